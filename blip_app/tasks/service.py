"""The three tasks as the UI, the API and the command line call them.

Validates text and settings before any model is touched, takes a model from the manager for the
length of the request, and runs the engine's phases. Nothing here branches on a model family: the
engine and the prompt styles carry that knowledge.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from blip_app.core.devices import LoadOptions
from blip_app.core.prompts import Turn, clean_text
from blip_app.core.settings import Limits, Preset, Task, resolve_settings
from blip_app.errors import BadImageError, BadInputError, PromptTooLongError
from blip_app.models.kinds import Captioner
from blip_app.models.loading import Loader
from blip_app.models.manager import ModelManager, ModelState

# A conversation's turns kept at most: more than any context holds (a formatted turn takes at least
# about 7 tokens, and the largest context 2,048).
MAX_HISTORY_TURNS = 500
# An earlier answer may be this many times as long as a message (the model writes more than people type).
ANSWER_CHARS_FACTOR = 4

_SURROGATE = re.compile("[\ud800-\udfff]")

log = logging.getLogger(__name__)

# What the first request would import (torch, transformers and the classes from_pretrained resolves lazily).
HEAVY_MODULES = ("blip_app.models.retrieval", "blip_app.models.engine")
HEAVY_CLASSES = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration", "Blip2ForImageTextRetrieval",
                 "Blip2Processor", "InstructBlipProcessor", "BlipImageProcessor", "GPT2Tokenizer", "T5Tokenizer",
                 "LlamaTokenizer", "BertTokenizer")


def import_models_in_background() -> threading.Thread:
    """Import torch, transformers and the model classes in a daemon thread, started now; returns the thread.

    The app imports them only when a model is first used, so that starting it and building the page stay
    quick; without this the first request would also pay for the imports (seconds on a CPU host). A
    request arriving meanwhile waits only for what is still being imported (Python's per-module import
    locks). A failure is logged; the request that needs the module then reports it.
    """
    def work() -> None:
        log.info("Importing torch and transformers in the background")
        started = time.monotonic()
        try:
            for name in HEAVY_MODULES:
                importlib.import_module(name)
            transformers = importlib.import_module("transformers")
            for name in HEAVY_CLASSES:
                getattr(transformers, name, None)  # transformers imports its model modules on first access
        except Exception:  # noqa: BLE001 - never fatal here
            log.exception("Importing the model libraries in the background failed")
            return
        log.info("Imported torch and transformers in the background in %.1f s", time.monotonic() - started)

    thread = threading.Thread(target=work, name="import-models", daemon=True)
    thread.start()
    return thread


def clean_message(text: Any, *, what: str, max_chars: int, allow_empty: bool = False) -> str:
    """The one cleaning of text people send: chat messages and questions, earlier turns, imported turns.

    :func:`prompts.clean_text` (type, length, NFC, control characters, spaces), after refusing a lone
    UTF-16 surrogate: JSON can carry one (``"\\ud800"``) but no tokenizer, encoder or page can use it,
    so it would break this request and every later one that carries the conversation.
    """
    if isinstance(text, str) and len(text) <= max_chars * 4 + 1024:  # longer: clean_text refuses it at once
        found = _SURROGATE.search(text)
        if found is not None:
            raise BadInputError(f"The {what} holds a broken character (an unpaired UTF-16 surrogate, "
                                f"U+{ord(found.group()):04X}, at character {found.start() + 1:,}); "
                                "please remove it or retype the text.")
    return clean_text(text, what=what, max_chars=max_chars, allow_empty=allow_empty)


def clean_turn(question: Any, answer: Any, *, max_chars: int, number: int | None = None) -> Turn:
    """An earlier turn of a conversation, cleaned and limited as chat limits it (``number``: named in errors)."""
    which = f" of turn {number}" if number is not None else ""
    return Turn(clean_message(question, what=f"earlier question{which}", max_chars=max_chars),
                clean_message(answer or "", what=f"earlier answer{which}", max_chars=max_chars * ANSWER_CHARS_FACTOR,
                              allow_empty=True))

# The cancel event of the request this thread is serving, for callers that cannot pass one down (the
# API functions, whose client may cancel or go away: see web/api.py, _stops_when_abandoned).
_REQUEST_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "blip_app_request_cancel", default=None)


@contextlib.contextmanager
def cancelled_by(cancel: threading.Event) -> Iterator[threading.Event]:
    """Within this block (and in threads started with a copy of its context), ``Service.run`` and
    ``Service.stream`` stop at the next token once ``cancel`` is set, unless given their own event."""
    token = _REQUEST_CANCEL.set(cancel)
    try:
        yield cancel
    finally:
        _REQUEST_CANCEL.reset(token)


@dataclass(frozen=True)
class Request:
    """A request validated without a model (:meth:`Service.request`): what the engine will be asked."""

    task: Task
    question: str = ""
    history: tuple[Turn, ...] = ()
    preset: Preset | str = Preset.STANDARD
    overrides: Mapping[str, Any] = field(default_factory=dict)
    short: bool = False
    detailed: bool = False
    older_turns: int = 0  # turns older than MAX_HISTORY_TURNS, dropped before cleaning


class Service:
    """Caption, answer and chat on the offered models."""

    def __init__(
        self,
        models: Sequence[str],
        options: LoadOptions = LoadOptions(),
        *,
        memory_budget_gb: float | None = None,
        limits: Limits = Limits(),
        max_message_chars: int = 2000,
        time_limit_s: float | None = None,
        manager: ModelManager | None = None,
    ) -> None:
        self.manager = manager or ModelManager(models, options, loader=Loader(), memory_budget_gb=memory_budget_gb)
        self.limits = limits
        self.max_message_chars = max_message_chars
        self.time_limit_s = time_limit_s

    # ---------------------------------------------------------------- models

    def models(self) -> list[ModelState]:
        """The offered models and their state."""
        return self.manager.states()

    def load(self, model: str) -> str:
        """Load ``model`` now (for the model picker); returns a line saying how it is held."""
        loaded = self.manager.get(model)
        notes = " ".join(loaded.plan.notes)
        return f"{model} is ready ({loaded.plan.precision_label} on {loaded.plan.device}). {notes}".strip()

    # ---------------------------------------------------------------- requests

    def request(
        self,
        task: Task,
        *,
        question: str = "",
        history: Sequence[Turn | Sequence[str]] = (),
        preset: Preset | str = Preset.STANDARD,
        overrides: Mapping[str, Any] | None = None,
        short: bool = False,
        detailed: bool = False,
    ) -> Request:
        """Validate everything that can be checked without a model; return the Request for the engine."""
        if task is not Task.CAPTION:
            question = clean_message(question, what="question" if task is Task.ANSWER else "message",
                                     max_chars=self.max_message_chars)
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise BadInputError("The history must be a list of [question, answer] pairs.")
        # Turns older than the newest MAX_HISTORY_TURNS can never fit a context; they are neither
        # cleaned nor tokenised (a client could send 200,000 of them), and count as dropped.
        older = max(0, len(history) - MAX_HISTORY_TURNS)
        turns = tuple(_turn(item, self.max_message_chars) for item in history[older:])
        resolve_settings(task, preset, overrides, limits=self.limits)  # fail fast, before loading a model
        return Request(task, question, turns, preset, dict(overrides or {}), short, detailed, older)

    def settings_for(self, loaded: Any, request: Request):
        """The validated decoding settings of a request on a loaded model: its family's task defaults,
        the preset, the checkpoint's saved settings and the request's overrides (settings.resolve_settings)."""
        return resolve_settings(request.task, request.preset, request.overrides,
                                checkpoint=loaded.checkpoint_generation, limits=self.limits,
                                traits=loaded.spec.traits, short=request.short)

    def _prepare(self, loaded: Any, request: Request):
        if not isinstance(loaded, Captioner):
            raise BadInputError(f"{loaded.name} is an image-text matching model: it gives trust scores and "
                                "search, not captions or answers. Choose a captioning model.")
        settings = self.settings_for(loaded, request)
        try:
            prepared = self._prompt(loaded, request, settings.max_new_tokens)
        except PromptTooLongError:
            if not loaded.spec.decoder_only:  # Flan-T5: the answer takes no room in the encoder's context
                raise
            prepared, settings = self._fit_answer(loaded, request, settings)
        if request.older_turns:
            plan = prepared.prompt
            prepared = dataclasses.replace(prepared, prompt=dataclasses.replace(
                plan, dropped_turns=plan.dropped_turns + request.older_turns))
        return prepared, settings

    @staticmethod
    def _prompt(loaded: Any, request: Request, max_new_tokens: int, *, history: bool = True):
        return loaded.prepare(request.task, question=request.question, history=request.history if history else (),
                              short=request.short, detailed=request.detailed, max_new_tokens=max_new_tokens,
                              preset=request.preset, overrides=request.overrides)

    def _fit_answer(self, loaded: Any, request: Request, settings: Any):
        """The prompt and settings with max_new_tokens lowered to what the context leaves, and a note saying so.

        A decoder-only language model's context holds the image tokens, the prompt and the answer; a preset
        asks for the same number of new tokens on every model (Detailed: 256), which a small context
        cannot hold. The answer then gets what is left after the image and the newest message alone (older
        chat turns are dropped first, as always); if not even one token is left, the prompt is too long.
        """
        spec = loaded.spec
        room = loaded.text_budget(0)  # prompt and answer tokens beside the image
        try:
            left = room - self._prompt(loaded, request, 0, history=False).prompt_tokens
        except PromptTooLongError:
            left = 0
        if left < 1 or left >= settings.max_new_tokens:
            what = {Task.CAPTION: "caption prompt", Task.ANSWER: "question"}.get(request.task, "message")
            raise PromptTooLongError(
                f"The {what} is too long for this model: beside the image ({spec.num_query_tokens:,} tokens), its "
                f"context of {spec.context_tokens:,} tokens holds at most {max(room - 1, 1):,} tokens of text and a "
                "one-token answer. Please shorten it.")
        fitted = dataclasses.replace(settings, max_new_tokens=left, min_new_tokens=min(settings.min_new_tokens, left))
        prepared = self._prompt(loaded, request, left)
        note = (f"Max new tokens lowered from {settings.max_new_tokens:,} to {left:,}: that is what this model's "
                f"context of {spec.context_tokens:,} tokens leaves after the image and the prompt.")
        plan = prepared.prompt
        return dataclasses.replace(prepared, prompt=dataclasses.replace(plan, notes=(*plan.notes, note))), fitted

    def run(self, model: str, image: Image.Image, request: Request, *,
            cancel: threading.Event | None = None):
        """Run a validated request to the end and return the engine's Reply."""
        cancel = cancel or _REQUEST_CANCEL.get()
        image = _checked(image)
        with self.manager.use(model) as loaded, getattr(loaded, "arriving", contextlib.nullcontext)():
            prepared, settings = self._prepare(loaded, request)
            return loaded.generate(image, prepared, settings, cancel=cancel, time_limit=self.time_limit_s)

    def events(self, model: str, image: Image.Image, request: Request, *, cancel: threading.Event | None = None,
               image_id: str | None = None) -> Iterator[Any]:
        """One pass for a request: the prepared prompt first (engine.Prepared, for the prompt inspector), then
        the Replies of :meth:`stream`. ``image_id`` is the image's digest when the caller has it already."""
        cancel = cancel or _REQUEST_CANCEL.get()
        image = _checked(image)
        with self.manager.use(model) as loaded:
            prepared, settings = self._prepare(loaded, request)
            yield prepared
            yield from loaded.stream(image, prepared, settings, cancel=cancel, time_limit=self.time_limit_s,
                                     image_id=image_id)

    def stream(self, model: str, image: Image.Image, request: Request, *,
               cancel: threading.Event | None = None, image_id: str | None = None) -> Iterator[Any]:
        """Yield Replies with the text so far, then the final one. Beam search yields only the final one."""
        events = self.events(model, image, request, cancel=cancel, image_id=image_id)
        try:
            next(events)  # the prepared prompt
            yield from events
        finally:
            events.close()

    def inspect(self, model: str, request: Request):
        """The exact prompt a request would send and its token counts (loads the model if needed)."""
        with self.manager.use(model) as loaded:
            prepared, _ = self._prepare(loaded, request)
            return prepared

    # ---------------------------------------------------------------- conveniences

    def caption(self, model: str, image: Image.Image, *, preset: Preset | str = Preset.STANDARD,
                overrides: Mapping[str, Any] | None = None, detailed: bool = False):
        """Caption an image."""
        return self.run(model, image, self.request(Task.CAPTION, preset=preset, overrides=overrides,
                                                    detailed=detailed))

    def answer(self, model: str, image: Image.Image, question: str, *, preset: Preset | str = Preset.STANDARD,
               overrides: Mapping[str, Any] | None = None, short: bool = False):
        """Answer a question about an image."""
        return self.run(model, image, self.request(Task.ANSWER, question=question, preset=preset,
                                                    overrides=overrides, short=short))

    def chat(self, model: str, image: Image.Image, history: Sequence[Turn | Sequence[str]], message: str, *,
             preset: Preset | str = Preset.STANDARD, overrides: Mapping[str, Any] | None = None):
        """Answer the newest message of a conversation about an image."""
        return self.run(model, image, self.request(Task.CHAT, question=message, history=history, preset=preset,
                                                    overrides=overrides))


def _turn(item: Turn | Sequence[str], max_chars: int) -> Turn:
    if isinstance(item, Turn):
        question, answer = item.question, item.answer
    else:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise BadInputError("Each history entry must be a [question, answer] pair.")
        question, answer = item
    return clean_turn(question, answer, max_chars=max_chars)


def _checked(image: Any) -> Image.Image:
    if image is None:
        raise BadImageError("No image was given. Please upload an image first.")
    if not isinstance(image, Image.Image):
        from blip_app.core.images import load_image

        return load_image(image)
    return image
