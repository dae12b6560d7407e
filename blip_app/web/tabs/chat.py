"""The Chat tab: a conversation about the image, the history carried into each prompt, streamed answers,
Regenerate / Undo / Clear, and the *Export or load* accordion (Markdown and JSON with a reproducibility
card; a JSON export loaded back continues once the same picture is shown, checked by its SHA-256).

Session state is plain data that deep-copies: ``{"image": digest or None, "turns": [[q, a], ...]}``.
Running answers are found by the browser session's id so that Stop and a new image can end them.
Chat text reaches the Chatbot only through :func:`common.inert`.
"""

import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import spaces

from blip_app.config import AppConfig
from blip_app.core.images import image_digest
from blip_app.core.settings import Preset, Task, resolve_settings
from blip_app.errors import CancelledError
from blip_app.tasks.exports import (
    card_for,
    conversation_from_json,
    conversation_to_json,
    conversation_to_markdown,
    export_filename,
    save_text,
)
from blip_app.tasks.service import Request, Service
from blip_app.web.common import (
    CURSOR,
    DECODE,
    EMPTY_PROMPT,
    LIGHT,
    PRESET_LABELS,
    PRIVATE,
    STOP,
    Downloads,
    captioning_states,
    client_key,
    inert,
    model_choices,
    model_status,
    notify,
    prompt_stats,
    reply_note,
    session_id,
    split_settings,
    uploaded_files,
)
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.widgets import SLIDERS, Tab, inspector, settings_panel

THINKING = "*thinking…*"
PRESET_NAMES = {p.value: PRESET_LABELS[p].split(" (")[0] for p in Preset}  # "fast": "Fast"
EMPTY_ANSWER = "*(the model gave an empty answer)*"
# Saves the export a click has just built (chat_export's output): the hidden button downloads its value.
SAVE_EXPORT = "() => { setTimeout(() => document.querySelector('#chat-export-file')?.click(), 0); }"
RESET_IMPORT_INPUT = ("() => { const input = document.querySelector('#chat-files input[type=file]'); "
                      "if (input) input.value = ''; }")


READY_PLACEHOLDER = "**Ask anything about the picture**: type below and press Send."
UPLOAD_PLACEHOLDER = "**Upload an image to start**, then ask anything about it."


def chat_messages(turns: Sequence[Sequence[str]], pending: tuple[str, str] | None = None,
                  meta: Sequence[Mapping[str, Any]] | None = None,
                  replaced: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """Chatbot messages for the finished turns and, while an answer is being written, the pending one.

    Each answer ends with who wrote it (``meta``: model and preset of each turn); the first answer by
    another model than the one before is marked as a switch; answers replaced by Regenerate
    (``replaced``) stay readable, folded, before the answer that replaced them.
    """
    messages: list[dict[str, Any]] = []
    meta, replaced = list(meta or []), list(replaced or [])
    previous = None
    for index, (question, answer) in enumerate(turns):
        info = meta[index] if index < len(meta) else None
        messages.append({"role": "user", "content": inert(question)})
        for number, old in enumerate(replaced[index] if index < len(replaced) else [], start=1):
            messages.append({"role": "assistant", "content": inert(old) or EMPTY_ANSWER,
                             "metadata": {"title": f"Replaced answer {number}", "status": "done"}})
        content = inert(answer) or EMPTY_ANSWER
        if info:
            switched = previous is not None and info.get("model") != previous.get("model")
            lead = f"**↪ Model switched to {inert(info.get('label') or info.get('model'))}**\n\n" if switched else ""
            content = f"{lead}{content}\n\n{signature(info)}"
            previous = info
        messages.append({"role": "assistant", "content": content})
    if pending is not None:
        question, shown = pending
        messages.append({"role": "user", "content": inert(question)})
        messages.append({"role": "assistant", "content": shown})
    return messages


def signature(info: Mapping[str, Any]) -> str:
    """The line under an answer: the model and preset that wrote it (and the seed when it sampled)."""
    preset = PRESET_NAMES.get(str(info.get("preset")), str(info.get("preset") or ""))
    parts = [inert(info.get("label") or info.get("model") or "model"), inert(preset)]
    settings = info.get("settings") or {}
    if settings.get("do_sample") and settings.get("seed") is not None:
        parts.append(f"sampled, seed {int(settings['seed'])}")
    return "*— " + " · ".join(part for part in parts if part) + "*"


def new_chat(image: str | None = None) -> dict[str, Any]:
    """A conversation's session state: plain data only. ``meta`` and ``replaced`` go with ``turns``, one
    entry per turn: who wrote the answer (model, label, preset, settings) and the answers Regenerate replaced."""
    return {"image": image, "turns": [], "meta": [], "replaced": []}


def _per_turn(chat: Mapping[str, Any], key: str) -> list[Any]:
    """``chat[key]`` as long as its turns (conversations from older pages or files have none)."""
    values = list(chat.get(key) or [])
    turns = len(chat.get("turns") or [])
    filler: Any = {} if key == "meta" else []
    return (values + [filler] * turns)[:turns]


def _shortened(chat: Mapping[str, Any], keep: int) -> dict[str, Any]:
    """``chat`` with only its first ``keep`` turns."""
    return {**chat, "turns": list(chat.get("turns") or [])[:keep], "meta": _per_turn(chat, "meta")[:keep],
            "replaced": _per_turn(chat, "replaced")[:keep]}


def _regenerate_settings(settings: Mapping[str, Any], limits: Any) -> tuple[dict[str, Any], str]:
    """Overrides that make a regenerated answer differ from the one it replaces, and the note saying how.

    Greedy decoding and beam search give the same answer every time, so Regenerate samples (one beam,
    so that it streams) with a fresh seed; settings that already sample get a fresh seed.
    """
    preset, overrides = split_settings(Task.CHAT, settings)
    try:
        resolved = resolve_settings(Task.CHAT, preset, overrides, limits=limits)
    except Exception:  # noqa: BLE001 - the turn itself reports bad settings
        return {}, ""
    seed = secrets.randbelow(2**31 - 1) + 1
    if resolved.do_sample:
        return {"seed": seed}, f"Regenerated with a fresh seed ({seed}); the replaced answer is kept above it."
    return ({"do_sample": True, "num_beams": 1, "seed": seed},
            f"Regenerated by sampling (seed {seed}): these settings always give the same answer, so Regenerate "
            "samples instead. The replaced answer is kept above it.")


class ChatTab(Tab):
    """The Chat tab and the handlers behind it."""

    def __init__(self, service: Service, config: AppConfig, limiter: RateLimiter, **shared: Any) -> None:
        super().__init__(service, config, limiter, **shared)
        # exports: deleted on the uploads' schedule (--delete-uploads-after; 0 keeps them)
        self.downloads = Downloads(keep_s=float(config.delete_uploads_after_s) or None)
        self._sliders: dict[str, Any] = {}  # the chat's settings sliders, by name
        self._resume: tuple[list[Any], list[Any]] | None = None  # inputs and outputs of chat_resume

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
            notify(exc)
            return unchanged
        try:
            digest = image_digest(self.picture(image))
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            return (None, *unchanged[1:])
        if digest == chat.get("image"):
            return unchanged
        self.running.stop(session_id(request), Task.CHAT, superseded=True)
        return (gr.skip(), new_chat(digest), gr.Chatbot(value=[], placeholder=READY_PLACEHOLDER), "",
                *_history_buttons(False))

    def chat_send(self, message: str, chat: dict[str, Any], image: Any, model: str, request: gr.Request,
                  progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: answer a new message, streaming the answer (beam search shows a placeholder instead)."""
        yield from _settling(self._chat_turn(message, chat, chat, image, model, settings, session_id(request),
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
        earlier = _shortened(chat, len(turns) - 1)
        extra, note = _regenerate_settings(settings, self.limits)
        kept = [*_per_turn(chat, "replaced")[-1], turns[-1][1]]  # the answers this turn has had
        yield from _settling(self._chat_turn(turns[-1][0], earlier, chat, image, model, settings,
                                             session_id(request), progress, client_key(request),
                                             extra=extra, note=note, replaced=kept))

    def history_buttons(self, chat: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Event (after each answer has completed): Regenerate, Undo and Clear work when there are turns."""
        return _history_buttons(bool(chat.get("turns")))

    def chat_undo(self, chat: dict[str, Any]) -> tuple[Any, ...]:
        """Event: remove the last turn and put its question back in the message box."""
        turns = chat.get("turns") or []
        if not turns:
            return _chat_view(chat)
        return _chat_view(_shortened(chat, len(turns) - 1), message=turns[-1][0], note="")

    def chat_clear(self, chat: dict[str, Any], request: gr.Request) -> tuple[Any, ...]:
        """Event: forget the conversation (the image stays); an answer being written is dropped."""
        self.running.stop(session_id(request), Task.CHAT, superseded=True)
        return _chat_view(new_chat(chat.get("image")), note="")

    def chat_preview(self, message: str, chat: dict[str, Any], image: Any, model: str, request: gr.Request,
                     progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the prompt the message box would send, without generating."""
        turns = chat.get("turns") or []
        return self._preview(Task.CHAT, model, settings, progress, request, question=message or "…", history=turns)

    def _chat_turn(self, message: str, chat: dict[str, Any], original: dict[str, Any], image: Any, model: str,
                   settings: Mapping[str, Any], session: str, progress: gr.Progress, client: str, *,
                   extra: Mapping[str, Any] | None = None, note: str = "",
                   replaced: Sequence[str] = ()) -> Iterator[tuple[Any, ...]]:
        """Answer ``message`` after ``chat``'s turns; on any failure show ``original`` again, unchanged.

        ``extra`` overrides the panel's settings (Regenerate's sampling), ``note`` is shown with the answer
        and ``replaced`` holds the answers the new one replaces.
        """
        try:
            self.limiter.check(client)
            picture = self.picture(image)
            digest = image_digest(picture)
            if digest != chat.get("image"):  # the image changed under a running page: a new conversation
                chat = original = new_chat(digest)
            preset, overrides = split_settings(Task.CHAT, settings)
            overrides = {**overrides, **(extra or {})}
            request = self.service.request(Task.CHAT, question=message, history=chat["turns"], preset=preset,
                                           overrides=overrides)
        except Exception as exc:  # noqa: BLE001
            notify(exc)
            yield _chat_view(original)
            return
        job = self.running.start(session, Task.CHAT)
        turn = {"info": {"model": model, "label": self._label(model), "preset": str(preset)}, "note": note,
                "replaced": list(replaced)}
        answer = self._chat_answer(request, chat, original, message, picture, digest, model, job.cancel, progress,
                                   turn)
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
                     progress: gr.Progress, turn: Mapping[str, Any]) -> Iterator[tuple[Any, ...]]:
        """The views of one validated chat turn, from the pending question to the finished answer: one pass
        through the service, whose first event is the prepared prompt (for the inspector)."""
        question = request.question
        text = ""
        settings: dict[str, Any] = {}
        events = self.service.events(model, picture, request, cancel=cancel, image_id=digest)

        def finished(answer: str, *notes: str) -> tuple[dict[str, Any], str]:
            info = {**turn["info"], "settings": settings}
            done = {**chat, "turns": [*chat["turns"], [question, answer]], "meta": [*_per_turn(chat, "meta"), info],
                    "replaced": [*_per_turn(chat, "replaced"), list(turn["replaced"])]}
            return done, "\n\n".join(n for n in (turn["note"], *notes) if n)

        try:
            yield _chat_view(chat, pending=(question, THINKING), busy=True, note="")
            self._announce_load(model, progress)
            prepared = next(events)
            yield _chat_view(chat, pending=(question, THINKING), busy=True,
                             prompt=prepared.prompt.text or EMPTY_PROMPT, stats=prompt_stats(prepared))
            for reply in events:
                text = reply.text
                settings = reply.settings.as_dict()
                if not reply.finished:
                    yield _chat_view(chat, pending=(question, inert(text) + CURSOR), busy=True)
                    continue
                done, note = finished(reply.text, *prepared.prompt.notes, reply_note(reply))
                yield _chat_view(done, note=note, stats=prompt_stats(prepared, reply))
        except CancelledError:
            if text:
                done, note = finished(text, "Stopped: the last answer is incomplete.")
                yield _chat_view(done, note=note)
            else:
                yield _chat_view(original, message=message, note="Stopped before the model answered.")
        except Exception as exc:  # noqa: BLE001
            self.unusable(model, exc)
            notify(exc)
            yield _chat_view(original, message=message)
        finally:
            events.close()


    # ---------------------------------------------------------------- export and load

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
            meta = _per_turn(chat, "meta")  # who wrote each answer, with which settings
            text = (conversation_to_markdown(turns, card, meta=meta) if kind == "md"
                    else conversation_to_json(turns, card, meta=meta))
            path = save_text(text, export_filename(model, kind), self.downloads.folder())
        except Exception as exc:  # noqa: BLE001
            notify(exc)
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
            notify(exc)
            return keep
        loaded = {"history": [list(turn) for turn in imported.history], "model": imported.model,
                  "settings": dict(imported.settings), "image_sha256": imported.image_sha256,
                  "meta": [dict(info) for info in imported.meta]}
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
        state = {"image": chat.get("image"), "turns": turns, "meta": [dict(m) for m in loaded.get("meta") or []],
                 "replaced": []}
        state["meta"] = _per_turn(state, "meta")
        states = captioning_states(self.service)
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
        return (chat_messages(turns, None, state["meta"]), state, " ".join(notes),
                gr.Dropdown(choices=model_choices(states), value=chosen), model_status(states, chosen), None,
                *_history_buttons(bool(turns)), *values)

    def build(self, image: Any, model: Any, status: Any) -> dict[str, Any]:
        """The tab's components and events; returns what the page wires to the image, the picker and the examples."""
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
                                 max_lines=6, max_length=self.service.max_message_chars, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, min_width=90, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=90, visible=False, elem_id="chat-stop")
        with gr.Row():
            regenerate = gr.Button("↻ Regenerate", size="sm", interactive=False, min_width=80)
            undo = gr.Button("↶ Undo", size="sm", interactive=False, min_width=80)
            clear = gr.Button("✕ Clear", size="sm", interactive=False, min_width=80)
        panel = settings_panel(Task.CHAT, self.limits)
        inspect = inspector()

        outputs = [chatbot, state, note, message, send, stop, regenerate, undo, clear, inspect.prompt, inspect.stats]
        settings = panel.controls
        # always_last: a message sent while the previous answer is finishing runs next instead of being dropped.
        run = {"preprocess": False, "inputs_kwargs": settings, "show_progress_on": [status],
               "trigger_mode": "always_last", **PRIVATE}
        # The box is emptied the moment Send is pressed (the message travels in `sending`), so that what
        # someone types next is never wiped when the answer starts.
        sending = gr.State("")
        sent = gr.on([send.click, message.submit], take_message, message, [message, sending], **LIGHT).then(
            spaces.GPU(self.chat_send), [sending, state, image, model], outputs, **run)
        again = regenerate.click(spaces.GPU(self.chat_regenerate), [state, image, model], outputs, **run)
        for event in (sent, again):
            event.then(self.history_buttons, state, [regenerate, undo, clear], **LIGHT)
        stop.click(self.stop_fn(Task.CHAT), None, None, **STOP)
        undo.click(self.chat_undo, state, outputs, **LIGHT)
        gr.on([clear.click, chatbot.clear], self.chat_clear, state, outputs, **LIGHT)
        inspect.preview.click(self.chat_preview, [message, state, image, model], [inspect.prompt, inspect.stats],
                              preprocess=False, inputs_kwargs=settings, **PRIVATE)
        chat = {"state": state, "chatbot": chatbot, "note": note, "message": message,
                "history_buttons": [regenerate, undo, clear], "events": [sent, again], "settings": settings}
        self.chat_files(chat, image, model, status)
        return chat


def take_message(message: str) -> tuple[str, str]:
    """Event (Send): empty the message box and keep the message for the answer that follows."""
    return "", message


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
        chat_messages(chat.get("turns") or [], pending, _per_turn(chat, "meta"), _per_turn(chat, "replaced")),
        chat,
        keep if note is None else note,
        keep if message is None else message,
        gr.Button(visible=not busy),
        gr.Button(visible=busy),
        *_history_buttons(has_turns),
        keep if prompt is None else prompt,
        keep if stats is None else stats,
    )

