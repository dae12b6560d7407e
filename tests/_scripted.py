"""A scripted captioning model, handed to the manager through its Loader, for tests of the layers above.

It satisfies ``models.kinds.Captioner`` and builds its prompts with ``core.prompts`` exactly as the
engine does (a word counts as a token), but its answers come from a script: by default it names the
model, the task and the newest question, so a test can check what reached the model and which model
answered. Sampling with a seed gives a different, reproducible answer per seed. It streams word by
word with a short pause and stops at the next word when cancelled, like the engine.

The engine itself is never tested through this: its own tests (and the reference tests) load real tiny
checkpoints through the default Loader.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from blip_app.core import prompts
from blip_app.core.catalog import Family, LanguageModel, ModelRef, PromptStyle
from blip_app.core.devices import LoadPlan
from blip_app.core.settings import GenerationSettings, Task
from blip_app.errors import CancelledError, PromptTooLongError
from blip_app.models.engine import ModelSpec, Prepared, Reply
from blip_app.models.loading import Loader


@dataclass(frozen=True)
class ScriptedPrepared(Prepared):
    """The engine's Prepared, and the question it was prepared for (what a script answers)."""

    question: str = ""


Script = Callable[[ScriptedPrepared, GenerationSettings, str], str]  # (prepared, settings, model name) -> answer


def default_script(prepared: ScriptedPrepared, settings: GenerationSettings, name: str) -> str:
    """'<name> <task>: <newest question>', plus the seed when sampling."""
    said = prepared.question or "the picture"
    seed = f" (seed {settings.seed})" if settings.do_sample else ""
    return f"{name} {prepared.task.value}: {said}{seed}"


@dataclass
class ScriptedModel:
    """A Captioner without weights (see the module docstring)."""

    name: str
    spec: ModelSpec
    script: Script = default_script
    word_delay_s: float = 0.01
    checkpoint_generation: dict[str, Any] | None = None
    model: Any = None  # no weights: the manager counts a footprint of 0
    plan: LoadPlan = LoadPlan(device="cpu", dtype="float32", quantization="none", device_map=None)

    def __post_init__(self) -> None:
        self.checkpoint_generation = dict(self.checkpoint_generation or {})
        self.calls: list[ScriptedPrepared] = []

    @property
    def cache_bytes(self) -> int:
        return 0

    def clear_caches(self) -> None:
        return None

    def prepare(self, task: Task, *, question: str = "", history: Sequence[prompts.Turn] = (),
                short: bool = False, detailed: bool = False, max_new_tokens: int = 30, preset: Any = None,
                overrides: Any = None) -> ScriptedPrepared:
        style = self.spec.prompt_style
        budget = self.spec.context_tokens - self.spec.num_query_tokens
        if self.spec.decoder_only:
            budget -= max_new_tokens
        if task is Task.CAPTION:
            plan = prompts.caption_prompt(style, detailed=detailed)
        elif task is Task.ANSWER:
            plan = prompts.answer_prompt(style, question, short=short)
        else:
            plan = prompts.fit_chat(style, history, question, count_tokens=_words, budget=budget)
        tokens = _words(plan.text)
        if tokens > budget:
            raise PromptTooLongError(f"The question is {tokens:,} tokens long, but this model can take at most "
                                     f"{max(budget, 0):,} tokens of text.")
        ids = (0,) * self.spec.num_query_tokens + tuple(range(1, tokens + 1))
        return ScriptedPrepared(task, plan, ids, None, tokens, self.spec.context_tokens, self.spec.num_query_tokens,
                                question=question)

    def generate(self, image: Any, prepared: Prepared, settings: GenerationSettings, *,
                 on_text: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                 time_limit: float | None = None, lock_timeout: float | None = None,
                 image_id: str | None = None) -> Reply:
        self.calls.append(prepared)
        words = self.script(prepared, settings, self.name).split()[: settings.max_new_tokens]
        started = time.monotonic()
        for count in range(1, len(words) + 1):
            if cancel is not None and cancel.wait(self.word_delay_s):
                raise CancelledError("The request was cancelled.")
            if on_text is not None and settings.streams:
                on_text(" ".join(words[:count]))
        return Reply(text=" ".join(words), model=self.name, prompt=prepared.prompt.text,
                     prompt_tokens=prepared.prompt_tokens, image_tokens=prepared.image_tokens,
                     context_tokens=prepared.context_tokens, dropped_turns=prepared.prompt.dropped_turns,
                     new_tokens=len(words), seconds=time.monotonic() - started, settings=settings)

    def stream(self, image: Any, prepared: Prepared, settings: GenerationSettings, *,
               cancel: threading.Event | None = None, **options: Any) -> Iterator[Reply]:
        seen: list[str] = []
        final = self.generate(image, prepared, settings, on_text=seen.append, cancel=cancel, **options)
        partial = replace(final, finished=False)
        for text in seen:  # replayed after the fact: enough for handlers, which only see the sequence
            yield replace(partial, text=text)
        yield final


def _words(text: str) -> int:
    return len(text.split()) + 1  # and an end-of-sequence token


# The published checkpoints' shapes that matter to prompts: query tokens and context.
SPECS = {
    "blip2-opt": ModelSpec(Family.BLIP2, LanguageModel.OPT, PromptStyle.BLIP2, 32, 2048, None),
    "blip2-flan-t5": ModelSpec(Family.BLIP2, LanguageModel.FLAN_T5, PromptStyle.BLIP2, 32, 512, None),
    "instructblip-flan-t5": ModelSpec(Family.INSTRUCTBLIP, LanguageModel.FLAN_T5, PromptStyle.INSTRUCTBLIP, 32, 512,
                                      128),
    "instructblip-vicuna": ModelSpec(Family.INSTRUCTBLIP, LanguageModel.VICUNA, PromptStyle.INSTRUCTBLIP, 32, 2048,
                                     128),
}


def scripted_loader(kinds: dict[str, str], *, script: Script = default_script, word_delay_s: float = 0.01,
                    loaded: list[ScriptedModel] | None = None) -> Loader:
    """A Loader offering names from ``kinds`` (name -> a key of SPECS) as scripted models; no downloads.

    Loaded models are appended to ``loaded`` when given, so a test can read what each model was asked.
    """

    def resolve(name: str) -> ModelRef:
        name = name.strip()
        if name not in kinds:
            from blip_app.errors import UnknownModelError

            raise UnknownModelError(f"Unknown model: {name}.")
        return ModelRef(name=name, source=name, entry=None, is_local=True)

    def load(ref: ModelRef, options: Any, **_: Any) -> ScriptedModel:
        model = ScriptedModel(ref.name, SPECS[kinds[ref.name]], script=script, word_delay_s=word_delay_s)
        if loaded is not None:
            loaded.append(model)
        return model

    return Loader(load=load, resolve=resolve, fetch=lambda ref, options: ref.source,
                  is_cached=lambda repo, cache_dir=None: True)
