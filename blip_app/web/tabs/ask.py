"""The visual question answering tab (labelled "Ask"): a question about the image, its answer, the trust line."""

from collections.abc import Iterator
from typing import Any

import gradio as gr
import spaces

from blip_app.core.settings import Task
from blip_app.web.common import PRIVATE, STOP
from blip_app.web.widgets import ReplyTab, inspector, settings_panel


class AskTab(ReplyTab):
    """The Ask tab and the handlers behind it."""

    def run_ask(self, question: str, short: bool, image: Any, model: str, request: gr.Request,
                progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> Iterator[tuple[Any, ...]]:
        """Event: answer a question about the image."""
        yield from self._single(Task.ANSWER, image, model, settings, request, progress,
                                question=question, short=bool(short))

    def ask_preview(self, question: str, short: bool, model: str, request: gr.Request,
                    progress: gr.Progress = gr.Progress(track_tqdm=True), **settings: Any) -> tuple[Any, Any]:
        """Event: show the question's prompt without generating."""
        return self._preview(Task.ANSWER, model, settings, progress, request, question=question, short=bool(short))

    def score_answer(self, image: Any, question: str, answer: str, request: gr.Request = None) -> str:
        """Event: the trust line for the question and answer shown, on the picture shown."""
        return self._score(Task.ANSWER, image, question, answer, request)

    def build(self, image: Any, model: Any, status: Any) -> dict[str, Any]:
        """The tab's components and events; returns the answer event and the question box (for the examples)."""
        question = gr.Textbox(label="Question", placeholder="What is the cat doing?", lines=1, max_lines=4,
                              max_length=self.service.max_message_chars, elem_id="question")
        short = gr.Checkbox(label="Short answer (a word or two, as in VQA benchmarks)", value=False)
        with gr.Row():
            run = gr.Button("Ask", variant="primary", elem_id="ask-run")
            stop = gr.Button("Stop", variant="stop", visible=False)
        output = gr.Textbox(label="Answer", lines=2, interactive=False, buttons=["copy"], elem_id="answer-output",
                            placeholder="Upload an image, type a question, then press Ask.")
        note = gr.Markdown("", elem_classes="note", elem_id="answer-note")
        trust = self.trust_line("answer-trust")  # "Image-text match: likely"
        panel = settings_panel(Task.ANSWER, self.limits)
        inspect = inspector()

        outputs = [output, run, stop, inspect.prompt, inspect.stats, note]
        event = gr.on([run.click, question.submit], spaces.GPU(self.run_ask), [question, short, image, model],
                      outputs, preprocess=False, inputs_kwargs=panel.controls, show_progress_on=[status],
                      trigger_mode="always_last", **PRIVATE)
        stop.click(self.stop_fn(Task.ANSWER), None, None, **STOP)
        self.wire_trust(trust, [run.click, question.submit], event, self.score_answer, [image, question, output])
        inspect.preview.click(self.ask_preview, [question, short, model], [inspect.prompt, inspect.stats],
                              preprocess=False, inputs_kwargs=panel.controls, **PRIVATE)
        return {"event": event, "question": question}
