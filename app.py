"""Start the web app: ``python app.py [--model NAME_OR_PATH ...]`` (``--help`` lists every option).

Importing this module loads no weights and builds nothing: :func:`create_app` builds the Service and
the page, :func:`main` also launches it. Models load on first use, or at start-up with ``--preload``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from blip_app.config import AppConfig, parse_config

if TYPE_CHECKING:
    import gradio as gr

    from blip_app.models.manager import ModelManager
    from blip_app.tasks.service import Service

log = logging.getLogger("blip_app")


def create_app(config: AppConfig, *, manager: ModelManager | None = None) -> tuple[gr.Blocks, Service]:
    """The Gradio app for ``config`` and the Service behind it (no model is loaded).

    ``manager`` replaces the default ModelManager (tests use one with their own loader).
    """
    from blip_app.tasks.service import Service
    from blip_app.web import page

    service = Service(
        config.offered_models,  # the captioning models and the image-text matching model (trust, search)
        config.load,
        memory_budget_gb=config.memory_budget_gb,
        limits=config.limits,
        max_message_chars=config.max_message_chars,
        time_limit_s=config.time_limit_s,
        manager=manager,
    )
    return page.build_ui(service, config), service


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, build the app, optionally preload the default model, and serve until stopped."""
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests, one line each
    from blip_app.tasks.service import import_models_in_background
    from blip_app.web import server

    demo, service = create_app(config)
    import_models_in_background()  # the first request would otherwise wait for torch and transformers
    if config.preload:
        log.info("Preloading %s", config.default_model)
        log.info(service.load(config.default_model))
    _stop_on_sigterm()
    server.launch(demo, config, service=service)
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (how Spaces, containers and systemd stop a process) shuts down like Ctrl-C.

    Python's default would end the process at once: gradio would not close its server, so neither its
    cache of uploads (``delete_cache``) nor the app's own temporary files (downloads, partial uploads,
    deleted at exit) would be cleaned up.
    """
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


if __name__ == "__main__":
    sys.exit(main())
