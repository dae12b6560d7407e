"""The named API endpoints for scripts: ``/caption``, ``/answer``, ``/chat`` and ``/models``, and, with an
image-text matching model, ``/trust`` and ``/search``; ``/embed`` always. Each is typed from its hints
(``gr.api``), counted by the per-client rate limit, and fails with one plain-text sentence.

Type hints here are evaluated at run time by gradio (``gr.api`` reads the return annotation without
resolving strings), so this module does not use ``from __future__ import annotations``.
"""

import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal, get_args

import gradio as gr
import spaces
from gradio.data_classes import FileData

from blip_app.config import AppConfig
from blip_app.core.settings import Preset, Task
from blip_app.errors import BadImageError, BadInputError
from blip_app.tasks.batch import BatchItem
from blip_app.tasks.service import Service, clean_message
from blip_app.web.common import (
    SEARCH_LIMIT,
    SEARCH_TEXT_CHARS,
    api_error,
    captioning_states,
    client_key,
    decode_upload,
    expand_uploads,
    model_name,
    uploaded_files,
)
from blip_app.web.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PresetName = Literal["standard", "fast", "detailed"]
assert set(get_args(PresetName)) == {p.value for p in Preset}, "PresetName must list every Preset"


def add_api(service: Service, config: AppConfig, limiter: RateLimiter) -> None:
    """Register every endpoint in the current Blocks (first, so that the API owns its names)."""
    _add_generation_api(service, config, limiter)
    _add_matching_api(service, config, limiter)


def _add_generation_api(service: Service, config: AppConfig, limiter: RateLimiter) -> None:
    """Register /caption, /answer, /chat and /models (typed from the hints below) in the current Blocks.

    Each function also takes the ``gr.Request`` (gradio fills it in; it is not an API parameter) for the
    per-client rate limit.
    """

    image_limits, default_model = config.image_limits, config.default_model

    def decode(image: Any) -> Any:
        return decode_upload(image, image_limits)

    def overrides(max_new_tokens: int | None, min_new_tokens: int | None, num_beams: int | None,
                  do_sample: bool | None, temperature: float | None, top_p: float | None,
                  repetition_penalty: float | None, length_penalty: float | None) -> dict[str, Any]:
        values = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "num_beams": num_beams,
                  "do_sample": do_sample, "temperature": temperature, "top_p": top_p,
                  "repetition_penalty": repetition_penalty, "length_penalty": length_penalty}
        return {name: value for name, value in values.items() if value is not None}

    def caption(image: FileData, model: str = default_model, preset: PresetName = "standard",
                max_new_tokens: int | None = None, min_new_tokens: int | None = None,
                num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                top_p: float | None = None, repetition_penalty: float | None = None,
                length_penalty: float | None = None, detailed: bool = False, request: gr.Request = None) -> str:
        """Caption an image. Send the image with gradio_client.handle_file(path)."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.CAPTION, preset=preset, detailed=detailed, overrides=overrides(
                max_new_tokens, min_new_tokens, num_beams, do_sample, temperature, top_p, repetition_penalty,
                length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    def answer(image: FileData, question: str, model: str = default_model, preset: PresetName = "standard",
               max_new_tokens: int | None = None, min_new_tokens: int | None = None,
               num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
               top_p: float | None = None, repetition_penalty: float | None = None,
               length_penalty: float | None = None, short: bool = False, request: gr.Request = None) -> str:
        """Answer a question about an image."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.ANSWER, question=question, preset=preset, short=short,
                                      overrides=overrides(max_new_tokens, min_new_tokens, num_beams, do_sample,
                                                          temperature, top_p, repetition_penalty, length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    def chat(image: FileData, history: list[list[str]], message: str, model: str = default_model,
             preset: PresetName = "standard", max_new_tokens: int | None = None, min_new_tokens: int | None = None,
             num_beams: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
             top_p: float | None = None, repetition_penalty: float | None = None,
             length_penalty: float | None = None, request: gr.Request = None) -> str:
        """Answer the newest message of a conversation about an image. history: [[user, assistant], ...]."""
        try:
            limiter.check(client_key(request))
            request = service.request(Task.CHAT, question=message, history=history or (), preset=preset,
                                      overrides=overrides(max_new_tokens, min_new_tokens, num_beams, do_sample,
                                                          temperature, top_p, repetition_penalty, length_penalty))
            return service.run(model_name(model), decode(image), request).text
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    def models() -> list[dict[str, str]]:
        """The offered models: name, label, family, state, detail, description."""
        try:
            return [asdict(state) for state in captioning_states(service)]
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    gr.api(_stops_when_abandoned(spaces.GPU(caption)), api_name="caption")
    gr.api(_stops_when_abandoned(spaces.GPU(answer)), api_name="answer")
    gr.api(_stops_when_abandoned(spaces.GPU(chat)), api_name="chat")
    gr.api(models, api_name="models", concurrency_limit=None)



def _add_matching_api(service: Service, config: AppConfig, limiter: RateLimiter) -> None:
    """Register ``/trust`` and ``/search`` (when a trust model is offered) and ``/embed`` in the current Blocks.

    Like _add_generation_api: typed from the hints, every call counted by the per-client rate limit, errors as
    one sentence.
    """
    image_limits = config.image_limits
    trust_model = config.trust_model

    def decode(image: Any) -> Any:
        return decode_upload(image, image_limits)

    def trust(image: FileData, text: str, model: str = trust_model or "", request: gr.Request = None) -> dict[str, Any]:
        """How well a text matches an image, by the image-text matching model: {score, label, model}.

        score is the matching head's probability that the text describes the image (0..1); label is
        "very likely" (>= 0.8), "likely" (>= 0.5), "uncertain" (>= 0.2) or "unlikely". For an answer,
        send the question and the answer together ("What is the cat doing? sleeping").
        """
        from blip_app.models.retrieval import trust_score

        try:
            limiter.check(client_key(request))
            text = clean_message(text, what="text to score", max_chars=SEARCH_TEXT_CHARS)
            return trust_score(service, model_name(model), decode(image), text).as_dict()
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    def search(images: list[FileData], query: str, model: str = trust_model or "",
               request: gr.Request = None) -> list[dict[str, Any]]:
        """Rank images (files, or zip archives of images) by how well they match query, best first.

        Each entry: {index (position among the images given), name, score (match probability), label,
        similarity (contrastive cosine)}.
        """
        from blip_app.models.retrieval import search as rank

        try:
            limiter.check(client_key(request))
            query = clean_message(query, what="search text", max_chars=SEARCH_TEXT_CHARS)
            items, _ = expand_uploads(images or [], image_limits, SEARCH_LIMIT)
            items = [item for item in items if not item.skipped]

            def loader(item: BatchItem) -> Any:
                def load() -> Any:  # called by rank when this image's turn comes: one decoded at a time
                    try:
                        return item.load()
                    except BadImageError as exc:
                        raise BadImageError(f"{item.name}: {exc}") from None
                return load

            return [hit.as_dict() for hit in rank(service, model_name(model), [loader(item) for item in items], query,
                                                   names=[item.name for item in items])]
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    def embed(image: FileData | None = None, text: str | None = None, model: str = trust_model or config.default_model,
              full: bool = False, request: gr.Request = None) -> list[dict[str, Any]]:
        """The features a model gives for an image and/or a text: one entry per kind.

        With the image-text matching model: itc-image / itc-text (the projected, normalised embeddings
        search uses), qformer, qformer-text and image. With a captioning model: image, qformer, text.
        Each entry: {kind, description, model, input, shape, norm, pooling, vector}; rows too if full.
        """
        from blip_app.models.retrieval import embed as features

        try:
            limiter.check(client_key(request))
            items: list[Any] = []
            names: list[str] = []
            if image is not None:
                items.append(decode(image))
                names.append(uploaded_files(image)[0][1])
            if text is not None:
                text = clean_message(text, what="text to embed", max_chars=SEARCH_TEXT_CHARS, allow_empty=True)
            if text:
                items.append(text)
                names.append(text)
            if not items:
                raise BadInputError("Give an image, a text, or both to embed.")
            return [e.as_dict(full=bool(full)) for e in features(service, model_name(model), items, names=names)]
        except Exception as exc:  # noqa: BLE001
            raise api_error(exc) from None

    if trust_model:
        gr.api(spaces.GPU(trust), api_name="trust")
        gr.api(spaces.GPU(search), api_name="search")
    gr.api(spaces.GPU(embed), api_name="embed")


def _stops_when_abandoned(fn: Any) -> Any:
    """An API function whose generation stops when its client cancels or goes away.

    gradio runs a plain function in a worker thread, and when the client cancels (gradio_client's
    ``Job.cancel``: POST /cancel) or its event stream closes, it only drops the result: the thread
    would go on generating on the device. The function runs here in a worker thread under a cancel
    event (``service.cancelled_by``) that is set when gradio cancels this task or marks its queue
    event dead, so the generation stops at its next token and a waiting one never starts.
    """
    import asyncio
    import functools

    import anyio

    from blip_app.tasks.service import cancelled_by

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        cancel = threading.Event()

        def work() -> Any:
            with cancelled_by(cancel):
                return fn(*args, **kwargs)

        event = _queue_event([*args, *kwargs.values()])
        watcher = asyncio.create_task(_watch_event(event, cancel)) if event is not None else None
        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except BaseException:
            cancel.set()  # cancelled by gradio (or already finished with an error: then a no-op)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    return run


def _queue_event(args: Sequence[Any]) -> Any:
    """The gradio queue event the running task serves (its name carries the event id), or None."""
    import asyncio

    task = asyncio.current_task()
    _, sep, event_id = (task.get_name() if task is not None else "").partition("<gradio-sep>")
    request = next((arg for arg in args if isinstance(arg, gr.Request)), None)
    try:
        queue = request.app.get_blocks()._queue  # type: ignore[union-attr]
        return queue.event_ids_to_events.get(event_id) if sep else None
    except Exception:  # noqa: BLE001 - no request or another gradio: task cancellation still works
        return None


async def _watch_event(event: Any, cancel: threading.Event, every: float = 0.2) -> None:
    """Set ``cancel`` once gradio marks ``event`` dead (its client's event stream closed)."""
    import asyncio

    while not cancel.is_set():
        if not getattr(event, "alive", True) or getattr(event, "closed", False):
            log.info("A client went away: stopping its request")
            cancel.set()
            return
        await asyncio.sleep(every)
