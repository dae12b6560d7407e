"""A captioning model that another OpenAI-compatible server runs: another blip_app's ``/v1``, or vLLM.

:class:`RemoteModel` is a :class:`~blip_app.models.kinds.Captioner` like the engine's LoadedModel, so the
service, the page and every API treat it like a local model; the manager holds it without counting any
memory. Rules:

- **The remote server writes the prompt.** A blip_app server is sent the conversation as OpenAI messages
  with blip_app's own fields (task, preset, short, detailed, and the caller's explicit settings), so it
  builds exactly the prompt and decoding it would build for its own page; its answer carries the prompt
  and settings it used. Any other server (vLLM) is sent the messages and plain sampling parameters, and
  its chat template writes the prompt (docs/openai-api.md has the template for BLIP-2 OPT). The prompt
  this side shows before the answer arrives is the one blip_app's prompt style would build.
- **Always streamed.** Every request is read as server-sent events in a reader thread, so that a cancel
  (Stop, a client that went away) closes the connection at once, which makes a blip_app server stop
  generating, and the time limit is kept here too.
- **Failures become the app's own errors**, each naming the server: unreachable or timed out
  (GenerationError), key refused (ModelLoadError), model not offered (UnknownModelError), the remote's
  400 and 413 (BadInputError), 429 (RateLimitedError), 503 (BusyError). The model's health (answered,
  unreachable) is kept for the picker (:attr:`RemoteModel.health`).
- The HTTP client is httpx (installed with gradio): the openai SDK would add a dependency for two routes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
from PIL import Image

from blip_app.core import prompts
from blip_app.core.catalog import Family, LanguageModel, ModelRef, PromptStyle
from blip_app.core.remote import API_KEY_VARIABLE, Health, RemoteTarget
from blip_app.core.settings import GenerationSettings, ModelTraits, Preset, Task
from blip_app.errors import (
    BadInputError,
    BlipAppError,
    BusyError,
    CancelledError,
    GenerationError,
    ModelLoadError,
    RateLimitedError,
    UnknownModelError,
)
from blip_app.models.engine import Reply

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 10.0  # GET /models when the model is first used
# Mapping of blip_app's generation settings to the fields a blip_app /v1 takes (web/openai_api.py).
_BLIP_APP_FIELDS = {"max_new_tokens": "max_completion_tokens", "num_beams": "beams", "temperature": "temperature",
                    "top_p": "top_p", "seed": "seed", "do_sample": "do_sample", "min_new_tokens": "min_new_tokens",
                    "repetition_penalty": "repetition_penalty", "length_penalty": "length_penalty"}


@dataclass(frozen=True)
class RemotePlan:
    """How a remote model is held, in the engine's LoadPlan terms the manager and the service read."""

    device: str  # host:port
    precision_label: str = "served remotely"
    quantization: str = "none"
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class RemoteSpec:
    """What the remote server said of its model (blip_app's /v1 says it; others do not)."""

    family: Family | None
    language_model: LanguageModel | None
    prompt_style: PromptStyle
    context_tokens: int
    num_query_tokens: int

    @property
    def traits(self) -> ModelTraits:
        """The reference decoding this side validates settings with (the remote resolves its own)."""
        return ModelTraits(self.family or Family.BLIP2, self.language_model or LanguageModel.OPT,
                           self.prompt_style is PromptStyle.BLIP2_COCO)


@dataclass(frozen=True)
class RemotePrepared:
    """A request ready to send: the messages, blip_app's fields, and the prompt it is expected to give."""

    task: Task
    prompt: prompts.PromptPlan
    messages: tuple[dict[str, Any], ...]  # the OpenAI messages without the image (added when sent)
    fields: Mapping[str, Any]  # blip_app's own request fields (task, preset, short, detailed, settings)
    context_tokens: int
    image_tokens: int
    prompt_tokens: int = 0  # known once the remote has answered (its usage)
    qformer_text: str | None = None
    input_ids: tuple[int, ...] = ()

    @property
    def total_tokens(self) -> int:
        """Image tokens plus prompt tokens, as far as this side knows them."""
        return self.image_tokens + self.prompt_tokens


def _spec(meta: Mapping[str, Any], old: RemoteSpec | None = None) -> RemoteSpec:
    """The spec a server's facts give (a blip_app server knows them once its model is loaded)."""
    style = _enum(PromptStyle, meta.get("prompt_style"))
    return RemoteSpec(
        family=_enum(Family, meta.get("family")) or (old.family if old else None),
        language_model=_enum(LanguageModel, meta.get("language_model")) or (old.language_model if old else None),
        prompt_style=style or (old.prompt_style if old else PromptStyle.BLIP2),
        context_tokens=int(meta.get("context_tokens") or (old.context_tokens if old else 2048)),
        num_query_tokens=int(meta.get("image_tokens") or (old.num_query_tokens if old else 32)),
    )


def _enum(kind: type, value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        return None


class RemoteModel:
    """A model on another OpenAI-compatible server, used through its /chat/completions."""

    remote = True
    model = None  # no weights here
    cache_bytes = 0
    checkpoint_generation: Mapping[str, Any] = {}

    def __init__(self, ref: ModelRef, *, info: Mapping[str, Any] | None = None, api_key: str | None = None,
                 health: Health | None = None, transport: httpx.BaseTransport | None = None) -> None:
        if ref.remote is None:
            raise UnknownModelError(f"{ref.name} is not a remote model.")
        self.name = ref.name
        self.target: RemoteTarget = ref.remote
        self.health = health or Health()
        meta = dict((info or {}).get("blip_app") or {})
        self.dialect = "blip_app" if meta or (info or {}).get("owned_by") == "blip_app" else (
            "vllm" if (info or {}).get("owned_by") == "vllm" else "openai")
        self.spec = _spec(meta)
        self.plan = RemotePlan(device=self.target.host, precision_label=f"served by {self.dialect}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.target.base_url, headers=headers, transport=transport,
                                    timeout=httpx.Timeout(LIST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    # ---------------------------------------------------------------- connecting

    @classmethod
    def connect(cls, ref: ModelRef, options: Any = None, *, health: Health | None = None,
                api_key: str | None = None, **_: Any) -> RemoteModel:
        """Ask the server for its models and check that it offers this one (the manager's "load")."""
        target = ref.remote
        if target is None:
            raise UnknownModelError(f"{ref.name} is not a remote model.")
        api_key = api_key if api_key is not None else (os.environ.get(API_KEY_VARIABLE) or None)
        health = health or Health()
        probe = cls(ref, api_key=api_key, health=health)
        try:
            response = probe._client.get("/models")
            listed = probe._checked(response).json().get("data") or []
        except BlipAppError as exc:
            health.record(False, str(exc))
            probe.close()
            raise ModelLoadError(str(exc)) from None
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            error = probe._transport_error(exc, "listing its models")
            health.record(False, str(error))
            probe.close()
            raise ModelLoadError(str(error)) from None
        probe.close()
        info = next((item for item in listed if isinstance(item, dict) and item.get("id") == target.model), None)
        if info is None:
            names = ", ".join(str(item.get("id")) for item in listed if isinstance(item, dict)) or "none"
            message = (f"The server at {target.host} does not offer the model {target.model!r}; "
                       f"it offers: {names}.")
            health.record(False, message)
            raise UnknownModelError(message)
        health.record(True, "answered")
        return cls(ref, info=info, api_key=api_key, health=health)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def clear_caches(self) -> None:
        """Nothing is cached here."""

    # ---------------------------------------------------------------- phase 1: prepare

    def prepare(self, task: Task, *, question: str = "", history: Sequence[prompts.Turn] = (), short: bool = False,
                detailed: bool = False, max_new_tokens: int = 30, preset: Preset | str = Preset.STANDARD,
                overrides: Mapping[str, Any] | None = None) -> RemotePrepared:
        """The messages and fields of a request; the prompt shown is the one blip_app's style builds."""
        style = self.spec.prompt_style
        if task is Task.CAPTION:
            plan = prompts.caption_prompt(style, detailed=detailed)
        elif task is Task.ANSWER:
            plan = prompts.answer_prompt(style, question, short=short)
        else:
            plan = prompts.chat_prompt(style, history, question)
        messages: list[dict[str, Any]] = []
        for turn in history if task is Task.CHAT else ():
            messages.append({"role": "user", "content": turn.question})
            messages.append({"role": "assistant", "content": turn.answer})
        messages.append({"role": "user", "content": question if task is not Task.CAPTION else ""})
        fields: dict[str, Any] = {}
        if self.dialect == "blip_app":
            fields = {"task": task.value, "preset": Preset(preset or Preset.STANDARD).value}
            if short:
                fields["short"] = True
            if detailed:
                fields["detailed"] = True
            for name, value in (overrides or {}).items():
                if value is not None and value != "" and name in _BLIP_APP_FIELDS:
                    fields[_BLIP_APP_FIELDS[name]] = value
        return RemotePrepared(task, plan, tuple(messages), fields, self.spec.context_tokens,
                              self.spec.num_query_tokens)

    # ---------------------------------------------------------------- phases 2 and 3

    def generate(self, image: Image.Image, prepared: RemotePrepared, settings: GenerationSettings, *,
                 on_text: Any = None, cancel: threading.Event | None = None, time_limit: float | None = None,
                 **_: Any) -> Reply:
        """The whole answer (read as a stream, so that cancel and the time limit act at once)."""
        final = None
        for reply in self.stream(image, prepared, settings, cancel=cancel, time_limit=time_limit):
            if not reply.finished and on_text is not None:
                on_text(reply.text)
            final = reply
        if final is None or not final.finished:
            raise GenerationError(f"The server at {self.target.host} ended its answer without finishing it.")
        return final

    def stream(self, image: Image.Image, prepared: RemotePrepared, settings: GenerationSettings, *,
               cancel: threading.Event | None = None, time_limit: float | None = None, **_: Any) -> Iterator[Reply]:
        """Yield the text so far as the server streams it, then the final Reply."""
        cancel = cancel or threading.Event()
        started = time.monotonic()
        deadline = started + time_limit if time_limit is not None else None
        body = self._body(image, prepared, settings)
        events: queue.Queue = queue.Queue()
        holder: dict[str, Any] = {}
        done = object()

        def read() -> None:
            try:
                # the time limit is kept by the consumer below (with its own message); the read timeout
                # only ends a reader whose server stopped sending altogether
                read_timeout = time_limit + 30 if time_limit is not None else None
                with self._client.stream("POST", "/chat/completions", json=body,
                                         timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)
                                         ) as response:
                    holder["response"] = response
                    if response.status_code >= 400:
                        response.read()
                        self._checked(response)
                    for line in response.iter_lines():
                        if cancel.is_set():
                            return
                        if line.startswith("data:"):
                            events.put(line[5:].strip())
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                events.put(exc)
            finally:
                events.put(done)

        reader = threading.Thread(target=read, name=f"remote-{self.target.host}", daemon=True)
        reader.start()
        text, usage, extra, finish, stopped = "", {}, {}, None, None
        partial = Reply(text="", model=self.name, prompt=prepared.prompt.text, prompt_tokens=0,
                        image_tokens=prepared.image_tokens, context_tokens=prepared.context_tokens,
                        finished=False, settings=settings)
        try:
            while True:
                if cancel.is_set():
                    raise CancelledError("The request was cancelled.")
                if deadline is not None and time.monotonic() > deadline:
                    if text:
                        stopped = "time limit"
                        break
                    raise GenerationError(f"The server at {self.target.host} did not answer within "
                                          f"{time_limit:.0f} s (the time limit).")
                try:
                    item = events.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is done:
                    break
                if isinstance(item, BlipAppError):
                    raise item
                if isinstance(item, BaseException):
                    if cancel.is_set():
                        raise CancelledError("The request was cancelled.") from None
                    raise self._transport_error(item, "answering") from None
                if item == "[DONE]":
                    break
                try:
                    chunk = json.loads(item)
                except ValueError:
                    raise GenerationError(f"The server at {self.target.host} sent a malformed event.") from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise self._error_from(chunk, 500)
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text += delta
                        yield replace(partial, text=text)
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("blip_app"):
                    extra = chunk["blip_app"]
        finally:
            cancel.set()  # the reader stops; closing the response ends the remote's generation
            response = holder.get("response")
            if response is not None:
                with contextlib.suppress(Exception):
                    response.close()
        if finish is None and stopped is None:
            raise GenerationError(f"The connection to {self.target.host} closed before the answer was finished.")
        self.health.record(True, "answered")
        if isinstance(extra.get("model"), Mapping) and extra["model"]:
            self.spec = _spec(extra["model"], self.spec)  # the server has loaded it: its facts are known now
        used = settings
        if isinstance(extra.get("settings"), Mapping):
            known = {k: v for k, v in extra["settings"].items() if k in GenerationSettings.__dataclass_fields__}
            with contextlib.suppress(TypeError):
                used = GenerationSettings(**known)
        elif self.dialect != "blip_app":
            used = replace(settings, num_beams=1)  # beam search is not requested from other servers
        yield Reply(
            text=text.strip(),
            model=self.name,
            prompt=str(extra.get("prompt", prepared.prompt.text)),
            prompt_tokens=int(extra.get("prompt_tokens", usage.get("prompt_tokens", 0)) or 0),
            image_tokens=int(extra.get("image_tokens", prepared.image_tokens) or 0),
            context_tokens=int(extra.get("context_tokens", prepared.context_tokens) or 0),
            dropped_turns=int(extra.get("dropped_turns", 0) or 0),
            new_tokens=int(usage.get("completion_tokens", 0) or 0),
            seconds=time.monotonic() - started,
            stopped_early=stopped or extra.get("stopped_early"),
            settings=used,
        )

    # ---------------------------------------------------------------- the wire

    def _body(self, image: Image.Image, prepared: RemotePrepared, settings: GenerationSettings) -> dict[str, Any]:
        messages = [dict(message) for message in prepared.messages]
        last = messages[-1]
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
        if last["content"]:
            parts.append({"type": "text", "text": last["content"]})
        last["content"] = parts
        body: dict[str, Any] = {"model": self.target.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.dialect == "blip_app":
            body.update(prepared.fields)
            return body
        # Other servers: the resolved settings as plain sampling parameters (no beam search).
        body["max_tokens"] = settings.max_new_tokens
        body["temperature"] = settings.temperature if settings.do_sample else 0.0
        if settings.do_sample:
            body["top_p"] = settings.top_p
        if settings.seed is not None:
            body["seed"] = settings.seed
        if self.dialect == "vllm":  # vLLM's extra sampling parameters
            body["min_tokens"] = settings.min_new_tokens
            body["repetition_penalty"] = settings.repetition_penalty
        return body

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.status_code < 400:
            return response
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": {"message": response.text[:300]}}
        raise self._error_from(payload, response.status_code)

    def _error_from(self, payload: Any, status: int) -> BlipAppError:
        """The app's error for an OpenAI-shaped (or vLLM-shaped) error body."""
        error = payload.get("error") if isinstance(payload, dict) else None
        if not isinstance(error, dict):
            error = payload if isinstance(payload, dict) else {}
        message = str(error.get("message") or f"HTTP {status}").strip()
        code = error.get("code")
        status = int(code) if isinstance(code, int) else status
        where = self.target.host
        if error.get("type") == "not_found_error" or code == "model_not_found" or status == 404:
            return UnknownModelError(f"The server at {where} does not offer the model {self.target.model!r} "
                                     f"any more: {message}")
        if status in (401, 403):
            return ModelLoadError(f"The server at {where} refused this app's key ({message}); set "
                                  f"{API_KEY_VARIABLE} to the key it requires.")
        if status == 429:
            return RateLimitedError(f"The server at {where} is limiting this app's requests: {message}")
        if status == 503:
            return BusyError(f"The server at {where} is busy: {message}")
        if status in (400, 413, 422):
            return BadInputError(message if self.dialect == "blip_app" else f"The server at {where} refused the "
                                                                            f"request: {message}")
        return GenerationError(f"The server at {where} failed on this request: {message}")

    def _transport_error(self, exc: BaseException, doing: str) -> GenerationError:
        where = self.target.host
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            error = GenerationError(f"The server at {where} took too long {doing}; please try again.")
        elif isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            error = GenerationError(f"The server at {where} cannot be reached ({_reason(exc)}); check that it "
                                    "is running and that this app may connect to it.")
        elif isinstance(exc, httpx.HTTPError):
            error = GenerationError(f"The connection to {where} broke while {doing} ({_reason(exc)}).")
        else:
            log.warning("Unexpected failure talking to %s", where, exc_info=exc)
            error = GenerationError(f"The server at {where} sent an answer this app cannot read.")
        self.health.record(False, str(error))
        return error


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:160]


def data_url(image: Image.Image) -> str:
    """A lossless BMP ``data:`` URL of an image: the remote decodes exactly the pixels this side has.

    BMP rather than PNG: it costs next to nothing to encode, where PNG's compression costs more time than
    its smaller size saves on a network (docs/openai-api.md has the figures). The uploaded file itself is
    gone by now: the service holds decoded pixels.
    """
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="BMP")
    return "data:image/bmp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
