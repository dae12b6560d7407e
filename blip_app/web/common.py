"""What several parts of the page share and that imports no other page module: which offered models
caption (the image-text matching model is offered too, but not in the model picker)."""

from __future__ import annotations

from collections.abc import Sequence

from blip_app.models.manager import ModelState
from blip_app.tasks.service import Service


def is_matching_model(service: Service, name: str) -> bool:
    """Whether the offered model ``name`` is an image-text matching one (it scores, it cannot caption)."""
    return service.manager.is_matching(name)


def captioning_only(service: Service, states: Sequence[ModelState]) -> list[ModelState]:
    """``states`` without the image-text matching models."""
    return [state for state in states if not is_matching_model(service, state.name)]
