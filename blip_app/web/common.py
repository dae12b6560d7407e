"""What several parts of the page share and that imports no other page module: which offered models
caption (the image-text matching model is offered too, but not in the model picker), and the largest
request body accepted."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from blip_app.config import AppConfig
from blip_app.errors import BlipAppError
from blip_app.models.manager import ModelState
from blip_app.tasks.service import Service

# retrieval.RetrievalFamily.BLIP2_ITM and retrieval.RETRIEVAL_ARCHITECTURE, written out because retrieval
# imports torch, which the web layer never does (tests/test_web_tools.py checks that they agree).
MATCHING_FAMILY = "blip2-itm"
MATCHING_ARCHITECTURE = "Blip2ForImageTextRetrieval"


def is_matching_model(service: Service, name: str) -> bool:
    """Whether the offered model ``name`` is an image-text matching one (it scores, it cannot caption).

    A catalog entry says so by its family; a checkpoint folder or a downloaded hub checkpoint by the
    ``architectures`` of its config.json (read from disk, never downloaded).
    """
    try:
        ref = service.manager.ref(name)
    except BlipAppError:
        return False
    family = getattr(getattr(ref.entry, "family", None), "value", None)
    if family is not None:
        return family == MATCHING_FAMILY
    config = Path(ref.source) / "config.json" if ref.is_local else _cached_config(ref.source, service)
    if config is None:
        return False
    try:
        architectures = json.loads(Path(config).read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return MATCHING_ARCHITECTURE in architectures


def _cached_config(repo_id: str, service: Service) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=service.manager.options.cache_dir)
    except Exception:  # noqa: BLE001 - not a repository id the cache knows
        return None
    return path if isinstance(path, str) else None


def captioning_only(service: Service, states: Sequence[ModelState]) -> list[ModelState]:
    """``states`` without the image-text matching models."""
    return [state for state in states if not is_matching_model(service, state.name)]


def request_body_limit(config: AppConfig) -> int:
    """The largest request body accepted (uploads aside): a /chat call carrying the longest history kept.

    That is MAX_HISTORY_TURNS turns of a full-length question and answer, plus room for the rest; the
    page's own requests are a few kilobytes (images travel as uploads). /v1 adds the largest image, in base64.
    """
    from blip_app.tasks.service import ANSWER_CHARS_FACTOR, MAX_HISTORY_TURNS

    return 1024 * 1024 + MAX_HISTORY_TURNS * config.max_message_chars * (1 + ANSWER_CHARS_FACTOR)
