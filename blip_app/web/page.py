"""The page: the model picker, the image, and every tab, composed from blip_app.web.ui (Chat, Caption,
Ask, the API) and blip_app.web.tools (trust, chat files, Search, Batch, Compare). The only module that
imports both; nothing imports it but app.py.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import spaces

from blip_app.config import AppConfig
from blip_app.tasks.service import Service
from blip_app.web import tools as web_tools
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.ui import (
    DECODE,
    EXAMPLES,
    EXAMPLES_DIR,
    LIGHT,
    PRIVATE,
    TAGLINE,
    TITLE,
    Handlers,
    add_api,
    ask_tab,
    caption_tab,
    captioning_states,
    chat_tab,
    model_choices,
    model_status,
)


def _examples(image: Any, message: Any, question: Any) -> None:
    """A row of example photos; a click loads the photo, a chat opener and a question (prompts stay hidden)."""
    if not EXAMPLES_DIR.is_dir():
        return
    gr.Examples(examples=[[str(EXAMPLES_DIR / e.file), e.opener, e.question] for e in EXAMPLES],
                inputs=[image, message, question], visible_columns=[0], label="Examples: click one to load it",
                examples_per_page=len(EXAMPLES), cache_examples=False, api_visibility="private")


def build_ui(service: Service, config: AppConfig) -> gr.Blocks:
    """The whole app as a gr.Blocks (nothing is loaded or launched here)."""
    limiter = RateLimiter(config.rate_limit_per_minute)
    handlers = Handlers(service, config.image_limits, limiter)
    extras = web_tools.Tools(service, config, limiter)  # trust lines, chat files, Search, Batch, Compare
    states = captioning_states(service)
    ages = config.delete_uploads_after_s
    with gr.Blocks(title=f"{TITLE} · BLIP-2 and InstructBLIP", analytics_enabled=False, fill_width=True,
                   delete_cache=(min(ages, 600), ages) if ages > 0 else None) as demo:
        add_api(service, config.image_limits, config.default_model, limiter)  # first: the API owns its names
        web_tools.add_extra_api(service, config, limiter)  # /trust, /search, /embed
        gr.Markdown(f"# {TITLE}\n{TAGLINE}", elem_id="header")
        with gr.Row(equal_height=True):
            model = gr.Dropdown(model_choices(states), value=config.default_model, label="Model", scale=2,
                                min_width=280, interactive=True, filterable=False, elem_id="model")
            status = gr.Markdown(model_status(states, config.default_model), elem_id="model-status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=300) as left:
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                 height=400, placeholder="# Upload an image to start\ndrop it here, paste it, "
                                                         "or pick an example below", buttons=["fullscreen"],
                                 elem_id="image")
            with gr.Column(scale=6, min_width=360):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        chat = chat_tab(handlers, service.limits, image, model, status)
                        extras.chat_files(chat, image, model, status)
                    with gr.Tab("Caption", id="caption"):
                        captioned = caption_tab(handlers, service.limits, image, model, status, extras)
                    with gr.Tab("Ask", id="ask"):
                        ask = ask_tab(handlers, service.limits, image, model, status, extras)
                    with gr.Tab("Compare", id="compare"):
                        extras.compare_tab(image)
                    if config.trust_model:
                        with gr.Tab("Search", id="search"):
                            extras.search_tab()
                    with gr.Tab("Batch", id="batch"):
                        extras.batch_tab(model)
        with left:
            _examples(image, chat["message"], ask["question"])
        changed = image.change(handlers.on_image, [image, chat["state"]],
                               [image, chat["state"], chat["chatbot"], chat["note"], *chat["history_buttons"]],
                               preprocess=False, **DECODE)
        extras.after_new_image(changed)  # a loaded conversation goes on once its picture is back
        model.select(spaces.GPU(handlers.load_model), model, [model, status], show_progress_on=[status], **PRIVATE)
        demo.load(handlers.refresh_models, model, [model, status], **LIGHT)
        for event in [*chat["events"], captioned, ask["event"]]:
            event.then(handlers.refresh_models, model, [model, status], **LIGHT)
    demo.blip_app_service = service  # type: ignore[attr-defined]  # for server.launch: /v1 serves the same Service
    return demo
