"""The OpenAI-compatible API: ``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/chat/completions``.

:func:`build_router` makes a FastAPI router from a :class:`~blip_app.tasks.service.Service` and the
AppConfig; it keeps no module-level state, so any process that has a Service can serve it (the
single-process server in web/server.py, a Ray Serve ingress). The wire format is OpenAI's; what
blip_app does with it:

- **Messages.** ``system`` and ``developer`` messages are ignored (BLIP-2 and InstructBLIP were never
  trained with one, and many clients always send one). ``user`` content is text or a list of ``text``
  and ``image_url`` parts; ``assistant`` content is text. Consecutive messages of one role are joined
  by a newline. The conversation starts with a user message and ends with one; each earlier user message
  and the assistant reply after it is one turn of the history, carried exactly as ``/chat`` carries it
  (Service.request cleans and limits it; the engine fits it into the context).
- **One image per conversation**, sent inline as a base64 ``data:`` URL in any user message; the same
  image sent again (some clients repeat it in every turn) counts once. ``http(s)`` and ``file`` URLs
  are refused with a 400 that says why: the server never fetches URLs (it would be anyone's proxy) and
  never reads its own files for a client.
- **Task.** blip_app's field ``task`` (caption, answer, chat); without it, a conversation with no text
  at all is a caption and anything else is chat. ``preset`` (standard, fast, detailed), ``beams``,
  ``short`` (answer), ``detailed`` (caption) and blip_app's other settings (``min_new_tokens``,
  ``repetition_penalty``, ``length_penalty``, ``do_sample``) are extra fields (the openai SDK sends them
  with ``extra_body``).
- **Decoding.** ``max_completion_tokens`` (or the older ``max_tokens``) is max_new_tokens. Without
  ``temperature`` or ``top_p`` the preset decides (standard: the papers' beam search). ``temperature``
  0 is greedy; above 0 it samples, as does ``top_p`` alone, with one beam unless ``beams`` says more.
  ``seed`` makes sampling repeatable. ``stop`` (up to 4 strings) ends the answer before the first one;
  a streamed generation stops there. ``n`` above 1, tools, log probabilities, presence or frequency
  penalties and JSON response formats are refused with a 400 naming the field.
- **Streaming** (``stream: true``): server-sent events of ``chat.completion.chunk`` objects ending with
  ``data: [DONE]``; ``stream_options.include_usage`` adds the usage chunk before it. Text is sent a
  word at a time (the engine's cleaning may still change an unfinished word). Beam search sends its
  answer in one chunk at the end.
- **Errors** in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad request,
  401 missing or wrong key (``--api-key`` / ``BLIP_APP_API_KEY``, checked as a Bearer token; with a
  page login (``--auth``) and no key, /v1 stays closed), 404 unknown model, 413 body or image too large,
  429 rate limit (the page's per-client limit, with Retry-After), 503 busy (more requests in flight than
  the queue holds), 500 when the model fails.
- **Queue and cancellation.** At most :data:`RUNNING` requests generate at once (the engine batches
  captions and answers up to 8); up to ``queue_size`` more wait; beyond that, 503. A client that
  disconnects, streaming or not, stops its generation at the next token.

Each response also carries ``blip_app``: the prompt the model was given, its token counts, the dropped
turns and the settings used; a remote blip_app (models/remote.py) reads them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from blip_app.config import AppConfig
from blip_app.core.images import load_image
from blip_app.core.settings import SETTING_NAMES, Preset, Task
from blip_app.errors import (
    BadImageError,
    BadInputError,
    BlipAppError,
    BusyError,
    CancelledError,
    GenerationError,
    ModelLoadError,
    RateLimitedError,
    SettingsError,
    UnknownModelError,
    user_message,
)
from blip_app.tasks.service import Service
from blip_app.web.common import captioning_states, is_matching_model
from blip_app.web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

RUNNING = 8  # requests generating at once: the engine batches up to 8 captions or answers
MAX_STOPS = 4
MAX_STOP_CHARS = 200
BUSY = "The server is busy: too many requests are already waiting. Please try again in a minute."
# Fields of OpenAI's request that blip_app cannot honour: refused rather than silently ignored.
_UNSUPPORTED = {
    "tools": "tools and function calls", "functions": "function calls", "tool_choice": "tool choice",
    "audio": "audio output", "prediction": "predicted outputs", "web_search_options": "web search",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BaseException) -> ApiError:
    """The OpenAI-shaped error for any exception (a bug gets the generic sentence and is logged)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BlipAppError):
        log.info("/v1 request refused: %s", exc)
    else:
        log.error("Unexpected error in /v1", exc_info=exc)
    text = user_message(exc)
    if isinstance(exc, UnknownModelError):
        return ApiError(404, text, param="model", code="model_not_found")
    if isinstance(exc, RateLimitedError):
        return ApiError(429, text, kind="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": _retry_after(text)})
    if isinstance(exc, BusyError):
        return ApiError(503, text, kind="server_error", code="server_busy", headers={"Retry-After": "5"})
    if isinstance(exc, BadImageError) and "limit" in text and "MB" in text:
        return ApiError(413, text, param="messages", code="image_too_large")
    if isinstance(exc, (BadImageError, BadInputError, SettingsError)):
        return ApiError(400, text, param=getattr(exc, "param", None))
    if isinstance(exc, ModelLoadError):
        return ApiError(503, text, kind="server_error", code="model_unavailable")
    if isinstance(exc, (GenerationError, CancelledError)):
        return ApiError(500, text, kind="server_error")
    return ApiError(500, text, kind="server_error")


def _retry_after(message: str) -> str:
    import re

    found = re.search(r"wait (\d+)", message)
    return found.group(1) if found else "5"


# --------------------------------------------------------------------------------------------------
# Reading a request


@dataclass
class ChatCall:
    """A /v1/chat/completions request, read and checked (before any model is touched)."""

    model: str
    image: bytes
    task: Task
    question: str
    history: list[list[str]]
    preset: str
    overrides: dict[str, Any]
    short: bool = False
    detailed: bool = False
    stream: bool = False
    include_usage: bool = False
    stops: tuple[str, ...] = ()
    ignored: list[str] = field(default_factory=list)


def _bad(message: str, param: str | None = None, status: int = 400, code: str | None = None) -> ApiError:
    return ApiError(status, message, param=param, code=code)


def _bool(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise _bad(f"{name} must be true or false, not {json.dumps(value)[:40]}.", name)


def _number(body: Mapping[str, Any], name: str, *, whole: bool = False) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and value != int(value)):
        raise _bad(f"{name} must be a {'whole ' if whole else ''}number, not {json.dumps(value)[:40]}.", name)
    return int(value) if whole else float(value)


def image_bytes(url: Any, max_bytes: int) -> bytes:
    """The bytes of an ``image_url`` part: a base64 ``data:`` URL; anything else is refused, saying why."""
    if isinstance(url, Mapping):
        url = url.get("url")
    if not isinstance(url, str) or not url.strip():
        raise _bad("An image_url part needs a url: a base64 data: URL such as data:image/png;base64,....",
                   "messages")
    text = url.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        raise _bad("This server never fetches images from URLs (it would fetch anything for anyone): send the "
                   "image inline as a base64 data: URL, e.g. data:image/jpeg;base64,<the file in base64>.",
                   "messages", code="image_url_not_allowed")
    if scheme == "file":
        raise _bad("file: URLs are refused: the server never reads its own files for a client. Send the image "
                   "inline as a base64 data: URL, e.g. data:image/png;base64,<the file in base64>.",
                   "messages", code="image_url_not_allowed")
    if scheme != "data":
        raise _bad("An image must be a base64 data: URL (data:image/png;base64,...); "
                   f"{text[:30]!r}... is not one.", "messages")
    header, sep, payload = text[5:].partition(",")
    media, *params = header.split(";")
    if not sep or "base64" not in [p.strip().lower() for p in params]:
        raise _bad("The image's data: URL must be base64-encoded (data:image/png;base64,...).", "messages")
    if media and not media.strip().lower().startswith("image/"):
        raise _bad(f"The data: URL says it holds {media.strip()[:40]!r}, not an image.", "messages")
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise ApiError(413, f"The image is about {len(payload) * 3 / 4 / 1e6:,.1f} MB; the limit is "
                            f"{max_bytes / 1e6:,.1f} MB.", param="messages", code="image_too_large")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("The image's data: URL is not valid base64.", "messages") from None
    if not data:
        raise _bad("The image's data: URL is empty.", "messages")
    return data


def _parts(content: Any, role: str, number: int, max_bytes: int) -> tuple[list[str], list[bytes]]:
    """The texts and images of one message's content."""
    where = f"message {number} ({role})"
    if content is None:
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise _bad(f"The content of {where} must be text or a list of parts.", "messages")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"A text part of {where} has no text.", "messages")
            texts.append(text)
        elif kind == "image_url" and role == "user":
            images.append(image_bytes(part.get("image_url"), max_bytes))
        elif kind == "refusal" and role == "assistant":
            continue
        else:
            shown = json.dumps(kind)[:40] if kind is not None else "a part without a type"
            allowed = "text and image_url" if role == "user" else "text"
            raise _bad(f"{where} holds {shown}; this server takes {allowed} parts.", "messages")
    return texts, images


def read_messages(messages: Any, max_bytes: int) -> tuple[bytes | None, list[list[str]], str, list[str]]:
    """(image, history as [[user, assistant], ...], newest user text, roles ignored) of a conversation."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects.", "messages")
    merged: list[list[Any]] = []  # [role, [texts]]
    image: bytes | None = None
    ignored: list[str] = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping):
            raise _bad(f"Message {number} must be an object with a role and a content.", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            ignored.append(str(role))
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"Message {number} has the role {json.dumps(role)[:40]}; this server takes user and "
                       "assistant messages (system messages are ignored).", "messages")
        if message.get("tool_calls") or message.get("function_call"):
            raise _bad(f"Message {number} holds tool calls, which this server does not support.", "messages")
        texts, images = _parts(message.get("content"), role, number, max_bytes)
        for picture in images:
            if image is not None and picture != image:
                raise _bad("This server takes one image per conversation; this one holds two different "
                           "images. Start a new conversation for a new image.", "messages")
            image = picture
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(texts)
        else:
            merged.append([role, list(texts)])
    if not merged or merged[0][0] != "user":
        raise _bad("The conversation must start with a user message.", "messages")
    if merged[-1][0] != "user":
        raise _bad("The last message must be the user's: it is the one the model answers.", "messages")
    joined = ["\n".join(t for t in texts if t is not None) for _, texts in merged]
    history = [[joined[i], joined[i + 1]] for i in range(0, len(joined) - 1, 2)]
    return image, history, joined[-1], ignored


def read_call(body: Any, max_bytes: int, max_message_chars: int) -> ChatCall:
    """Check a chat-completion request body; every refusal names its field."""
    if not isinstance(body, Mapping):
        raise _bad("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: one of the ids GET /v1/models lists.", "model")
    for name, what in _UNSUPPORTED.items():
        if body.get(name):
            raise _bad(f"{name}: {what} are not supported by this server.", name)
    if (n := _number(body, "n", whole=True)) not in (None, 1):
        raise _bad(f"n is {n}; this server writes one answer per request.", "n")
    if _bool(body, "logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs: log probabilities are not supported by this server.", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name):
            raise _bad(f"{name} is not supported; use the extra field repetition_penalty (1 to 5).", name)
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by this server.", "logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, Mapping)
                                        or response_format.get("type") != "text"):
        raise _bad("response_format: only text answers are supported.", "response_format")
    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _bad("stream_options is only allowed with stream: true.", "stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _bad("stream_options must be an object such as {\"include_usage\": true}.", "stream_options")
    include_usage = bool(_bool(options or {}, "include_usage"))

    image, history, question, ignored = read_messages(body.get("messages"), max_bytes)
    if image is None:
        raise _bad("The conversation holds no image: add one to a user message as an image_url part with a "
                   "base64 data: URL.", "messages", code="image_missing")
    task_name = body.get("task")
    if task_name is None:
        task = Task.CAPTION if not question.strip() and not history else Task.CHAT
    else:
        try:
            task = Task(task_name)
        except ValueError:
            raise _bad(f"task must be caption, answer or chat, not {json.dumps(task_name)[:40]}.", "task") from None
    if task is Task.CAPTION and (question.strip() or history):
        raise _bad("A caption takes the image alone: leave out the text, or use the task answer or chat.", "task")
    if task is Task.ANSWER and history:
        raise _bad("The task answer takes one question; send the conversation with the task chat.", "task")
    short, detailed = bool(_bool(body, "short")), bool(_bool(body, "detailed"))
    if short and task is not Task.ANSWER:
        raise _bad("short applies to the task answer only.", "short")
    if detailed and task is not Task.CAPTION:
        raise _bad("detailed applies to the task caption only.", "detailed")
    preset = body.get("preset", Preset.STANDARD.value)
    if not isinstance(preset, str) or preset not in {p.value for p in Preset}:
        raise _bad(f"preset must be one of {', '.join(p.value for p in Preset)}, not {json.dumps(preset)[:40]}.",
                   "preset")
    return ChatCall(model=model.strip(), image=image, task=task, question=question if task is not Task.CAPTION else "",
                    history=history, preset=preset, overrides=_overrides(body), short=short, detailed=detailed,
                    stream=stream, include_usage=include_usage, stops=_stops(body.get("stop")), ignored=ignored)


def _overrides(body: Mapping[str, Any]) -> dict[str, Any]:
    """blip_app's generation settings from OpenAI's fields and blip_app's extra ones (validated later)."""
    out: dict[str, Any] = {}
    tokens = _number(body, "max_completion_tokens", whole=True)
    tokens = tokens if tokens is not None else _number(body, "max_tokens", whole=True)
    if tokens is not None:
        out["max_new_tokens"] = tokens
    for name, key in (("beams", "num_beams"), ("num_beams", "num_beams"), ("min_new_tokens", "min_new_tokens"),
                      ("min_tokens", "min_new_tokens"), ("seed", "seed")):
        value = _number(body, name, whole=True)
        if value is not None:
            out[key] = value
    for name in ("repetition_penalty", "length_penalty", "top_p"):
        value = _number(body, name)
        if value is not None:
            out[name] = value
    temperature = _number(body, "temperature")
    sample = _bool(body, "do_sample")
    if sample is None and temperature is not None:
        sample = temperature > 0
    elif sample is None and "top_p" in out:
        sample = True
    if temperature is not None and temperature > 0:
        out["temperature"] = temperature
    if sample is not None:
        out["do_sample"] = sample
        if (sample or temperature is not None) and "num_beams" not in out:
            out["num_beams"] = 1  # OpenAI's decoding is not beam search: temperature 0 is greedy
    unknown = set(out) - set(SETTING_NAMES)
    assert not unknown, unknown  # noqa: S101 - the mapping above names settings only
    return out


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop must be a string or a list of strings.", "stop")
    stops = [s for s in stops if s]
    if len(stops) > MAX_STOPS:
        raise _bad(f"stop holds {len(stops)} sequences; at most {MAX_STOPS} are allowed.", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(f"A stop sequence is longer than {MAX_STOP_CHARS} characters.", "stop")
    return tuple(stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the first stop sequence, and whether one was found."""
    found = [index for index in (text.find(s) for s in stops) if index >= 0]
    return (text[: min(found)], True) if found else (text, False)


# --------------------------------------------------------------------------------------------------
# Admission, the body limit, the key


class Admission:
    """At most ``running`` requests generate at once and ``waiting`` more wait; beyond that, 503 at once."""

    def __init__(self, running: int, waiting: int) -> None:
        self.running = running
        self.limit = running + max(0, waiting)
        self._count = 0
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None

    def admit(self) -> Ticket:
        """A place in the queue, or BusyError when it is full."""
        with self._lock:
            if self._count >= self.limit:
                raise BusyError(BUSY)
            self._count += 1
        return Ticket(self)

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self._count

    def _release(self) -> None:
        with self._lock:
            self._count -= 1


class Ticket:
    """One admitted request: wait for a running slot, then release the place (once, whoever calls it)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._released = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Hold a running slot for the block (waiting for one)."""
        if self._admission._slots is None:
            self._admission._slots = asyncio.Semaphore(self._admission.running)
        async with self._admission._slots:
            yield

    def release(self) -> None:
        """Give the place back (idempotent)."""
        if not self._released:
            self._released = True
            self._admission._release()


def check_length(request: Request, max_body: int) -> None:
    """413 for a body whose declared length is over ``max_body`` bytes (checked before it is read)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise _bad("The Content-Length header is not a number.") from None
        if length > max_body:
            raise _too_large(length, max_body)


async def read_body(request: Request, max_body: int) -> bytes:
    """The request body, refused with 413 past ``max_body`` bytes (by its declared length, or as it arrives)."""
    check_length(request, max_body)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(None, max_body)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(length: int | None, limit: int) -> ApiError:
    size = f"is {length / 1e6:,.1f} MB;" if length is not None else "is too large:"
    return ApiError(413, f"This request {size} the most this server accepts is {limit / 1e6:,.1f} MB "
                         "(the image included).", code="request_too_large")


def check_key(request: Request, config: AppConfig) -> None:
    """401 unless the request carries the configured key as a Bearer token (none configured: open,
    unless the page requires a login, which /v1 cannot check)."""
    if config.api_key is None:
        if config.auth is not None:
            raise ApiError(401, "This server's page requires a login, so its OpenAI-compatible API needs a key: "
                                "its operator must start it with --api-key (or BLIP_APP_API_KEY).",
                           kind="authentication_error", code="invalid_api_key")
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "This server requires an API key: send it as 'Authorization: Bearer <key>' "
                            "(the openai SDK's api_key).", kind="authentication_error", code="invalid_api_key")
    if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "The API key is not the one this server requires.", kind="authentication_error",
                       code="invalid_api_key")


def client_key(request: Request) -> str:
    """Who is asking, for the rate limit: the peer address (a trusted proxy's X-Forwarded-For is already
    applied by the web server; on a Space, the entry the platform's proxy appends)."""
    if os.environ.get("SPACE_ID"):
        entries = [e.strip() for e in request.headers.get("x-forwarded-for", "").split(",") if e.strip()]
        if entries:
            return entries[-1]
    return request.client.host if request.client else "anonymous"


# --------------------------------------------------------------------------------------------------
# Running a request


class _Pump:
    """Runs a blocking iterator in a worker thread and hands its items to the event loop.

    The thread owns the iterator from start to close; ``cancel`` (set when the client leaves) makes
    the service stop at its next token, after which the thread closes the iterator itself.
    """

    def __init__(self, make: Callable[[], Iterator[Any]], cancel: threading.Event) -> None:
        self.cancel = cancel
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._work, args=(make,), name="v1-request", daemon=True)
        self._thread.start()

    def _post(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)

    def _work(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            iterator = make()
            try:
                for item in iterator:
                    self._post(("item", item))
                    if self.cancel.is_set():
                        break
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
            self._post(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            self._post(("error", exc))

    async def items(self, request: Request) -> AsyncIterator[Any]:
        """The iterator's items; stops (and cancels the work) when the client disconnects."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(self._items.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("A /v1 client went away: stopping its request")
                        return
                    continue
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            self.cancel.set()


def _usage(reply: Any, completion_tokens: int | None = None) -> dict[str, int]:
    prompt = int(reply.prompt_tokens) + int(reply.image_tokens)
    completion = int(reply.new_tokens if completion_tokens is None else completion_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _details(reply: Any, call: ChatCall, service: Service) -> dict[str, Any]:
    """blip_app's own account of a reply, and of the model that wrote it (the remote client reads both)."""
    details = {"task": call.task.value, "prompt": reply.prompt, "prompt_tokens": reply.prompt_tokens,
               "image_tokens": reply.image_tokens, "context_tokens": reply.context_tokens,
               "dropped_turns": reply.dropped_turns, "stopped_early": reply.stopped_early,
               "settings": reply.settings.as_dict(), "ignored_messages": call.ignored}
    details["model"] = _spec_facts(service.manager.peek(call.model) if hasattr(service.manager, "peek") else None)
    return details


def _spec_facts(loaded: Any) -> dict[str, Any]:
    """Family, language model, prompt style and sizes of a loaded model (empty when unknown)."""
    spec = getattr(loaded, "spec", None)
    if spec is None or getattr(spec, "family", None) is None:
        return {}
    return {"family": spec.family.value, "language_model": getattr(spec.language_model, "value", None),
            "prompt_style": spec.prompt_style.value, "context_tokens": spec.context_tokens,
            "image_tokens": spec.num_query_tokens}


def _finish_reason(reply: Any, stopped: bool) -> str:
    if stopped:
        return "stop"
    if reply.stopped_early == "time limit" or reply.new_tokens >= reply.settings.max_new_tokens:
        return "length"
    return "stop"


def _stable(text: str) -> str:
    """The part of a streamed text that can no longer change: up to its last space or newline."""
    index = max(text.rfind(" "), text.rfind("\n"))
    return text[: index + 1] if index >= 0 else ""


def model_card(state: Any, service: Service, created: int) -> dict[str, Any]:
    """One model as GET /v1/models lists it, with blip_app's facts about it."""
    meta = {"label": state.label, "family": state.family, "state": state.state, "detail": state.detail,
            "description": state.description}
    try:
        ref = service.manager.ref(state.name)
    except BlipAppError:
        ref = None
    entry = getattr(ref, "entry", None)
    if entry is not None:
        meta.update(family=entry.family.value, language_model=entry.language_model.value,
                    prompt_style=entry.prompt_style.value, context_tokens=entry.context_tokens)
    meta.update(_spec_facts(service.manager.peek(state.name) if hasattr(service.manager, "peek") else None))
    return {"id": state.name, "object": "model", "created": created, "owned_by": "blip_app", "blip_app": meta}


def build_router(service: Service, config: AppConfig, *, max_body: int, limiter: RateLimiter | None = None,
                 prefix: str = "/v1") -> APIRouter:
    """The /v1 routes over ``service``: the same validation, per-client rate limit, queue size and
    cancellation as the page and its named API (see the module docstring).

    ``max_body`` is the largest body the page's API takes (server.request_body_limit); /v1 takes the
    largest image in base64 on top of it."""
    limiter = limiter or RateLimiter(config.rate_limit_per_minute)
    admission = Admission(RUNNING, config.queue_size)
    max_image = config.image_limits.max_bytes
    max_body = max_body + max_image * 4 // 3 + 1024
    created = int(time.time())
    router = APIRouter(prefix=prefix)

    def listed() -> list[dict[str, Any]]:
        return [model_card(state, service, created) for state in captioning_states(service)]

    @router.get("/models")
    async def models(request: Request) -> Response:
        try:
            check_key(request, config)
            return JSONResponse({"object": "list", "data": listed()})
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()

    @router.get("/models/{model:path}")
    async def model(model: str, request: Request) -> Response:
        try:
            check_key(request, config)
            for card in listed():
                if card["id"] == model:
                    return JSONResponse(card)
            raise ApiError(404, f"The model {model!r} is not offered on this server; GET /v1/models lists the "
                                "ones that are.", param="model", code="model_not_found")
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()

    @router.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            check_key(request, config)
            check_length(request, max_body)  # refused without counting against the client's allowance
            limiter.check(client_key(request))
            raw = await read_body(request, max_body)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise _bad("The request body is not valid JSON.") from None
            call = read_call(body, max_image, service.max_message_chars)
            service.manager.ref(call.model)  # 404 before the image is decoded
            if is_matching_model(service, call.model):
                raise _bad(f"{call.model} is an image-text matching model: it scores images against texts and "
                           "cannot write. Choose a captioning model from GET /v1/models.", "model")
            picture = await asyncio.to_thread(load_image, call.image, config.image_limits)
            validated = service.request(call.task, question=call.question, history=call.history,
                                        preset=call.preset, overrides=call.overrides, short=call.short,
                                        detailed=call.detailed)
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()
        if call.stream:
            return await _streamed(request, call, picture, validated)
        return await _whole(request, call, picture, validated)

    def streams(call: ChatCall) -> bool:
        """Whether a request decodes greedily or by sampling, so that a stop sequence can end it early."""
        beams = call.overrides.get("num_beams")
        return beams == 1 or (beams is None and call.preset == Preset.FAST.value)

    async def _whole(request: Request, call: ChatCall, picture: Any, validated: Any) -> Response:
        cancel = threading.Event()
        try:
            ticket = admission.admit()
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()
        try:
            async with ticket.running():
                if call.stops and streams(call):
                    make = lambda: service.stream(call.model, picture, validated, cancel=cancel)  # noqa: E731
                else:  # batched with other requests
                    make = lambda: iter([service.run(call.model, picture, validated, cancel=cancel)])  # noqa: E731
                reply, text, stopped, updates = None, "", False, 0
                async for item in _Pump(make, cancel).items(request):
                    reply, updates = item, updates + 1
                    text, stopped = cut_at_stop(item.text, call.stops)
                    if stopped:
                        break
                if reply is None:
                    return Response(status_code=499)  # the client left
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()
        finally:
            ticket.release()
        tokens = updates if stopped and not reply.finished else None
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": call.model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": _finish_reason(reply, stopped)}],
            "usage": _usage(reply, tokens), "blip_app": _details(reply, call, service),
        })

    async def _streamed(request: Request, call: ChatCall, picture: Any, validated: Any) -> Response:
        from starlette.background import BackgroundTask

        cancel = threading.Event()
        try:
            ticket = admission.admit()  # 503 before the stream starts, as a normal error response
        except Exception as exc:  # noqa: BLE001
            return api_error(exc).response()
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> str:
            data = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": call.model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
            if call.include_usage and "usage" not in data:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            sent, reply, stopped, updates = "", None, False, 0
            try:
                yield chunk({"role": "assistant", "content": ""})
                async with ticket.running():
                    make = lambda: service.stream(call.model, picture, validated, cancel=cancel)  # noqa: E731
                    async for item in _Pump(make, cancel).items(request):
                        reply, updates = item, updates + 1
                        text, stopped = cut_at_stop(item.text, call.stops)
                        ready = text if (item.finished or stopped) else _stable(text)
                        if ready.startswith(sent) and len(ready) > len(sent):
                            yield chunk({"content": ready[len(sent):]})
                            sent = ready
                        elif not ready.startswith(sent) and (item.finished or stopped):
                            log.info("A streamed answer changed after it was sent: %r became %r", sent, ready)
                        if stopped:
                            break
                if reply is None:
                    return  # the client left before anything was generated
                tokens = updates if stopped and not reply.finished else None
                yield chunk({}, _finish_reason(reply, stopped), blip_app=_details(reply, call, service))
                if call.include_usage:
                    data = {"id": ident, "object": "chat.completion.chunk", "created": now, "model": call.model,
                            "system_fingerprint": None, "choices": [], "usage": _usage(reply, tokens)}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - the status is sent: the error travels as an event
                yield f"data: {json.dumps(api_error(exc).body(), ensure_ascii=False)}\n\n"
            finally:
                cancel.set()
                ticket.release()

        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(ticket.release),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
