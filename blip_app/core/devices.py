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
WEIGHT_ONLY = ("int8-weight-only", "int4-weight-only")
QUANTIZATIONS = ("none", *WEIGHT_ONLY, "8bit", "4bit", "int8-cpu")
# int8-weight-only / int4-weight-only: torchao, the language model's linear layers, activations kept in
# bfloat16 (CPU and GPU; blip_app.models.quantize). int4-weight-only is the recommended mode on a CPU.
# 8bit and 4bit: bitsandbytes (GPU memory; on a CPU they save memory but decode far slower than bfloat16;
# figures: docs/cpu-accelerations.md).
# int8-cpu: torch's dynamic int8 (activations quantised per tensor too; CPU only, opt-in), refused from
# INT8_ACTIVATION_LIMIT_B billion language-model parameters.
INT8_ACTIVATION_LIMIT_B = 6.0
# LLM.int8() (Dettmers et al. 2022, arXiv:2208.07339, figure 1 and section 3): from OPT-6.7B on,
# outlier features of large magnitude appear in every layer, and quantising activations to 8 bits
# (vector-wise, let alone per tensor) collapses zero-shot accuracy and perplexity.


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model: device, precision and quantisation as the operator asked for them."""

    device: str = "auto"  # auto, cpu, cuda or cuda:N
    precision: str = "auto"  # auto, float32, float16, bfloat16
    quantization: str = "none"  # none, int8/int4-weight-only (torchao), 8bit, 4bit (bitsandbytes), int8-cpu
    cpu_speedups: bool = True  # on a CPU: weights resident in RAM, packed bfloat16 kernels (blip_app.models.speed)
    revision: str | None = None
    local_files_only: bool = False
    cache_dir: str | None = None
    quantized_cache_dir: str | None = None  # weight-only results (None: blip_app.models.quantize's default)
    static_cache: bool = False  # GPU fast path: static key/value cache + compiled decode step (engine)


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
        """How the weights are held, for the UI: the quantization's name or the dtype name."""
        return self.quantization if self.quantization != "none" else self.dtype


def language_model_billions(text_config: dict[str, Any]) -> float | None:
    """Parameters of a language model in billions, estimated from its config (None if it lacks the sizes).

    Decoder-only: layers x (4 h^2 attention + 2 or 3 h x mlp) + vocab x h. Flan-T5: encoder layers x
    (4 h x inner + 3 h x d_ff) + decoder layers x (8 h x inner + 3 h x d_ff) + 2 vocab x h.
    OPT-6.7b: 6.6, Vicuna-7b: 6.7, Flan-T5-XXL: 11.3, OPT-2.7b: 2.6.
    """
    vocab = text_config.get("vocab_size") or 0
    if "d_model" in text_config:
        h, d_ff = text_config.get("d_model"), text_config.get("d_ff")
        inner = (text_config.get("num_heads") or 0) * (text_config.get("d_kv") or 0)
        enc = text_config.get("num_layers")
        dec = text_config.get("num_decoder_layers") or enc
        if not (h and d_ff and enc):
            return None
        return (enc * (4 * h * inner + 3 * h * d_ff) + dec * (8 * h * inner + 3 * h * d_ff) + 2 * vocab * h) / 1e9
    h = text_config.get("hidden_size")
    layers = text_config.get("num_hidden_layers")
    mlp = text_config.get("ffn_dim") or text_config.get("intermediate_size")
    if not (h and layers and mlp):
        return None
    gated = 3 if text_config.get("model_type") == "llama" else 2
    return (layers * (4 * h * h + gated * h * mlp) + vocab * h) / 1e9


def plan_load(language_model: LanguageModel, options: LoadOptions, hardware: Hardware, *,
              language_billions: float | None = None) -> LoadPlan:
    """Decide device, dtype and quantisation for a language model on this hardware.

    GPU: float16 for OPT and Vicuna, bfloat16 for Flan-T5 (float16 makes Flan-T5 output garbage; without
    bfloat16 support it runs in float32). CPU: bfloat16 where the processor has bfloat16 instructions,
    else float32. 8-bit and 4-bit go through bitsandbytes with an accelerate device map; int8-cpu (torch's
    dynamic int8, applied after loading by :mod:`blip_app.models.speed`) only on a CPU, and refused for a
    language model of ``language_billions`` >= INT8_ACTIVATION_LIMIT_B. The weight-only modes (torchao,
    applied after loading) run on either; int4 on a GPU needs bfloat16 activations and compute
    capability 8.0 (its kernel, tinygemm), so it is refused where the GPU has no bfloat16.
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
    if quantization in WEIGHT_ONLY:
        if on_gpu and quantization == "int4-weight-only":
            if not hardware.cuda_bf16:
                raise ModelLoadError(
                    "--quantization int4-weight-only needs a GPU with bfloat16 (compute capability 8.0 or newer) "
                    "for its kernel; use int8-weight-only or 4bit (bitsandbytes) on this GPU.")
            if dtype != "bfloat16":
                notes.append(f"int4-weight-only computes in bfloat16, so the model runs in bfloat16, not {dtype}.")
                dtype = "bfloat16"
        device_map = {"": device}
        notes.append(f"{quantization}: the language model's weights are quantised (torchao) for a faster decode; "
                     "answers may differ slightly from bfloat16 (README: Quantization).")
    elif quantization == "int8-cpu":
        if on_gpu:
            raise ModelLoadError(
                "--quantization int8-cpu is for CPUs; on a GPU use int8-weight-only, int4-weight-only, "
                "or 8bit / 4bit (bitsandbytes)."
            )
        if language_billions is not None and language_billions >= INT8_ACTIVATION_LIMIT_B:
            raise ModelLoadError(
                f"--quantization int8-cpu quantises activations to 8 bits, which is known to break language models "
                f"from about 6.7B parameters (LLM.int8(): outlier features); this one has about "
                f"{language_billions:.1f}B. Use --quantization int8-weight-only or int4-weight-only instead.")
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
