"""The Compare tab: the shared picture and one prompt sent to two or three models in turn (one in memory at a
time); each column fills as its model finishes, with its text, its time and its trust score."""

import html
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import spaces

from blip_app.core.settings import Preset, Task
from blip_app.errors import BadInputError
from blip_app.web.common import (
    COMPARE_LIMIT,
    LIGHT,
    PRESET_LABELS,
    PRIVATE,
    captioning_states,
    client_key,
    is_matching_model,
    notify,
)
from blip_app.web.widgets import TRUST_CSS, Tab, trust_span

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



class CompareTab(Tab):
    """The Compare tab and the handlers behind it."""

    def build(self, image: Any) -> None:
        """Two or three models on the shared picture and prompt; one column each, with its time and trust."""
        states = captioning_states(self.service)
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
            notify(exc)
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
            notify(exc)
            yield hidden
