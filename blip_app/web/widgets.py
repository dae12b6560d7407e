"""The parts of the page that several tabs use: the page's style, the decoding settings panel, the prompt
inspector, the trust line, the model picker's handlers, and the base every tab's handlers build on
(:class:`Tab`: the service, the limits, the running jobs; :class:`ReplyTab`: a caption or an answer into
one output box, with its trust line).

Below the tabs (web/tabs/), above web/common.py; imports no tab.

gradio finds the ``gr.Request`` and ``gr.Progress`` parameters of handlers by their type hints, evaluated
at run time, so the page's modules with handlers do not use ``from __future__ import annotations``.
"""

import contextvars
import html
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr
import spaces

from blip_app.config import AppConfig
from blip_app.core.settings import PRESET_HELP, Limits, Preset, Task, preset_settings
from blip_app.errors import BlipAppError, CancelledError, ModelLoadError, UnsupportedCheckpointError, user_message
from blip_app.tasks.service import Request, Service
from blip_app.web.common import (
    CURSOR,
    DECODE,
    DEFAULT_PRESET,
    EMPTY_PROMPT,
    LIGHT,
    PRESET_LABELS,
    PRIVATE,
    Jobs,
    captioning_states,
    client_key,
    decode_upload,
    inert,
    loads_limiter,
    model_choices,
    model_status,
    notify,
    prompt_stats,
    reply_note,
    session_id,
    split_settings,
)
from blip_app.web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

NO_PROMPT = "(nothing yet: the prompt appears here when a request runs, or press Preview)"

# What ReplyTab writes around a reply in the Caption and Ask boxes (shown_reply takes it off again).
THINKING = "thinking…"
EMPTY_REPLY = "(the model gave an empty answer)"
REPLY_MARKS = (" [stopped]", " [cut short at the time limit]", CURSOR)

CSS = """
.gradio-container { width: 100% !important; max-width: 1240px !important; margin: 0 auto !important; }
#header h1 { margin-bottom: 0.1em; }
#header p { margin-top: 0; color: var(--body-text-color-subdued); }
#model-status p { margin: 0.35em 0; }
.note p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0.2em 0; }
/* Toasts appear at the bottom, never over the model's status line at the top. */
.toast-wrap { top: auto !important; bottom: var(--size-4) !important; }
/* The file lists of Search and Batch grow with their files (gradio's fixed height showed two rows). */
#batch-files, #search-files { height: auto !important; min-height: 150px; }
#batch-files .file-preview-holder, #search-files .file-preview-holder { max-height: 320px; overflow-y: auto; }
@media (max-width: 720px) {
  /* A phone: a short header, the status under the picker, then the picture, the tabs, and the examples. */
  .gradio-container { padding: 0 8px !important; }
  #header h1 { font-size: 1.35rem; margin: 0.2em 0 0; }
  #header p { font-size: var(--text-sm); line-height: 1.3; }
  #picker-row { flex-direction: column; gap: 4px; }
  #picker-row > * { width: 100% !important; min-width: 0 !important; flex: none !important; }
  #model-status { font-size: var(--text-sm); }
  #main-row { flex-direction: column; }
  #image-column { display: contents; }
  #image { order: 1; height: 240px !important; }
  #tabs-column { order: 2; width: 100% !important; min-width: 0 !important; }
  #examples { order: 3; }
  #chatbot { height: 340px !important; }
  #tabs button[role=tab] { padding: 6px 10px; }
  /* Tables keep readable columns and scroll sideways: the header table and the rows' viewport are both
     children of .table-wrap, so both get the same width and the columns stay aligned. */
  #batch-table .table-wrap { overflow-x: auto !important; }
  #batch-table .table-wrap > * { min-width: 600px; }
}
"""

TRUST_CSS = """
.trust-line { font-size: var(--text-sm); color: var(--body-text-color-subdued); padding: 2px 2px 0; }
.trust { cursor: help; text-decoration: underline dotted; text-underline-offset: 3px; }
.trust strong { font-weight: 600; }
.trust-very-likely strong { color: #15803d; }
.trust-likely strong { color: #0f766e; }
.trust-uncertain strong { color: #b45309; }
.trust-unlikely strong { color: #b91c1c; }
"""


# --------------------------------------------------------------------------------------------------
# Settings panel and prompt inspector


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


# The settings sliders of settings_panel, in its order.
SLIDERS = ("max_new_tokens", "min_new_tokens", "num_beams", "do_sample", "temperature", "top_p",
           "repetition_penalty", "length_penalty")


def _wire_settings(panel: SettingsPanel, limits: Limits) -> None:
    c = panel.controls
    sliders = list(SLIDERS)

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


def style_to_preset(style: Any, preset: Any) -> None:
    """Choosing the detailed style also switches the decoding preset to 'detailed' (and back)."""
    style.change(lambda chosen: Preset.DETAILED.value if chosen == "detailed" else Preset.STANDARD.value,
                 style, preset, **LIGHT)


# --------------------------------------------------------------------------------------------------
# The trust line


def trust_span(label: str, hover: str) -> str:
    """The words "Image-text match: <label>" with ``hover`` as its title (both escaped)."""
    label = str(label)
    title = f"{hover}. How well the text describes the picture, not whether it is right."
    return (f'<span class="trust trust-{html.escape(label.replace(" ", "-"))}" title="{html.escape(title)}">'
            f"Image-text match: <strong>{html.escape(label)}</strong></span>")


def trust_html(trust: Any = None, *, note: str | None = None) -> str:
    """The trust line: "Image-text match: likely" (the match probability in the hover title), or why there is none.

    It names what is measured: how well the text matches the picture, which readers took for the answer's
    correctness when it said "Confidence".

    ``trust`` is a retrieval.Trust. Everything in the line is escaped: the model name may be a folder path.
    """
    if trust is None:
        if not note:
            return ""
        return (f'<div class="trust-line"><span class="trust trust-none" title="{html.escape(note)}">'
                "Image-text match: not available</span></div>")
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


# --------------------------------------------------------------------------------------------------
# The handlers' bases


class Tab:
    """What every tab's handlers share: the service, the request limit, this tab's running jobs.

    Handlers take and return plain values; each catches everything it runs (common.notify).
    """

    def __init__(self, service: Service, config: AppConfig, limiter: RateLimiter, *,
                 problems: dict[str, str] | None = None) -> None:
        self.service = service
        self.config = config
        # Models that could not be loaded, with the reason: shared by the page's tabs, shown by the picker.
        self.problems: dict[str, str] = problems if problems is not None else {}
        self.image_limits = config.image_limits
        self.limits: Limits = service.limits
        self.limiter = limiter
        self.trust_model = config.trust_model
        self.auto_trust = bool(config.trust and config.trust_model)
        self.running = Jobs()

    def picture(self, value: Any) -> Any:
        """The uploaded image, decoded by blip_app.core.images.load_image (raises BadImageError)."""
        return decode_upload(value, self.image_limits)

    def unusable(self, model: str, exc: BaseException) -> None:
        """Remember that ``model`` cannot be loaded (offline and not cached, gated, missing, out of memory)."""
        if isinstance(exc, (ModelLoadError, UnsupportedCheckpointError)):
            self.problems[model] = str(exc)

    def _label(self, model: str) -> str:
        """How ``model`` is named to people (a folder by its name, never by its path on the server)."""
        return next((state.label for state in captioning_states(self.service) if state.name == model), model)

    def stop(self, request: gr.Request, task: Any) -> None:
        """Event: stop this session's running work in ``task`` at its next token."""
        self.running.stop(session_id(request), task)

    def stop_fn(self, task: Any) -> Any:
        """The Stop button's handler for ``task``."""
        def stop(request: gr.Request) -> None:
            self.stop(request, task)

        return stop

    def _prepare(self, model: str, request: Request, progress: gr.Progress) -> Any:
        """Service.inspect, which loads the model first if needed (with the progress bar)."""
        self._announce_load(model, progress)
        return self.service.inspect(model, request)

    def _announce_load(self, model: str, progress: gr.Progress) -> None:
        """Start the progress bar when ``model`` is about to be loaded for a request."""
        if not any(s.name == model and s.state == "loaded" for s in self.service.models()):
            progress(0, desc=f"Loading {model}…")

    def _preview(self, task: Task, model: str, settings: Mapping[str, Any], progress: gr.Progress,
                 request: gr.Request | None, **inputs: Any) -> tuple[Any, Any]:
        """The prompt and its token counts; counted by the rate limit (it may load the model)."""
        try:
            self.limiter.check(client_key(request))
            preset, overrides = split_settings(task, settings)
            request = self.service.request(task, preset=preset, overrides=overrides, **inputs)
            prepared = self._prepare(model, request, progress)
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            return gr.skip(), gr.skip()
        return prepared.prompt.text or EMPTY_PROMPT, prompt_stats(prepared)


OFFLINE_REASON = ("it is not downloaded, and this server runs offline (--offline or HF_HUB_OFFLINE=1), so it "
                  "cannot be downloaded")


class Picker(Tab):
    """The model picker: every model's state, models that cannot be used marked so with their reason (the
    page falls back to one that works), and loading the model just chosen with its progress as text."""

    def __init__(self, service: Service, config: AppConfig, limiter: RateLimiter,
                 load_limiter: RateLimiter | None = None, *, problems: dict[str, str] | None = None) -> None:
        super().__init__(service, config, limiter, problems=problems)
        self.load_limiter = load_limiter or loads_limiter(limiter)

    def reasons(self, states: Sequence[Any]) -> dict[str, str]:
        """Why each model that cannot be used now cannot: a failed load, or offline and not downloaded."""
        reasons = {}
        for state in states:
            if state.state == "loaded":
                self.problems.pop(state.name, None)  # it loads after all (a file was added, memory freed)
            elif state.name in self.problems:
                reasons[state.name] = self.problems[state.name]
            elif state.state == "download" and self.config.load.local_files_only:
                reasons[state.name] = OFFLINE_REASON
        return reasons

    def view(self, model: str) -> tuple[list[tuple[str, str]], str, str]:
        """The picker's choices, the model it shows (``model``, or one that works instead) and the status line."""
        states = captioning_states(self.service)
        reasons = self.reasons(states)
        choices = [(label + (" · unavailable" if name in reasons else ""), name)
                   for (label, name) in model_choices(states)]
        if model not in reasons:
            return choices, model, model_status(states, model)
        usable = [s for s in states if s.name not in reasons]
        fallback = next((s for s in usable if s.state == "loaded"), usable[0] if usable else None)
        label = next((s.label for s in states if s.name == model), model)
        why = f"**Unavailable**: {inert(label)} cannot be used: {inert(reasons[model])}"
        if fallback is None:
            return choices, model, why + "\n\nNo offered model can be used right now."
        return choices, fallback.name, (f"{model_status(states, fallback.name)}\n\n{why} "
                                        f"{inert(fallback.label)} is used instead.")

    def models_view(self, model: str) -> tuple[Any, str]:
        """The model picker (choices, and the model shown) and the status line."""
        choices, shown, status = self.view(model)
        return gr.Dropdown(choices=choices, value=shown), status

    def refresh_models(self, model: str) -> tuple[Any, str]:
        """Event: show every model's current state (page load, after each request)."""
        try:
            return self.models_view(model)
        except Exception as exc:  # noqa: BLE001 - shown, never raised into gradio
            notify(exc)
            return gr.skip(), gr.skip()

    def load_model(self, model: str, request: gr.Request,
                   progress: gr.Progress = gr.Progress(track_tqdm=True)) -> Iterator[tuple[Any, str]]:
        """Event: load the model just chosen; the status line says how far the download and loading are.

        Counted by the rate limit, and a model not already loaded also by the stricter one for loads (a
        load at real size reads gigabytes and may evict another user's model). A model that cannot be
        loaded is marked unavailable with its reason, in place, and the picker falls back to one that works.
        """
        try:
            self.limiter.check(client_key(request))
            if model not in self.service.manager.loaded_names():
                self.load_limiter.check(client_key(request))
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            yield self.refresh_models(model)
            return
        if model in self.reasons(captioning_states(self.service)):
            yield self.refresh_models(model)  # known not to work (offline, or failed before): the fallback
            return
        failure: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            try:
                self.service.load(model)
            except BaseException as exc:  # noqa: BLE001 - reported below, in the status line
                failure.append(exc)
            finally:
                done.set()

        # The copied context lets gradio's tqdm tracking see the download's and the loader's progress bars.
        threading.Thread(target=contextvars.copy_context().run, args=(load,), name="load-model", daemon=True).start()
        started = time.monotonic()
        label = self._label(model)
        while not done.wait(0.4):
            yield gr.skip(), loading_status(label, getattr(progress, "iterables", []), time.monotonic() - started)
        if failure:
            if isinstance(failure[0], (ModelLoadError, UnsupportedCheckpointError)):
                self.unusable(model, failure[0])
                log.info("Could not load %s: %s", model, failure[0])
            else:
                notify(failure[0])
        yield self.refresh_models(model)


def loading_status(label: str, bars: Sequence[Any], seconds: float) -> str:
    """The status line while a model loads: what is being done (downloaded bytes, shards, weights) and for how long.

    ``bars`` are the progress bars gradio tracks for the event (tqdm: a description, a position, a total, a unit).
    """
    steps = []
    for bar in bars:
        done, total = getattr(bar, "index", None), getattr(bar, "length", None)
        what = (getattr(bar, "desc", None) or "").strip().rstrip(":") or "working"
        if done is None:
            continue
        if getattr(bar, "unit", "") in ("B", "iB"):
            steps.append(f"{what}: {_size(done)}" + (f" of {_size(total)}" if total else ""))
        else:
            steps.append(f"{what}: {int(done):,}" + (f" of {int(total):,}" if total else ""))
    detail = "; ".join(inert(step) for step in steps) or "reading the checkpoint"
    return f"**Loading** {inert(label)}… {detail} ({seconds:.0f} s)"


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{int(count):,} bytes"


def _single_view(output: Any = None, *, busy: bool = False, prompt: Any = None, stats: Any = None,
                 note: Any = None) -> tuple[Any, ...]:
    """Values for a caption/ask tab's outputs: output, run button, stop button, prompt, stats, note."""
    keep = gr.skip()
    return (keep if output is None else output, gr.Button(visible=not busy), gr.Button(visible=busy),
            keep if prompt is None else prompt, keep if stats is None else stats, keep if note is None else note)


class ReplyTab(Tab):
    """A tab that writes one caption or answer into an output box, with the trust line under it."""

    def _single(self, task: Task, image: Any, model: str, settings: Mapping[str, Any], request: gr.Request,
                progress: gr.Progress, **inputs: Any) -> Iterator[tuple[Any, ...]]:
        """Run a caption or an answer into the tab's output box: (output, run button, stop button, prompt, stats)."""
        session = session_id(request)
        try:
            self.limiter.check(client_key(request))
            picture = self.picture(image)
            preset, overrides = split_settings(task, settings)
            request = self.service.request(task, preset=preset, overrides=overrides, **inputs)
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            yield _single_view()
            return
        job = self.running.start(session, task)
        text = ""
        try:
            yield _single_view(THINKING, busy=True, note="")
            prepared = self._prepare(model, request, progress)
            yield _single_view(busy=True, prompt=prepared.prompt.text or EMPTY_PROMPT, stats=prompt_stats(prepared))
            for reply in self.service.stream(model, picture, request, cancel=job.cancel):
                text = reply.text
                if not reply.finished:
                    yield _single_view(text + CURSOR, busy=True)
                    continue
                output = reply.text or EMPTY_REPLY
                if reply.stopped_early == "time limit":
                    output += " [cut short at the time limit]"
                notes = [*prepared.prompt.notes, reply_note(reply)]
                yield _single_view(output, stats=prompt_stats(prepared, reply), note="\n\n".join(n for n in notes if n))
        except CancelledError:
            yield _single_view(f"{text} [stopped]" if text else "")
        except Exception as exc:  # noqa: BLE001
            self.unusable(model, exc)
            notify(exc)
            yield _single_view("")
        finally:
            self.running.finish(session, task, job)

    # ---------------------------------------------------------------- the trust line

    def trust_line(self, elem_id: str) -> Any:
        """The empty trust line to place under an output box, or None when trust scores are off."""
        if not self.auto_trust:
            return None
        return gr.HTML("", elem_id=elem_id, css_template=TRUST_CSS, container=False, padding=False)

    def wire_trust(self, line: Any, triggers: Sequence[Any], event: Any, score: Any, inputs: Sequence[Any]) -> None:
        """Clear ``line`` when a request starts (``triggers``); ``score`` the shown text once ``event`` completes."""
        if line is None:
            return
        gr.on(triggers, lambda: "", None, line, **LIGHT)
        event.then(spaces.GPU(score), list(inputs), line, preprocess=False, show_progress="minimal",
                   concurrency_id="decode", concurrency_limit=DECODE["concurrency_limit"], **PRIVATE)

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
