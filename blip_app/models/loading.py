"""Where a model is loaded: a name becomes a checkpoint reference, a local folder, then a model.

The manager (``manager.py``) keeps models within a memory budget; it receives a :class:`Loader` and
never imports a model class. Every step a real checkpoint takes is here, in order:

1. ``resolve``: a catalog name, hub id or local folder becomes a :class:`~blip_app.core.catalog.ModelRef`
   (``core.catalog`` lists the captioning and the image-text matching checkpoints);
2. ``fetch``: a hub checkpoint is downloaded into the Hugging Face cache, or found there; a failure
   removes the partial files and names cause and fix (``checkpoints.explain_load_error``);
3. ``load``: the class is chosen from ``config.json`` by ``checkpoints.is_matching``
   (``Blip2ForImageTextRetrieval`` gives a :class:`~blip_app.models.retrieval.RetrievalModel`,
   anything else the engine's ``LoadedModel``),
   then loaded with the device plan of ``core.devices``.

Tests hand the manager a Loader whose ``load`` builds a scripted model, so the layers above are tested
without weights; the engine's own tests load real (tiny) checkpoints through the default one.
torch and transformers are imported only when a model is really loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_app.core.catalog import ModelRef, resolve_model

log = logging.getLogger(__name__)

# What a checkpoint needs: configs, tokenizers, processor files and the safetensors weights.
_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
_SUPPORT_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "qformer_tokenizer/*"]


def download(ref: ModelRef, options: Any) -> str:
    """Fetch a hub checkpoint into the Hugging Face cache (or find it there); return the local folder.

    Progress shows through tqdm, which Gradio's progress bar follows. On failure, partial downloads
    of this repository are removed and the error names cause and fix (see checkpoints.explain_load_error).
    """
    from huggingface_hub import snapshot_download

    from blip_app.models.checkpoints import explain_load_error

    common = {"revision": options.revision, "cache_dir": options.cache_dir,
              "local_files_only": options.local_files_only}
    try:
        folder = snapshot_download(ref.source, allow_patterns=_SUPPORT_PATTERNS + _WEIGHT_PATTERNS, **common)
        if not any(Path(folder).glob("*.safetensors")):  # an older repository with .bin weights only
            folder = snapshot_download(ref.source, allow_patterns=_SUPPORT_PATTERNS + ["*.bin", "*.bin.index.json"],
                                       **common)
    except Exception as exc:  # noqa: BLE001 - every cause is explained
        _remove_partial_downloads(ref.source, options.cache_dir)
        raise explain_load_error(exc, ref) from exc
    return folder


def _remove_partial_downloads(repo_id: str, cache_dir: str | None) -> None:
    from huggingface_hub import constants

    root = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "blobs"
    for partial in root.glob("*.incomplete"):
        try:
            partial.unlink()
            log.info("Removed partial download %s", partial)
        except OSError:
            log.warning("Could not remove partial download %s", partial, exc_info=True)


def is_cached(repo_id: str, cache_dir: str | None = None) -> bool:
    """Whether a hub repository's config and weights are in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        return isinstance(path, str) and os.path.exists(path)

    if not cached("config.json"):
        return False
    return cached("model.safetensors.index.json") or cached("model.safetensors")


def is_matching(ref: ModelRef, options: Any, *, source: str | None = None, download: bool = False) -> bool:
    """Whether ``ref`` is an image-text matching checkpoint (see ``checkpoints.is_matching``)."""
    from blip_app.models.checkpoints import is_matching as read

    return read(ref, options, source=source, download=download)


def load_model(ref: ModelRef, options: Any, *, hardware: Any = None, source: str | None = None,
               **engine_options: Any) -> Any:
    """A :class:`RetrievalModel` for an image-text matching checkpoint, else the engine's :class:`LoadedModel`."""
    from blip_app.models.engine import LoadedModel
    from blip_app.models.retrieval import RetrievalModel

    if is_matching(ref, options, source=source, download=True):
        return RetrievalModel.load(ref, options, hardware=hardware, source=source)
    return LoadedModel.load(ref, options, hardware=hardware, source=source, **engine_options)


@dataclass(frozen=True)
class Loader:
    """The steps from a name to a model, as the manager calls them (see the module docstring).

    ``load(ref, options, *, hardware=None, source=None)`` returns a model of ``kinds.Captioner`` or
    ``kinds.Matcher``; ``source`` is the folder ``fetch`` returned for a hub checkpoint.
    """

    load: Callable[..., Any] = load_model
    resolve: Callable[[str], ModelRef] = resolve_model
    fetch: Callable[[ModelRef, Any], str] = download
    is_cached: Callable[[str, str | None], bool] = is_cached
    is_matching: Callable[..., bool] = is_matching  # (ref, options, *, download=False): reads only what is on disk
