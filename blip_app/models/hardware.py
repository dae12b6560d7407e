"""What this machine can do, read with torch once per load: CUDA, bfloat16 on the GPU and on the CPU; and
what running out of memory looks like, and how memory is given back."""

from __future__ import annotations

from pathlib import Path

import torch

from blip_app.core.devices import Hardware

# What out of memory raises: on a GPU torch's error, on a CPU Python's (an allocation refused).
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)


def free_accelerator_memory() -> None:
    """Hand the GPU memory torch caches but no longer uses back to the driver (nothing on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def detect_hardware() -> Hardware:
    """Read the CUDA and CPU capabilities that decide precision."""
    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_bf16=_cpu_supports_bf16(),
        cuda_name=torch.cuda.get_device_name(0) if cuda else "",
    )
