"""The two kinds of model the manager holds, as the layers above it see them.

The tasks ask ``isinstance(model, Captioner)`` rather than probing for attributes: the engine's
LoadedModel is a Captioner, and so is remote.RemoteModel (a model another OpenAI-compatible server
runs); the image-text matching RetrievalModel is a Matcher. Both keep caches that
the manager counts in its memory budget and clears when it parks or frees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Cached(Protocol):
    """A model with caches the manager counts and clears."""

    name: str

    @property
    def cache_bytes(self) -> int: ...

    def clear_caches(self) -> None: ...


@runtime_checkable
class Captioner(Cached, Protocol):
    """BLIP-2 or InstructBLIP: prepare a request's prompt, then generate (or stream) its answer.

    ``prepare`` receives the request's task and text, the resolved ``max_new_tokens``, and the request's
    own ``preset`` and ``overrides``: a model that another server runs (remote.RemoteModel) passes those
    on, so that the server resolves the settings for its model as it does for its own page; the engine's
    LoadedModel uses the resolved settings it is handed.
    """

    spec: Any  # engine.ModelSpec: family, language model, prompt style, context
    checkpoint_generation: Mapping[str, Any]

    def prepare(self, task: Any, **inputs: Any) -> Any: ...

    def generate(self, image: Any, prepared: Any, settings: Any, **options: Any) -> Any: ...

    def stream(self, image: Any, prepared: Any, settings: Any, **options: Any) -> Iterator[Any]: ...


@runtime_checkable
class Matcher(Cached, Protocol):
    """BLIP-2's image-text matching model: trust scores, similarities, embeddings, ranking."""

    def itm_scores(self, images: Sequence[Any], texts: Sequence[str] | str) -> list[float]: ...

    def rank(self, images: Sequence[Any], query: str, *, method: str = "itm") -> list[tuple[int, float]]: ...
