"""What a checkpoint is, read from its files, and why it could not be loaded, in words.

- :func:`is_matching`: an image-text matching checkpoint (``Blip2ForImageTextRetrieval``) or a captioning
  one, the one place that question is answered (the manager, the page and Compare ask it here);
- :func:`explain_load_error`: every cause of a failed download or load gets its own sentence and fix.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

from blip_app.core.catalog import RETRIEVAL_ARCHITECTURE, CatalogEntry, ModelRef, RetrievalEntry
from blip_app.core.devices import LoadOptions
from blip_app.errors import BlipAppError, ModelLoadError, UnsupportedCheckpointError
from blip_app.models.hardware import OUT_OF_MEMORY


def config_architectures(ref: ModelRef, options: LoadOptions, source: str | None) -> list[str]:
    """The ``architectures`` of a checkpoint's config.json (downloading only config.json if allowed)."""
    where = source or ref.source
    folder = Path(where)
    if folder.is_dir():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UnsupportedCheckpointError(f"Cannot read {folder / 'config.json'}: {exc}.") from exc
        return list(config.get("architectures") or [])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, revision=options.revision, cache_dir=options.cache_dir,
                                            local_files_only=options.local_files_only)
    except Exception as exc:  # noqa: BLE001 - explained for the user
        raise explain_load_error(exc, ref) from exc
    return list(getattr(config, "architectures", None) or [])


def is_matching(ref: ModelRef, options: LoadOptions = LoadOptions(), *, source: str | None = None,
                download: bool = True) -> bool:
    """Whether ``ref`` is an image-text matching checkpoint: by its catalog entry, else its config.json's
    ``architectures`` (the matching checkpoint's ``model_type`` is "blip-2", like the captioning ones).

    Without ``download``, only files already on disk are read (a checkpoint not downloaded counts as a
    captioning one until it is): the page asks this for every offered model to build its picker.
    """
    if not download and not ref.is_local and source is None and not isinstance(ref.entry, RetrievalEntry):
        if isinstance(ref.entry, CatalogEntry):
            return False
        cached = _cached_config(ref.source, options.cache_dir)
        if cached is None:
            return False
        source = str(Path(cached).parent)
    if isinstance(ref.entry, RetrievalEntry):
        return True
    if isinstance(ref.entry, CatalogEntry):
        return False
    try:
        return RETRIEVAL_ARCHITECTURE in config_architectures(ref, options, source)
    except BlipAppError:
        if download:
            raise
        return False


def _cached_config(repo_id: str, cache_dir: str | None) -> str | None:
    """The path of a hub repository's config.json in the local cache, else None (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - not a repository id the cache knows
        return None
    return path if isinstance(path, str) else None


def explain_load_error(exc: BaseException, ref: ModelRef) -> ModelLoadError:
    """Turn an exception raised while loading ``ref`` into a message that names cause and fix."""
    from huggingface_hub import errors as hub_errors

    where = ref.source
    chain = list(_chain(exc))

    def caused_by(*kinds: type) -> bool:
        return any(isinstance(e, kinds) for e in chain)

    if caused_by(hub_errors.GatedRepoError):
        text = (f"{where} is a gated repository. Accept its licence on its Hugging Face page and log in "
                "(hf auth login, or set HF_TOKEN), then try again.")
    elif caused_by(hub_errors.RepositoryNotFoundError):
        text = (f"{where} was not found on the Hugging Face Hub, or it is private. Check the name, or log in "
                "(hf auth login / HF_TOKEN) if it is private.")
    elif caused_by(hub_errors.RevisionNotFoundError):
        text = f"The revision asked for does not exist in {where}."
    elif caused_by(hub_errors.LocalEntryNotFoundError) or _is_network_error(exc):
        text = (f"{where} is not in the local cache and could not be downloaded (no network access to the "
                "Hugging Face Hub). Connect to the network, or download it elsewhere and copy the "
                "Hugging Face cache (HF_HOME), or pass a local folder.")
    elif caused_by(*OUT_OF_MEMORY):
        text = (f"Not enough memory to load {ref.label}. Close other models, choose a smaller model, or load "
                "it with --quantization 8bit or 4bit.")
    elif any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        text = (f"The disk is full: {ref.label} could not be downloaded. Free some space in the Hugging Face "
                "cache folder (HF_HOME) and try again.")
    elif isinstance(exc, ImportError):
        text = f"A package needed to load {ref.label} this way is missing: {exc}."
    else:
        text = f"Could not load {ref.label}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return ModelLoadError(text)


def _is_network_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "ReadTimeout",
                         "OfflineModeIsEnabled", "gaierror", "NameResolutionError", "MaxRetryError"})


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__
