"""The Chat, Caption and Ask tabs, the model picker's handlers and the API endpoints for scripts
(``/caption``, ``/answer``, ``/chat``, ``/models``; ``/trust``, ``/search``, ``/embed`` and the Compare,
Search and Batch tabs are in web/tools.py, and web/page.py composes the page); :func:`launch` starts the
server. The Service validates every request, picks the model and runs it; nothing here branches on a model family.

How this module keeps its promises:

- **Images are decoded by blip_app only.** ``gr.Image.preprocess`` calls ``PIL.Image.open`` with every
  Pillow plugin even for ``type="filepath"`` (gradio/image_utils.py, ``preprocess_image``), so every
  event that takes the image runs with ``preprocess=False``: the handler receives the upload's file
  record, whose path gradio has checked to lie in its upload folder, checks that again, and hands the
  path to :func:`blip_app.core.images.load_image` (allow-list, size limits).
- **Text is inert.** gradio renders Chatbot messages as Markdown and then as (sanitised) HTML, which still
  lets ``<img src=...>``, ``![](url)``, forms and links through; toasts render HTML. Chat text is
  therefore escaped for Markdown (:func:`inert`) and toast sentences for HTML (:func:`_toast_text`).
- **Session state is plain data** that deep-copies: ``{"image": digest or None, "turns": [[q, a], ...]}``.
  Running answers are found by the browser session's id so that Stop can end them (:class:`_Running`).
- **Errors never lose the conversation.** Every handler catches everything: a BlipAppError shows its
  sentence, anything else is logged with its traceback and shows :func:`errors.user_message`.

Type hints here are evaluated at run time by gradio (``gr.api`` reads the return annotation without
resolving strings), so this module does not use ``from __future__ import annotations``.
"""

import contextlib
import html
import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

# Read by gradio when it is imported and when an app launches; an operator may still set it to True.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import spaces  # noqa: E402
from gradio.data_classes import FileData  # noqa: E402
from gradio.utils import get_upload_folder, is_in_or_equal  # noqa: E402

from blip_app.config import AppConfig  # noqa: E402
from blip_app.core.images import ImageLimits, image_digest, install_pillow_limits, load_image  # noqa: E402
from blip_app.core.settings import PRESET_HELP, Limits, Preset, Task, preset_settings  # noqa: E402
from blip_app.errors import BadImageError, BadInputError, BlipAppError, CancelledError, user_message  # noqa: E402
from blip_app.models.manager import ModelState  # noqa: E402
from blip_app.tasks.service import Request, Service  # noqa: E402
from blip_app.web.common import captioning_only
from blip_app.web.ratelimit import RateLimiter  # noqa: E402

log = logging.getLogger(__name__)

TITLE = "Talk with images"
TAGLINE = "Caption a photo, ask questions about it, or chat about it, with the BLIP-2 and InstructBLIP models."
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"  # the repository's assets/

# On a CPU greedy decoding is the one that streams, so chat starts there; captions and answers use the
# papers' beam search.
DEFAULT_PRESET = {Task.CHAT: Preset.FAST, Task.CAPTION: Preset.STANDARD, Task.ANSWER: Preset.STANDARD}
PRESET_LABELS = {Preset.STANDARD: "Standard (beam search)", Preset.FAST: "Fast (streams)",
                 Preset.DETAILED: "Detailed"}

# Generation events per event type that may run at once. The engine's device lock already keeps one
# generation per device; a second slot lets a request load its model or validate while another generates.
CONCURRENCY = 2

PresetName = Literal["standard", "fast", "detailed"]
assert set(get_args(PresetName)) == {p.value for p in Preset}, "PresetName must list every Preset"

THINKING = "*thinking…*"
CURSOR = " ▍"
EMPTY_ANSWER = "*(the model gave an empty answer)*"
NO_PROMPT = "(nothing yet: the prompt appears here when a request runs, or press Preview)"
EMPTY_PROMPT = "(empty: the model sees only the image tokens)"

PRIVATE: dict[str, Any] = {"api_visibility": "private"}
# Handlers that only reshuffle session data: never queued behind generations.
LIGHT: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
# Handlers that decode an upload (an image of up to 40 megapixels: 120 MB decoded; a conversation file) but
# run no model: a few at a time across the whole server, so that a burst of uploads queues instead of
# decoding all at once.
DECODE: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": CONCURRENCY, "concurrency_id": "decode",
                          "show_progress": "hidden"}
# Model loads one client may start: at real size each reads gigabytes and may evict someone else's model.
LOADS_PER_MINUTE_SHARE = 6  # a sixth of the request rate
LOAD_BURST = 3
LOAD_MESSAGE = ("Models are being switched too often from here: each switch loads gigabytes. Please wait {wait:.0f} s "
                "before loading another model.")

CSS = """
.gradio-container { width: 100% !important; max-width: 1240px !important; margin: 0 auto !important; }
#header h1 { margin-bottom: 0.1em; }
#header p { margin-top: 0; color: var(--body-text-color-subdued); }
#model-status p { margin: 0.35em 0; }
.note p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0.2em 0; }
"""


@dataclass(frozen=True)
class Example:
    """A photo in assets/examples with a question for the Ask tab and an opening line for the chat."""

    file: str
    question: str
    opener: str


EXAMPLES = (
    Example("chelsea.jpg", "What color is the cat?", "What animal is this, and what is it doing?"),
    Example("astronaut.jpg", "What is she wearing?", "Who might this person be?"),
    Example("rocket.jpg", "What is happening in this picture?", "Where could this photo have been taken?"),
    Example("coffee.jpg", "What is in the cup?", "Describe the drink in detail."),
    Example("hubble_deep_field.jpg", "What are the bright dots?", "What does this picture show?"),
)


# --------------------------------------------------------------------------------------------------
# Plain helpers: text, images, settings


_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def inert(text: str) -> str:
    """Markdown source that the Chatbot shows exactly as ``text`` reads: no HTML, links, images, code or maths.

    Every ASCII punctuation mark is backslash-escaped (CommonMark renders each as itself), which also
    defeats GFM's bare-URL and e-mail autolinks. Lines are trimmed so that indentation cannot make a
    code block. Chatbot copy buttons are off because they would copy the escapes.
    """
    lines = (line.strip() for line in str(text).splitlines())
    return "\n".join(_ASCII_PUNCTUATION.sub(r"\\\1", line) for line in lines)


def _toast_text(text: str) -> str:
    """A sentence for gr.Warning / gr.Error, which render their message as (sanitised) HTML."""
    return html.escape(text, quote=False)


def _notify(exc: BaseException) -> None:
    """Show an exception to the person: our errors with their sentence, bugs logged with traceback."""
    if isinstance(exc, BlipAppError):
        log.info("Refused: %s", exc)
        gr.Warning(_toast_text(str(exc)))
    else:
        log.exception("Unexpected error in a UI handler")
        gr.Warning(_toast_text(user_message(exc)))


def _api_error(exc: BaseException) -> gr.Error:
    """The gr.Error that carries an exception's sentence to an API client, as plain text.

    API endpoints are called by scripts (gradio_client, HTTP), never rendered by the page: the sentence
    is sent as written (``<`` stays ``<``); the page's toasts escape theirs (:func:`_toast_text`).
    """
    if isinstance(exc, BlipAppError):
        log.info("API request refused: %s", exc)
    else:
        log.exception("Unexpected error in an API endpoint")
    return gr.Error(user_message(exc), print_exception=False)


def model_name(value: Any) -> str:
    """The model an API call names, or a BadInputError saying what came instead of a name."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, str):
        raise BadInputError("The model name is empty; give one of the names that /models lists.")
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    raise BadInputError(f"The model must be given by its name, as text (one of the names /models lists), "
                        f"not {type(value).__name__} {shown}.")


def uploaded_path(value: Any) -> str:
    """The file path of an uploaded image as gradio hands it over with ``preprocess=False``.

    gradio has already refused paths outside its upload folder for file records (those whose ``meta``
    names ``gradio.FileData``); anything else (a bare path string, a record without ``meta``) never went
    through that check, so the folder is checked here again. Raises BadImageError.
    """
    if value is None:
        raise BadImageError("No image was given. Please upload an image first.")
    path = value.get("path") if isinstance(value, Mapping) else None
    if not isinstance(path, str) or not path:
        raise BadImageError("The image must be sent as an uploaded file (gradio_client: handle_file(path)).")
    if not is_in_or_equal(path, get_upload_folder()):
        raise BadImageError("The image must be sent as an uploaded file (gradio_client: handle_file(path)).")
    return path


def split_settings(task: Task, settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset and the overrides of a settings panel: only the values that differ from the preset's.

    Untouched sliders thus leave the preset (and, for the standard preset, the checkpoint's own saved
    settings) in charge; the Service validates whatever is sent.
    """
    values = dict(settings)
    preset = values.pop("preset", None) or DEFAULT_PRESET[task].value
    try:
        defaults = preset_settings(task, Preset(preset))
    except ValueError:
        return preset, values  # the Service names the unknown preset
    overrides = {name: value for name, value in values.items()
                 if value is not None and value != getattr(defaults, name, None)}
    return preset, overrides


def describe_settings(settings: Any) -> str:
    """One line for the decoding settings a reply used."""
    if settings.do_sample:
        how = f"sampling (temperature {settings.temperature:g}, top-p {settings.top_p:g})"
    elif settings.num_beams > 1:
        how = f"beam search ({settings.num_beams} beams)"
    else:
        how = "greedy"
    return f"{how}, up to {settings.max_new_tokens} new tokens"


def prompt_stats(prepared: Any, reply: Any = None) -> str:
    """Markdown: the token counts of a prepared prompt against the model's limit, and how the reply went."""
    lines = [
        f"**{prepared.total_tokens:,}** tokens go in ({prepared.image_tokens:,} image tokens + "
        f"{prepared.prompt_tokens:,} prompt tokens); the model takes at most **{prepared.context_tokens:,}**."
    ]
    plan = prepared.prompt
    if plan.dropped_turns:
        lines.append(f"{plan.dropped_turns} oldest turn(s) left out to fit; {plan.kept_turns} kept.")
    if prepared.qformer_text is not None:
        lines.append(f"Instruction read by the Q-Former: {inert(prepared.qformer_text) or '(none)'}")
    if reply is not None:
        lines.append(f"Answer: {reply.new_tokens} new tokens in {reply.seconds:.2f} s, "
                     f"{describe_settings(reply.settings)}.")
    return "\n\n".join(lines)


def reply_note(reply: Any) -> str:
    """Markdown for what the person should know about a finished reply (dropped turns, early stop)."""
    notes = []
    if reply.dropped_turns:
        notes.append(f"The {reply.dropped_turns} oldest turn(s) no longer fit in the model's context: "
                     "this answer was written without them.")
    if reply.stopped_early == "time limit":
        notes.append("The answer was cut short at the server's time limit.")
    return "\n\n".join(notes)


def model_choices(states: Sequence[ModelState]) -> list[tuple[str, str]]:
    """Dropdown choices: (label with the model's state, model name)."""
    words = {"loaded": "loaded", "parked": "in CPU memory", "loading": "loading…", "on disk": "downloaded",
             "folder": "local folder"}
    return [(f"{state.label} · {words.get(state.state, state.detail)}", state.name) for state in states]


def model_status(states: Sequence[ModelState], name: str) -> str:
    """Markdown: the chosen model's state and description."""
    headline = {"loaded": "Ready", "parked": "Ready soon", "loading": "Loading", "on disk": "Not loaded",
                "folder": "Not loaded", "download": "Not downloaded"}
    for state in states:
        if state.name == name:
            return (f"**{headline.get(state.state, 'Not loaded')}**: {inert(state.detail)}.\n\n"
                    f"{inert(state.description)}")
    return "Choose a model."


def captioning_states(service: Service) -> list[ModelState]:
    """The offered models that caption and answer (the picker, /models): the image-text matching model is left out."""
    return captioning_only(service, service.models())


def chat_messages(turns: Sequence[Sequence[str]], pending: tuple[str, str] | None = None) -> list[dict[str, str]]:
    """Chatbot messages for the finished turns and, while an answer is being written, the pending one."""
    messages = []
    for question, answer in turns:
        messages.append({"role": "user", "content": inert(question)})
        messages.append({"role": "assistant", "content": inert(answer) or EMPTY_ANSWER})
    if pending is not None:
        question, shown = pending
        messages.append({"role": "user", "content": inert(question)})
        messages.append({"role": "assistant", "content": shown})
    return messages


def new_chat(image: str | None = None) -> dict[str, Any]:
    """A conversation's session state: plain data only."""
    return {"image": image, "turns": []}


@dataclass
class _Job:
    """An answer being written: Stop sets ``cancel``; a new image also marks it ``superseded``."""

    cancel: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False


class _Running:
    """The answers being written, by browser session and tab, so that Stop and a new image can end them.

    Plain dictionary operations (atomic in CPython); no lock is held by the UI.
    """

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], _Job] = {}

    def start(self, session: str, task: Task) -> _Job:
        """Register this session's new answer in ``task``."""
        job = _Job()
        self._jobs[(session, task.value)] = job
        return job

    def stop(self, session: str, task: Task, *, superseded: bool = False) -> None:
        """Ask the running answer, if any, to stop at its next token."""
        job = self._jobs.get((session, task.value))
        if job is not None:
            job.superseded = job.superseded or superseded
            job.cancel.set()

    def finish(self, session: str, task: Task, job: _Job) -> None:
        """Forget ``job`` unless a newer answer has replaced it."""
        if self._jobs.get((session, task.value)) is job:
            del self._jobs[(session, task.value)]


def loads_limiter(limiter: RateLimiter) -> RateLimiter:
    """The stricter limit on model loads that goes with the request limit ``limiter`` (none if it has none)."""
    per_minute = round(limiter.rate * 60)
    if per_minute <= 0:
        return RateLimiter(0)
    return RateLimiter(max(1, per_minute // LOADS_PER_MINUTE_SHARE), burst=LOAD_BURST, message=LOAD_MESSAGE)


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def client_key(request: gr.Request | None) -> str:
    """Who is asking, for the rate limit: the logged-in user, else the client's address.

    Any client can write X-Forwarded-For, so only what a trusted proxy added counts. On a Space the app
    sits behind Hugging Face's proxy, which appends the address it saw: the last entry (the ones before
    it are whatever the client sent). Elsewhere the web server replaces the peer address from the header
    only for the proxies given with ``--trusted-proxy`` (see :func:`launch`), so the peer address is used.
    """
    if request is None:
        return "anonymous"
    if getattr(request, "username", None):
        return f"user:{request.username}"
    if os.environ.get("SPACE_ID"):
        headers = request.headers or {}
        forwarded = headers.get("x-forwarded-for", "") if hasattr(headers, "get") else ""
        entries = [entry.strip() for entry in forwarded.split(",") if entry.strip()]
        if entries:
            return entries[-1]
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "anonymous"


# --------------------------------------------------------------------------------------------------
# Components that several handlers fill


@dataclass
class SettingsPanel:
    """The decoding settings of one tab; ``controls`` maps preset and setting names to components."""

    task: Task
    controls: dict[str, Any]


@dataclass
class Inspector:
    """The prompt inspector of one tab."""

    prompt: Any
    stats: Any
    preview: Any


def settings_panel(task: Task, limits: Limits) -> SettingsPanel:
    """The 'Decoding settings' accordion, starting at the task's default preset. Bounds come from Limits."""
    preset = DEFAULT_PRESET[task]
    values = preset_settings(task, preset)
    with gr.Accordion("Decoding settings", open=False):
        controls: dict[str, Any] = {
            "preset": gr.Radio([(PRESET_LABELS[p], p.value) for p in Preset], value=preset.value,
                               label="Preset", info=PRESET_HELP[preset]),
        }
        with gr.Row():
            controls["max_new_tokens"] = gr.Slider(1, limits.max_new_tokens, step=1, label="Max new tokens",
                                                   value=min(values.max_new_tokens, limits.max_new_tokens))
            controls["min_new_tokens"] = gr.Slider(0, limits.max_new_tokens, step=1, label="Min new tokens",
                                                   value=min(values.min_new_tokens, limits.max_new_tokens))
        with gr.Row():
            controls["num_beams"] = gr.Slider(1, limits.num_beams, step=1, label="Beams",
                                              value=min(values.num_beams, limits.num_beams),
                                              info="1 = greedy: the answer appears as it is written")
            controls["length_penalty"] = gr.Slider(-5.0, 5.0, step=0.1, value=values.length_penalty,
                                                   label="Length penalty", interactive=values.num_beams > 1,
                                                   info="beam search only; below 0 favours shorter output")
        with gr.Row():
            controls["do_sample"] = gr.Checkbox(value=values.do_sample, label="Sampling",
                                                info="pick words at random instead of the likeliest")
            controls["temperature"] = gr.Slider(0.05, 2.0, step=0.05, value=values.temperature,
                                                label="Temperature", interactive=values.do_sample)
            controls["top_p"] = gr.Slider(0.05, 1.0, step=0.05, value=values.top_p, label="Top-p",
                                          interactive=values.do_sample)
        controls["repetition_penalty"] = gr.Slider(0.5, 3.0, step=0.05, value=values.repetition_penalty,
                                                   label="Repetition penalty", info="above 1 discourages repeats")
    panel = SettingsPanel(task, controls)
    _wire_settings(panel, limits)
    return panel


def _wire_settings(panel: SettingsPanel, limits: Limits) -> None:
    c = panel.controls
    sliders = ["max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
               "repetition_penalty", "length_penalty"]

    def apply_preset(preset: str) -> tuple[Any, ...]:
        try:
            chosen = Preset(preset)
        except ValueError:
            return tuple(gr.skip() for _ in range(len(sliders) + 1))
        values = preset_settings(panel.task, chosen)
        caps = {"max_new_tokens": limits.max_new_tokens, "min_new_tokens": limits.max_new_tokens,
                "num_beams": limits.num_beams}
        updates = [min(getattr(values, name), caps[name]) if name in caps else getattr(values, name)
                   for name in sliders]
        return (gr.Radio(info=PRESET_HELP[chosen]), *updates)

    c["preset"].change(apply_preset, c["preset"], [c["preset"], *(c[name] for name in sliders)], **LIGHT)
    c["do_sample"].change(lambda on: (gr.Slider(interactive=on), gr.Slider(interactive=on)),
                          c["do_sample"], [c["temperature"], c["top_p"]], **LIGHT)
    c["num_beams"].change(lambda beams: gr.Slider(interactive=(beams or 1) > 1),
                          c["num_beams"], c["length_penalty"], **LIGHT)


def inspector() -> Inspector:
    """The 'Prompt inspector' accordion: the exact text sent to the model and its token counts."""
    with gr.Accordion("Prompt inspector", open=False):
        prompt = gr.Textbox(label="Text sent to the language model, after the image tokens", value=NO_PROMPT,
                            lines=3, max_lines=12, interactive=False, buttons=["copy"])
        stats = gr.Markdown("", elem_classes="note")
        preview = gr.Button("Preview the prompt", size="sm")
    return Inspector(prompt, stats, preview)


# --------------------------------------------------------------------------------------------------
# Handlers


class Handlers:
    """The functions behind the page's events. Each takes and returns plain values."""

    def __init__(self, service: Service, image_limits: ImageLimits, limiter: RateLimiter,
                 load_limiter: RateLimiter | None = None) -> None:
        self.service = service
        self.image_limits = image_limits
        self.limiter = limiter
        self.load_limiter = load_limiter or loads_limiter(limiter)
        self.running = _Running()

    # ---------------------------------------------------------------- shared pieces

    def picture(self, value: Any) -> Any:
        """The uploaded image, decoded by blip_app.core.images.load_image (raises BadImageError)."""
        return load_image(uploaded_path(value), self.image_limits)

    def models_view(self, model: str) -> tuple[Any, str]:
        """The model picker's choices and the chosen model's status line."""
        states = captioning_states(self.service)
        return gr.Dropdown(choices=model_choices(states)), model_status(states, model)

    def refresh_models(self, model: str) -> tuple[Any, str]:
        """Event: show every model's current state (page load, after each request)."""
        try:
            return self.models_view(model)
        except Exception as exc:  # noqa: BLE001 - shown, never raised into gradio
            _notify(exc)
            return gr.skip(), gr.skip()

    def load_model(self, model: str, request: gr.Request,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[Any, str]:
        """Event: load the model just chosen, with a progress bar while it downloads and loads.

        Counted by the rate limit, and a model not already loaded also by the stricter one for loads (a
        load at real size reads gigabytes and may evict another user's model).
        """
        try:
            self.limiter.check(client_key(request))
            if model not in self.service.manager.loaded_names():
                self.load_limiter.check(client_key(request))
            progress(0, desc=f"Loading {model}…")
            self.service.load(model)
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
        return self.refresh_models(model)

    def _prepare(self, model: str, request: Request, progress: gr.Progress) -> Any:
        """Service.inspect, which loads the model first if needed (with the progress bar)."""
        self._announce_load(model, progress)
        return self.service.inspect(model, request)

    def _announce_load(self, model: str, progress: gr.Progress) -> None:
        """Start the progress bar when ``model`` is about to be loaded for a request."""
        if not any(s.name == model and s.state == "loaded" for s in self.service.models()):
            progress(0, desc=f"Loading {model}…")

    def stop(self, request: gr.Request, task: Task) -> None:
        """Event: stop this session's running answer in ``task`` at its next token."""
        self.running.stop(_session(request), task)

    # ---------------------------------------------------------------- chat

    def on_image(self, image: Any, chat: dict[str, Any], request: gr.Request) -> tuple[Any, ...]:
        """Event: a new image (upload or example) starts a new conversation and stops a running answer.

        Outputs: image, chat state, chatbot, note, regenerate, undo, clear. Removing the image keeps the
        conversation (the same picture uploaded again continues it); an unreadable upload is removed.
        """
        unchanged = tuple(gr.skip() for _ in range(7))
        if image is None:
            return unchanged
        try:
            self.limiter.check(client_key(request))  # decoding a 40-megapixel upload costs 120 MB
        except Exception as exc:  # noqa: BLE001 - the picture stays; the next message checks it again
            _notify(exc)
            return unchanged
        try:
            digest = image_digest(self.picture(image))
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            return (None, *unchanged[1:])
        if digest == chat.get("image"):
            return unchanged
        self.running.stop(_session(request), Task.CHAT, superseded=True)
        return (gr.skip(), new_chat(digest), [], "", *_history_buttons(False))

    def chat_send(self, message: str, chat: dict[str, Any], image: Any, model: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: answer a new message, streaming the answer (beam search shows a placeholder instead)."""
        yield from _settling(self._chat_turn(message, chat, chat, image, model, settings, _session(request),
                                             progress, client_key(request)))

    def chat_regenerate(self, chat: dict[str, Any], image: Any, model: str, request: gr.Request,
                        progress: gr.Progress = gr.Progress(track_tqdm=True),
                        **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: ask the last question again, replacing its answer."""
        turns = chat.get("turns") or []
        if not turns:
            gr.Info("There is no answer to regenerate yet.")
            yield _chat_view(chat)
            return
        earlier = {**chat, "turns": turns[:-1]}
        yield from _settling(self._chat_turn(turns[-1][0], earlier, chat, image, model, settings,
                                             _session(request), progress, client_key(request)))

    def history_buttons(self, chat: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Event (after each answer has completed): Regenerate, Undo and Clear work when there are turns."""
        return _history_buttons(bool(chat.get("turns")))

    def chat_undo(self, chat: dict[str, Any]) -> tuple[Any, ...]:
        """Event: remove the last turn and put its question back in the message box."""
        turns = chat.get("turns") or []
        if not turns:
            return _chat_view(chat)
        chat = {**chat, "turns": turns[:-1]}
        return _chat_view(chat, message=turns[-1][0], note="")

    def chat_clear(self, chat: dict[str, Any], request: gr.Request) -> tuple[Any, ...]:
        """Event: forget the conversation (the image stays); an answer being written is dropped."""
        self.running.stop(_session(request), Task.CHAT, superseded=True)
        return _chat_view(new_chat(chat.get("image")), note="")

    def chat_preview(self, message: str, chat: dict[str, Any], image: Any, model: str, request: gr.Request,
                     progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the prompt the message box would send, without generating."""
        turns = chat.get("turns") or []
        return self._preview(Task.CHAT, model, settings, progress, request, question=message or "…", history=turns)

    def _chat_turn(self, message: str, chat: dict[str, Any], original: dict[str, Any], image: Any, model: str,
                   settings: Mapping[str, Any], session: str, progress: gr.Progress,
                   client: str) -> Iterator[tuple[Any, ...]]:
        """Answer ``message`` after ``chat``'s turns; on any failure show ``original`` again, unchanged."""
        try:
            self.limiter.check(client)
            picture = self.picture(image)
            digest = image_digest(picture)
            if digest != chat.get("image"):  # the image changed under a running page: a new conversation
                chat = original = new_chat(digest)
            preset, overrides = split_settings(Task.CHAT, settings)
            request = self.service.request(Task.CHAT, question=message, history=chat["turns"], preset=preset,
                                           overrides=overrides)
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield _chat_view(original)
            return
        job = self.running.start(session, Task.CHAT)
        answer = self._chat_answer(request, chat, original, message, picture, digest, model, job.cancel, progress)
        try:
            for view in answer:
                if job.superseded:
                    break
                yield view
        finally:
            answer.close()
            self.running.finish(session, Task.CHAT, job)
        if job.superseded:  # a new image arrived meanwhile: its new, empty conversation wins
            yield _chat_view(new_chat(), note="")

    def _chat_answer(self, request: Request, chat: dict[str, Any], original: dict[str, Any], message: str,
                     picture: Any, digest: str, model: str, cancel: threading.Event,
                     progress: gr.Progress) -> Iterator[tuple[Any, ...]]:
        """The views of one validated chat turn, from the pending question to the finished answer: one pass
        through the service, whose first event is the prepared prompt (for the inspector)."""
        question = request.question
        text = ""
        events = self.service.events(model, picture, request, cancel=cancel, image_id=digest)
        try:
            yield _chat_view(chat, pending=(question, THINKING), busy=True, message="", note="")
            self._announce_load(model, progress)
            prepared = next(events)
            yield _chat_view(chat, pending=(question, THINKING), busy=True,
                             prompt=prepared.prompt.text or EMPTY_PROMPT, stats=prompt_stats(prepared))
            for reply in events:
                text = reply.text
                if not reply.finished:
                    yield _chat_view(chat, pending=(question, inert(text) + CURSOR), busy=True)
                    continue
                done = {**chat, "turns": [*chat["turns"], [question, reply.text]]}
                yield _chat_view(done, note=reply_note(reply), stats=prompt_stats(prepared, reply))
        except CancelledError:
            if text:
                done = {**chat, "turns": [*chat["turns"], [question, text]]}
                yield _chat_view(done, note="Stopped: the last answer is incomplete.")
            else:
                yield _chat_view(original, message=message, note="Stopped before the model answered.")
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield _chat_view(original, message=message)
        finally:
            events.close()

    # ---------------------------------------------------------------- caption and ask

    def run_caption(self, image: Any, model: str, style: str, request: gr.Request,
                    progress: gr.Progress = gr.Progress(track_tqdm=True),
                    **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: caption the image."""
        yield from self._single(Task.CAPTION, image, model, settings, request, progress,
                                detailed=style == "detailed")

    def run_ask(self, question: str, short: bool, image: Any, model: str, request: gr.Request,
                progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: answer a question about the image."""
        yield from self._single(Task.ANSWER, image, model, settings, request, progress,
                                question=question, short=bool(short))

    def caption_preview(self, model: str, style: str, request: gr.Request,
                        progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the caption prompt without generating."""
        return self._preview(Task.CAPTION, model, settings, progress, request, detailed=style == "detailed")

    def ask_preview(self, question: str, short: bool, model: str, request: gr.Request,
                    progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the question's prompt without generating."""
        return self._preview(Task.ANSWER, model, settings, progress, request, question=question, short=bool(short))

    def _single(self, task: Task, image: Any, model: str, settings: Mapping[str, Any], request: gr.Request,
                progress: gr.Progress, **inputs: Any) -> Iterator[tuple[Any, ...]]:
        """Run a caption or an answer into the tab's output box: (output, run button, stop button, prompt, stats)."""
        session = _session(request)
        try:
            self.limiter.check(client_key(request))
            picture = self.picture(image)
            preset, overrides = split_settings(task, settings)
            request = self.service.request(task, preset=preset, overrides=overrides, **inputs)
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield _single_view()
            return
        job = self.running.start(session, task)
        text = ""
        try:
            yield _single_view("thinking…", busy=True)
            prepared = self._prepare(model, request, progress)
            yield _single_view(busy=True, prompt=prepared.prompt.text or EMPTY_PROMPT, stats=prompt_stats(prepared))
            for reply in self.service.stream(model, picture, request, cancel=job.cancel):
                text = reply.text
                if not reply.finished:
                    yield _single_view(text + CURSOR, busy=True)
                    continue
                output = reply.text or "(the model gave an empty answer)"
                if reply.stopped_early == "time limit":
                    output += " [cut short at the time limit]"
                yield _single_view(output, stats=prompt_stats(prepared, reply))
        except CancelledError:
            yield _single_view(f"{text} [stopped]" if text else "")
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield _single_view("")
        finally:
            self.running.finish(session, task, job)

    def _preview(self, task: Task, model: str, settings: Mapping[str, Any], progress: gr.Progress,
                 request: gr.Request | None, **inputs: Any) -> tuple[Any, Any]:
        """The prompt and its token counts; counted by the rate limit (it may load the model)."""
        try:
            self.limiter.check(client_key(request))
            preset, overrides = split_settings(task, settings)
            request = self.service.request(task, preset=preset, overrides=overrides, **inputs)
            prepared = self._prepare(model, request, progress)
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            return gr.skip(), gr.skip()
        return prepared.prompt.text or EMPTY_PROMPT, prompt_stats(prepared)


def _history_buttons(enabled: bool) -> tuple[Any, Any, Any]:
    return tuple(gr.Button(interactive=enabled) for _ in range(3))  # type: ignore[return-value]


def _settling(views: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Chat views with Regenerate, Undo and Clear off; the event's ``.then`` step turns them on.

    gradio sends a generator's last outputs again when the event completes, which would silently
    revert an Undo or Clear clicked between the last yield and that moment.
    """
    for view in views:
        yield (*view[:6], *_history_buttons(False), *view[9:])


def _chat_view(chat: dict[str, Any], *, pending: tuple[str, str] | None = None, busy: bool = False,
               message: Any = None, note: Any = None, prompt: Any = None, stats: Any = None) -> tuple[Any, ...]:
    """Values for CHAT outputs: chatbot, state, note, message, send, stop, regenerate, undo, clear, prompt, stats.

    ``None`` for message, note, prompt and stats means "leave as it is".
    """
    keep = gr.skip()
    has_turns = bool(chat.get("turns")) and not busy
    return (
        chat_messages(chat.get("turns") or [], pending),
        chat,
        keep if note is None else note,
        keep if message is None else message,
        gr.Button(visible=not busy),
        gr.Button(visible=busy),
        *_history_buttons(has_turns),
        keep if prompt is None else prompt,
        keep if stats is None else stats,
    )


def _single_view(output: Any = None, *, busy: bool = False, prompt: Any = None, stats: Any = None) -> tuple[Any, ...]:
    """Values for a caption/ask tab's outputs: output, run button, stop button, prompt, stats."""
    keep = gr.skip()
    return (keep if output is None else output, gr.Button(visible=not busy), gr.Button(visible=busy),
            keep if prompt is None else prompt, keep if stats is None else stats)


# --------------------------------------------------------------------------------------------------
# The API for scripts


def add_api(service: Service, image_limits: ImageLimits, default_model: str, limiter: RateLimiter) -> None:
    """Register /caption, /answer, /chat and /models (typed from the hints below) in the current Blocks.

    Each function also takes the ``gr.Request`` (gradio fills it in; it is not an API parameter) for the
    per-client rate limit.
    """

    def decode(image: Any) -> Any:
        return load_image(uploaded_path(image), image_limits)

    def overrides(max_new_tokens: int | None, min_new_tokens: int | None, num_beams: int | None,
                  do_sample: bool | None, temperature: float | None, top_p: float | None,
                  repetition_penalty: float | None, length_penalty: float | None) -> dict[str, Any]:
        values = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "num_beams": num_beams,
                  "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
                  "repetition_penalty": repetition_penalty, "length_penalty": length_penalty}
        return {name: value for name, value in values.items() if value is not None}

    def caption(image: FileData, model: str = default_model, preset: PresetName = "standard",
                max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                top_p: float | None = None, repetition_penalty: float | None = None,
                length_penalty: float | None = None, detailed: bool = False, request: gr.Request = None) -> str:
        """Caption an image. Send the image with gradio_client.handle_file(path)."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.CAPTION, preset=preset, detailed=detailed, overrides=overrides(
                max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty,
                length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    def answer(image: FileData, question: str, model: str = default_model, preset: PresetName = "standard",
               max_new_tokens: int | None = None, min_new_tokens: int | None = None,
               num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None,
               length_penalty: float | None = None, short: bool = False, request: gr.Request = None) -> str:
        """Answer a question about an image."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.ANSWER, question=question, preset=preset, short=short,
                                      overrides=overrides(max_new_tokens, min_new_tokens, num_beams, do_sample,
                                                          temperature, top_p, repetition_penalty, length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    def chat(image: FileData, history: list[list[str]], message: str, model: str = default_model,
             preset: PresetName = "standard", max_new_tokens: int | None = None, min_new_tokens: int | None = None,
             num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             length_penalty: float | None = None, request: gr.Request = None) -> str:
        """Answer the newest message of a conversation about an image. history: [[user, assistant], ...]."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.CHAT, question=message, history=history or (), preset=preset,
                                      overrides=overrides(max_new_tokens, min_new_tokens, num_beams, do_sample,
                                                          temperature, top_p, repetition_penalty, length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    def models() -> list[dict[str, str]]:
        """The offered models: name, label, family, state, detail, description."""
        try:
            return [asdict(state) for state in captioning_states(service)]
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    gr.api(_stops_when_abandoned(spaces.GPU(caption)), api_name="caption")
    gr.api(_stops_when_abandoned(spaces.GPU(answer)), api_name="answer")
    gr.api(_stops_when_abandoned(spaces.GPU(chat)), api_name="chat")
    gr.api(models, api_name="models", concurrency_limit=None)


# --------------------------------------------------------------------------------------------------
# The page


# Stop must run at once, never queued behind the generation it stops.
_STOP: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}


def _stop_fn(handlers: Handlers, task: Task) -> Any:
    def stop(request: gr.Request) -> None:
        handlers.stop(request, task)

    return stop


def chat_tab(handlers: Handlers, limits: Limits, image: Any, model: Any, status: Any) -> dict[str, Any]:
    state = gr.State(new_chat())
    # Text reaches the Chatbot through inert(): Markdown on (for line breaks), raw HTML, LaTeX, custom tags,
    # copy buttons (they would copy the escapes) and feedback buttons (nothing records them) off.
    chatbot = gr.Chatbot(label="Conversation", show_label=False, height=400, elem_id="chatbot", buttons=[],
                         feedback_options=None, render_markdown=True, sanitize_html=True, allow_tags=False,
                         latex_delimiters=[], line_breaks=True,
                         placeholder="**Upload an image to start**, then ask anything about it.")
    note = gr.Markdown("", elem_classes="note", elem_id="chat-note")
    with gr.Row(equal_height=True):
        message = gr.Textbox(placeholder="Ask something about the image…", show_label=False, scale=6, lines=1,
                             max_lines=6, max_length=handlers.service.max_message_chars, elem_id="message")
        send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, visible=False, elem_id="chat-stop")
    with gr.Row():
        regenerate = gr.Button("↻ Regenerate", size="sm", interactive=False, min_width=80)
        undo = gr.Button("↶ Undo", size="sm", interactive=False, min_width=80)
        clear = gr.Button("✕ Clear", size="sm", interactive=False, min_width=80)
    panel = settings_panel(Task.CHAT, limits)
    inspect = inspector()

    outputs = [chatbot, state, note, message, send, stop, regenerate, undo, clear, inspect.prompt, inspect.stats]
    settings = panel.controls
    # always_last: a message sent while the previous answer is finishing runs next instead of being dropped.
    run = {"preprocess": False, "inputs_kwargs": settings, "show_progress_on": [status],
           "trigger_mode": "always_last", **PRIVATE}
    sent = gr.on([send.click, message.submit], spaces.GPU(handlers.chat_send), [message, state, image, model],
                 outputs, **run)
    again = regenerate.click(spaces.GPU(handlers.chat_regenerate), [state, image, model], outputs, **run)
    for event in (sent, again):
        event.then(handlers.history_buttons, state, [regenerate, undo, clear], **LIGHT)
    stop.click(_stop_fn(handlers, Task.CHAT), None, None, **_STOP)
    undo.click(handlers.chat_undo, state, outputs, **LIGHT)
    gr.on([clear.click, chatbot.clear], handlers.chat_clear, state, outputs, **LIGHT)
    inspect.preview.click(handlers.chat_preview, [message, state, image, model], [inspect.prompt, inspect.stats],
                          preprocess=False, inputs_kwargs=settings, **PRIVATE)
    return {"state": state, "chatbot": chatbot, "note": note, "message": message,
            "history_buttons": [regenerate, undo, clear], "events": [sent, again], "settings": settings}


def caption_tab(handlers: Handlers, limits: Limits, image: Any, model: Any, status: Any, extras: Any = None) -> Any:
    style = gr.Radio([("Short caption", "short"), ("Detailed description", "detailed")], value="short",
                     label="Style", info="Detailed also switches the decoding preset to 'detailed'.")
    with gr.Row():
        run = gr.Button("Caption", variant="primary", elem_id="caption-run")
        stop = gr.Button("Stop", variant="stop", visible=False)
    output = gr.Textbox(label="Caption", lines=3, interactive=False, buttons=["copy"], elem_id="caption-output",
                        placeholder="Upload an image, then press Caption.")
    trust = extras.trust_line("caption-trust") if extras else None  # "Confidence: likely" (web/tools.py)
    panel = settings_panel(Task.CAPTION, limits)
    inspect = inspector()

    style.change(lambda chosen: Preset.DETAILED.value if chosen == "detailed" else Preset.STANDARD.value,
                 style, panel.controls["preset"], **LIGHT)
    outputs = [output, run, stop, inspect.prompt, inspect.stats]
    event = run.click(spaces.GPU(handlers.run_caption), [image, model, style], outputs, preprocess=False,
                      inputs_kwargs=panel.controls, show_progress_on=[status], trigger_mode="always_last",
                      **PRIVATE)
    stop.click(_stop_fn(handlers, Task.CAPTION), None, None, **_STOP)
    if trust is not None:
        extras.wire_trust(trust, [run.click], event, Task.CAPTION, image, output)
    inspect.preview.click(handlers.caption_preview, [model, style], [inspect.prompt, inspect.stats],
                          preprocess=False, inputs_kwargs=panel.controls, **PRIVATE)
    return event


def ask_tab(handlers: Handlers, limits: Limits, image: Any, model: Any, status: Any,
            extras: Any = None) -> dict[str, Any]:
    question = gr.Textbox(label="Question", placeholder="What is the cat doing?", lines=1, max_lines=4,
                          max_length=handlers.service.max_message_chars, elem_id="question")
    short = gr.Checkbox(label="Short answer (a word or two, as in VQA benchmarks)", value=False)
    with gr.Row():
        run = gr.Button("Ask", variant="primary", elem_id="ask-run")
        stop = gr.Button("Stop", variant="stop", visible=False)
    output = gr.Textbox(label="Answer", lines=2, interactive=False, buttons=["copy"], elem_id="answer-output",
                        placeholder="Upload an image, type a question, then press Ask.")
    trust = extras.trust_line("answer-trust") if extras else None  # "Confidence: likely" (web/tools.py)
    panel = settings_panel(Task.ANSWER, limits)
    inspect = inspector()

    outputs = [output, run, stop, inspect.prompt, inspect.stats]
    event = gr.on([run.click, question.submit], spaces.GPU(handlers.run_ask), [question, short, image, model],
                  outputs, preprocess=False, inputs_kwargs=panel.controls, show_progress_on=[status],
                  trigger_mode="always_last", **PRIVATE)
    stop.click(_stop_fn(handlers, Task.ANSWER), None, None, **_STOP)
    if trust is not None:
        extras.wire_trust(trust, [run.click, question.submit], event, Task.ANSWER, image, output, question)
    inspect.preview.click(handlers.ask_preview, [question, short, model], [inspect.prompt, inspect.stats],
                          preprocess=False, inputs_kwargs=panel.controls, **PRIVATE)
    return {"event": event, "question": question}


# --------------------------------------------------------------------------------------------------
# Serving


BUSY_MESSAGE = "The server is busy: too many requests are already waiting. Please try again in a minute."
# gradio's file route fetches any public http(s) URL for anyone (route_utils.secure_url_stream_response);
# this app never serves remote files, so the server is no one's proxy.
_REMOTE_FILE = re.compile(r"/gradio_api/file[=/]+\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _stops_when_abandoned(fn: Any) -> Any:
    """An API function whose generation stops when its client cancels or goes away.

    gradio runs a plain function in a worker thread, and when the client cancels (gradio_client's
    ``Job.cancel``: POST /cancel) or its event stream closes, it only drops the result: the thread
    would go on generating on the device. The function runs here in a worker thread under a cancel
    event (``service.cancelled_by``) that is set when gradio cancels this task or marks its queue
    event dead, so the generation stops at its next token and a waiting one never starts.
    """
    import asyncio
    import functools

    import anyio

    from blip_app.tasks.service import cancelled_by

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        cancel = threading.Event()

        def work() -> Any:
            with cancelled_by(cancel):
                return fn(*args, **kwargs)

        event = _queue_event([*args, *kwargs.values()])
        watcher = asyncio.create_task(_watch_event(event, cancel)) if event is not None else None
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException:
            cancel.set()  # cancelled by gradio (or already finished with an error: then a no-op)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    return run


def _queue_event(args: Sequence[Any]) -> Any:
    """The gradio queue event the running task serves (its name carries the event id), or None."""
    import asyncio

    task = asyncio.current_task()
    _, sep, event_id = (task.get_name() if task is not None else "").partition("<gradio-sep>")
    request = next((arg for arg in args if isinstance(arg, gr.Request)), None)
    try:
        queue = request.app.get_blocks()._queue  # type: ignore[union-attr]
        return queue.event_ids_to_events.get(event_id) if sep else None
    except Exception:  # noqa: BLE001 - no request or another gradio: task cancellation still works
        return None


async def _watch_event(event: Any, cancel: threading.Event, every: float = 0.2) -> None:
    """Set ``cancel`` once gradio marks ``event`` dead (its client's event stream closed)."""
    import asyncio

    while not cancel.is_set():
        if not getattr(event, "alive", True) or getattr(event, "closed", False):
            log.info("A client went away: stopping its request")
            cancel.set()
            return
        await asyncio.sleep(every)


def _current_queue_event() -> Any:
    """The gradio queue event the running page handler serves, or None (called directly, or another gradio).

    gradio sets its per-call context (``LocalContext``) before every call and every step of a
    generator, in the worker thread that runs it.
    """
    try:
        from gradio.context import LocalContext

        event_id = LocalContext.event_id.get(None)
        blocks = LocalContext.blocks.get(None)
        if not event_id or blocks is None:
            return None
        return blocks._queue.event_ids_to_events.get(event_id)
    except Exception:  # noqa: BLE001 - no queue: Stop still works
        return None


@contextlib.contextmanager
def stopped_when_client_leaves(cancel: threading.Event, every: float = 0.2) -> Iterator[threading.Event]:
    """Within this block, ``cancel`` is set once gradio marks the page event being served dead.

    gradio stops iterating a generator whose client left only after its current step returns, and a
    step that waits for a slow result (a batch's next caption) would run to its end: a watcher thread
    sets ``cancel`` instead, so the work stops at its next token.
    """
    event = _current_queue_event()
    if event is None:
        yield cancel
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if not getattr(event, "alive", True) or getattr(event, "closed", False):
                log.info("A page went away: stopping its work")
                cancel.set()
                return

    watcher = threading.Thread(target=watch, name="client-watch", daemon=True)
    watcher.start()
    try:
        yield cancel
    finally:
        done.set()


class _Guard:
    """ASGI middleware in front of gradio's routes.

    - ``/gradio_api/file=<URL>`` (and the older ``/file/<URL>``) is refused: gradio would fetch any
      public URL for any caller; this app serves only its own files.
    - A request body larger than ``max_body`` bytes is refused with 413 before it is read (uploads
      excepted: gradio's own ``max_file_size`` applies to them); gradio would hold the whole body, and
      every input value in it, in memory before any handler could refuse it.
    - ``/queue/join`` naming an event the page does not have gets 404 and a sentence, not a 500.
    - A full queue's 503 (``/queue/join``, ``/call/...``) carries :data:`BUSY_MESSAGE`, a sentence for
      people, instead of gradio's "Queue is full. Max size is N and size is N.".
    - Open heartbeat streams are counted per session (:class:`Sessions`), so that sessions no page keeps
      open can be expired.
    - Logins are slowed down, then refused, after repeated failures from one address (:class:`LoginThrottle`),
      and uploads are rate-limited per address (:class:`Uploads`).
    """

    def __init__(self, app: Any, *, max_body: int = 8 * 1024 * 1024, blocks: Any = None,
                 sessions: "Sessions | None" = None, logins: "LoginThrottle | None" = None,
                 uploads: "Uploads | None" = None) -> None:
        self.app = app
        self.max_body = max_body
        self.blocks = blocks
        self.sessions = sessions
        self.logins = logins
        self.uploads = uploads

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if _REMOTE_FILE.search(path):
            await _send_json(send, 403, {"detail": "File not allowed: this server serves only its own files."})
            return
        if "/heartbeat/" in path and self.sessions is not None:
            session = path.rstrip("/").rsplit("/", 1)[-1]
            with self.sessions.connected(session):
                await self.app(scope, receive, send)
            return
        if path.rstrip("/").endswith("/upload") and scope.get("method") == "POST" and self.uploads is not None:
            refusal = self.uploads.check(_peer_key(scope))
            if refusal is not None:
                await _send_json(send, 429, {"detail": refusal})
                return
            from starlette.requests import ClientDisconnect

            try:
                await self.app(scope, receive, send)
            except ClientDisconnect:  # gradio would log a traceback for each; its partial file is swept later
                log.info("An upload was cut off mid-body by %s", _peer_key(scope))
            return
        if scope.get("method") in ("POST", "PUT", "PATCH") and not path.rstrip("/").endswith("/upload"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return  # refused
            if path.endswith("/queue/join") and not await self._known_event(body, send):
                return
            receive = _replay(body, receive)
            if path.rstrip("/").endswith("/login") and self.logins is not None:
                await self._login(scope, receive, send)
                return
        if not (path.endswith("/queue/join") or "/call/" in path):
            await self.app(scope, receive, send)
            return
        busy = False

        async def relay(message: dict[str, Any]) -> None:
            nonlocal busy
            if message["type"] == "http.response.start" and message.get("status") == 503:
                busy = True
                await _send_json(send, 503, {"detail": BUSY_MESSAGE})
            elif not busy:
                await send(message)

        await self.app(scope, receive, relay)

    async def _login(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A login attempt, slowed down or refused after repeated failures from its address."""
        import asyncio

        key = _peer_key(scope)
        delay = self.logins.begin(key)
        if delay is None:
            wait = max(1.0, self.logins.wait_s(key))
            log.warning("Refused a login from %s: too many failures", key)
            await _send_json(send, 429, {"detail": f"Too many failed logins from this address: please wait "
                                                   f"{wait:.0f} s before trying again."})
            return
        status = 0

        async def relay(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message.get("status", 0))
            await send(message)

        try:
            if delay:
                await asyncio.sleep(delay)
            await self.app(scope, receive, relay)
        finally:
            self.logins.end(key, 200 <= status < 400)

    async def _read_body(self, scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
        """The request's body, or None once a 413 has been sent (by its declared length, or as it arrives)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            await _send_json(send, 400, {"detail": "The Content-Length header is not a number."})
            return None
        if length is not None and length > self.max_body:
            await self._too_large(send, length)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send, None)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Any, length: int | None) -> None:
        size = f" is {length / 1e6:,.1f} MB;" if length is not None else " is too large:"
        log.info("Refused a request body over %d bytes", self.max_body)
        await _send_json(send, 413, {"detail": f"This request{size} the most this server accepts is "
                                               f"{self.max_body / 1e6:,.1f} MB (send images as uploaded files)."})

    async def _known_event(self, body: bytes, send: Any) -> bool:
        """Whether a queue join names an event of the page; if not, a 404 with a sentence has been sent."""
        import json

        if self.blocks is None:
            return True
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return True  # gradio answers malformed bodies itself (422)
        if fn_index is None or (isinstance(fn_index, int) and not isinstance(fn_index, bool)
                                and fn_index in self.blocks.fns):
            return True
        shown = repr(fn_index) if len(repr(fn_index)) <= 40 else repr(fn_index)[:39] + "…"
        await _send_json(send, 404, {"detail": f"There is no event {shown} in this app; reload the page to get "
                                               "the current one."})
        return False


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands over the already read ``body`` once, then the connection's own messages."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # only http.disconnect can come now

    return replayed


def _release_freed_memory() -> None:
    """Hand memory Python has freed back to the system (glibc keeps it in per-thread arenas otherwise).

    Expired sessions free megabytes of request data allocated in whichever worker thread served them,
    and glibc keeps what is freed in that thread's arena for later use by the same thread.
    """
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        if name:
            ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LoginThrottle:
    """Slows down, then refuses, repeated failed logins from one client address.

    The first ``free`` failures cost nothing (people mistype); each later attempt waits ``0.25 * 2**k``
    seconds (at most ``max_delay``) before it is checked; after ``lock_after`` failures the address is
    refused for ``lockout_s`` seconds. Failures are forgotten ``window_s`` seconds after the last one, and
    a successful login forgets them at once, so the real user is kept out for a minute at most, and only
    at the address that was guessing. Attempts still being checked count as failures, so parallel
    guesses gain nothing.
    """

    def __init__(self, *, free: int = 3, lock_after: int = 8, max_delay: float = 2.0, lockout_s: float = 60.0,
                 window_s: float = 900.0, max_clients: int = 10_000) -> None:
        self.free = free
        self.lock_after = lock_after
        self.max_delay = max_delay
        self.lockout_s = lockout_s
        self.window_s = window_s
        self.max_clients = max_clients
        self._clients: dict[str, list[float]] = {}  # key -> [failures, in flight, last failure, locked until]
        self._lock = threading.Lock()

    def begin(self, key: str) -> float | None:
        """Seconds to wait before checking this attempt, or None if the address is locked out."""
        import time

        now = time.monotonic()
        with self._lock:
            failures, flying, last, until = self._clients.get(key, [0, 0, 0.0, 0.0])
            if failures and now - last > self.window_s:
                failures = 0
            if until > now:
                return None
            probe = until and not flying  # a lockout has ended: one try at a time, locked again if it fails
            if failures + flying >= self.lock_after and not probe:
                self._clients[key] = [failures, flying, last, now + self.lockout_s]
                return None
            self._clients[key] = [failures, flying + 1, last, until]
            if len(self._clients) > self.max_clients:
                self._clients.pop(next(iter(self._clients)))
            over = failures + flying - self.free
            return 0.0 if over < 0 else min(self.max_delay, 0.25 * 2 ** over)

    def end(self, key: str, succeeded: bool) -> None:
        """Record how an attempt that :meth:`begin` let through ended."""
        import time

        with self._lock:
            failures, flying, last, until = self._clients.get(key, [0, 1, 0.0, 0.0])
            if succeeded:
                self._clients.pop(key, None)
                return
            failures += 1
            until = time.monotonic() + self.lockout_s if failures >= self.lock_after else until
            self._clients[key] = [failures, max(0, flying - 1), time.monotonic(), until]

    def wait_s(self, key: str) -> float:
        """Seconds left in ``key``'s lockout."""
        import time

        with self._lock:
            return max(0.0, self._clients.get(key, [0, 0, 0.0, 0.0])[3] - time.monotonic())


def _peer_key(scope: dict[str, Any]) -> str:
    """The client address of a request, as :func:`client_key` finds it (for routes without a gr.Request)."""
    if os.environ.get("SPACE_ID"):
        forwarded = [value.decode("latin1") for name, value in scope.get("headers") or []
                     if name == b"x-forwarded-for"]
        entries = [entry.strip() for entry in ",".join(forwarded).split(",") if entry.strip()]
        if entries:
            return entries[-1]
    client = scope.get("client")
    return str(client[0]) if client else "anonymous"


class Uploads:
    """Uploads: a rate limit per client address, and the partial files of aborted uploads swept away.

    gradio writes each upload to a temporary file directly in its upload folder and moves it into a
    folder of its own once the body is complete; an upload cut off mid-body leaves its temporary file
    behind, which nothing deletes. Such files (``tmp*`` directly in the folder) not written to for
    ``idle_s`` seconds are deleted every ``every`` seconds, and all of them at shutdown (:meth:`close`).
    """

    def __init__(self, limiter: RateLimiter, *, folder: str | None = None, idle_s: float = 60.0,
                 every: float = 30.0) -> None:
        self.limiter = limiter
        self.folder = Path(folder or get_upload_folder())
        self.idle_s = idle_s
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, key: str) -> str | None:
        """None if ``key`` may upload now, else the sentence refusing it."""
        try:
            self.limiter.check(key)
        except BlipAppError as exc:
            return str(exc)
        return None

    def sweep(self, idle_s: float | None = None) -> int:
        """Delete the partial uploads not written to for ``idle_s`` seconds (default: the configured time)."""
        import time

        idle = self.idle_s if idle_s is None else idle_s
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            try:
                if (entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False)
                        and now - entry.stat(follow_symlinks=False).st_mtime >= idle):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("Deleted %d partial upload(s)", removed)
        return removed

    def start(self) -> None:
        """Sweep in a daemon thread until :meth:`close`."""
        if self._thread is None:
            def loop() -> None:
                while not self._stop.wait(self.every):
                    self.sweep()

            self._thread = threading.Thread(target=loop, name="upload-sweeper", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop sweeping and delete every partial upload (when the server closes, and at exit)."""
        self._stop.set()
        _join(self._thread)
        self.sweep(idle_s=0.0)


class Sessions:
    """Expires the gradio sessions no page keeps open.

    gradio keeps a session's state (a copy of the page's configuration and every input value it was
    sent) until its page's heartbeat stream closes, and then for an hour; a raw client that never opens
    one (every ``/call`` request makes a new session) keeps its state until 10,000 sessions exist. Every
    ``every`` seconds, the sessions that have no open heartbeat, no event waiting or running and were
    last used over ``idle_s`` seconds ago are forgotten (a closed page's too: a reload starts a new one),
    with the ids of results their client never came to read.
    """

    def __init__(self, *, idle_s: float = 60.0, every: float = 15.0) -> None:
        self.idle_s = idle_s
        self.every = every
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def connected(self, session: str) -> Iterator[None]:
        """While a heartbeat stream of ``session`` is open."""
        with self._lock:
            self._open[session] = self._open.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open.get(session, 1) - 1
                if left > 0:
                    self._open[session] = left
                else:
                    self._open.pop(session, None)

    def start(self, demo: Any) -> None:
        """Sweep ``demo``'s sessions in a daemon thread until :meth:`stop`."""
        import weakref

        if self._thread is not None:
            return
        ref = weakref.ref(demo)

        def loop() -> None:
            while not self._stop.wait(self.every):
                current = ref()
                if current is None:
                    return
                try:
                    self.sweep(current)
                except Exception:  # noqa: BLE001 - the next sweep tries again
                    log.exception("Expiring idle sessions failed")
                del current

        self._thread = threading.Thread(target=loop, name="session-expiry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop expiring sessions (when the server closes, and at exit)."""
        self._stop.set()
        _join(self._thread)

    def sweep(self, demo: Any) -> int:
        """Forget the expired sessions now; returns how many."""
        import datetime

        holder = getattr(demo, "state_holder", None)
        queue = getattr(demo, "_queue", None)
        if holder is None:
            return 0
        now = datetime.datetime.now()
        busy = set()
        if queue is not None:  # an event waiting or running (a finished one stays "pending" until its stream is read)
            busy = {event.session_hash for event in list(queue.event_ids_to_events.values())}
            busy |= {event.session_hash for job in list(queue.active_jobs) if job for event in job}
        with self._lock:
            connected = set(self._open)
        expired = 0
        with holder.lock:
            for session in list(holder.session_data):
                used = holder.time_last_used.get(session)
                if session in connected or session in busy:
                    continue
                if used is not None and (now - used).total_seconds() < self.idle_s:
                    continue
                holder.session_data.pop(session, None)
                holder.time_last_used.pop(session, None)
                if queue is not None:  # results nobody came to read
                    queue.pending_event_ids_session.pop(session, None)
                expired += 1
        if expired:
            log.info("Expired %d idle session(s)", expired)
            _release_freed_memory()
        return expired


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    import json

    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def request_body_limit(config: AppConfig) -> int:
    """The largest request body accepted (uploads aside): a /chat call carrying the longest history kept.

    That is MAX_HISTORY_TURNS turns of a full-length question and answer, plus room for the rest; the
    page's own requests are a few kilobytes (images travel as uploads).
    """
    from blip_app.tasks.service import ANSWER_CHARS_FACTOR, MAX_HISTORY_TURNS

    return 1024 * 1024 + MAX_HISTORY_TURNS * config.max_message_chars * (1 + ANSWER_CHARS_FACTOR)


def launch(demo: gr.Blocks, config: AppConfig, *, prevent_thread_lock: bool = False, quiet: bool = False) -> str:
    """Apply the image limits, configure the queue and serve ``demo``; returns the local URL.

    Blocks until the server stops unless ``prevent_thread_lock``.
    """
    from starlette.middleware import Middleware

    install_pillow_limits(config.image_limits)
    # uvicorn rewrites the client address from X-Forwarded-For for the peers this lists (by default
    # loopback, so that any local client could forge its address): only the configured proxies.
    os.environ["FORWARDED_ALLOW_IPS"] = ",".join(config.trusted_proxies)
    sessions = Sessions()
    uploads = Uploads(uploads_limiter(config.rate_limit_per_minute))
    demo.queue(max_size=config.queue_size, default_concurrency_limit=CONCURRENCY, api_open=False)
    # Started before launch, which blocks until the server stops (unless prevent_thread_lock).
    sessions.start(demo)  # sessions no page keeps open are forgotten after a minute
    uploads.start()  # partial uploads deleted after a minute
    demo.blip_app_sessions = sessions  # type: ignore[attr-defined]
    demo.blip_app_uploads = uploads  # type: ignore[attr-defined]
    _clean_at_exit(uploads.close, sessions.stop)
    _, url, _ = demo.launch(
        server_name=config.host,
        server_port=config.port,
        auth=config.auth,
        max_file_size=int(config.max_upload_mb * 1024 * 1024),
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,  # gradio's default (None) serves /monitoring to anyone holding its key
        app_kwargs={"middleware": [Middleware(_Guard, max_body=request_body_limit(config), blocks=demo,
                                              sessions=sessions, logins=LoginThrottle(), uploads=uploads)]},
        run_history=False,  # would keep every image and chat in the browser's storage
        footer_links=["api", "gradio", "settings"],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"),
        css=CSS,
    )
    close = demo.close

    def close_all(*args: Any, **kwargs: Any) -> Any:  # the sweepers end with the server, not the process
        uploads.close()
        sessions.stop()
        return close(*args, **kwargs)

    demo.close = close_all  # type: ignore[method-assign]
    return url


def asgi_app(demo: gr.Blocks, config: AppConfig) -> Any:
    """``demo`` as an ASGI app (a FastAPI app with the page mounted at /), configured as :func:`launch`
    serves it: image limits, queue, the _Guard middleware, the session and upload sweepers, theme.

    For servers that run the app themselves (blip_app.serving's Ray Serve ingress); the sweepers start
    and stop with the app's lifespan.
    """
    from fastapi import FastAPI
    from starlette.middleware import Middleware

    install_pillow_limits(config.image_limits)
    sessions = Sessions()
    uploads = Uploads(uploads_limiter(config.rate_limit_per_minute))
    demo.queue(max_size=config.queue_size, default_concurrency_limit=CONCURRENCY, api_open=False)
    demo.blip_app_sessions = sessions  # type: ignore[attr-defined]
    demo.blip_app_uploads = uploads  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        sessions.start(demo)
        uploads.start()
        try:
            yield
        finally:
            uploads.close()
            sessions.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    return gr.mount_gradio_app(
        app, demo, path="/", server_name=config.host, server_port=config.port, auth=config.auth,
        max_file_size=int(config.max_upload_mb * 1024 * 1024), show_error=False, ssr_mode=False, mcp_server=False,
        enable_monitoring=False,
        app_kwargs={"middleware": [Middleware(_Guard, max_body=request_body_limit(config), blocks=demo,
                                              sessions=sessions, logins=LoginThrottle(), uploads=uploads)]},
        run_history=False, footer_links=["api", "gradio", "settings"],
        theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"), css=CSS,
    )


def _join(thread: threading.Thread | None) -> None:
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5)


def uploads_limiter(per_minute: int) -> RateLimiter:
    """Uploads one address may send: twice the request rate, in bursts of 20 or more (a Batch of photos
    arrives in one request; every image shown in the page is one upload); none if requests have no limit."""
    if per_minute <= 0:
        return RateLimiter(0)
    return RateLimiter(2 * per_minute, burst=max(20, per_minute),
                       message="You are uploading files too quickly; please wait {wait:.0f} s and try again.")


def _clean_at_exit(*steps: Any) -> None:
    """Run ``steps`` when the process exits (normally, by Ctrl-C, or by SIGTERM: see app.main)."""
    import atexit

    for step in steps:
        atexit.register(step)
