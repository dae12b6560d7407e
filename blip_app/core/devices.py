"""Load decisions: which device, dtype and quantisation a model gets on this machine.

Pure functions over plain data, so the decisions are tested on a CPU even for GPU paths that cannot
run here; the hardware itself is read by blip_app.models.hardware (torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blip_app.core.catalog import LanguageModel
from blip_app.errors import ModelLoadError

PRECISIONS = ("auto", "float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "8bit", "4bit", "int8-cpu")
# 8bit and 4bit: bitsandbytes (GPU; on a CPU they save memory but decode about 20 times slower).
# int8-cpu: torch's dynamic int8 kernels on the language model's linear layers (CPU only, opt-in): the
# fastest decode measured on a CPU, but its quality has not been checked on every real checkpoint.


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: device, precision and quantisation as the operator asked for them."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    precision: str = "auto"  # auto, float32, float16, bfloat16
    quantization: str = "none"  # none, 8bit, 4bit (bitsandbytes), int8-cpu (torch, CPU only)
    cpu_speedups: bool = True  # on a CPU: weights resident in RAM, packed bfloat16 kernels (blip_app.models.speed)
    revision: str | None = None
    local_files_only: bool = False
    cache_dir: str | None = None


@dataclass(frozen=True)
class Hardware:
    """What this machine can do, read once."""

    cuda: bool
    cuda_bf16: bool
    cpu_bf16: bool
    cuda_name: str = ""


@dataclass(frozen=True)
class LoadPlan:
    """What will actually be done: device, dtype, quantisation, device map, and why (notes)."""

    device: str  # "cpu" or "cuda[:N]"
    dtype: str  # a key of DTYPES
    quantization: str
    device_map: str | dict[str, Any] | None
    notes: tuple[str, ...] = ()

    @property
    def precision_label(self) -> str:
        """How the weights are held, for the UI: '8bit', '4bit', 'int8-cpu' or the dtype name."""
        return self.quantization if self.quantization != "none" else self.dtype


def plan_load(language_model: LanguageModel, options: LoadOptions, hardware: Hardware) -> LoadPlan:
    """Decide device, dtype and quantisation for a language model on this hardware.

    GPU: float16 for OPT and Vicuna, bfloat16 for Flan-T5 (float16 makes Flan-T5 output garbage; without
    bfloat16 support it runs in float32). CPU: bfloat16 where the processor has bfloat16 instructions,
    else float32. 8-bit and 4-bit go through bitsandbytes with an accelerate device map; int8-cpu (torch's
    dynamic int8, applied after loading by :mod:`blip_app.models.speed`) only on a CPU.
    """
    notes: list[str] = []
    if options.precision not in PRECISIONS:
        raise ModelLoadError(f"Unknown precision {options.precision!r}; use one of: {', '.join(PRECISIONS)}.")
    if options.quantization not in QUANTIZATIONS:
        raise ModelLoadError(
            f"Unknown quantization {options.quantization!r}; use one of: {', '.join(QUANTIZATIONS)}."
        )
    device = options.device.strip().lower() if options.device else "auto"
    if device == "auto":
        device = "cuda" if hardware.cuda else "cpu"
    if device.startswith("cuda") and not hardware.cuda:
        raise ModelLoadError(
            f"Device {options.device!r} was asked for, but this machine has no usable CUDA GPU. "
            "Use --device cpu (or auto)."
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"Unknown device {options.device!r}; use auto, cpu, cuda or cuda:N.")
    on_gpu = device != "cpu"

    if on_gpu:
        auto = language_model.gpu_dtype
        if auto == "bfloat16" and not hardware.cuda_bf16:
            auto = "float32"
            notes.append("This GPU has no bfloat16 support and Flan-T5 breaks in float16, so it runs in float32.")
    else:
        auto = "bfloat16" if hardware.cpu_bf16 else "float32"
    dtype = auto if options.precision == "auto" else options.precision

    if dtype == "float16" and language_model is LanguageModel.FLAN_T5:
        dtype = "bfloat16" if (hardware.cuda_bf16 if on_gpu else hardware.cpu_bf16) else "float32"
        notes.append(f"Flan-T5 produces garbage in float16, so it runs in {dtype} instead.")
    if dtype == "float16" and not on_gpu:
        dtype = auto
        notes.append(f"float16 is slow and inexact on a CPU, so it runs in {dtype} instead.")
    if dtype == "bfloat16" and not on_gpu and not hardware.cpu_bf16:
        notes.append("This CPU has no bfloat16 instructions: bfloat16 will be emulated and slow.")

    quantization = options.quantization
    device_map: str | dict[str, Any] | None
    if quantization == "int8-cpu":
        if on_gpu:
            raise ModelLoadError(
                "--quantization int8-cpu is for CPUs; on a GPU use --quantization 8bit or 4bit (bitsandbytes)."
            )
        device_map = {"": "cpu"}
        notes.append("int8-cpu: the language model's weights are quantised to int8 for a faster decode on this CPU; "
                     "answers may differ slightly from bfloat16.")
    elif quantization != "none":
        if on_gpu:
            device_map = "auto" if device == "cuda" else {"": device}
        else:
            device_map = {"": "cpu"}
            notes.append(
                f"{quantization} weights on a CPU save memory but generate much more slowly than {dtype} "
                "(bitsandbytes has no fast CPU kernels)."
            )
    else:
        device_map = {"": device}
    return LoadPlan(device=device, dtype=dtype, quantization=quantization, device_map=device_map, notes=tuple(notes))
