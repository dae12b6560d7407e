"""The page and the API beyond the demos: trust scores, search, batch captioning, side by side, chat files.

:func:`blip_app.web.ui.build_ui` calls in here in a few lines: :func:`add_extra_api` registers ``/trust``,
``/search`` and ``/embed`` next to ui.py's endpoints, and :class:`Tools` builds

- the **trust line** under the Caption and Ask outputs: "Confidence: likely", the image-text match
  probability in the hover title (:func:`trust_html`), scored after each caption or answer by the
  image-text matching model (retrieval.py) on the text shown and the picture shown;
- the chat's **Export / load** accordion: Markdown and JSON downloads with a reproducibility card
  (exports.py), and loading a JSON export back, which continues the conversation once the same
  picture is uploaded (the card's SHA-256 of the decoded picture is checked);
- the **Search** tab (several images or a zip, a sentence, the images ranked with their scores), the
  **Batch** tab (captions for many images with a progress bar, a table, CSV and JSON Lines downloads that
  record the model and every setting) and the **Compare** tab (two or three models on the shared image,
  each column with its time and trust score).

ui.py's conventions hold here: no ``from __future__ import annotations`` (gradio reads the hints of the
gr.api functions at run time); uploads arrive as file records (``preprocess=False``) whose path is checked
by :func:`ui.uploaded_path` and decoded only by :func:`images.load_image` (through :func:`batch.iter_images`
for several files and zip archives); text shown to people is inert (Markdown through :func:`ui.inert`,
HTML built here through :func:`html.escape`, gallery captions and table cells are rendered as plain text
by gradio); page errors go through :func:`ui._notify` and API errors through :func:`ui._api_error`;
handlers take and return plain values; every function that runs a model is wrapped in ``spaces.GPU``.
The modules that import torch (retrieval, compare) are imported inside the functions that use them.
"""

import html
import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import spaces
from gradio.data_classes import FileData

from blip_app.config import AppConfig
from blip_app.core.catalog import MAX_SEARCH_IMAGES, MAX_TEXT_CHARS
from blip_app.core.images import ImageLimits, load_image
from blip_app.core.settings import Limits, Preset, Task, resolve_settings
from blip_app.errors import BadImageError, BadInputError, BlipAppError, user_message
from blip_app.models.manager import ModelState
from blip_app.tasks.batch import BatchItem, BatchResult, iter_images
from blip_app.tasks.compare import MAX_MODELS
from blip_app.tasks.exports import (
    batch_to_csv,
    batch_to_jsonl,
    card_for,
    conversation_from_json,
    conversation_to_json,
    conversation_to_markdown,
    export_filename,
    save_text,
)
from blip_app.tasks.service import Service, clean_message
from blip_app.web.common import captioning_only, is_matching_model
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.ui import (
    _STOP,
    CURSOR,
    DECODE,
    LIGHT,
    PRESET_LABELS,
    PRIVATE,
    _api_error,
    _history_buttons,
    _notify,
    _session,
    chat_messages,
    client_key,
    inert,
    model_choices,
    model_name,
    model_status,
    settings_panel,
    split_settings,
    stopped_when_client_leaves,
    uploaded_path,
)

log = logging.getLogger(__name__)

SEARCH_LIMIT = MAX_SEARCH_IMAGES
COMPARE_LIMIT = MAX_MODELS
SEARCH_TEXT_CHARS = MAX_TEXT_CHARS

# What ui.Handlers._single writes around a reply in the Caption and Ask boxes.
THINKING = "thinking…"
EMPTY_REPLY = "(the model gave an empty answer)"
REPLY_MARKS = (" [stopped]", " [cut short at the time limit]", CURSOR)

# The settings sliders of ui.settings_panel, in its order (the preset radio is left alone on import: its
# change event would reset them).
SLIDERS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
           "repetition_penalty", "length_penalty")

BATCH_HEADERS = ["file", "caption", "seconds", "note"]
ROWS_EVERY_S = 0.5  # the Batch table is sent again at most this often for rows that cost no model run
# Saves the export a click has just built (chat_export's output): the hidden button downloads its value.
SAVE_EXPORT = "() => { setTimeout(() => document.querySelector('#chat-export-file')?.click(), 0); }"
RESET_IMPORT_INPUT = ("() => { const input = document.querySelector('#chat-files input[type=file]'); "
                      "if (input) input.value = ''; }")

TRUST_CSS = """
.trust-line { font-size: var(--text-sm); color: var(--body-text-color-subdued); padding: 2px 2px 0; }
.trust { cursor: help; text-decoration: underline dotted; text-underline-offset: 3px; }
.trust strong { font-weight: 600; }
.trust-very-likely strong { color: #15803d; }
.trust-likely strong { color: #0f766e; }
.trust-uncertain strong { color: #b45309; }
.trust-unlikely strong { color: #b91c1c; }
"""

CARD_CSS = TRUST_CSS + """
.compare-card { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
                padding: 10px 12px; background: var(--block-background-fill); min-height: 120px;
                display: flex; flex-direction: column; gap: 8px; }
.compare-model { font-weight: 600; font-size: var(--text-md); overflow-wrap: anywhere; }
.compare-text { white-space: pre-wrap; overflow-wrap: anywhere; flex: 1; }
.compare-wait { color: var(--body-text-color-subdued); font-style: italic; }
.compare-error { color: #b91c1c; }
.compare-meta { font-size: var(--text-sm); color: var(--body-text-color-subdued); }
"""


# --------------------------------------------------------------------------------------------------
# Which offered models caption: the image-text matching model is offered too, but not in the picker.


# --------------------------------------------------------------------------------------------------
# Plain helpers


def trust_span(label: str, hover: str) -> str:
    """"Confidence: <label>" with ``hover`` as its title (both escaped)."""
    label = str(label)
    title = f"{hover}. How well the text describes the picture, not whether it is right."
    return (f'<span class="trust trust-{html.escape(label.replace(" ", "-"))}" title="{html.escape(title)}">'
            f"Confidence: <strong>{html.escape(label)}</strong></span>")


def trust_html(trust: Any = None, *, note: str | None = None) -> str:
    """The trust line: "Confidence: likely", with the match probability in the hover title; or why there is none.

    ``trust`` is a retrieval.Trust. Everything in the line is escaped: the model name may be a folder path.
    """
    if trust is None:
        if not note:
            return ""
        return (f'<div class="trust-line"><span class="trust trust-none" title="{html.escape(note)}">'
                "Confidence: not available</span></div>")
    return f'<div class="trust-line">{trust_span(trust.label, trust.hover)}</div>'


def shown_reply(text: Any) -> str:
    """The model's text in a Caption / Ask output box, without the marks the page adds ("" when there is none)."""
    text = str(text or "").strip()
    if text in ("", THINKING, EMPTY_REPLY):
        return ""
    changed = True
    while changed:
        changed = False
        for mark in REPLY_MARKS:
            if text.endswith(mark.strip()):
                text, changed = text[: -len(mark.strip())].rstrip(), True
    return text


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


def search_caption(hit: Any) -> str:
    """A gallery caption: score and words first (a long file name is cut at the end), then the name."""
    return f"{hit.score:.2f} {hit.label} · {hit.name}"


def thumbnail(picture: Any, side: int = 384) -> Any:
    """A small copy of a decoded picture for a gallery."""
    small = picture.copy()
    small.thumbnail((side, side))
    return small


def batch_table(results: Sequence[BatchResult]) -> list[list[Any]]:
    """Rows of the Batch tab's table: file, caption, seconds, note (gradio shows cells as plain text)."""
    return [[r.name, r.caption or "", None if r.seconds is None else round(r.seconds, 2), r.error or ""]
            for r in results]


def batch_summary(results: Sequence[BatchResult], total: int, *, running: bool, stopped: bool = False) -> str:
    """Markdown: how far the batch is and how it went."""
    done = sum(1 for r in results if r.ok)
    skipped = sum(1 for r in results if r.skipped)
    failed = len(results) - done - skipped
    parts = [f"**{done}** of {total} captioned"]
    if failed:
        parts.append(f"{failed} could not be read or captioned")
    if skipped:
        parts.append(f"{skipped} skipped (not images)")
    head = "Working… " if running else ("Stopped: " if stopped else "Done: ")
    return head + ", ".join(parts) + "."


def compare_card(model: str, result: Any = None, *, running: bool = False, scoring: bool = False) -> str:
    """HTML for one Compare column: the model, its text, time and trust (everything escaped)."""
    name = html.escape(Path(model).name if "/" in model and Path(model).name else model)
    head = f'<div class="compare-model" title="{html.escape(model)}">{name}</div>'
    if result is None or not result.done:
        wait = "writing…" if running else "waiting for its turn…"
        return f'<div class="compare-card">{head}<div class="compare-text compare-wait">{wait}</div></div>'
    if result.text is None:
        body = f'<div class="compare-text compare-error">{html.escape(result.error or "No answer.")}</div>'
        return f'<div class="compare-card">{head}{body}</div>'
    text = result.text.strip() or "(the model gave an empty answer)"
    body = f'<div class="compare-text">{html.escape(text)}</div>'
    meta = [f"{result.seconds:.2f} s" if result.seconds is not None else ""]
    if result.total_seconds is not None and result.seconds is not None and result.total_seconds - result.seconds > 0.5:
        meta.append(f"{result.total_seconds:.1f} s with loading")
    if result.trust is not None:
        meta.append(trust_span(result.trust_label or "", f"image-text match probability {result.trust:.2f}"))
    elif scoring:
        meta.append('<span class="compare-wait">checking the match…</span>')
    elif result.error:
        meta.append(f'<span title="{html.escape(result.error)}">no trust score</span>')
    line = " · ".join(part for part in meta if part)
    return f'<div class="compare-card">{head}{body}<div class="compare-meta">{line}</div></div>'


def _captions_filename(model: str, suffix: str) -> str:
    """``captions-<model>-<time>.<suffix>``, like the conversation exports' names."""
    return "captions-" + export_filename(model, suffix).removeprefix("conversation-")


class _Downloads:
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


class _Cancels:
    """The running batch of each browser session, so that Stop can end it."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}

    def start(self, session: str) -> threading.Event:
        """A new cancel event for ``session`` (a batch already running there is stopped)."""
        self.stop(session)
        event = threading.Event()
        self._events[session] = event
        return event

    def stop(self, session: str) -> None:
        """Stop ``session``'s batch, if one runs."""
        event = self._events.get(session)
        if event is not None:
            event.set()

    def finish(self, session: str, event: threading.Event) -> None:
        """Forget ``event`` unless a newer batch replaced it."""
        if self._events.get(session) is event:
            del self._events[session]


# --------------------------------------------------------------------------------------------------
# The API


def add_extra_api(service: Service, config: AppConfig, limiter: RateLimiter) -> None:
    """Register ``/trust`` and ``/search`` (when a trust model is offered) and ``/embed`` in the current Blocks.

    Like ui.add_api: typed from the hints, every call counted by the per-client rate limit, errors as
    one sentence.
    """
    image_limits = config.image_limits
    trust_model = config.trust_model

    def decode(image: Any) -> Any:
        return load_image(uploaded_path(image), image_limits)

    def trust(image: FileData, text: str, model: str = trust_model or "", request: gr.Request = None) -> dict[str, Any]:
        """How well a text matches an image, by the image-text matching model: {score, label, model}.

        score is the matching head's probability that the text describes the image (0..1); label is
        "very likely" (>= 0.8), "likely" (>= 0.5), "uncertain" (>= 0.2) or "unlikely". For an answer,
        send the question and the answer together ("What is the cat doing? sleeping").
        """
        from blip_app.models.retrieval import trust_score

        try:
            limiter.check(client_key(request))
            text = clean_message(text, what="text to score", max_chars=SEARCH_TEXT_CHARS)
            return trust_score(service, model_name(model), decode(image), text).as_dict()
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    def search(images: list[FileData], query: str, model: str = trust_model or "",
               request: gr.Request = None) -> list[dict[str, Any]]:
        """Rank images (files, or zip archives of images) by how well they match query, best first.

        Each entry: {index (position among the images given), name, score (match probability), label,
        similarity (contrastive cosine)}.
        """
        from blip_app.models.retrieval import search as rank

        try:
            limiter.check(client_key(request))
            query = clean_message(query, what="search text", max_chars=SEARCH_TEXT_CHARS)
            items, _ = expand_uploads(images or [], image_limits, SEARCH_LIMIT)
            items = [item for item in items if not item.skipped]

            def loader(item: BatchItem) -> Any:
                def load() -> Any:  # called by rank when this image's turn comes: one decoded at a time
                    try:
                        return item.load()
                    except BadImageError as exc:
                        raise BadImageError(f"{item.name}: {exc}") from None
                return load

            return [hit.as_dict() for hit in rank(service, model_name(model), [loader(item) for item in items], query,
                                                   names=[item.name for item in items])]
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    def embed(image: FileData | None = None, text: str | None = None, model: str = trust_model or config.default_model,
              full: bool = False, request: gr.Request = None) -> list[dict[str, Any]]:
        """The features a model gives for an image and/or a text: one entry per kind.

        With the image-text matching model: itc-image / itc-text (the projected, normalised embeddings
        search uses), qformer, qformer-text and image. With a captioning model: image, qformer, text.
        Each entry: {kind, description, model, input, shape, norm, pooling, vector}; rows too if full.
        """
        from blip_app.models.retrieval import embed as features

        try:
            limiter.check(client_key(request))
            items: list[Any] = []
            names: list[str] = []
            if image is not None:
                items.append(decode(image))
                names.append(uploaded_files(image)[0][1])
            if text is not None:
                text = clean_message(text, what="text to embed", max_chars=SEARCH_TEXT_CHARS, allow_empty=True)
            if text:
                items.append(text)
                names.append(text)
            if not items:
                raise BadInputError("Give an image, a text, or both to embed.")
            return [e.as_dict(full=bool(full)) for e in features(service, model_name(model), items, names=names)]
        except Exception as exc:  # noqa: BLE001
            raise _api_error(exc) from None

    if trust_model:
        gr.api(spaces.GPU(trust), api_name="trust")
        gr.api(spaces.GPU(search), api_name="search")
    gr.api(spaces.GPU(embed), api_name="embed")


# --------------------------------------------------------------------------------------------------
# The page


class Tools:
    """The extra parts of the page and the handlers behind them (each takes and returns plain values)."""

    def __init__(self, service: Service, config: AppConfig, limiter: RateLimiter) -> None:
        self.service = service
        self.image_limits = config.image_limits
        self.limiter = limiter
        self.limits: Limits = service.limits
        self.trust_model = config.trust_model
        self.auto_trust = bool(config.trust and config.trust_model)
        self.max_batch_images = config.max_batch_images
        # exports and batch results: deleted on the uploads' schedule (--delete-uploads-after; 0 keeps them)
        self.downloads = _Downloads(keep_s=float(config.delete_uploads_after_s) or None)
        self.batches = _Cancels()
        self._sliders: dict[str, Any] = {}  # the chat's settings sliders, by name
        self._resume: tuple[list[Any], list[Any]] | None = None  # inputs and outputs of chat_resume

    def picture(self, value: Any) -> Any:
        """The uploaded image, decoded by blip_app.core.images.load_image (raises BadImageError)."""
        return load_image(uploaded_path(value), self.image_limits)

    def captioning_models(self) -> list[ModelState]:
        """The offered models that caption and answer."""
        return captioning_only(self.service, self.service.models())

    # ---------------------------------------------------------------- trust lines (Caption and Ask tabs)

    def trust_line(self, elem_id: str) -> Any:
        """The empty trust line to place under an output box, or None when trust scores are off."""
        if not self.auto_trust:
            return None
        return gr.HTML("", elem_id=elem_id, css_template=TRUST_CSS, container=False, padding=False)

    def wire_trust(self, line: Any, triggers: Sequence[Any], event: Any, task: Task, image: Any, output: Any,
                   question: Any = None) -> None:
        """Clear ``line`` when a request starts (``triggers``); score the shown text once ``event`` completes."""
        if line is None:
            return
        gr.on(triggers, lambda: "", None, line, **LIGHT)
        if task is Task.CAPTION:
            event.then(spaces.GPU(self.score_caption), [image, output], line, preprocess=False,
                       show_progress="minimal", concurrency_id="decode",
                       concurrency_limit=DECODE["concurrency_limit"], **PRIVATE)
        else:
            event.then(spaces.GPU(self.score_answer), [image, question, output], line, preprocess=False,
                       show_progress="minimal", concurrency_id="decode",
                       concurrency_limit=DECODE["concurrency_limit"], **PRIVATE)

    def score_caption(self, image: Any, caption: str, request: gr.Request = None) -> str:
        """Event: the trust line for the caption shown, on the picture shown."""
        return self._score(Task.CAPTION, image, "", caption, request)

    def score_answer(self, image: Any, question: str, answer: str, request: gr.Request = None) -> str:
        """Event: the trust line for the question and answer shown, on the picture shown."""
        return self._score(Task.ANSWER, image, question, answer, request)

    def _score(self, task: Task, image: Any, question: str, text: str, request: gr.Request | None) -> str:
        """The trust line; counted by the rate limit (it decodes the picture and runs the matching model)."""
        from blip_app.models.retrieval import trust_score, trust_text

        reply = shown_reply(text)
        if not reply or image is None or not self.trust_model:
            return ""
        try:
            self.limiter.check(client_key(request))
            trust = trust_score(self.service, self.trust_model, self.picture(image),
                                trust_text(task, question or "", reply))
        except Exception as exc:  # noqa: BLE001 - the caption stands without its score; no toast each time
            if isinstance(exc, BlipAppError):
                log.info("No trust score: %s", exc)
            else:
                log.exception("Trust score failed")
            return trust_html(note=user_message(exc))
        return trust_html(trust)

    # ---------------------------------------------------------------- chat: export and load

    def chat_files(self, chat: Mapping[str, Any], image: Any, model: Any, status: Any) -> None:
        """The chat tab's 'Export or load' accordion. ``chat`` is what ui.chat_tab returns."""
        state, settings = chat["state"], chat["settings"]
        pending = gr.State(None)  # a loaded conversation waiting for its picture
        with gr.Accordion("Export or load this conversation", open=False, elem_id="chat-files"):
            gr.Markdown("The files carry a reproducibility card: model, revision, precision, seed, every "
                        "generation setting and the SHA-256 of the picture (the picture itself is not included). "
                        "Load a JSON export, upload the same picture, and the conversation goes on.",
                        elem_classes="note")
            with gr.Row():
                markdown = gr.Button("⬇ Markdown", interactive=False, size="sm", elem_id="chat-export-md")
                json_file = gr.Button("⬇ JSON", interactive=False, size="sm", elem_id="chat-export-json")
                load = gr.UploadButton("⬆ Load a JSON export", file_types=[".json"], file_count="single",
                                       size="sm", elem_id="chat-import")
            # The file is written only when someone asks for it: a click builds it into this hidden button,
            # and the page then clicks that to save it.
            fetch = gr.DownloadButton("Save", value=None, visible="hidden", elem_id="chat-export-file")
        state.change(self.export_buttons, state, [markdown, json_file], **LIGHT)
        for button, build in ((markdown, self.export_markdown), (json_file, self.export_json)):
            button.click(build, [state, model], fetch, inputs_kwargs=settings, **LIGHT).then(
                None, None, None, js=SAVE_EXPORT, **LIGHT)
        sliders = [settings[name] for name in SLIDERS]
        outputs = [chat["chatbot"], state, chat["note"], model, status, pending, *chat["history_buttons"], *sliders]
        load.upload(self.chat_import, [load, state, model, pending], outputs, preprocess=False, **DECODE)
        # gradio leaves the file in the hidden <input>, so choosing the same file again would fire nothing
        load.upload(None, None, None, js=RESET_IMPORT_INPUT, **LIGHT)
        self._sliders = {name: settings[name] for name in SLIDERS}
        self._resume = ([state, model, pending], outputs)

    def after_new_image(self, event: Any) -> None:
        """Wire the step after ui's new-image event: a loaded conversation waiting for this picture goes on."""
        if self._resume is not None:
            inputs, outputs = self._resume
            event.then(self.chat_resume, inputs, outputs, **LIGHT)

    def _chat_settings(self, model: str, settings: Mapping[str, Any]) -> Any:
        """The settings the chat's next answer would use (the checkpoint's own, if its model is loaded)."""
        preset, overrides = split_settings(Task.CHAT, settings)
        checkpoint = None
        if model in self.service.manager.loaded_names():
            with self.service.manager.use(model) as loaded:
                checkpoint = getattr(loaded, "checkpoint_generation", None)
        return resolve_settings(Task.CHAT, preset, overrides, checkpoint=checkpoint, limits=self.limits)

    def export_buttons(self, chat: Mapping[str, Any]) -> tuple[Any, Any]:
        """Event (the conversation changed): the download buttons work when there is something to export."""
        ready = bool(chat.get("turns"))
        return gr.Button(interactive=ready), gr.Button(interactive=ready)

    def export_markdown(self, chat: Mapping[str, Any], model: str, request: gr.Request = None,
                        **settings: Any) -> Any:
        """Event (⬇ Markdown): the conversation as Markdown, written now, for the page to save."""
        return self.chat_export("md", chat, model, request, **settings)

    def export_json(self, chat: Mapping[str, Any], model: str, request: gr.Request = None, **settings: Any) -> Any:
        """Event (⬇ JSON): the conversation as JSON, written now, for the page to save."""
        return self.chat_export("json", chat, model, request, **settings)

    def chat_export(self, kind: str, chat: Mapping[str, Any], model: str, request: gr.Request = None,
                    **settings: Any) -> Any:
        """The hidden download button holding a fresh ``kind`` ("md" or "json") export of the conversation.

        Counted by the rate limit (each writes a file); deleted on the uploads' schedule.
        """
        turns = chat.get("turns") or []
        if not turns:
            gr.Info("There is nothing to export yet.")
            return gr.skip()
        try:
            self.limiter.check(client_key(request))
            card = card_for(self.service, model, self._chat_settings(model, settings), image_sha256=chat.get("image"))
            text = (conversation_to_markdown(turns, card) if kind == "md" else conversation_to_json(turns, card))
            path = save_text(text, export_filename(model, kind), self.downloads.folder())
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            return gr.skip()
        return gr.DownloadButton(value=str(path))

    def chat_import(self, upload: Any, chat: Mapping[str, Any], model: str, pending: Any,
                    request: gr.Request = None) -> tuple[Any, ...]:
        """Event: read a JSON export; continue it now if the picture shown is its picture, else wait for it."""
        keep = self._unchanged()
        try:
            path = uploaded_files(upload)[0][0] if upload else None
            if path is None:
                return keep
            self.limiter.check(client_key(request))
            # the limits and the cleaning of chat itself: what loads can be continued
            imported = conversation_from_json(Path(path), max_chars=self.service.max_message_chars)
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            return keep
        loaded = {"history": [list(turn) for turn in imported.history], "model": imported.model,
                  "settings": dict(imported.settings), "image_sha256": imported.image_sha256}
        current = chat.get("image")
        if current is not None and imported.image_sha256 in (None, current):
            return self._restore(loaded, chat, model)
        turns = len(loaded["history"])
        what = f"A conversation of {turns} turn(s) with {inert(imported.model)} was loaded"
        if current is None:
            note = f"{what}. Upload the picture it is about to continue it."
        else:
            gr.Warning("This conversation was about another picture (its SHA-256 differs from the one shown). "
                       "Upload the original picture to continue it; the current chat is unchanged.")
            note = (f"{what}, but it was about another picture: upload that picture to continue it "
                    f"(SHA-256 {imported.image_sha256[:12]}…; this one is {current[:12]}…).")
        return (*keep[:2], note, *keep[3:5], loaded, *keep[6:])

    def chat_resume(self, chat: Mapping[str, Any], model: str, pending: Any) -> tuple[Any, ...]:
        """Event (after a new picture): continue the loaded conversation if this is its picture."""
        keep = self._unchanged()
        current = chat.get("image")
        if not pending or current is None:
            return keep
        if pending.get("image_sha256") in (None, current):
            return self._restore(pending, chat, model)
        note = ("This picture is not the one the loaded conversation was about (its SHA-256 differs): upload "
                "the original to continue it.")
        return (*keep[:2], note, *keep[3:])

    def _unchanged(self) -> tuple[Any, ...]:
        return tuple(gr.skip() for _ in range(6 + 3 + len(SLIDERS)))

    def _restore(self, loaded: Mapping[str, Any], chat: Mapping[str, Any], model: str) -> tuple[Any, ...]:
        """Outputs that put a loaded conversation, its model and its settings in place."""
        turns = [[str(q), str(a)] for q, a in loaded["history"]]
        state = {"image": chat.get("image"), "turns": turns}
        states = self.captioning_models()
        names = [s.name for s in states]
        wanted = str(loaded.get("model") or "")
        chosen = wanted if wanted in names else model
        notes = [f"Loaded {len(turns)} turn(s); ask the next question to continue."]
        if wanted != chosen:
            notes.append(f"The model {inert(wanted)} is not offered here, so {inert(chosen)} goes on with it.")
        if loaded.get("image_sha256") is None:
            notes.append("The file records no picture, so it could not be checked against this one.")
        values, capped = [], []
        for name in SLIDERS:
            value = loaded["settings"].get(name)
            slider = self._sliders[name]
            if value is None:
                values.append(gr.skip())
                continue
            if hasattr(slider, "maximum") and not isinstance(value, bool):
                bounded = min(max(value, slider.minimum), slider.maximum)
                if bounded != value:
                    capped.append(name)
                value = bounded
            values.append(value)
        if capped:
            notes.append(f"Capped to this server's limits: {', '.join(capped)}.")
        return (chat_messages(turns), state, " ".join(notes), gr.Dropdown(choices=model_choices(states), value=chosen),
                model_status(states, chosen), None, *_history_buttons(bool(turns)), *values)

    # ---------------------------------------------------------------- search tab

    def search_tab(self) -> None:
        """Several images (or a zip), a sentence, the images ranked by how well they match it."""
        gr.Markdown(f"Drop up to {SEARCH_LIMIT} photos (or a zip of them), describe what you are looking for, "
                    "and see them ranked by the image-text matching model. The score under each is the "
                    "probability that the sentence describes the photo.", elem_classes="note")
        files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos, or a zip of photos",
                        height=150, elem_id="search-files")
        with gr.Row(equal_height=True):
            query = gr.Textbox(placeholder="a cat asleep on a sofa", show_label=False, scale=5, lines=1,
                               max_length=SEARCH_TEXT_CHARS, elem_id="search-query")
            run = gr.Button("Search", variant="primary", scale=1, min_width=90, elem_id="search-run")
        summary = gr.Markdown("", elem_classes="note", elem_id="search-summary")
        # height "fit-content": gradio's "auto" keeps a 450 px minimum (a blank block under a few results)
        gallery = gr.Gallery(label="Best match first", show_label=False, columns=4, height="fit-content",
                             object_fit="cover", interactive=False, allow_preview=True, buttons=["fullscreen"],
                             elem_id="search-results")
        gr.on([run.click, query.submit], spaces.GPU(self.run_search), [files, query], [gallery, summary],
              preprocess=False, show_progress_on=[gallery], trigger_mode="always_last", **PRIVATE)

    def run_search(self, files: Any, query: str, request: gr.Request,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple[Any, Any]:
        """Event: rank the uploaded images by the query; a gallery with rank, name, label and score."""
        from blip_app.models.retrieval import search

        try:
            self.limiter.check(client_key(request))
            query = clean_message(query, what="search text", max_chars=SEARCH_TEXT_CHARS)
            items, notes = expand_uploads(files, self.image_limits, SEARCH_LIMIT)
            items = [item for item in items if not item.skipped]
            if not items:
                raise BadInputError("Add some photos (or a zip of photos) to search first.")
            thumbnails: dict[int, Any] = {}

            def loader(index: int, item: BatchItem) -> Any:
                def load() -> Any:  # called by search when this image's turn comes: one decoded at a time
                    try:
                        picture = item.load()
                    except BlipAppError as exc:
                        notes.append(f"{item.name}: {exc}")
                        return None
                    thumbnails[index] = thumbnail(picture)
                    return picture
                return load

            progress(0, desc=f"Ranking {len(items)} images…")
            hits = search(self.service, self.trust_model, [loader(i, item) for i, item in enumerate(items)], query,
                          names=[item.name for item in items])
            if not hits:
                raise BadInputError("None of the files could be read as a photo: "
                                    + "; ".join(notes[:3]) + ("…" if len(notes) > 3 else ""))
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            return gr.skip(), gr.skip()
        gallery = [(thumbnails[hit.index], search_caption(hit)) for hit in hits]
        lines = [f"**{len(hits)}** images ranked for “{inert(query)}”, best match first. Each score is the "
                 "probability that the sentence describes the photo (0.8 or more: very likely; 0.5: likely; "
                 "0.2: uncertain; below: unlikely)."]
        lines += [f"Left out: {inert(note)}" for note in notes[:20]]
        return gallery, "\n\n".join(lines)

    # ---------------------------------------------------------------- batch tab

    def batch_tab(self, model: Any) -> None:
        """Captions for many images with the chosen model: a progress bar, a table, CSV and JSON Lines."""
        gr.Markdown(f"Caption up to {self.max_batch_images} photos at once with the model chosen above: several "
                    "files or zip archives. The downloads record the model and every generation setting.",
                    elem_classes="note")
        files = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos, or zip archives of photos",
                        height=150, elem_id="batch-files")
        style = gr.Radio([("Short captions", "short"), ("Detailed descriptions", "detailed")], value="short",
                         label="Style")
        with gr.Row():
            run = gr.Button("Caption all", variant="primary", elem_id="batch-run")
            stop = gr.Button("Stop", variant="stop", visible=False, elem_id="batch-stop")
        summary = gr.Markdown("", elem_classes="note", elem_id="batch-summary")
        table = gr.Dataframe(headers=BATCH_HEADERS, datatype=["str", "str", "number", "str"], interactive=False,
                             wrap=True, max_height=420, column_widths=["22%", "50%", "14%", "14%"],
                             label="Captions", elem_id="batch-table")
        with gr.Row():
            csv_file = gr.DownloadButton("⬇ CSV", value=None, interactive=False, size="sm", elem_id="batch-csv")
            jsonl_file = gr.DownloadButton("⬇ JSON Lines", value=None, interactive=False, size="sm",
                                           elem_id="batch-jsonl")
        panel = settings_panel(Task.CAPTION, self.limits)
        style.change(lambda chosen: Preset.DETAILED.value if chosen == "detailed" else Preset.STANDARD.value,
                     style, panel.controls["preset"], **LIGHT)
        outputs = [table, summary, csv_file, jsonl_file, run, stop]
        run.click(spaces.GPU(self.run_batch), [files, model, style], outputs, preprocess=False,
                  inputs_kwargs=panel.controls, show_progress_on=[summary], **PRIVATE)
        stop.click(self.stop_batch, None, None, **_STOP)

    def stop_batch(self, request: gr.Request) -> None:
        """Event: stop this session's batch (images not started are dropped)."""
        self.batches.stop(_session(request))

    def run_batch(self, files: Any, model: str, style: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: caption every uploaded image, the table filling as captions arrive; then the downloads."""
        from blip_app.tasks.batch import caption_many

        session = _session(request)
        idle = (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.Button(visible=True), gr.Button(visible=False))
        try:
            self.limiter.check(client_key(request))
            items, _ = expand_uploads(files, self.image_limits, self.max_batch_images)
            if not items:
                raise BadInputError("Add some photos (or zip archives of photos) to caption first.")
            preset, overrides = split_settings(Task.CAPTION, settings)
            self.service.request(Task.CAPTION, preset=preset, overrides=overrides)  # refuse bad settings now
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield idle
            return
        cancel = self.batches.start(session)
        total = len(items)
        results: list[BatchResult] = []
        off = gr.DownloadButton(value=None, interactive=False)
        yield ([], f"Working… 0 of {total}.", off, off, gr.Button(visible=False), gr.Button(visible=True))
        try:
            with stopped_when_client_leaves(cancel):
                if not any(s.name == model and s.state == "loaded" for s in self.service.models()):
                    progress(0, desc=f"Loading {model}…")
                steps = caption_many(self.service, model, items, preset, overrides, detailed=style == "detailed",
                                     cancel=cancel, progress=lambda done, count, name: progress(
                                         (done, count), desc=f"{done} of {count}", unit="images"))
                shown = time.monotonic()
                for result in steps:
                    results.append(result)
                    # Each view re-sends the whole table: a caption (which took a model run) is shown at once,
                    # rows that cost nothing (skipped files, unreadable images) at most every ROWS_EVERY_S.
                    if result.ok or time.monotonic() - shown >= ROWS_EVERY_S:
                        shown = time.monotonic()
                        yield (batch_table(results), batch_summary(results, total, running=True), gr.skip(),
                               gr.skip(), gr.skip(), gr.skip())
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
        finally:
            self.batches.finish(session, cancel)
        stopped = cancel.is_set() and len(results) < total
        summary = batch_summary(results, total, running=False, stopped=stopped)
        if not results:
            yield (gr.skip(), summary, off, off, gr.Button(visible=True), gr.Button(visible=False))
            return
        try:
            folder = self.downloads.folder()
            csv_path = save_text(batch_to_csv(results), _captions_filename(model, "csv"), folder)
            jsonl_path = save_text(batch_to_jsonl(results), _captions_filename(model, "jsonl"), folder)
            files_out = (gr.DownloadButton(value=str(csv_path), interactive=True),
                         gr.DownloadButton(value=str(jsonl_path), interactive=True))
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            files_out = (off, off)
        yield (batch_table(results), summary, *files_out, gr.Button(visible=True), gr.Button(visible=False))

    # ---------------------------------------------------------------- compare tab

    def compare_tab(self, image: Any) -> None:
        """Two or three models on the shared picture and prompt; one column each, with its time and trust."""
        states = self.captioning_models()
        choices = [(state.label, state.name) for state in states]
        if len(choices) < 2:
            gr.Markdown("Side by side needs two or more captioning models: start the app with several `--model` "
                        "options to compare them here.", elem_classes="note", elem_id="compare-none")
            return
        gr.Markdown("The same picture and prompt go to each model in turn (one at a time in memory); every "
                    "column shows the text, how long it took" + (" and how well it matches the picture."
                                                                 if self.auto_trust else "."),
                    elem_classes="note")
        models = gr.CheckboxGroup(choices, value=[name for _, name in choices[:2]], label="Models (two or three)",
                                  elem_id="compare-models")
        chosen = gr.State([name for _, name in choices[:2]])
        with gr.Row(equal_height=True):
            task = gr.Radio([("Caption", "caption"), ("Question", "answer")], value="caption",
                            label="Task", scale=2, min_width=200, elem_id="compare-task")
            preset = gr.Radio([(PRESET_LABELS[p], p.value) for p in Preset], value=Preset.STANDARD.value,
                              label="Decoding", scale=5)
        question = gr.Textbox(label="Question", placeholder="What is the cat doing?", visible=False, lines=1,
                              max_length=self.service.max_message_chars, elem_id="compare-question")
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        with gr.Row(equal_height=True, elem_id="compare-columns"):
            cards = [gr.HTML("", visible=False, css_template=CARD_CSS, min_width=200, elem_id=f"compare-{n}",
                             elem_classes="compare-column") for n in range(COMPARE_LIMIT)]
        task.change(lambda chosen_task: gr.Textbox(visible=chosen_task == "answer"), task, question, **LIGHT)
        models.input(self.limit_models, [models, chosen], [models, chosen], **LIGHT)
        gr.on([run.click, question.submit], spaces.GPU(self.run_compare), [models, task, question, preset, image],
              cards, preprocess=False, show_progress="hidden", trigger_mode="always_last", **PRIVATE)

    def limit_models(self, models: list[str], previous: list[str]) -> tuple[list[str], list[str]]:
        """Event: at most three models; a fourth tick is undone with a note."""
        if len(models or []) > COMPARE_LIMIT:
            gr.Info(f"At most {COMPARE_LIMIT} models can be compared at once; untick one first.")
            return previous, previous
        return models, models

    def run_compare(self, models: list[str], task: str, question: str, preset: str, image: Any,
                    request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Event: run the models in turn; each column fills as its model finishes, then the trust scores."""
        from blip_app.tasks.compare import iter_compare

        names = [str(m) for m in (models or [])]
        hidden = tuple(gr.HTML(value="", visible=False) for _ in range(COMPARE_LIMIT))
        try:
            self.limiter.check(client_key(request))
            if len(names) < 2:
                raise BadInputError("Tick two or three models to compare.")
            if len(names) > COMPARE_LIMIT:
                raise BadInputError(f"At most {COMPARE_LIMIT} models can be compared at once.")
            for name in names:
                self.service.manager.ref(name)  # UnknownModelError naming the choices
                if is_matching_model(self.service, name):
                    raise BadInputError(f"{name} is an image-text matching model; it cannot caption or answer.")
            picture = self.picture(image)
            request_task = Task(task)
            self.service.request(request_task, question=question or "", preset=preset)  # refuse bad input now
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield tuple(gr.skip() for _ in range(COMPARE_LIMIT))
            return

        def view(results: Sequence[Any] | None, *, scoring: bool = False) -> tuple[Any, ...]:
            cards = []
            running = next((i for i, r in enumerate(results or []) if not r.done), 0 if results is None else -1)
            for index in range(COMPARE_LIMIT):
                if index >= len(names):
                    cards.append(hidden[index])
                    continue
                result = results[index] if results else None
                cards.append(gr.HTML(value=compare_card(names[index], result, running=index == running,
                                                        scoring=scoring and bool(result and result.text)),
                                     visible=True))
            return tuple(cards)

        yield view(None)
        trust = self.trust_model if self.auto_trust else None
        scored = False
        try:
            for results in iter_compare(self.service, names, picture, request_task, question or "", preset,
                                        trust=trust):
                everyone = all(r.done for r in results)
                # iter_compare yields once more, with the scores, after the last model: say so meanwhile
                yield view(results, scoring=bool(trust) and everyone and not scored)
                scored = scored or everyone
        except Exception as exc:  # noqa: BLE001
            _notify(exc)
            yield hidden
