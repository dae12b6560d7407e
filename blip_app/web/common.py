"""What every part of the page shares, with no gradio component in it: the event options, text made
inert, errors turned into sentences, uploads checked and decoded, settings split from their preset, who is
asking (rate limit) and which answers are running (Stop), and which offered models caption.

Nothing here imports another page module; the widgets (web/widgets.py) and every tab (web/tabs/) import it.

- **Images are decoded by blip_app only.** ``gr.Image.preprocess`` calls ``PIL.Image.open`` with every
  Pillow plugin even for ``type="filepath"`` (gradio/image_utils.py, ``preprocess_image``), so every
  event that takes an upload runs with ``preprocess=False``: the handler receives the upload's file
  record, whose path gradio has checked to lie in its upload folder, checks that again
  (:func:`uploaded_path`), and hands the path to :func:`blip_app.core.images.load_image` (allow-list,
  size limits) through :func:`decode_upload`.
- **Text is inert.** gradio renders Chatbot messages as Markdown and then as (sanitised) HTML, which still
  lets ``<img src=...>``, ``![](url)``, forms and links through; toasts render HTML. Chat text is
  therefore escaped for Markdown (:func:`inert`) and toast sentences for HTML (:func:`toast_text`).
- **Errors never lose the work shown.** Every handler catches everything: a BlipAppError shows its
  sentence, anything else is logged with its traceback and shows :func:`errors.user_message`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal

from blip_app.core.catalog import MAX_SEARCH_IMAGES, MAX_TEXT_CHARS
from blip_app.core.images import ImageLimits, load_image
from blip_app.core.settings import Preset, Task, preset_settings
from blip_app.errors import BadImageError, BadInputError, BlipAppError, user_message
from blip_app.models.manager import ModelState
from blip_app.tasks.batch import BatchItem, iter_images
from blip_app.tasks.compare import MAX_MODELS
from blip_app.tasks.service import Service
from blip_app.web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

# On a CPU greedy decoding is the one that streams, so chat starts there; captions and answers use the
# papers' beam search.
DEFAULT_PRESET = {Task.CHAT: Preset.FAST, Task.CAPTION: Preset.STANDARD, Task.ANSWER: Preset.STANDARD}
PRESET_LABELS = {Preset.STANDARD: "Standard (beam search)", Preset.FAST: "Fast (streams)",
                 Preset.DETAILED: "Detailed"}

# Generation events per event type that may run at once. The engine's device lock already keeps one
# generation per device; a second slot lets a request load its model or validate while another generates.
CONCURRENCY = 2

CURSOR = " ▍"
EMPTY_PROMPT = "(empty: the model sees only the image tokens)"

PRIVATE: dict[str, Any] = {"api_visibility": "private"}
# Handlers that only reshuffle session data: never queued behind generations.
LIGHT: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
# Handlers that decode an upload (an image of up to 40 megapixels: 120 MB decoded; a conversation file) but
# run no model: a few at a time across the whole server, so that a burst of uploads queues instead of
# decoding all at once.
DECODE: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": CONCURRENCY, "concurrency_id": "decode",
                          "show_progress": "hidden"}
# Stop must run at once, never queued behind the generation it stops.
STOP: dict[str, Any] = {"api_visibility": "private", "concurrency_limit": None, "show_progress": "hidden"}
# Model loads one client may start: at real size each reads gigabytes and may evict someone else's model.
LOADS_PER_MINUTE_SHARE = 6  # a sixth of the request rate
LOAD_BURST = 3
LOAD_MESSAGE = ("Models are being switched too often from here: each switch loads gigabytes. Please wait {wait:.0f} s "
                "before loading another model.")

SEARCH_LIMIT = MAX_SEARCH_IMAGES
COMPARE_LIMIT = MAX_MODELS
SEARCH_TEXT_CHARS = MAX_TEXT_CHARS


# --------------------------------------------------------------------------------------------------
# Text and errors


_ASCII_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def inert(text: str) -> str:
    """Markdown source that the Chatbot shows exactly as ``text`` reads: no HTML, links, images, code or maths.

    Every ASCII punctuation mark is backslash-escaped (CommonMark renders each as itself), which also
    defeats GFM's bare-URL and e-mail autolinks. Lines are trimmed so that indentation cannot make a
    code block. Chatbot copy buttons are off because they would copy the escapes.
    """
    lines = (line.strip() for line in str(text).splitlines())
    return "\n".join(_ASCII_PUNCTUATION.sub(r"\\\1", line) for line in lines)


def toast_text(text: str) -> str:
    """A sentence for gr.Warning / gr.Error, which render their message as (sanitised) HTML."""
    return html.escape(text, quote=False)


def notify(exc: BaseException) -> None:
    """Show an exception to the person: our errors with their sentence, bugs logged with traceback."""
    if isinstance(exc, BlipAppError):
        log.info("Refused: %s", exc)
        gr.Warning(toast_text(str(exc)))
    else:
        log.exception("Unexpected error in a UI handler")
        gr.Warning(toast_text(user_message(exc)))


def api_error(exc: BaseException) -> gr.Error:
    """The gr.Error that carries an exception's sentence to an API client, as plain text.

    API endpoints are called by scripts (gradio_client, HTTP), never rendered by the page: the sentence
    is sent as written (``<`` stays ``<``); the page's toasts escape theirs (:func:`toast_text`).
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


# --------------------------------------------------------------------------------------------------
# Uploads


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


def decode_upload(value: Any, limits: ImageLimits) -> Any:
    """The uploaded image (a file record), decoded by blip_app.core.images.load_image (raises BadImageError).

    The one way the page and the API turn an upload into a picture.
    """
    return load_image(uploaded_path(value), limits)


def uploaded_files(value: Any) -> list[tuple[str, str]]:
    """(path, original file name) of each file of an upload (gr.File, preprocess=False); paths checked."""
    if value is None:
        return []
    records = value if isinstance(value, list) else [value]
    files = []
    for record in records:
        path = uploaded_path(record)
        original = record.get("orig_name") if isinstance(record, Mapping) else None
        files.append((path, Path(str(original or path)).name or Path(path).name))
    return files


def expand_uploads(value: Any, image_limits: ImageLimits, max_files: int) -> tuple[list[BatchItem], list[str]]:
    """The images in uploaded files and zip archives (named by the original file names), and notes.

    Entries that are not images come back as skipped items (their ``note`` says why). Every entry
    counts against ``max_files``, images or not (each costs a row, and an archive of thousands of text
    files would otherwise cost as much as thousands of images): one more is refused with a
    BadInputError before anything is decoded.
    """
    items: list[BatchItem] = []
    for path, name in uploaded_files(value):
        try:
            for item in iter_images([path], image_limits=image_limits):
                if len(items) >= max_files:
                    raise BadInputError(f"More than {max_files:,} files were given (every file in an archive "
                                        f"counts, images or not); at most {max_files:,} can be handled at once here.")
                shown = name + item.name[len(path):] if item.name.startswith(path) else Path(item.name).name
                items.append(BatchItem(shown, item.load, item.note))
        except BadInputError as exc:  # an archive refused whole: named as the person named it, not by its temp path
            raise BadInputError(str(exc).replace(path, name)) from None
    return items, [f"{item.name}: {item.note}" for item in items if item.skipped]



class Downloads:
    """Folders for the files the page offers for download, deleted on the uploads' schedule.

    Exports hold what people wrote, so they live no longer than their uploads: a folder older than
    ``keep_s`` seconds is removed by a sweeper thread that runs every ``min(keep_s, 600)`` seconds (as
    gradio's ``delete_cache`` does for the copies it serves), ``keep_s`` None keeps them, and the whole
    root goes when the app object does or the process exits (:meth:`close`).
    """

    def __init__(self, keep_s: float | None = 900.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="blip_app-downloads-"))
        self.keep_s = keep_s
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_downloads, str(self.root), self._stop)

    def folder(self) -> Path:
        """A new, empty folder (older ones are removed first)."""
        self.sweep()
        self._start_sweeper()
        path = self.root / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def sweep(self) -> None:
        """Remove the folders older than ``keep_s``."""
        if self.keep_s is None:
            return
        now = time.time()
        for child in list(self.root.iterdir()) if self.root.is_dir() else []:
            try:
                if now - child.stat().st_mtime >= self.keep_s:
                    shutil.rmtree(child, ignore_errors=True)
            except OSError:
                pass

    def _start_sweeper(self) -> None:
        if self.keep_s is None or self._sweeper is not None:
            return
        with self._lock:
            if self._sweeper is None:
                every = max(0.5, min(self.keep_s, 600.0))
                self._sweeper = threading.Thread(target=_sweep_every, args=(weakref.ref(self), self._stop, every),
                                                 name="downloads-sweeper", daemon=True)
                self._sweeper.start()

    def close(self) -> None:
        """Delete every file offered for download (at shutdown)."""
        self._finalizer()


def _sweep_every(downloads: Any, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        current = downloads()
        if current is None:
            return
        current.sweep()
        del current


def _close_downloads(root: str, stop: threading.Event) -> None:
    stop.set()
    shutil.rmtree(root, ignore_errors=True)



# --------------------------------------------------------------------------------------------------
# Settings and replies


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
    return f"{how}, up to {settings.max_new_tokens:,} new tokens"


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
    lines += [inert(note) for note in plan.notes]
    if reply is not None:
        lines.append(f"Answer: {reply.new_tokens:,} new tokens in {reply.seconds:.2f} s, "
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


# --------------------------------------------------------------------------------------------------
# Which models caption


def is_matching_model(service: Service, name: str) -> bool:
    """Whether the offered model ``name`` is an image-text matching one (it scores, it cannot caption)."""
    return service.manager.is_matching(name)


def captioning_states(service: Service) -> list[ModelState]:
    """The offered models that caption and answer (the picker, /models, Compare): the matching model is left out.

    A checkpoint folder is named by its folder (with its parent when two share a name), never by its
    path on the server: people see the label, detail and description, and the path told them nothing.
    """
    states = [state for state in service.models() if not is_matching_model(service, state.name)]
    folders = {state.name: Path(service.manager.ref(state.name).source) for state in states
               if service.manager.ref(state.name).is_local}
    names = [folder.name for folder in folders.values()]
    shown = []
    for state in states:
        folder = folders.get(state.name)
        if folder is not None:
            label = folder.name if names.count(folder.name) == 1 else f"{folder.parent.name}/{folder.name}"
            detail = "local folder" if state.state == "folder" else state.detail.replace(str(folder), label)
            description = f"A checkpoint in the folder {label}." if state.description.startswith("checkpoint at ") \
                else state.description.replace(str(folder), label)
            state = dataclasses.replace(state, label=label, detail=detail, description=description)
        shown.append(state)
    return shown


def model_choices(states: Sequence[ModelState]) -> list[tuple[str, str]]:
    """Dropdown choices: (label with the model's state, model name)."""
    words = {"loaded": "loaded", "parked": "in CPU memory", "loading": "loading…", "on disk": "downloaded",
             "folder": "local folder", "remote": "remote", "unreachable": "remote, unreachable"}
    return [(f"{state.label} · {words.get(state.state, state.detail)}", state.name) for state in states]


def model_status(states: Sequence[ModelState], name: str) -> str:
    """Markdown: the chosen model's state and description."""
    headline = {"loaded": "Ready", "parked": "Ready soon", "loading": "Loading", "on disk": "Not loaded",
                "folder": "Not loaded", "download": "Not downloaded", "remote": "Remote",
                "unreachable": "Unreachable"}
    for state in states:
        if state.name == name:
            return (f"**{headline.get(state.state, 'Not loaded')}**: {inert(state.detail)}.\n\n"
                    f"{inert(state.description)}")
    return "Choose a model."


# --------------------------------------------------------------------------------------------------
# Who is asking, and what is running


@dataclass
class Job:
    """Work being done for one session: Stop sets ``cancel``; a new image or a newer job marks it ``superseded``."""

    cancel: threading.Event = field(default_factory=threading.Event)
    superseded: bool = False


class Jobs:
    """The work running for each browser session, by kind (a task, "batch"), so that Stop can end it.

    Plain dictionary operations (atomic in CPython); no lock is held by the UI.
    """

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job] = {}

    def start(self, session: str, kind: Any, *, stop_running: bool = False) -> Job:
        """Register this session's new job of ``kind``; ``stop_running`` stops the one it replaces."""
        if stop_running:
            self.stop(session, kind)
        job = Job()
        self._jobs[(session, _kind(kind))] = job
        return job

    def stop(self, session: str, kind: Any, *, superseded: bool = False) -> None:
        """Ask the running job of ``kind``, if any, to stop at its next token."""
        job = self._jobs.get((session, _kind(kind)))
        if job is not None:
            job.superseded = job.superseded or superseded
            job.cancel.set()

    def finish(self, session: str, kind: Any, job: Job) -> None:
        """Forget ``job`` unless a newer one has replaced it."""
        if self._jobs.get((session, _kind(kind))) is job:
            del self._jobs[(session, _kind(kind))]


def _kind(kind: Any) -> str:
    return str(getattr(kind, "value", kind))


def loads_limiter(limiter: RateLimiter) -> RateLimiter:
    """The stricter limit on model loads that goes with the request limit ``limiter`` (none if it has none)."""
    per_minute = round(limiter.rate * 60)
    if per_minute <= 0:
        return RateLimiter(0)
    return RateLimiter(max(1, per_minute // LOADS_PER_MINUTE_SHARE), burst=LOAD_BURST, message=LOAD_MESSAGE)


def session_id(request: gr.Request | None) -> str:
    """The browser session a page event comes from."""
    return getattr(request, "session_hash", None) or "anonymous"


def client_key(request: gr.Request | None) -> str:
    """Who is asking, for the rate limit: the logged-in user, else the client's address.

    Any client can write X-Forwarded-For, so only what a trusted proxy added counts. On a Space the app
    sits behind Hugging Face's proxy, which appends the address it saw: the last entry (the ones before
    it are whatever the client sent). Elsewhere the web server replaces the peer address from the header
    only for the proxies given with ``--trusted-proxy`` (see web/server.py's ``launch``), so the peer
    address is used.
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
