"""Serving the page and /v1: :func:`build_app` makes the whole web app one ASGI application, the page
(gradio) mounted in a FastAPI app beside the OpenAI-compatible ``/v1`` (web/openai_api.py), so that the
single-process server (:func:`launch`, called by app.py) and a Ray Serve ingress serve the same thing:

- ``/v1`` is matched before the page; it checks its own body size, key and rate;
- the page and its named API are mounted at ``/`` with ``gr.mount_gradio_app``, which in gradio 6 takes
  what ``launch()`` used to: the login (``auth``), ``max_file_size`` (413 for larger uploads),
  ``ssr_mode``, ``theme`` and ``css``, the footer, ``enable_monitoring``, and ``app_kwargs`` for the
  gradio app's own middleware, where :class:`_Guard` goes (hostile requests refused before gradio reads
  them). The queue is configured on the Blocks before mounting (``mount_gradio_app`` validates it) and
  started by the app's lifespan, which gradio chains to the FastAPI app's;
- :class:`Sessions` (sessions no page keeps open are forgotten) and :class:`Uploads` (an upload rate
  limit, aborted uploads swept away) run while that lifespan does; :class:`LoginThrottle` slows guessing.

:func:`build_app` starts no server: ``uvicorn.run(build_app(...))``, :func:`serve` or :func:`launch` does.
"""

import contextlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import uvicorn
from fastapi import FastAPI
from gradio.utils import get_upload_folder
from starlette.middleware import Middleware

from blip_app.config import AppConfig
from blip_app.core.images import install_pillow_limits
from blip_app.errors import BlipAppError
from blip_app.tasks.service import Service
from blip_app.web import openai_api
from blip_app.web.common import CONCURRENCY
from blip_app.web.ratelimit import RateLimiter
from blip_app.web.widgets import CSS

log = logging.getLogger(__name__)

FOOTER = ["api", "gradio", "settings"]
BUSY_MESSAGE = "The server is busy: too many requests are already waiting. Please try again in a minute."
# gradio's file route fetches any public http(s) URL for anyone (route_utils.secure_url_stream_response);
# this app never serves remote files, so the server is no one's proxy.
_REMOTE_FILE = re.compile(r"/gradio_api/file[=/]+\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


class _Guard:
    """ASGI middleware in front of gradio's routes.

    - ``/gradio_api/file=<URL>`` (and the older ``/file/<URL>``) is refused: gradio would fetch any
      public URL for any caller; this app serves only its own files.
    - A request body larger than ``max_body`` bytes is refused with 413 before it is read (uploads
      excepted: gradio's own ``max_file_size`` applies to them); gradio would hold the whole body, and
      every input value in it, in memory before any handler could refuse it.
    - ``/queue/join`` naming an event the page does not have gets 404 and a sentence, not a 500.
    - A full queue's 503 (``/queue/join``, ``/call/...``) carries :data:`BUSY_MESSAGE`, a sentence for
      people, instead of gradio's "Queue is full. Max size is N and size is N.".
    - Open heartbeat streams are counted per session (:class:`Sessions`), so that sessions no page keeps
      open can be expired.
    - Logins are slowed down, then refused, after repeated failures from one address (:class:`LoginThrottle`),
      and uploads are rate-limited per address (:class:`Uploads`).
    """

    def __init__(self, app: Any, *, max_body: int = 8 * 1024 * 1024, blocks: Any = None,
                 sessions: "Sessions | None" = None, logins: "LoginThrottle | None" = None,
                 uploads: "Uploads | None" = None) -> None:
        self.app = app
        self.max_body = max_body
        self.blocks = blocks
        self.sessions = sessions
        self.logins = logins
        self.uploads = uploads

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if _REMOTE_FILE.search(path):
            await _send_json(send, 403, {"detail": "File not allowed: this server serves only its own files."})
            return
        if "/heartbeat/" in path and self.sessions is not None:
            session = path.rstrip("/").rsplit("/", 1)[-1]
            with self.sessions.connected(session):
                await self.app(scope, receive, send)
            return
        if path.rstrip("/").endswith("/upload") and scope.get("method") == "POST" and self.uploads is not None:
            refusal = self.uploads.check(_peer_key(scope))
            if refusal is not None:
                await _send_json(send, 429, {"detail": refusal})
                return
            from starlette.requests import ClientDisconnect

            try:
                await self.app(scope, receive, send)
            except ClientDisconnect:  # gradio would log a traceback for each; its partial file is swept later
                log.info("An upload was cut off mid-body by %s", _peer_key(scope))
            return
        if scope.get("method") in ("POST", "PUT", "PATCH") and not path.rstrip("/").endswith("/upload"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return  # refused
            if path.endswith("/queue/join") and not await self._known_event(body, send):
                return
            receive = _replay(body, receive)
            if path.rstrip("/").endswith("/login") and self.logins is not None:
                await self._login(scope, receive, send)
                return
        if not (path.endswith("/queue/join") or "/call/" in path):
            await self.app(scope, receive, send)
            return
        busy = False

        async def relay(message: dict[str, Any]) -> None:
            nonlocal busy
            if message["type"] == "http.response.start" and message.get("status") == 503:
                busy = True
                await _send_json(send, 503, {"detail": BUSY_MESSAGE})
            elif not busy:
                await send(message)

        await self.app(scope, receive, relay)

    async def _login(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A login attempt, slowed down or refused after repeated failures from its address."""
        import asyncio

        key = _peer_key(scope)
        delay = self.logins.begin(key)
        if delay is None:
            wait = max(1, math.ceil(self.logins.wait_s(key)))
            log.warning("Refused a login from %s: too many failures", key)
            await _send_json(send, 429, {"detail": f"Too many failed logins from this address: please wait "
                                                   f"{wait:.0f} s before trying again."})
            return
        status = 0

        async def relay(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message.get("status", 0))
            await send(message)

        try:
            if delay:
                await asyncio.sleep(delay)
            await self.app(scope, receive, relay)
        finally:
            self.logins.end(key, 200 <= status < 400)

    async def _read_body(self, scope: dict[str, Any], receive: Any, send: Any) -> bytes | None:
        """The request's body, or None once a 413 has been sent (by its declared length, or as it arrives)."""
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            length = int(declared) if declared is not None else None
        except ValueError:
            await _send_json(send, 400, {"detail": "The Content-Length header is not a number."})
            return None
        if length is not None and length > self.max_body:
            await self._too_large(send, length)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._too_large(send, None)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Any, length: int | None) -> None:
        size = f" is {length / 1e6:,.1f} MB;" if length is not None else " is too large:"
        log.info("Refused a request body over %d bytes", self.max_body)
        await _send_json(send, 413, {"detail": f"This request{size} the most this server accepts is "
                                               f"{self.max_body / 1e6:,.1f} MB (send images as uploaded files)."})

    async def _known_event(self, body: bytes, send: Any) -> bool:
        """Whether a queue join names an event of the page; if not, a 404 with a sentence has been sent."""
        import json

        if self.blocks is None:
            return True
        try:
            fn_index = json.loads(body).get("fn_index")
        except (ValueError, AttributeError, UnicodeDecodeError):
            return True  # gradio answers malformed bodies itself (422)
        if fn_index is None or (isinstance(fn_index, int) and not isinstance(fn_index, bool)
                                and fn_index in self.blocks.fns):
            return True
        shown = repr(fn_index) if len(repr(fn_index)) <= 40 else repr(fn_index)[:39] + "…"
        await _send_json(send, 404, {"detail": f"There is no event {shown} in this app; reload the page to get "
                                               "the current one."})
        return False


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that hands over the already read ``body`` once, then the connection's own messages."""
    sent = False

    async def replayed() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # only http.disconnect can come now

    return replayed


def _release_freed_memory() -> None:
    """Hand memory Python has freed back to the system (glibc keeps it in per-thread arenas otherwise).

    Expired sessions free megabytes of request data allocated in whichever worker thread served them,
    and glibc keeps what is freed in that thread's arena for later use by the same thread.
    """
    import ctypes
    import ctypes.util

    try:
        name = ctypes.util.find_library("c")
        if name:
            ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class LoginThrottle:
    """Slows down, then refuses, repeated failed logins from one client address.

    The first ``free`` failures cost nothing (people mistype); each later attempt waits ``0.25 * 2**k``
    seconds (at most ``max_delay``) before it is checked; after ``lock_after`` failures the address is
    refused for ``lockout_s`` seconds. Failures are forgotten ``window_s`` seconds after the last one, and
    a successful login forgets them at once, so the real user is kept out for a minute at most, and only
    at the address that was guessing. Attempts still being checked count as failures, so parallel
    guesses gain nothing.
    """

    def __init__(self, *, free: int = 3, lock_after: int = 8, max_delay: float = 2.0, lockout_s: float = 60.0,
                 window_s: float = 900.0, max_clients: int = 10_000) -> None:
        self.free = free
        self.lock_after = lock_after
        self.max_delay = max_delay
        self.lockout_s = lockout_s
        self.window_s = window_s
        self.max_clients = max_clients
        self._clients: dict[str, list[float]] = {}  # key -> [failures, in flight, last failure, locked until]
        self._lock = threading.Lock()

    def begin(self, key: str) -> float | None:
        """Seconds to wait before checking this attempt, or None if the address is locked out."""
        import time

        now = time.monotonic()
        with self._lock:
            failures, flying, last, until = self._clients.get(key, [0, 0, 0.0, 0.0])
            if failures and now - last > self.window_s:
                failures = 0
            if until > now:
                return None
            probe = until and not flying  # a lockout has ended: one try at a time, locked again if it fails
            if failures + flying >= self.lock_after and not probe:
                self._clients[key] = [failures, flying, last, now + self.lockout_s]
                return None
            self._clients[key] = [failures, flying + 1, last, until]
            if len(self._clients) > self.max_clients:
                self._clients.pop(next(iter(self._clients)))
            over = failures + flying - self.free
            return 0.0 if over < 0 else min(self.max_delay, 0.25 * 2 ** over)

    def end(self, key: str, succeeded: bool) -> None:
        """Record how an attempt that :meth:`begin` let through ended."""
        import time

        with self._lock:
            failures, flying, last, until = self._clients.get(key, [0, 1, 0.0, 0.0])
            if succeeded:
                self._clients.pop(key, None)
                return
            failures += 1
            until = time.monotonic() + self.lockout_s if failures >= self.lock_after else until
            self._clients[key] = [failures, max(0, flying - 1), time.monotonic(), until]

    def wait_s(self, key: str) -> float:
        """Seconds left in ``key``'s lockout."""
        import time

        with self._lock:
            return max(0.0, self._clients.get(key, [0, 0, 0.0, 0.0])[3] - time.monotonic())


def _peer_key(scope: dict[str, Any]) -> str:
    """The client address of a request, as :func:`common.client_key` finds it (for routes without a gr.Request)."""
    if os.environ.get("SPACE_ID"):
        forwarded = [value.decode("latin1") for name, value in scope.get("headers") or []
                     if name == b"x-forwarded-for"]
        entries = [entry.strip() for entry in ",".join(forwarded).split(",") if entry.strip()]
        if entries:
            return entries[-1]
    client = scope.get("client")
    return str(client[0]) if client else "anonymous"


class Uploads:
    """Uploads: a rate limit per client address, and the partial files of aborted uploads swept away.

    gradio writes each upload to a temporary file directly in its upload folder and moves it into a
    folder of its own once the body is complete; an upload cut off mid-body leaves its temporary file
    behind, which nothing deletes. Such files (``tmp*`` directly in the folder) not written to for
    ``idle_s`` seconds are deleted every ``every`` seconds, and all of them at shutdown (:meth:`close`).
    """

    def __init__(self, limiter: RateLimiter, *, folder: str | None = None, idle_s: float = 60.0,
                 every: float = 30.0) -> None:
        self.limiter = limiter
        self.folder = Path(folder or get_upload_folder())
        self.idle_s = idle_s
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, key: str) -> str | None:
        """None if ``key`` may upload now, else the sentence refusing it."""
        try:
            self.limiter.check(key)
        except BlipAppError as exc:
            return str(exc)
        return None

    def sweep(self, idle_s: float | None = None) -> int:
        """Delete the partial uploads not written to for ``idle_s`` seconds (default: the configured time)."""
        import time

        idle = self.idle_s if idle_s is None else idle_s
        removed = 0
        now = time.time()
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            try:
                if (entry.name.startswith("tmp") and entry.is_file(follow_symlinks=False)
                        and now - entry.stat(follow_symlinks=False).st_mtime >= idle):
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        if removed:
            log.info("Deleted %d partial upload(s)", removed)
        return removed

    def start(self) -> None:
        """Sweep in a daemon thread until :meth:`close`."""
        if self._thread is None:
            def loop() -> None:
                while not self._stop.wait(self.every):
                    self.sweep()

            self._thread = threading.Thread(target=loop, name="upload-sweeper", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop sweeping and delete every partial upload (when the server closes, and at exit)."""
        self._stop.set()
        _join(self._thread)
        self.sweep(idle_s=0.0)


class Sessions:
    """Expires the gradio sessions no page keeps open.

    gradio keeps a session's state (a copy of the page's configuration and every input value it was
    sent) until its page's heartbeat stream closes, and then for an hour; a raw client that never opens
    one (every ``/call`` request makes a new session) keeps its state until 10,000 sessions exist. Every
    ``every`` seconds, the sessions that have no open heartbeat, no event waiting or running and were
    last used over ``idle_s`` seconds ago are forgotten (a closed page's too: a reload starts a new one),
    with the ids of results their client never came to read.
    """

    def __init__(self, *, idle_s: float = 60.0, every: float = 15.0) -> None:
        self.idle_s = idle_s
        self.every = every
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def connected(self, session: str) -> Iterator[None]:
        """While a heartbeat stream of ``session`` is open."""
        with self._lock:
            self._open[session] = self._open.get(session, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._open.get(session, 1) - 1
                if left > 0:
                    self._open[session] = left
                else:
                    self._open.pop(session, None)

    def start(self, demo: Any) -> None:
        """Sweep ``demo``'s sessions in a daemon thread until :meth:`stop`."""
        import weakref

        if self._thread is not None:
            return
        ref = weakref.ref(demo)

        def loop() -> None:
            while not self._stop.wait(self.every):
                current = ref()
                if current is None:
                    return
                try:
                    self.sweep(current)
                except Exception:  # noqa: BLE001 - the next sweep tries again
                    log.exception("Expiring idle sessions failed")
                del current

        self._thread = threading.Thread(target=loop, name="session-expiry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop expiring sessions (when the server closes, and at exit)."""
        self._stop.set()
        _join(self._thread)

    def sweep(self, demo: Any) -> int:
        """Forget the expired sessions now; returns how many."""
        import datetime

        holder = getattr(demo, "state_holder", None)
        queue = getattr(demo, "_queue", None)
        if holder is None:
            return 0
        now = datetime.datetime.now()
        busy = set()
        if queue is not None:  # an event waiting or running (a finished one stays "pending" until its stream is read)
            busy = {event.session_hash for event in list(queue.event_ids_to_events.values())}
            busy |= {event.session_hash for job in list(queue.active_jobs) if job for event in job}
        with self._lock:
            connected = set(self._open)
        expired = 0
        with holder.lock:
            for session in list(holder.session_data):
                used = holder.time_last_used.get(session)
                if session in connected or session in busy:
                    continue
                if used is not None and (now - used).total_seconds() < self.idle_s:
                    continue
                holder.session_data.pop(session, None)
                holder.time_last_used.pop(session, None)
                if queue is not None:  # results nobody came to read
                    queue.pending_event_ids_session.pop(session, None)
                expired += 1
        if expired:
            log.info("Expired %d idle session(s)", expired)
            _release_freed_memory()
        return expired


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    import json

    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def request_body_limit(config: AppConfig) -> int:
    """The largest request body accepted (uploads aside): a /chat call carrying the longest history kept.

    That is MAX_HISTORY_TURNS turns of a full-length question and answer, plus room for the rest; the
    page's own requests are a few kilobytes (images travel as uploads).
    """
    from blip_app.tasks.service import ANSWER_CHARS_FACTOR, MAX_HISTORY_TURNS

    return 1024 * 1024 + MAX_HISTORY_TURNS * config.max_message_chars * (1 + ANSWER_CHARS_FACTOR)


def build_app(demo: gr.Blocks, service: Service, config: AppConfig) -> FastAPI:
    """The page, its named API and /v1 for ``service`` as one FastAPI app (nothing is started).

    Sets the process-wide Pillow limits from ``config`` and configures ``demo``'s queue; the sweepers
    of sessions and uploads run while the app's lifespan does. ``demo.blip_app_sessions`` and
    ``demo.blip_app_uploads`` hold them.
    """
    install_pillow_limits(config.image_limits)
    sessions = Sessions()
    uploads = Uploads(uploads_limiter(config.rate_limit_per_minute))
    demo.queue(max_size=config.queue_size, default_concurrency_limit=CONCURRENCY, api_open=False)
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
    app.include_router(openai_api.build_router(service, config, max_body=request_body_limit(config)))
    guard = Middleware(_Guard, max_body=request_body_limit(config), blocks=demo, sessions=sessions,
                       logins=LoginThrottle(), uploads=uploads)
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
        css=CSS,
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
    service = service or getattr(demo, "blip_app_service", None)
    if service is None:
        raise ValueError("launch() needs the Service behind the page for /v1: pass service=...")
    app = build_app(demo, service, config)
    _clean_at_exit(demo.blip_app_uploads.close, demo.blip_app_sessions.stop)
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


def _join(thread: threading.Thread | None) -> None:
    if thread is not None and thread is not threading.current_thread():
        thread.join(timeout=5)


def uploads_limiter(per_minute: int) -> RateLimiter:
    """Uploads one address may send: twice the request rate, in bursts of 20 or more (a Batch of photos
    arrives in one request; every image shown in the page is one upload); none if requests have no limit."""
    if per_minute <= 0:
        return RateLimiter(0)
    return RateLimiter(2 * per_minute, burst=max(20, per_minute),
                       message="You are uploading files too quickly; please wait {wait:.0f} s and try again.")


def _clean_at_exit(*steps: Any) -> None:
    """Run ``steps`` when the process exits (normally, by Ctrl-C, or by SIGTERM: see app.main)."""
    import atexit

    for step in steps:
        atexit.register(step)
