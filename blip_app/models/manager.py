"""Which models are loaded, switching between them, memory, and who may use a model right now.

- Models stay loaded while they fit the memory budget; the least recently used one not in use is
  evicted first. On a GPU an evicted model is parked in CPU RAM when it fits there, so switching
  back is quick.
- A model in use by a request is never evicted: ``use()`` counts its users.
- Loading happens outside the device lock, so switching never blocks other people's generations.
- A failed load (unknown or gated repository, no network, no memory or disk) raises a message that
  names cause and fix, and the models that were serving keep serving.
- The manager receives its :class:`~blip_app.models.loading.Loader` (how a name becomes a model) and
  never imports a model class: tests give it scripted models the same way.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip_app.core.catalog import BYTES_PER_PARAM, ModelRef
from blip_app.errors import BusyError, UnknownModelError

if TYPE_CHECKING:
    from blip_app.models.loading import Loader

log = logging.getLogger(__name__)

GB = 1024**3

# The Salesforce repositories hold float32 safetensors: about 4 bytes per parameter to download.
_DOWNLOAD_BYTES_PER_PARAM = 4.0


@dataclass(frozen=True)
class ModelState:
    """One offered model as the model picker and the /models endpoint show it."""

    name: str
    label: str
    family: str
    state: str  # loaded, parked, loading, on disk, download, folder
    detail: str  # one line for people: "loaded (bfloat16 on cpu)", "needs a download of about 15 GB"
    description: str


class ModelManager:
    """Keeps recently used models loaded within a memory budget and hands them out to requests."""

    def __init__(
        self,
        offered: Sequence[str],
        options: Any,  # engine.LoadOptions
        *,
        memory_budget_gb: float | None = None,
        loader: Loader,
        hardware: Any = None,
        busy_timeout_s: float = 60.0,
    ) -> None:
        if not offered:
            raise UnknownModelError("No models are offered: give at least one --model.")
        self.options = options
        self._refs: OrderedDict[str, ModelRef] = OrderedDict()
        for name in offered:
            ref = loader.resolve(name)
            self._refs.setdefault(ref.name, ref)
        self._loader = loader
        self._hardware = hardware
        self._loaded: OrderedDict[str, Any] = OrderedDict()  # name -> LoadedModel, most recent last
        self._parked: dict[str, Any] = {}  # name -> LoadedModel moved to CPU RAM
        self._users: dict[str, int] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._reserved: dict[str, int] = {}  # bytes promised to loads in flight, by model name
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)
        self._budget_bytes = int(memory_budget_gb * GB) if memory_budget_gb else None
        self._busy_timeout_s = busy_timeout_s

    # ---------------------------------------------------------------- what is offered

    @property
    def names(self) -> list[str]:
        """The offered model names, in the order given."""
        return list(self._refs)

    def ref(self, name: str) -> ModelRef:
        """The offered model called ``name``; anything else is refused, naming the choices."""
        ref = self._refs.get((name or "").strip())
        if ref is None:
            raise UnknownModelError(
                f"The model {name!r} is not offered on this server. Choose one of: {', '.join(self._refs)}."
            )
        return ref

    def is_matching(self, name: str) -> bool:
        """Whether the offered model ``name`` is an image-text matching one (it scores; it cannot caption).

        Read from its catalog entry or the config.json on disk (never downloaded); False for a name not offered.
        """
        ref = self._refs.get((name or "").strip())
        return ref is not None and self._loader.is_matching(ref, self.options)

    def states(self) -> list[ModelState]:
        """Every offered model with its state, for the picker and the API."""
        with self._lock:
            loaded = dict(self._loaded)
            parked = set(self._parked)
            loading = {name for name, lock in self._loading.items() if lock.locked()}
        result = []
        for name, ref in self._refs.items():
            entry = ref.entry
            family = entry.family.value if entry else "checkpoint"
            if name in loaded:
                plan = loaded[name].plan
                state, detail = "loaded", f"loaded ({plan.precision_label} on {plan.device})"
            elif name in parked:
                state, detail = "parked", "in CPU memory, quick to bring back"
            elif name in loading:
                state, detail = "loading", "loading now"
            elif ref.is_local:
                state, detail = "folder", f"local folder {ref.source}"
            elif self._loader.is_cached(ref.source, self.options.cache_dir):
                state, detail = "on disk", "downloaded, not loaded"
            else:
                size = f" of about {entry.params_billion * _DOWNLOAD_BYTES_PER_PARAM:.0f} GB" if entry else ""
                state, detail = "download", f"needs a download{size}"
            description = entry.description if entry else f"checkpoint at {ref.source}"
            result.append(ModelState(name, ref.label, family, state, detail, description))
        return result

    def loaded_names(self) -> list[str]:
        """Names of the models in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    # ---------------------------------------------------------------- using a model

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Any]:
        """The loaded model for ``name``, loading it if needed; it cannot be evicted until the block ends."""
        model = self.get(name, hold=True)
        try:
            yield model
        finally:
            with self._lock:
                self._users[name] -= 1
                self._released.notify_all()

    def get(self, name: str, *, hold: bool = False) -> Any:
        """Load (or bring back) ``name`` and mark it most recently used. ``hold`` counts a user."""
        ref = self.ref(name)
        with self._lock:
            load_lock = self._loading.setdefault(name, threading.Lock())
        with load_lock:  # one load per model at a time; other models load or run meanwhile
            with self._lock:
                model = self._loaded.get(name)
                if model is not None:
                    self._loaded.move_to_end(name)
                    if hold:
                        self._users[name] = self._users.get(name, 0) + 1
                    return model
            try:
                model = self._bring_back(name) or self._load(ref)
            except BaseException:
                with self._lock:
                    self._reserved.pop(name, None)
                    self._released.notify_all()
                raise
            with self._lock:  # one critical section: the model starts counting as its reservation ends
                self._reserved.pop(name, None)
                self._released.notify_all()
                self._loaded[name] = model
                self._loaded.move_to_end(name)
                if hold:
                    self._users[name] = self._users.get(name, 0) + 1
            return model

    def unload(self, name: str) -> None:
        """Free a model now (waiting for its current users to finish)."""
        with self._lock:
            while self._users.get(name, 0) > 0:
                self._released.wait()
            model = self._loaded.pop(name, None) or self._parked.pop(name, None)
        if model is not None:
            _free(model)

    def close(self) -> None:
        """Free every model."""
        for name in list(self._loaded) + list(self._parked):
            self.unload(name)

    # ---------------------------------------------------------------- loading and memory

    def _load(self, ref: ModelRef) -> Any:
        started = time.monotonic()
        # Most failures happen here, before anything is evicted.
        source = None if ref.is_local else self._loader.fetch(ref, self.options)
        need = self._estimate_bytes(ref, source or ref.source)
        evicted = self._make_room(need, exclude=ref.name)
        try:
            kwargs = {"hardware": self._hardware}
            if source is not None:
                kwargs["source"] = source
            model = self._loader.load(ref, self.options, **kwargs)
        except BaseException:
            for name, old in evicted:  # the models that were serving keep serving
                self._restore(name, old)
            raise
        for _, old in evicted:
            if old is not None:
                _free(old)
        log.info("Loaded %s in %.1f s", ref.label, time.monotonic() - started)
        return model

    def _estimate_bytes(self, ref: ModelRef, folder: str) -> int:
        """Memory the model will take once loaded: from the catalog, else from its weight files."""
        if ref.entry is not None:
            precision = self.options.quantization if self.options.quantization != "none" else "bfloat16"
            return int(ref.entry.params_billion * 1e9 * BYTES_PER_PARAM.get(precision, 2.0))
        path = Path(folder)
        if not path.is_dir():
            return 0
        size = sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
        return size // 2 if self.options.precision != "float32" else size  # checkpoints are mostly float32

    def _budget(self) -> int:
        """Bytes the models may take: the configured budget, else most of the device's memory."""
        if self._budget_bytes is not None:
            return self._budget_bytes
        import torch

        device = getattr(self.options, "device", "auto")
        if device != "cpu" and torch.cuda.is_available():
            index = int(device.split(":")[1]) if ":" in device else 0
            return int(torch.cuda.get_device_properties(index).total_memory * 0.9)
        import psutil

        return int(psutil.virtual_memory().total * 0.8)

    def _make_room(self, need: int, *, exclude: str) -> list[tuple[str, Any]]:
        """Evict least recently used models not in use until ``need`` bytes fit the budget, then reserve them.

        Loads in flight count with the bytes reserved for them, so two models loading at once never
        overcommit the budget together; the reservation ends when the model is in (see ``get``).
        """
        budget = self._budget()
        evicted: list[tuple[str, Any]] = []
        deadline = time.monotonic() + self._busy_timeout_s
        with self._lock:
            while True:
                in_flight = sum(size for name, size in self._reserved.items() if name != exclude)
                used = sum(_footprint(m) for m in self._loaded.values()) + in_flight
                if used + need <= budget:
                    self._reserved[exclude] = need
                    return evicted
                idle = [n for n in self._loaded if n != exclude and self._users.get(n, 0) == 0]
                if idle:
                    name = idle[0]
                    model = self._loaded.pop(name)
                    evicted.append((name, self._park(name, model)))
                    continue
                if not in_flight and not any(self._users.get(n, 0) for n in self._loaded):
                    self._reserved[exclude] = need
                    return evicted  # nothing left to evict: try anyway, the loader reports a real OOM
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BusyError("Other requests are using the models in memory; please try again shortly.")
                self._released.wait(remaining)

    def _park(self, name: str, model: Any) -> Any:
        """On a GPU, move an evicted model to CPU RAM when possible; return it (None once freed)."""
        plan = model.plan
        if plan.device == "cpu" or plan.quantization != "none":
            return model  # freed after the new model loads, or restored if it fails
        try:
            model.clear_caches()  # key/value caches and features live on the GPU
            model.model.to("cpu")
            _empty_cuda()
            self._parked[name] = model
            log.info("Parked %s in CPU memory", name)
        except Exception:  # noqa: BLE001 - not enough RAM: free it instead
            log.warning("Could not park %s in CPU memory; freeing it", name, exc_info=True)
            return model
        return None

    def _bring_back(self, name: str) -> Any:
        with self._lock:
            model = self._parked.pop(name, None)
        if model is None:
            return None
        self._make_room(_footprint(model), exclude=name)
        model.model.to(model.plan.device)
        return model

    def _restore(self, name: str, model: Any) -> None:
        with self._lock:
            if model is None:
                model = self._parked.pop(name, None)
                if model is None:
                    return
                try:
                    model.model.to(model.plan.device)
                except Exception:  # noqa: BLE001
                    log.warning("Could not bring %s back after a failed load", name, exc_info=True)
                    return
            self._loaded[name] = model
            self._loaded.move_to_end(name, last=False)


def _footprint(model: Any) -> int:
    """Bytes a loaded model holds: its weights, and its key/value caches and image features."""
    try:
        weights = int(model.model.get_memory_footprint())
    except Exception:  # noqa: BLE001 - a stand-in without weights
        weights = 0
    return weights + int(getattr(model, "cache_bytes", 0) or 0)


def _empty_cuda() -> None:
    from blip_app.models.hardware import free_accelerator_memory

    free_accelerator_memory()


def _free(model: Any) -> None:
    """Drop a model's weights and caches, and check that the memory came back."""
    import torch

    device = model.plan.device
    before = torch.cuda.memory_allocated() if device.startswith("cuda") else None
    model.clear_caches()
    model.model = None
    gc.collect()
    _empty_cuda()
    if before is not None:
        after = torch.cuda.memory_allocated()
        if after >= before:
            log.warning("Freeing %s returned no GPU memory (%.1f GB still allocated)", model.name, after / GB)
