"""The whole web app as one ASGI application: the page (gradio) mounted in a FastAPI app beside ``/v1``.

:func:`build_app` is the one place that puts the parts together, so that the single-process server
(:func:`launch`, called by app.py) and a Ray Serve ingress serve the same thing:

- the OpenAI-compatible routes (web/openai_api.py) under ``/v1``, matched before the page;
- the page and its named API, mounted at ``/`` with ``gr.mount_gradio_app``, which in gradio 6 takes
  what ``launch()`` used to: the login (``auth``), ``max_file_size`` (413 for larger uploads),
  ``ssr_mode``, ``theme`` and ``css``, the footer, ``enable_monitoring``, and ``app_kwargs`` for the
  gradio app's own middleware, where the :class:`~blip_app.web.ui._Guard` goes (it guards gradio's
  routes only: /v1 checks its own body size, key and rate). The queue is configured on the Blocks
  before mounting (``mount_gradio_app`` validates it) and started by the app's lifespan, which
  gradio chains to the FastAPI app's;
- the sweepers of idle sessions and partial uploads, started and stopped by the same lifespan.

:func:`build_app` starts no server: ``uvicorn.run(build_app(...))``, :func:`serve` or :func:`launch` does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from blip_app.config import AppConfig
from blip_app.core.images import install_pillow_limits
from blip_app.tasks.service import Service
from blip_app.web import openai_api
from blip_app.web.common import request_body_limit

log = logging.getLogger(__name__)

FOOTER = ["api", "gradio", "settings"]


def build_app(demo: gr.Blocks, service: Service, config: AppConfig) -> FastAPI:
    """The page, its named API and /v1 for ``service`` as one FastAPI app (nothing is started).

    Sets the process-wide Pillow limits from ``config`` and configures ``demo``'s queue; the sweepers
    of sessions and uploads run while the app's lifespan does. ``demo.blip_app_sessions`` and
    ``demo.blip_app_uploads`` hold them.
    """
    from blip_app.web import ui

    install_pillow_limits(config.image_limits)
    sessions = ui.Sessions()
    uploads = ui.Uploads(ui.uploads_limiter(config.rate_limit_per_minute))
    demo.queue(max_size=config.queue_size, default_concurrency_limit=ui.CONCURRENCY, api_open=False)
    demo.blip_app_sessions = sessions  # type: ignore[attr-defined]
    demo.blip_app_uploads = uploads  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sessions.start(demo)  # sessions no page keeps open are forgotten after a minute
        uploads.start()  # partial uploads deleted after a minute
        try:
            yield
        finally:
            uploads.close()
            sessions.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(openai_api.build_router(service, config))
    guard = Middleware(ui._Guard, max_body=request_body_limit(config), blocks=demo, sessions=sessions,
                       logins=ui.LoginThrottle(), uploads=uploads)
    gr.mount_gradio_app(
        app, demo, path="/",
        server_name=config.host,
        server_port=config.port,
        auth=config.auth,
        max_file_size=int(config.max_upload_mb * 1024 * 1024),
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        enable_monitoring=False,  # gradio's default (None) serves /monitoring to anyone holding its key
        app_kwargs={"middleware": [guard]},
        run_history=False,  # would keep every image and chat in the browser's storage
        footer_links=FOOTER,
        theme=gr.themes.Soft(primary_hue="indigo", secondary_hue="slate"),
        css=ui.CSS,
    )
    from starlette.routing import Mount

    mounted = [route.app for route in app.routes if isinstance(route, Mount)]
    demo.blip_app_gradio_app = mounted[-1] if mounted else None  # type: ignore[attr-defined]
    return app


def launch(demo: gr.Blocks, config: AppConfig, *, service: Service | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False) -> str:
    """Serve ``demo`` and, for ``service``, /v1 beside it; returns the local URL. Without ``service`` the
    Service is the page's own (page.build_ui records it). Blocks until the server stops unless
    ``prevent_thread_lock``; the sweepers also end at exit (normal, Ctrl-C or SIGTERM: see app.main).
    """
    from blip_app.web import ui

    service = service or getattr(demo, "blip_app_service", None)
    if service is None:
        raise ValueError("launch() needs the Service behind the page for /v1: pass service=...")
    app = build_app(demo, service, config)
    ui._clean_at_exit(demo.blip_app_uploads.close, demo.blip_app_sessions.stop)
    return serve(app, demo, config, prevent_thread_lock=prevent_thread_lock, quiet=quiet)


class _Server(uvicorn.Server):
    """uvicorn in a thread of this process; app.py turns SIGTERM into KeyboardInterrupt itself."""

    def install_signal_handlers(self) -> None:
        pass


def serve(app: Any, demo: gr.Blocks, config: AppConfig, *, prevent_thread_lock: bool = False,
          quiet: bool = False) -> str:
    """Serve ``app`` on ``config.host:port``; returns the local URL.

    Blocks until Ctrl-C or SIGTERM unless ``prevent_thread_lock``; ``demo.close()`` then stops the
    server, the queue and the sweepers (tests call it). Raises OSError when the port is taken.
    """
    # uvicorn rewrites the client address from X-Forwarded-For for the peers this lists (by default
    # loopback, so that any local client could forge its address): only the configured proxies.
    forwarded = ",".join(config.trusted_proxies)
    os.environ["FORWARDED_ALLOW_IPS"] = forwarded
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                    forwarded_allow_ips=forwarded, timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, name="web-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"Could not start the server on {config.host}:{config.port} (is the port taken?)")
        time.sleep(0.01)
    host = "localhost" if config.host in ("0.0.0.0", "::") else config.host
    url = f"http://{host}:{config.port}/"
    if not quiet:
        log.info("Serving the page on %s and the OpenAI-compatible API on %sv1", url, url)
    close = demo.close

    def stop(*args: Any, **kwargs: Any) -> Any:
        gradio_app = getattr(demo, "blip_app_gradio_app", None)
        if gradio_app is not None:  # open heartbeat and event streams end, so the server can stop
            gradio_app.stop_event.set()
        server.should_exit = True
        if thread is not threading.current_thread():
            thread.join(timeout=10)
        demo.blip_app_uploads.close()  # type: ignore[attr-defined]
        demo.blip_app_sessions.stop()  # type: ignore[attr-defined]
        return close(*args, **{"verbose": False, **kwargs})

    demo.close = stop  # type: ignore[method-assign]
    demo.local_url = url
    if not prevent_thread_lock:
        try:  # sleep, not join: a KeyboardInterrupt inside Thread.join can mark the live thread as ended
            while thread.is_alive():
                time.sleep(0.2)
        except KeyboardInterrupt:
            log.info("Stopping the server")
        finally:
            demo.close()
    return url
