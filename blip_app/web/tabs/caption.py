"""The Caption tab: a short caption or a detailed description of the image, with the trust line under it."""

from collections.abc import Iterator
from typing import Any

import gradio as gr
import spaces

from blip_app.core.settings import Task
from blip_app.web.common import PRIVATE, STOP
from blip_app.web.widgets import ReplyTab, inspector, settings_panel, style_to_preset


class CaptionTab(ReplyTab):
    """The Caption tab and the handlers behind it."""

    def run_caption(self, image: Any, model: str, style: str, request: gr.Request,
                    progress: gr.Progress = gr.Progress(track_tqdm=True),
                    **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: caption the image."""
        yield from self._single(Task.CAPTION, image, model, settings, request, progress,
                                detailed=style == "detailed")

    def caption_preview(self, model: str, style: str, request: gr.Request,
                        progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the caption prompt without generating."""
        return self._preview(Task.CAPTION, model, settings, progress, request, detailed=style == "detailed")

    def score_caption(self, image: Any, caption: str, request: gr.Request = None) -> str:
        """Event: the trust line for the caption shown, on the picture shown."""
        return self._score(Task.CAPTION, image, "", caption, request)

    def build(self, image: Any, model: Any, status: Any) -> Any:
        """The tab's components and events; returns the caption event (the page refreshes the picker after it)."""
        style = gr.Radio([("Short caption", "short"), ("Detailed description", "detailed")], value="short",
                         label="Style", info="Detailed also switches the decoding preset to 'detailed'.")
        with gr.Row():
            run = gr.Button("Caption", variant="primary", elem_id="caption-run")
            stop = gr.Button("Stop", variant="stop", visible=False)
        output = gr.Textbox(label="Caption", lines=3, interactive=False, buttons=["copy"], elem_id="caption-output",
                            placeholder="Upload an image, then press Caption.")
        note = gr.Markdown("", elem_classes="note", elem_id="caption-note")
        trust = self.trust_line("caption-trust")  # "Image-text match: likely"
        panel = settings_panel(Task.CAPTION, self.limits)
        inspect = inspector()

        style_to_preset(style, panel.controls["preset"])
        outputs = [output, run, stop, inspect.prompt, inspect.stats, note]
        event = run.click(spaces.GPU(self.run_caption), [image, model, style], outputs, preprocess=False,
                          inputs_kwargs=panel.controls, show_progress_on=[status], trigger_mode="always_last",
                          **PRIVATE)
        stop.click(self.stop_fn(Task.CAPTION), None, None, **STOP)
        self.wire_trust(trust, [run.click], event, self.score_caption, [image, output])
        inspect.preview.click(self.caption_preview, [model, style], [inspect.prompt, inspect.stats],
                              preprocess=False, inputs_kwargs=panel.controls, **PRIVATE)
        return event
