"""Which device, dtype and quantisation a model gets: the GPU decisions are tested here on a CPU."""

from __future__ import annotations

import pytest

from blip_app.core.catalog import LanguageModel
from blip_app.core.devices import Hardware, LoadOptions, plan_load
from blip_app.errors import ModelLoadError

OPT, T5, VICUNA = LanguageModel.OPT, LanguageModel.FLAN_T5, LanguageModel.VICUNA
GPU_BF16 = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=True)
GPU_OLD = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=False)  # e.g. a T4: no bfloat16
CPU_BF16 = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True)
CPU_OLD = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False)


@pytest.mark.parametrize(
    ("lm", "hardware", "options", "device", "dtype", "quantization"),
    [
        (OPT, GPU_BF16, LoadOptions(), "cuda", "float16", "none"),
        (VICUNA, GPU_BF16, LoadOptions(), "cuda", "float16", "none"),
        (T5, GPU_BF16, LoadOptions(), "cuda", "bfloat16", "none"),
        (T5, GPU_OLD, LoadOptions(), "cuda", "float32", "none"),
        (T5, GPU_BF16, LoadOptions(precision="float16"), "cuda", "bfloat16", "none"),
        (T5, GPU_OLD, LoadOptions(precision="float16"), "cuda", "float32", "none"),
        (OPT, GPU_BF16, LoadOptions(precision="bfloat16"), "cuda", "bfloat16", "none"),
        (OPT, CPU_BF16, LoadOptions(), "cpu", "bfloat16", "none"),
        (T5, CPU_BF16, LoadOptions(), "cpu", "bfloat16", "none"),
        (OPT, CPU_OLD, LoadOptions(), "cpu", "float32", "none"),
        (OPT, CPU_BF16, LoadOptions(precision="float16"), "cpu", "bfloat16", "none"),
        (OPT, GPU_BF16, LoadOptions(device="cpu"), "cpu", "bfloat16", "none"),
        (OPT, GPU_BF16, LoadOptions(quantization="8bit"), "cuda", "float16", "8bit"),
        (T5, GPU_BF16, LoadOptions(quantization="4bit"), "cuda", "bfloat16", "4bit"),
        (OPT, CPU_BF16, LoadOptions(quantization="8bit"), "cpu", "bfloat16", "8bit"),
        (OPT, CPU_BF16, LoadOptions(quantization="int8-cpu"), "cpu", "bfloat16", "int8-cpu"),
        (T5, CPU_OLD, LoadOptions(quantization="int8-cpu"), "cpu", "float32", "int8-cpu"),
        (VICUNA, GPU_BF16, LoadOptions(device="cpu", quantization="int8-cpu"), "cpu", "bfloat16", "int8-cpu"),
    ],
)
def test_precision_policy(lm, hardware, options, device, dtype, quantization):
    plan = plan_load(lm, options, hardware)
    assert (plan.device, plan.dtype, plan.quantization) == (device, dtype, quantization)


def test_the_reason_for_every_override_is_given():
    assert "garbage in float16" in plan_load(T5, LoadOptions(precision="float16"), GPU_BF16).notes[0]
    assert "no bfloat16 support" in plan_load(T5, LoadOptions(), GPU_OLD).notes[0]
    assert "slow and inexact on a CPU" in plan_load(OPT, LoadOptions(precision="float16"), CPU_BF16).notes[0]
    assert "save memory but generate much more slowly" in plan_load(OPT, LoadOptions(quantization="8bit"), CPU_BF16).notes[0]
    assert plan_load(OPT, LoadOptions(), GPU_BF16).notes == ()


def test_device_maps():
    assert plan_load(OPT, LoadOptions(quantization="4bit"), GPU_BF16).device_map == "auto"
    assert plan_load(OPT, LoadOptions(device="cuda:1", quantization="4bit"), GPU_BF16).device_map == {"": "cuda:1"}
    assert plan_load(OPT, LoadOptions(), CPU_BF16).device_map == {"": "cpu"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (LoadOptions(device="cuda"), "no usable CUDA GPU"),
        (LoadOptions(device="tpu"), "Unknown device 'tpu'"),
        (LoadOptions(precision="int3"), "Unknown precision 'int3'"),
        (LoadOptions(quantization="2bit"), "Unknown quantization '2bit'"),
    ],
)
def test_impossible_requests_are_refused_by_name(options, message):
    with pytest.raises(ModelLoadError, match=message):
        plan_load(OPT, options, CPU_BF16)


def test_bitsandbytes_configs_follow_the_docs():
    from blip_app.models.engine import quantization_config

    config8 = quantization_config(plan_load(OPT, LoadOptions(quantization="8bit"), GPU_BF16))
    assert config8.load_in_8bit and not config8.load_in_4bit
    config4 = quantization_config(plan_load(T5, LoadOptions(quantization="4bit"), GPU_BF16))
    assert config4.load_in_4bit and config4.bnb_4bit_quant_type == "nf4"
    assert str(config4.bnb_4bit_compute_dtype) == "torch.bfloat16"
    assert quantization_config(plan_load(OPT, LoadOptions(), GPU_BF16)) is None


def test_int8_cpu_is_refused_on_a_gpu_with_the_alternative_named():
    with pytest.raises(ModelLoadError, match="int8-weight-only, int4-weight-only, or 8bit / 4bit"):
        plan_load(OPT, LoadOptions(quantization="int8-cpu"), GPU_BF16)
    plan = plan_load(OPT, LoadOptions(quantization="int8-cpu"), CPU_BF16)
    assert plan.device_map == {"": "cpu"} and plan.precision_label == "int8-cpu"
    assert any("int8" in note for note in plan.notes)


def test_cpu_speedups_can_be_turned_off_from_the_command_line_and_the_environment(monkeypatch):
    from blip_app.config import parse_config

    assert parse_config([]).load.cpu_speedups is True
    assert parse_config(["--no-cpu-speedups"]).load.cpu_speedups is False
    monkeypatch.setenv("BLIP_APP_CPU_SPEEDUPS", "0")
    assert parse_config([]).load.cpu_speedups is False
    assert parse_config(["--quantization", "int8-cpu"]).load.quantization == "int8-cpu"
