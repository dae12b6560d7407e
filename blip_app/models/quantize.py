"""Weight-only quantization of the language model through torchao, and the on-disk cache of its result.

Two methods, chosen with ``--quantization`` (bitsandbytes' ``8bit`` / ``4bit`` stay apart: they save GPU
memory, and on a CPU decode far slower than bfloat16; figures: docs/cpu-accelerations.md, "Weight-only
quantization (torchao) and bitsandbytes on a CPU"):

* ``int8-weight-only``: one int8 weight per parameter with one scale per output row (symmetric), the
  activations stay in the model's dtype. The row scales are chosen by torchao (``Int8Tensor.from_hp``,
  ``PerRow``). On a CPU the product runs in ``torch.ops.aten._weight_int8pack_mm`` (:class:`Int8WeightOnlyLinear`):
  torchao's own eager path for this tensor converts the whole int8 weight to bfloat16 on every call, so it
  is slower than the bfloat16 layer unless ``torch.compile`` fuses it (figures: docs/performance.md,
  section 1).
  On a GPU: torchao's ``Int8WeightOnlyConfig`` as its documentation shows.
* ``int4-weight-only``: int4 weights in groups of :data:`INT4_GROUP_SIZE` input channels, each group with
  its own bfloat16 scale and zero point (asymmetric, torchao's "tinygemm" parameters). On a CPU torchao's
  ``PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``, kernel ``aten._weight_int4pack_mm_for_cpu``); on a
  GPU its ``Int4WeightOnlyConfig`` as torchao's quick start writes it (group 32, ``tile_packed_to_4d``
  layout, HQQ parameters; kernel ``aten._weight_int4pack_mm``, bfloat16 activations, compute capability
  8.0 or newer).

Only the language model's ``nn.Linear`` layers are quantized, its output head included (a tied head gets
its own quantized copy; the embedding lookup keeps the bfloat16 matrix). The vision encoder, the Q-Former
and the projection stay as loaded: an image's 257 rows make their products compute-bound, where fewer
weight bytes do not help (docs/performance.md measures it).

A layer whose input width is not a multiple of the group size (int4) is left as it is and listed in the
report. While quantizing, each layer's output error against float32 is measured on fixed random inputs
(:func:`relative_error`) and kept in the cache's metadata: the bench prints it at the real size.

**Quantize once.** Quantizing a language model takes far longer than loading its quantized layers
(figures: docs/cpu-accelerations.md, "Weight-only quantization (torchao) and bitsandbytes on a CPU"); the
result is saved (``torch.save`` of the quantized layers' state, torchao's tensors included, loaded back
with ``weights_only=True``) under a key made of the checkpoint (hub id and revision, or a local folder and
its weight files' names, sizes and modification times), the method and group size, the device kind, the
dtype, and the torch and torchao versions. A second start loads the checkpoint memory-mapped, replaces the
language model's layers by the cached ones before anything reads the bfloat16 weights, and so costs less
than a bfloat16 load (half of one at the real size, imports included: docs/performance.md, section 3).
A cache entry that does not match the model (missing layer, other shape) or
cannot be read is ignored, recomputed and overwritten.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

INT8 = "int8-weight-only"
INT4 = "int4-weight-only"
METHODS = (INT8, INT4)
# Group size of int4: 32, 64 and 128 decode at the same speed here (docs/performance.md: the kernel reads
# 4.0 bits of weight and 16 bits of scale and zero point per group, 4.5 bits per weight at 32 against
# 4.1 at 128), while the output error falls with the group size; 32 is the smallest the CPU kernel takes.
INT4_GROUP_SIZE = 32
CACHE_FORMAT = 1
_ERROR_ROWS = 4  # input rows for the error measurement of each layer


def torchao_version() -> str | None:
    """torchao's version, or None when it is not installed."""
    try:
        from importlib.metadata import version

        return version("torchao")
    except Exception:  # noqa: BLE001 - not installed
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao's import prints deprecation notices about torch internals; nothing to act on here."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------
# The layers


class Int8WeightOnlyLinear(nn.Module):
    """A linear layer with int8 weights (one scale per output row) computed by ``aten._weight_int8pack_mm``.

    ``qweight`` (out x in, int8) and ``scales`` (out, in the activation dtype) come from torchao's
    ``Int8Tensor.from_hp`` with ``PerRow`` granularity. Inputs in another dtype than the scales are cast
    to it and the output cast back. ``weight`` is the int8 matrix (T5's feed-forward reads its dtype and
    skips its cast for int8).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8WeightOnlyLinear:
        with _quiet():
            from torchao.quantization.granularity import PerRow
            from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

        quantized = Int8Tensor.from_hp(linear.weight.detach(), granularity=PerRow())
        qweight = quantized.qdata.contiguous()
        scales = quantized.scale.reshape(-1).to(dtype).contiguous()
        bias = None if linear.bias is None else linear.bias.detach().to(dtype)
        return cls(qweight, scales, bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.dtype != self.scales.dtype:
            rows = rows.to(self.scales.dtype)
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        out = out.reshape(*shape[:-1], self.out_features)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 weight-only")


def _torchao_config(method: str, device_type: str, group_size: int) -> Any:
    """The torchao config for a method on a device kind, as torchao's documentation shows."""
    with _quiet():
        if method == INT8:
            from torchao.quantization import Int8WeightOnlyConfig

            return Int8WeightOnlyConfig()
        if device_type == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=group_size)
        from torchao.quantization import Int4WeightOnlyConfig

        # torchao's README and docs/source/examples/inference/int4_weight_only.py (0.18), as written there.
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    int4_choose_qparams_algorithm="hqq")


def quantizable(linear: nn.Linear, method: str, group_size: int) -> bool:
    """Whether a layer's shape suits the method's kernel; the others stay as they are (and are listed).

    Found by running the kernels on a CPU: int4 (``_convert_weight_to_int4pack_for_cpu``) refuses an output
    width that is not a multiple of 16 and needs the input width in whole groups; ``_weight_int8pack_mm``
    silently returns wrong numbers for an input width that is not a multiple of 16 (24, 40) and crashes the
    process for some (36). Every published BLIP-2 / InstructBLIP language model has widths that are
    multiples of 128 (a Vicuna head of 32001 rows stays in bfloat16 under int4).
    """
    if method == INT4:
        return linear.in_features % group_size == 0 and linear.out_features % 16 == 0
    if linear.weight.device.type == "cpu":
        return linear.in_features % 16 == 0
    return True


def quantize_layer(linear: nn.Linear, method: str, *, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """A quantized copy of one ``nn.Linear`` (the original is left as it is)."""
    device_type = linear.weight.device.type
    if method == INT8 and device_type == "cpu":
        return Int8WeightOnlyLinear.from_linear(linear, linear.weight.dtype)
    from torchao.quantization import quantize_

    layer = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device="meta")
    layer.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    with _quiet():
        quantize_(layer, _torchao_config(method, device_type, group_size))
    return layer


@torch.inference_mode()
def relative_error(reference: nn.Linear, quantized: nn.Module, *, rows: int = _ERROR_ROWS, seed: int = 0) -> float:
    """‖y_q − y_32‖ / ‖y_32‖ on ``rows`` fixed standard-normal inputs: the quantized layer in the model's
    dtype against the original layer computed in float32."""
    weight = reference.weight
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, reference.in_features, generator=generator).to(weight.device)
    bias = None if reference.bias is None else reference.bias.float()
    exact = torch.nn.functional.linear(x, weight.float(), bias)
    got = quantized(x.to(weight.dtype)).float()
    return float((got - exact).norm() / exact.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The language model


@dataclass
class Report:
    """What :func:`quantize_language_model` did."""

    method: str
    group_size: int | None
    layers: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # layer name -> relative error against float32
    seconds: float = 0.0
    from_cache: bool = False
    cache_path: str | None = None

    def error_summary(self) -> dict[str, float]:
        """Median and maximum of the layer errors (NaN when none were measured)."""
        values = sorted(self.errors.values())
        if not values:
            return {"median": float("nan"), "max": float("nan"), "layers": 0}
        return {"median": values[len(values) // 2], "max": values[-1], "layers": len(values)}


def _linear_slots(module: nn.Module) -> list[tuple[str, str]]:
    """(parent module name, attribute) of every plain ``nn.Linear`` under ``module`` (names, not modules:
    holding the layers would keep every replaced weight alive)."""
    return [(name, attr) for name, parent in module.named_modules()
            for attr, child in parent.named_children() if type(child) is nn.Linear]


def quantize_language_model(language_model: nn.Module, method: str, *, group_size: int = INT4_GROUP_SIZE,
                            measure_errors: bool = True) -> tuple[Report, dict[str, nn.Module]]:
    """Replace the language model's linear layers by quantized ones, one at a time; return the report and
    {layer name: quantized module} (what the cache saves)."""
    if method not in METHODS:
        raise ValueError(f"Unknown weight-only method {method!r}; use one of {', '.join(METHODS)}.")
    started = time.perf_counter()
    report = Report(method, group_size if method == INT4 else None)
    done: dict[str, nn.Module] = {}
    for parent_name, attr in _linear_slots(language_model):
        parent = language_model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        name = f"{parent_name}.{attr}" if parent_name else attr
        if not quantizable(layer, method, group_size):
            report.skipped.append(name)
            continue
        quantized = quantize_layer(layer, method, group_size=group_size)
        if measure_errors:
            report.errors[name] = relative_error(layer, quantized)
        setattr(parent, attr, quantized)
        done[name] = quantized
        del layer
        report.layers += 1
    gc.collect()
    report.seconds = time.perf_counter() - started
    return report, done


# --------------------------------------------------------------------------------------------------
# The cache on disk


def default_cache_dir() -> Path:
    """``$BLIP_APP_QUANTIZED_CACHE``, else ``$XDG_CACHE_HOME/blip_app/quantized`` (``~/.cache`` by default)."""
    explicit = os.environ.get("BLIP_APP_QUANTIZED_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "blip_app" / "quantized"


def _checkpoint_identity(source: str, revision: str | None) -> dict[str, Any]:
    """What names a checkpoint's weights: a local folder by its weight files' names, sizes and times;
    a hub id by the id and the revision asked for."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in path.glob(pattern))
        return {"folder": str(path.resolve()),
                "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    return {"hub_id": source, "revision": revision or "main"}


def cache_key(source: str, revision: str | None, method: str, group_size: int, device_type: str,
              dtype: torch.dtype) -> dict[str, Any]:
    """Everything the quantized weights depend on."""
    return {"format": CACHE_FORMAT, "checkpoint": _checkpoint_identity(source, revision), "method": method,
            "group_size": group_size if method == INT4 else None, "device": device_type, "dtype": str(dtype),
            "torch": torch.__version__, "torchao": torchao_version()}


def cache_path(key: dict[str, Any], root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return (root or default_cache_dir()) / f"{key['method']}-{digest}"


def _save(folder: Path, key: dict[str, Any], report: Report, layers: dict[str, nn.Module]) -> None:
    """Write the quantized layers' state and the metadata atomically (a temporary folder, then renamed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder.parent))
    try:
        state = {f"{name}|{k}": v for name, layer in layers.items() for k, v in layer.state_dict().items()}
        torch.save(state, staging / "layers.pt")
        meta = {"key": key, "layers": sorted(layers), "skipped": report.skipped, "errors": report.errors,
                "quantize_seconds": report.seconds}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load(folder: Path, key: dict[str, Any], language_model: nn.Module, method: str, group_size: int
          ) -> Report | None:
    """Put the cached layers into the language model; None (nothing changed) when the cache does not fit."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("key") != key:
            return None
        # Importing the method's torchao modules registers its tensor classes as safe for
        # ``weights_only`` loading (a fresh process has not imported them yet).
        _torchao_config(method, key["device"], group_size)
        with _quiet():
            state = torch.load(folder / "layers.pt", weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - unreadable or partial: recomputed
        log.warning("Quantized cache %s is unreadable (%s); quantizing again.", folder, exc)
        return None
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for full, tensor in state.items():
        name, _, item = full.partition("|")
        by_layer.setdefault(name, {})[item] = tensor
    slots = {(f"{p}.{a}" if p else a): (p, a) for p, a in _linear_slots(language_model)}
    wanted = set(meta.get("layers", []))
    if wanted != set(by_layer) or not wanted <= set(slots):
        log.warning("Quantized cache %s does not match this model; quantizing again.", folder)
        return None
    built: dict[str, nn.Module] = {}
    for name in wanted:
        parent_name, attr = slots[name]
        original = getattr(language_model.get_submodule(parent_name), attr)
        items = by_layer[name]
        try:
            built[name] = _rebuild(original, items, method, group_size)
        except Exception as exc:  # noqa: BLE001 - a shape or format that does not fit
            log.warning("Quantized cache %s: layer %s does not fit (%s); quantizing again.", folder, name, exc)
            return None
    for name, layer in built.items():
        parent_name, attr = slots[name]
        setattr(language_model.get_submodule(parent_name), attr, layer)
    return Report(method, group_size if method == INT4 else None, layers=len(built),
                  skipped=list(meta.get("skipped", [])), errors=dict(meta.get("errors", {})),
                  from_cache=True, cache_path=str(folder))


def _rebuild(original: nn.Linear, items: dict[str, torch.Tensor], method: str, group_size: int) -> nn.Module:
    device = original.weight.device
    bias = items.get("bias")
    if "qweight" in items:
        qweight, scales = items["qweight"], items["scales"]
        if tuple(qweight.shape) != (original.out_features, original.in_features):
            raise ValueError(f"cached shape {tuple(qweight.shape)}")
        return Int8WeightOnlyLinear(qweight.to(device), scales.to(device),
                                    None if bias is None else bias.to(device))
    weight = items["weight"]
    if tuple(weight.shape) != (original.out_features, original.in_features):
        raise ValueError(f"cached shape {tuple(weight.shape)}")
    layer = nn.Linear(original.in_features, original.out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.to(device), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return layer


def apply(model: nn.Module, method: str, *, source: str, revision: str | None = None,
          group_size: int = INT4_GROUP_SIZE, cache_dir: str | Path | None = None, use_cache: bool = True
          ) -> Report:
    """Quantize ``model.language_model`` (or ``model``) with ``method``, from the disk cache when it holds
    this checkpoint's result, else computed and saved there. Marks the model (``speed.applied``)."""
    from blip_app.models import speed

    language_model = getattr(model, "language_model", model)
    first = next(language_model.parameters())
    key = cache_key(source, revision, method, group_size, first.device.type, first.dtype)
    folder = cache_path(key, Path(cache_dir) if cache_dir else None)
    report = None
    if use_cache and folder.is_dir():
        started = time.perf_counter()
        report = _load(folder, key, language_model, method, group_size)
        if report is not None:
            report.seconds = time.perf_counter() - started
    if report is None:
        report, layers = quantize_language_model(language_model, method, group_size=group_size)
        if use_cache:
            try:
                _save(folder, key, report, layers)
                report.cache_path = str(folder)
            except OSError as exc:  # a read-only or full disk: the model still works, the next start quantizes again
                log.warning("Could not save the quantized weights to %s: %s", folder, exc)
    speed.release_free_memory()
    speed.mark(model, method)
    object.__setattr__(model, "_blip_app_quantization", report)
    return report


def report_of(model: nn.Module) -> Report | None:
    """The :class:`Report` of the quantization :func:`apply` made on ``model`` (None if none)."""
    return getattr(model, "_blip_app_quantization", None)
