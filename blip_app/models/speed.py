"""CPU accelerations the engine can apply to a loaded model, each measured (see docs/bench-opt-2.7b.md).

The docstrings here state the rules and their reasons; the figures behind them, with the model, threads
and host they were taken on, are in docs/cpu-accelerations.md. ``python -m blip_app.devtools.speed``
measures them again for any checkpoint.

What a decode step costs is reading the language model's weights: what matters is how fast the
matrix-vector products stream them from memory. Three things decide that here:

* **where the weights live** — ``from_pretrained`` memory-maps the safetensors file, so weights sit in
  4 KiB page-cache pages. Anonymous memory backed by transparent huge pages (2 MiB) streams faster
  (fewer TLB misses): :func:`make_resident`, :func:`huge_pages_enabled`.
* **the kernel** (by a rule since issue 13: :data:`KERNEL_RULE`) — oneDNN's inner product with the
  weight packed once into its blocked layout (what inductor's ``freezing=True`` does inside
  ``torch.compile``, here without compiling: :func:`pack_linears`) can stream the weights much faster
  than bfloat16 ``torch.nn.functional.linear`` with one row of input, or slower, depending on the host;
  timing both at load (:func:`measure_kernel_choice`) flipped from one load to the next, so the engine
  no longer does (figures: docs/cpu-accelerations.md, "Packed kernels", "The kernel rule").
* **bytes per weight** — weight-only int8 halves them and int4 quarters them
  (:mod:`blip_app.models.quantize`, torchao); :func:`quantize_int8` (``int8-cpu``) also quantises the
  activations, per tensor, which is known to break large OPT models.

Attention (:func:`set_attention`) barely matters for speed at these lengths, but it decides whether a
reused key/value cache gives bit-identical results (see :func:`apply_cpu_defaults`). ``torch.compile``
with a static cache is not applied: see :func:`compile_note`.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import gc
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_HUGE_PAGE = 2 * 1024 * 1024
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_APPLIED = "_blip_app_speed"  # attribute set on a model: the accelerations applied to it


# --------------------------------------------------------------------------------------------------
# Memory: huge pages, memory-mapped weights


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``); False where unavailable."""
    trim = getattr(_LIBC, "malloc_trim", None)
    return bool(trim is not None and trim(0))


def large_allocations_mapped(threshold: int = 4 * 1024 * 1024) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with their own mmap (freed at once).

    glibc raises its mmap threshold after a large block is freed (up to 32 MB), after which weight-sized
    blocks come from the heap and freeing them (a dense weight replaced by its packed copy, a model
    unloaded) leaves the memory with the process. Fixing the threshold also stops that adjustment
    (figures: docs/cpu-accelerations.md, "glibc mmap threshold").
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(-3, threshold))  # M_MMAP_THRESHOLD


def _madvise(start: int, end: int, advice: int, *, align: int = _PAGE) -> bool:
    """madvise() on the ``align``-aligned part of [start, end); False when there is none or it fails."""
    first = (start + align - 1) // align * align
    last = end // align * align
    if _LIBC is None or last <= first:
        return False
    return _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice) == 0


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode for anonymous memory: always, madvise, never (or unknown)."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii").read()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def anon_huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory backed by transparent huge pages (0 if unknown)."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as smaps:
            for line in smaps:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def huge_pages_enabled() -> bool:
    """Whether torch's CPU allocator by itself hands out huge-page-backed memory for large tensors.

    True when the kernel's mode is ``always``, or ``madvise`` with ``THP_MEM_ALLOC_ENABLE=1`` in the
    environment before torch was imported. Checked on a real allocation. Without it, :func:`make_resident`
    and :func:`pack_linears` still get huge pages for the weights (madvise / MADV_COLLAPSE): weights on
    huge pages stream faster, dense or packed, through fewer TLB misses (figures:
    docs/cpu-accelerations.md, "Huge pages").
    """
    before = anon_huge_page_bytes()
    probe = torch.empty(8 * _HUGE_PAGE, dtype=torch.uint8)
    probe.fill_(1)
    return anon_huge_page_bytes() > before


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under a tensor's storage (call before its memory is first written)."""
    storage = tensor.untyped_storage()
    start = storage.data_ptr()
    return _madvise(start, start + storage.nbytes(), _MADV_HUGEPAGE, align=_HUGE_PAGE)


def collapse_huge_pages(tensor: torch.Tensor) -> bool:
    """Move an already written tensor (dense or oneDNN-packed) onto huge pages (``MADV_COLLAPSE``, Linux 6.1+).

    Costs time in proportion to the tensor's size, once at load (figures: docs/cpu-accelerations.md,
    "Huge pages"). Returns False when the kernel refuses or the tensor is too small.
    """
    if tensor.is_mkldnn:
        start, nbytes = torch.ops.mkldnn.data_ptr(tensor), torch.ops.mkldnn._nbytes(tensor)
    else:
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
    if nbytes < 2 * _HUGE_PAGE:
        return False
    _madvise(start, start + nbytes, _MADV_HUGEPAGE, align=_HUGE_PAGE)
    return _madvise(start, start + nbytes, _MADV_COLLAPSE, align=_HUGE_PAGE)


@dataclass(frozen=True)
class _Region:
    start: int
    end: int
    path: str


def file_mappings() -> list[_Region]:
    """This process's file-backed memory mappings (shared libraries excluded), sorted by address."""
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 6:
                    continue
                path = parts[5].strip()
                if not path.startswith("/") or ".so" in os.path.basename(path):
                    continue
                low, high = (int(x, 16) for x in parts[0].split("-"))
                regions.append(_Region(low, high, path))
    except OSError:
        return []
    return sorted(regions, key=lambda r: r.start)


def _mapped_file(ptr: int, regions: list[_Region], starts: list[int]) -> str | None:
    index = bisect.bisect_right(starts, ptr) - 1
    if index >= 0 and regions[index].start <= ptr < regions[index].end:
        return regions[index].path
    return None


def is_plain(tensor: torch.Tensor) -> bool:
    """False for a tensor subclass that wraps others (torchao's quantized weights): it has no storage of
    its own to copy or pack."""
    return not hasattr(tensor, "__tensor_flatten__")


def _named_tensors(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(module, attribute, tensor, is_parameter) for every parameter and buffer, each tensor once."""
    seen: set[int] = set()
    for module in model.modules():
        for kind, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in table.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield module, name, tensor, kind


def mapped_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights that live in memory-mapped files (safetensors) rather than in RAM."""
    regions = file_mappings()
    starts = [r.start for r in regions]
    total = 0
    for _, _, tensor, _ in _named_tensors(model):
        if (tensor.device.type == "cpu" and not tensor.is_mkldnn and is_plain(tensor)
                and _mapped_file(tensor.data_ptr(), regions, starts)):
            total += tensor.numel() * tensor.element_size()
    return total


def make_resident(model: nn.Module, *, huge_pages: bool = True) -> int:
    """Copy memory-mapped weights into anonymous RAM, one tensor at a time; return the bytes copied.

    ``from_pretrained`` leaves the weights in the memory-mapped safetensors file. Each such tensor is
    copied into a fresh allocation (advised to use huge pages), the parameter keeps its identity (so
    tied weights stay tied), and the source pages are dropped from this process at once
    (``MADV_DONTNEED``: the kernel keeps them in its page cache, where they can be reclaimed), so the
    resident size never holds two copies: the peak is the model plus one tensor.

    Resident weights decode faster than memory-mapped ones, which sit on 4 KiB page-cache pages (figures:
    docs/cpu-accelerations.md, "Resident weights"). With :func:`pack_linears` the packed language-model
    weights are copies anyway; this function then matters for the vision encoder, the embeddings and
    the norms.
    """
    regions = file_mappings()
    if not regions:
        return 0
    starts = [r.start for r in regions]
    large_allocations_mapped()
    copied = 0
    with torch.no_grad():
        for module, name, tensor, is_param in list(_named_tensors(model)):
            if tensor.device.type != "cpu" or tensor.is_mkldnn or not is_plain(tensor) or tensor.numel() == 0:
                continue
            if _mapped_file(tensor.data_ptr(), regions, starts) is None:
                continue
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype)
            if huge_pages and fresh.numel() * fresh.element_size() >= _HUGE_PAGE:
                advise_huge_pages(fresh)
            fresh.copy_(tensor)
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
            if is_param:
                tensor.data = fresh
            else:
                module._buffers[name] = fresh
            _madvise(start, end, _MADV_DONTNEED)  # unmap the file pages this tensor was reading
            copied += fresh.numel() * fresh.element_size()
    _mark(model, "resident")
    return copied


# --------------------------------------------------------------------------------------------------
# Kernels: packed bfloat16 linear layers


def packing_supported(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN can pack and run linear weights of ``dtype`` on this CPU (bfloat16 needs AVX-512 bf16/AMX)."""
    if dtype is not torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        weight = torch.ones(8, 8, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool(out.float().sum().item() == 64.0)
    except (RuntimeError, AttributeError):
        return False


class PackedLinear(nn.Module):
    """``nn.Linear`` in bfloat16 with its weight packed once into oneDNN's blocked layout.

    Same results as the dense layer (exactly, checked in tests), computed by
    ``torch.ops.mkldnn._linear_pointwise``. ``weight`` is the packed (opaque) tensor: its shape and dtype
    are right, so code that reads ``layer.weight.dtype`` (T5) keeps working, but it cannot be used in
    arithmetic. Inputs in another dtype are cast to bfloat16 and the output cast back.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        if weight.dtype is not torch.bfloat16:
            raise ValueError("PackedLinear packs bfloat16 weights only.")
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        collapse_huge_pages(packed)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN is handed a 2-D matrix: with the (batch, tokens, features) input of a transformer it
        # ran much slower (figures: docs/cpu-accelerations.md, "Packed kernels").
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.dtype is not torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        out = out.reshape(*shape[:-1], self.out_features)
        return out if x.dtype is torch.bfloat16 else out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _linear_slots(module: nn.Module) -> list[tuple[str, str]]:
    """(parent module name, attribute) of every ``nn.Linear`` under ``module``.

    Names, not module objects: holding the layers in a list would keep every replaced dense weight
    alive until the end, beside its replacement, instead of one layer at a time (figures:
    docs/cpu-accelerations.md, "Holding layers by name while replacing them").
    """
    return [(name, attr) for name, parent in module.named_modules()
            for attr, child in parent.named_children() if type(child) is nn.Linear]


def tied_parameters(module: nn.Module) -> set[int]:
    """ids of parameters registered in more than one place (OPT's lm_head and input embeddings)."""
    counts: dict[int, int] = {}
    for _, param in module.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def pack_linears(module: nn.Module, *, batch_hint: int = 1, skip: Callable[[str], bool] | None = None,
                 skip_tied: bool = False) -> int:
    """Replace every bfloat16 CPU ``nn.Linear`` under ``module`` by a :class:`PackedLinear`; return how many.

    One layer at a time, so the peak is the model plus one layer: the dense weight is released as its
    packed copy takes its place, unless something else holds it: a tied ``lm_head`` keeps the embedding
    matrix, which the embedding lookup needs, so packing it costs a second copy (0.26 GB for OPT-2.7b);
    ``skip_tied`` leaves such layers dense.

    Packed products can stream the weights much faster than dense ones on one host and slower
    on another, hence :data:`KERNEL_RULE` (figures: docs/cpu-accelerations.md, "Packed kernels"; a
    decode step of the whole model: blip_app.devtools.speed / docs/bench-opt-2.7b.md).
    """
    if not packing_supported():
        return 0
    large_allocations_mapped()
    tied = tied_parameters(module) if skip_tied else set()
    replaced = 0
    for parent_name, attr in _linear_slots(module):
        parent = module.get_submodule(parent_name)
        layer = getattr(parent, attr)
        full = f"{parent_name}.{attr}" if parent_name else attr
        if layer.weight.device.type != "cpu" or layer.weight.dtype is not torch.bfloat16 or not is_plain(layer.weight):
            continue
        if (skip is not None and skip(full)) or id(layer.weight) in tied:
            continue
        setattr(parent, attr, PackedLinear(layer, batch_hint))
        del layer  # the dense weight goes now (unless tied), not at the end: the peak stays one layer
        replaced += 1
    if replaced:
        _mark(module, "packed")
    release_free_memory()
    return replaced


# --------------------------------------------------------------------------------------------------
# Attention, int8, compile


def set_attention(model: nn.Module, implementation: str) -> str:
    """Switch the attention implementation (``sdpa`` or ``eager``) of a transformers model; return it.

    For decode speed the two are within noise of each other at these lengths, so exactness decides:
    :func:`apply_cpu_defaults` picks eager where it is exact (a decoder-only language model with a reused
    key/value cache) and leaves the vision encoder's choice as an option, since each was the faster one
    on some host (figures: docs/cpu-accelerations.md, "Attention implementation").
    """
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        for sub in model.modules():
            config = getattr(sub, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = implementation
    return implementation


def quantize_int8(language_model: nn.Module) -> int:
    """Opt-in int8: dynamic quantisation (int8 weights, activations quantised per call) of the Linear layers.

    ``torch.ao.quantization.quantize_dynamic`` (fbgemm kernels, one scale per output channel: as fast as
    one per tensor here, and closer on real weights whose rows differ in range), one layer at a time so that only one
    layer is ever held in float32 beside the rest. fbgemm takes float32 activations, so the language
    model's other tensors (embeddings, norms) become float32; the vision encoder and the Q-Former keep
    their dtype. A tied ``lm_head`` gets its own int8 copy. Returns the number of quantised layers.

    It decodes faster than bfloat16 (fewer bytes per weight; figures: docs/cpu-accelerations.md,
    "int8-cpu (dynamic int8)", docs/bench-opt-2.7b.md).
    Quality cannot be judged on random weights: keep it opt-in until checked on a real checkpoint.
    ``torch.ao.quantization`` is deprecated in favour of torchao, and torch warns that quantised tensors
    will go in a future release; in torch 2.14 it still ships, needs no extra dependency and beat
    torchao's int8 path here (STACK.md), so it is used quietly. When torch drops it, this mode must move.
    """
    import warnings

    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice (it points to torchao)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    large_allocations_mapped()
    count = 0
    for parent_name, attr in _linear_slots(language_model):
        parent = language_model.get_submodule(parent_name)
        holder = nn.Module()
        holder.add_module("layer", getattr(parent, attr).float())
        with warnings.catch_warnings():  # deprecation notices of torch.ao and of quantised tensors
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            quantize_dynamic(holder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        setattr(parent, attr, holder.layer)
        del holder
        count += 1
        if count % 8 == 0:
            gc.collect()  # quantize_dynamic leaves reference cycles holding each float32 layer: they pile up
    gc.collect()
    language_model.float()
    release_free_memory()
    _mark(language_model, "int8")
    return count


def compile_note() -> str:
    """Why ``torch.compile`` with a static cache is not applied on CPU (STACK.md, measured there).

    Static cache + ``torch.compile`` without freezing gains nothing over eager with a dynamic cache.
    With inductor ``freezing=True`` it decodes faster, but compiling takes minutes, holds a second copy
    of the weights meanwhile, and starts again on any change of shape or thread count — and freezing's
    gain is the weight packing that :func:`pack_linears` gets without compiling (figures:
    docs/cpu-accelerations.md, "torch.compile and a static cache on CPU").
    """
    return compile_note.__doc__.splitlines()[0]


# --------------------------------------------------------------------------------------------------
# Applying them


def mark(model: nn.Module, what: str) -> None:
    """Record that ``what`` was applied to ``model`` (see :func:`applied`)."""
    _mark(model, what)


def _mark(model: nn.Module, what: str) -> None:
    applied = list(getattr(model, _APPLIED, ()))
    if what not in applied:
        applied.append(what)
    object.__setattr__(model, _APPLIED, tuple(applied))


def applied(model: nn.Module) -> tuple[str, ...]:
    """The accelerations applied to ``model`` (and its language model), in order."""
    names = list(getattr(model, _APPLIED, ()))
    language_model = getattr(model, "language_model", None)
    if language_model is not None:
        names += [n for n in getattr(language_model, _APPLIED, ()) if n not in names]
    return tuple(names)


def measure_kernel_choice(module: nn.Module, *, sample_bytes: float = 0.35e9, rounds: int = 7,
                         rows: int = 1) -> dict[str, Any]:
    """Whether packed kernels run ``module``'s products faster than the dense ones here, measured on it.

    ``rows`` input rows (1: a decode step of a language model; 257: a vision-encoder image) through a
    sample of the module's own bfloat16 linear layers (its first ones, about ``sample_bytes``: more than
    the caches hold; not the output head), dense and packed, interleaved ``rounds`` times; the medians
    decide, packed only when at least 10% faster. The packed copies are freed afterwards. Neither kernel
    wins on every host of the same kind, nor from one run to the next, which is why the engine now
    follows :data:`KERNEL_RULE` and this is for ``blip_app.devtools.speed`` (figures:
    docs/cpu-accelerations.md, "The kernel rule"). Returns the timings and the decision (``packed``).
    """
    sample: list[nn.Linear] = []
    total = 0
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    for parent_name, attr in _linear_slots(module):
        layer = getattr(module.get_submodule(parent_name), attr)
        if (layer is head or layer.weight.device.type != "cpu" or layer.weight.dtype is not torch.bfloat16
                or not is_plain(layer.weight)):
            continue  # the output head (found first, 50272 rows for OPT) is not a typical layer: the blocks are
        sample.append(layer)
        total += layer.weight.numel() * layer.weight.element_size()
        if total >= sample_bytes:
            break
    if not sample or not packing_supported():
        return {"packed": False, "reason": "nothing to pack here"}
    packed = [PackedLinear(layer) for layer in sample]
    generator = torch.Generator().manual_seed(0)
    widths = {layer.in_features for layer in sample}
    inputs = {n: torch.randn(rows, n, generator=generator).to(torch.bfloat16) for n in widths}
    times: dict[str, list[float]] = {"dense": [], "packed": []}
    with torch.inference_mode():
        for layers in (sample, packed):  # first touch, oneDNN primitive creation
            for layer in layers:
                layer(inputs[layer.in_features])
        for _ in range(rounds):
            for name, layers in (("dense", sample), ("packed", packed)):
                started = time.perf_counter()
                for layer in layers:
                    layer(inputs[layer.in_features])
                times[name].append(time.perf_counter() - started)
    del packed
    release_free_memory()
    dense_s, packed_s = median(times["dense"]), median(times["packed"])
    return {"packed": packed_s < 0.9 * dense_s, "dense_s": dense_s, "packed_s": packed_s,
            "sample_gb": total / 1e9, "layers": len(sample), "rounds": rounds, "rows": rows}


def kernel_choice(model: nn.Module, part: str = "language") -> dict[str, Any] | None:
    """What :func:`measure_kernel_choice` measured for ``part`` ("language" or "vision") when
    :func:`apply_cpu_defaults` ran (None if it did not)."""
    return getattr(model, "_blip_app_kernel_choices", {}).get(part)


def _record_choice(model: nn.Module, part: str, measured: dict[str, Any]) -> None:
    choices = dict(getattr(model, "_blip_app_kernel_choices", {}))
    choices[part] = measured
    object.__setattr__(model, "_blip_app_kernel_choices", choices)


KERNEL_RULE = ("dense bfloat16 kernels (the ones from_pretrained's model uses), packed only when asked: "
               "timing both at load chose differently from one load to the next on this kind of host")


def apply_cpu_defaults(model: nn.Module, *, pack: bool = True, pack_tied: bool = True, int8: bool = False,
                       pack_language: bool | None = False, pack_vision: bool | None = False,
                       vision_attention: str | None = None,
                       language_attention: str | None = "eager") -> tuple[str, ...]:
    """What blip_app does to a BLIP-2 / InstructBLIP model on a CPU after loading; idempotent.

    1. :func:`make_resident` for every weight still memory-mapped (huge pages), since resident weights
       decode faster (figures: docs/cpu-accelerations.md, "Resident weights"). Weights that a
       quantization already replaced are not read from the file at all;
    2. kernels by a rule (:data:`KERNEL_RULE`), not by timing: the dense bfloat16 kernels, the same as
       the usual loop's, so a bfloat16 decode is never slower than the baseline's and every load makes
       the same choice. Timing dense against packed (oneDNN's blocked layout, :func:`pack_linears`) on the
       model's own layers at start-up flipped between hosts of one kind and between loads on one machine,
       for the language model and the vision encoder's 257-row products alike, and a wrong pick made
       decode slower than the baseline's (figures: docs/cpu-accelerations.md, "The kernel rule").
       ``pack_language`` / ``pack_vision`` True pack anyway (a tied ``lm_head`` too unless ``pack_tied``
       is False: a second copy of the embedding matrix, 0.26 GB for OPT-2.7b); None measures as before
       (:func:`measure_kernel_choice`, for ``blip_app.devtools.speed``). Where decode speed matters,
       weight-only int4 (:mod:`blip_app.models.quantize`) reads a quarter of the bytes instead;
    3. with ``int8``: :func:`quantize_int8` on the language model (``int8-cpu``, opt-in);
    4. ``vision_attention``: left to transformers (sdpa) by default (eager was the faster one on
       another host, hence the option);
    5. eager attention in a decoder-only language model (OPT, Vicuna), for exactness: in bfloat16, sdpa
       computes a follow-up turn's new tokens over a reused key/value cache differently (not bit for
       bit) from the whole prompt at once, so prefix reuse changed a greedy answer for 2 (OPT) and 5
       (Vicuna) of 20 tiny-model conversations; with eager attention, 0 of 20 for both (float32: 0 with
       either). Decode speed is the same within noise (figures: docs/cpu-accelerations.md, "Attention
       implementation"). Flan-T5 keeps its default.

    Nothing is applied on a GPU or to a bitsandbytes-quantised model. Returns :func:`applied`.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return applied(model)
    if device.type != "cpu" or getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return applied(model)
    done = applied(model)
    language_model = getattr(model, "language_model", model)
    if int8 and "int8" not in done:
        quantize_int8(language_model)
    if "resident" not in applied(model):
        make_resident(model)
    vision = getattr(model, "vision_model", None)
    if pack and packing_supported():
        if language_model is not model and not {"packed", "dense-vision"} & set(applied(model)):
            choice = pack_vision
            if choice is None and vision is not None:  # the vision encoder's 257-row products, both ways
                measured = measure_kernel_choice(vision, sample_bytes=0.1e9, rows=257)
                _record_choice(model, "vision", measured)
                choice = measured["packed"]
            elif vision is not None:
                _record_choice(model, "vision", {"packed": bool(choice), "rule": KERNEL_RULE})
            if choice is None or choice:
                pack_linears(model, skip=lambda name: name.startswith("language_model."))  # marks "packed"
            else:
                _mark(model, "dense-vision")
        if not {"packed-lm", "dense-lm", "int8"} & set(applied(model)):
            choice = pack_language
            if choice is None:
                measured = measure_kernel_choice(language_model)
                _record_choice(model, "language", measured)
                choice = measured["packed"]
            else:
                _record_choice(model, "language", {"packed": bool(choice), "rule": KERNEL_RULE})
            if choice and pack_linears(language_model, skip_tied=not pack_tied):
                _mark(model, "packed-lm")
            else:
                _mark(model, "dense-lm")
    if vision_attention and vision is not None and f"vision-{vision_attention}" not in applied(model):
        with contextlib.suppress(Exception):
            set_attention(vision, vision_attention)
            _mark(model, f"vision-{vision_attention}")
    decoder_only = not getattr(getattr(language_model, "config", None), "is_encoder_decoder", True)
    if language_attention and decoder_only and f"lm-{language_attention}" not in applied(model):
        with contextlib.suppress(Exception):
            set_attention(language_model, language_attention)
            _mark(model, f"lm-{language_attention}")
    return applied(model)


# --------------------------------------------------------------------------------------------------
# Measuring (what the engine times at load; the measuring tools are blip_app.devtools.speed)


def median(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
