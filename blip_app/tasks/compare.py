"""Side by side: the same image and prompt sent to two or three models, one after another.

The models run in turn through the service, so only one of them needs to be in memory at a time:
the manager evicts the least recently used one when the next does not fit. Trust scores are computed
at the end, all in one pass of the image-text matching model, so it is loaded once and never pushes
out a captioning model that is still to run. A model that fails gets its error message in its
column; the others still answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from PIL import Image

from blip_app.core.settings import Preset, Task
from blip_app.errors import BadImageError, BadInputError, BlipAppError, user_message

log = logging.getLogger(__name__)

MAX_MODELS = 3


@dataclass(frozen=True)
class CompareResult:
    """One model's column."""

    model: str
    text: str | None = None  # the caption or answer
    seconds: float | None = None  # generation time
    total_seconds: float | None = None  # including loading the model
    trust: float | None = None  # image-text match probability of the text
    trust_label: str | None = None  # retrieval.confidence_label(trust)
    error: str | None = None  # why there is no text (or, with a text, why there is no trust score)
    done: bool = False  # False while the model has not run yet

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the API."""
        return asdict(self)


def _image(image: Any) -> Image.Image:
    if image is None:
        raise BadImageError("No image was given. Please upload an image first.")
    if isinstance(image, Image.Image):
        return image
    from blip_app.core.images import load_image

    return load_image(image)


def _check_models(service: Any, models: Sequence[str]) -> list[str]:
    names = [str(m).strip() for m in models if str(m or "").strip()]
    if not names:
        raise BadInputError("Choose at least one model to compare.")
    if len(names) > MAX_MODELS:
        raise BadInputError(f"{len(names)} models were chosen; at most {MAX_MODELS} can be compared at once.")
    if len(set(names)) != len(names):
        raise BadInputError("The same model was chosen twice; choose different models to compare.")
    for name in names:
        service.manager.ref(name)  # UnknownModelError naming the choices
    return names


def iter_compare(
    service: Any,
    models: Sequence[str],
    image: Any,
    task: Task | str,
    question: str = "",
    preset: Preset | str = Preset.STANDARD,
    overrides: Mapping[str, Any] | None = None,
    trust: str | None = None,
) -> Iterator[list[CompareResult]]:
    """Yield every column after each model has run (columns still to run have ``done`` False), then with trust.

    ``task`` is caption or answer (``question`` is needed for answer). ``trust`` names the offered
    image-text matching model that scores each text, or None for no trust scores. Everything that can
    be checked without a model is checked first (models offered, text, settings, image).
    """
    task = Task(task)
    if task is Task.CHAT:
        raise BadInputError("Side by side takes a caption or a question, not a conversation.")
    names = _check_models(service, models)
    if trust:
        service.manager.ref(trust)
    request = service.request(task, question=question, preset=preset, overrides=overrides)
    picture = _image(image)
    results = [CompareResult(name) for name in names]
    for index, name in enumerate(names):
        started = time.monotonic()
        try:
            _refuse_matching_model(service, name)
            reply = service.run(name, picture, request)
            results[index] = CompareResult(name, reply.text, reply.seconds, time.monotonic() - started, done=True)
        except BlipAppError as exc:
            results[index] = CompareResult(name, error=str(exc), total_seconds=time.monotonic() - started, done=True)
        except Exception as exc:  # noqa: BLE001 - one model failing leaves the others standing
            log.exception("%s failed in a comparison", name)
            results[index] = CompareResult(name, error=user_message(exc), total_seconds=time.monotonic() - started,
                                           done=True)
        yield list(results)
    if trust and any(r.text for r in results):
        yield _with_trust(service, trust, picture, task, request.question, results)


def _refuse_matching_model(service: Any, name: str) -> None:
    if service.manager.is_matching(name):
        raise BadInputError(f"{name} is an image-text matching model; it cannot caption or answer.")


def _with_trust(service: Any, trust: str, image: Image.Image, task: Task, question: str,
                results: list[CompareResult]) -> list[CompareResult]:
    from blip_app.models.retrieval import trust_scores, trust_text

    texts = [trust_text(task, question, r.text) if r.text else "" for r in results]
    try:
        scores = trust_scores(service, trust, image, texts)
    except BlipAppError as exc:
        note = f"No trust score: {exc}"
        return [replace(r, error=r.error or note) for r in results]
    except Exception as exc:  # noqa: BLE001 - the answers stand without their scores
        log.exception("Trust scores failed in a comparison")
        return [replace(r, error=r.error or f"No trust score: {user_message(exc)}") for r in results]
    return [replace(r, trust=s.score, trust_label=s.label) if s is not None else r for r, s in zip(results, scores)]


def compare(
    service: Any,
    models: Sequence[str],
    image: Any,
    task: Task | str,
    question: str = "",
    preset: Preset | str = Preset.STANDARD,
    overrides: Mapping[str, Any] | None = None,
    trust: str | None = None,
) -> list[CompareResult]:
    """Run ``models`` one after another on the same image and prompt; one result per model, in order."""
    results: list[CompareResult] = []
    for step in iter_compare(service, models, image, task, question, preset, overrides, trust):
        results = step
    return results
