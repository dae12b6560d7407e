"""The page: the model picker, the image, and every tab (web/tabs/, one module each), composed here with
the API (web/api.py). The only module that imports the tabs; nothing imports it but app.py.

Tabs never import each other; what they share sits below them (web/widgets.py, web/common.py).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import spaces

from blip_app.config import AppConfig
from blip_app.tasks.service import Service
from blip_app.web.api import add_api
from blip_app.web.common import DECODE, LIGHT, PRIVATE
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.tabs.ask import AskTab
from blip_app.web.tabs.batch import BatchTab
from blip_app.web.tabs.caption import CaptionTab
from blip_app.web.tabs.chat import ChatTab
from blip_app.web.tabs.compare import CompareTab
from blip_app.web.tabs.search import SearchTab
from blip_app.web.widgets import Picker

TITLE = "Talk with images"
TAGLINE = "Caption a photo, ask questions about it, or chat about it, with the BLIP-2 and InstructBLIP models."
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "assets" / "examples"  # the repository's assets/


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


@dataclass(frozen=True)
class Tabs:
    """The handlers of one page, one object per tab (and the model picker's), sharing one request limit."""

    picker: Picker
    chat: ChatTab
    caption: CaptionTab
    ask: AskTab
    compare: CompareTab
    search: SearchTab
    batch: BatchTab

    @property
    def service(self) -> Service:
        """The service every tab runs its requests on."""
        return self.picker.service

    @classmethod
    def create(cls, service: Service, config: AppConfig, limiter: RateLimiter) -> "Tabs":
        """Every tab's handlers on ``service``, counted by ``limiter``, sharing what they learn of unusable models."""
        problems: dict[str, str] = {}
        return cls(*(kind(service, config, limiter, problems=problems)
                     for kind in (Picker, ChatTab, CaptionTab, AskTab, CompareTab, SearchTab, BatchTab)))


def _examples(image: Any, message: Any, question: Any) -> None:
    """A row of example photos; a click loads the photo, a chat opener and a question (prompts stay hidden)."""
    if not EXAMPLES_DIR.is_dir():
        return
    gr.Examples(examples=[[str(EXAMPLES_DIR / e.file), e.opener, e.question] for e in EXAMPLES],
                inputs=[image, message, question], visible_columns=[0], label="Examples: click one to load it",
                examples_per_page=len(EXAMPLES), cache_examples=False, api_visibility="private", elem_id="examples")


# Tabs that work on the shared picture (the image panel shows beside them); Search and Batch take files of
# their own, and the panel they would ignore is hidden while they are open.
PICTURE_TABS = ("chat", "caption", "ask", "compare")


def build_ui(service: Service, config: AppConfig) -> gr.Blocks:
    """The whole app as a gr.Blocks (nothing is loaded or launched here)."""
    limiter = RateLimiter(config.rate_limit_per_minute)
    tabs = Tabs.create(service, config, limiter)
    picker, chat = tabs.picker, tabs.chat
    choices, shown, status_text = picker.view(config.default_model)  # an unusable default is replaced at once
    ages = config.delete_uploads_after_s
    with gr.Blocks(title=f"{TITLE} · BLIP-2 and InstructBLIP", analytics_enabled=False, fill_width=True,
                   delete_cache=(min(ages, 600), ages) if ages > 0 else None) as demo:
        add_api(service, config, limiter)  # first: the API owns its names
        gr.Markdown(f"# {TITLE}\n{TAGLINE}", elem_id="header")
        with gr.Row(equal_height=True, elem_id="picker-row"):
            model = gr.Dropdown(choices, value=shown, label="Model", scale=2, min_width=280, interactive=True,
                                filterable=False, elem_id="model")
            status = gr.Markdown(status_text, elem_id="model-status")
        with gr.Row(equal_height=False, elem_id="main-row"):
            with gr.Column(scale=4, min_width=300, elem_id="image-column") as left:
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                 height=400, placeholder="# Upload an image to start\ndrop it here, paste it, "
                                                         "or pick an example below", buttons=["fullscreen"],
                                 elem_id="image")
            with gr.Column(scale=6, min_width=360, elem_id="tabs-column"):
                # wrap: on a phone every tab keeps its name on a second row instead of hiding behind "…"
                with gr.Tabs(overflow_behavior="wrap", elem_id="tabs"):
                    opened = {}
                    with gr.Tab("Chat", id="chat") as opened["chat"]:
                        chatting = chat.build(image, model, status)
                    with gr.Tab("Caption", id="caption") as opened["caption"]:
                        captioned = tabs.caption.build(image, model, status)
                    with gr.Tab("Ask", id="ask") as opened["ask"]:
                        asking = tabs.ask.build(image, model, status)
                    with gr.Tab("Compare", id="compare") as opened["compare"]:
                        tabs.compare.build(image)
                    if config.trust_model:
                        with gr.Tab("Search", id="search") as opened["search"]:
                            tabs.search.build()
                    with gr.Tab("Batch", id="batch") as opened["batch"]:
                        tabs.batch.build(model)
        with left:
            _examples(image, chatting["message"], asking["question"])
        for name, tab in opened.items():
            tab.select(lambda shows=name in PICTURE_TABS: gr.Column(visible=shows), None, left, **LIGHT)
        changed = image.change(chat.on_image, [image, chatting["state"]],
                               [image, chatting["state"], chatting["chatbot"], chatting["note"],
                                *chatting["history_buttons"]], preprocess=False, **DECODE)
        chat.after_new_image(changed)  # a loaded conversation goes on once its picture is back
        # The status line says how far a load is, as text: no progress overlay is drawn over it.
        model.select(spaces.GPU(picker.load_model), model, [model, status], show_progress="hidden", **PRIVATE)
        demo.load(picker.refresh_models, model, [model, status], **LIGHT)
        for event in [*chatting["events"], captioned, asking["event"]]:
            event.then(picker.refresh_models, model, [model, status], **LIGHT)
    demo.blip_app_service = service  # type: ignore[attr-defined]  # for server.launch: /v1 serves the same Service
    return demo
