"""What this machine can do, read with torch once per load: CUDA, bfloat16 on the GPU and on the CPU."""

from __future__ import annotations

from pathlib import Path

from blip_app.core.devices import Hardware


def _cpu_supports_bf16() -> bool:
    import torch

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
    import torch

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_bf16=_cpu_supports_bf16(),
        cuda_name=torch.cuda.get_device_name(0) if cuda else "",
    )
