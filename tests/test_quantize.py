"""Weight-only int8/int4 (torchao) on the tiny checkpoints: layer errors, tokens, the disk cache, refusals."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from blip_app.core.catalog import CATALOG, resolve
from blip_app.core.devices import (
    INT8_ACTIVATION_LIMIT_B,
    Hardware,
    LoadOptions,
    language_model_billions,
    plan_load,
)
from blip_app.core.prompts import Turn
from blip_app.core.settings import GenerationSettings, Task
from blip_app.devtools.tiny import FAMILIES
from blip_app.errors import ModelLoadError
from blip_app.models import quantize, speed
from blip_app.models.engine import LoadedModel

METHODS = quantize.METHODS
CAPTION = GenerationSettings(max_new_tokens=6, min_new_tokens=6, num_beams=1)
# Output error of one layer against float32 (4 random input rows): bfloat16 itself is about 0.3%;
# per-row int8 about 0.6%; int4 in groups of 32 about 8% (measured on these layers and at the real size).
ERROR_BOUND = {quantize.INT8: 0.02, quantize.INT4: 0.15}


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


def load(path, method: str, cache, **options) -> LoadedModel:
    return LoadedModel.load(resolve(str(path)), LoadOptions(quantization=method, quantized_cache_dir=str(cache),
                                                            **options))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_layers_are_quantized_and_close(tiny_checkpoints, tmp_path, family, method):
    loaded = load(tiny_checkpoints[family], method, tmp_path)
    report = quantize.report_of(loaded.model)
    assert method in speed.applied(loaded.model) and not report.from_cache
    assert report.layers > 0 and len(report.errors) == report.layers
    assert max(report.errors.values()) < ERROR_BOUND[method], report.error_summary()
    assert min(report.errors.values()) > 0  # something was quantized, not copied
    # Every linear layer of the language model is quantized (or listed as skipped); none of the vision side.
    plain = [name for name, m in loaded.model.language_model.named_modules()
             if type(m) is nn.Linear and speed.is_plain(m.weight)]
    assert sorted(plain) == sorted(report.skipped)
    assert all(speed.is_plain(m.weight) for m in loaded.model.vision_model.modules() if type(m) is nn.Linear)
    reply = loaded.generate(noise(1), loaded.prepare(Task.CAPTION), CAPTION)
    assert reply.new_tokens == 6 and all(0 <= t < loaded.model.get_input_embeddings().num_embeddings
                                         for t in reply.token_ids)
    assert not set(reply.token_ids) & set(loaded.suppressed_ids)


def next_token_logits(loaded: LoadedModel, image: Image.Image) -> torch.Tensor:
    prepared = loaded.prepare(Task.CAPTION)
    features = loaded.image_features(image, prepared.qformer_text)
    ids = torch.tensor([prepared.input_ids])
    with torch.inference_mode():
        embeds = loaded._inputs_embeds(ids, features)
        if loaded.spec.decoder_only:
            out = loaded.model.language_model(inputs_embeds=embeds)
        else:
            out = loaded.model.language_model(inputs_embeds=embeds,
                                              decoder_input_ids=torch.tensor([[loaded._decoder_start_id()]]))
    return out.logits[0, -1].float()


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-flan-t5"])
def test_quantized_logits_follow_bfloat16_in_proportion_to_the_bits(tiny_checkpoints, tmp_path, family):
    """Next-token logits against float32: int8 errs about as much as bfloat16, int4 more, within a bound.

    Measured here: OPT about 1x / 2x, Flan-T5 1.1x / 7x the bfloat16 error (a random T5 amplifies the
    layers' errors through its 2 x 2 layers and relative position biases)."""
    exact = LoadedModel.load(resolve(str(tiny_checkpoints[family])), LoadOptions(precision="float32"))
    plain = LoadedModel.load(resolve(str(tiny_checkpoints[family])))
    int8 = load(tiny_checkpoints[family], quantize.INT8, tmp_path)
    int4 = load(tiny_checkpoints[family], quantize.INT4, tmp_path)
    errors = {"bf16": 0.0, "int8": 0.0, "int4": 0.0}
    for seed in (3, 4, 5):
        truth = next_token_logits(exact, noise(seed))
        for name, model in (("bf16", plain), ("int8", int8), ("int4", int4)):
            errors[name] += float((next_token_logits(model, noise(seed)) - truth).norm() / truth.norm()) / 3
    assert errors["int8"] < 3 * errors["bf16"] + 0.01, errors
    assert errors["int8"] < errors["int4"] < 10 * errors["bf16"] + 0.05, errors


@pytest.mark.parametrize("method", METHODS)
def test_prefix_reuse_stays_exact_when_quantized(tiny_checkpoints, tmp_path, method):
    """A follow-up turn over the reused key/value cache gives the tokens of recomputing the whole prompt:
    the quantized kernels compute a row the same way whatever the number of rows beside it."""
    cached = load(tiny_checkpoints["blip2-opt"], method, tmp_path)
    scratch = load(tiny_checkpoints["blip2-opt"], method, tmp_path)
    scratch.prefix_cache = None
    settings = GenerationSettings(max_new_tokens=8, num_beams=1)
    questions = ["what is it?", "what colour is it?", "is it big?"]
    for seed in (21, 22, 23, 24):
        runs = []
        for loaded in (cached, scratch):
            history: list[Turn] = []
            ids = []
            for question in questions:
                reply = loaded.generate(noise(seed), loaded.prepare(Task.CHAT, question=question, history=history,
                                                                    max_new_tokens=8), settings)
                ids.append(reply.token_ids)
                history.append(Turn(question, reply.text))
            runs.append(ids)
        assert runs[0] == runs[1], seed
    assert cached.prefix_cache is not None and len(cached.prefix_cache) > 0


@pytest.mark.parametrize("method", METHODS)
def test_second_start_comes_from_the_disk_cache_with_the_same_tokens(tiny_checkpoints, tmp_path, method):
    first = load(tiny_checkpoints["blip2-opt"], method, tmp_path)
    assert not quantize.report_of(first.model).from_cache
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    second = load(tiny_checkpoints["blip2-opt"], method, tmp_path)
    report = quantize.report_of(second.model)
    assert report.from_cache and report.errors == quantize.report_of(first.model).errors
    # The cached layers went in before the weights were copied out of the file: nothing memory-mapped is left.
    assert speed.mapped_bytes(second.model) == 0
    for seed in (1, 2):
        image = noise(seed)
        assert (first.generate(image, first.prepare(Task.CAPTION), CAPTION).token_ids
                == second.generate(image, second.prepare(Task.CAPTION), CAPTION).token_ids)
    # Without the speedups too (the quantization asked for is still applied)
    third = load(tiny_checkpoints["blip2-opt"], method, tmp_path, cpu_speedups=False)
    assert quantize.report_of(third.model).from_cache and "resident" not in speed.applied(third.model)


@pytest.mark.parametrize("method", METHODS)
def test_a_fresh_process_reads_the_disk_cache(tiny_checkpoints, tmp_path, method):
    """The second start is another process, which has not imported torchao's tensor classes yet."""
    import subprocess
    import sys

    first = load(tiny_checkpoints["blip2-opt"], method, tmp_path)
    ids = first.generate(noise(1), first.prepare(Task.CAPTION), CAPTION).token_ids
    code = (
        "import sys, numpy as np\n"
        "from PIL import Image\n"
        "from blip_app.core.catalog import resolve\n"
        "from blip_app.core.devices import LoadOptions\n"
        "from blip_app.core.settings import GenerationSettings, Task\n"
        "from blip_app.models import quantize\n"
        "from blip_app.models.engine import LoadedModel\n"
        f"m = LoadedModel.load(resolve({str(tiny_checkpoints['blip2-opt'])!r}), "
        f"LoadOptions(quantization={method!r}, quantized_cache_dir={str(tmp_path)!r}))\n"
        "image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8))\n"
        "s = GenerationSettings(max_new_tokens=6, min_new_tokens=6, num_beams=1)\n"
        "print(quantize.report_of(m.model).from_cache, list(m.generate(image, m.prepare(Task.CAPTION), s).token_ids))\n"
    )
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"True {list(ids)}"


def test_a_broken_or_foreign_cache_is_recomputed(tiny_checkpoints, tmp_path, caplog):
    first = load(tiny_checkpoints["blip2-opt"], quantize.INT4, tmp_path)
    folder = [p for p in tmp_path.iterdir() if not p.name.startswith(".")][0]
    (folder / "layers.pt").write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING):
        again = load(tiny_checkpoints["blip2-opt"], quantize.INT4, tmp_path)
    assert not quantize.report_of(again.model).from_cache
    assert "unreadable" in caplog.text
    assert quantize.report_of(load(tiny_checkpoints["blip2-opt"], quantize.INT4, tmp_path).model).from_cache
    # A cache entry whose layer list does not match the model is not used either.
    meta = json.loads((folder / "meta.json").read_text())
    meta["layers"] = meta["layers"][:-1]
    (folder / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not quantize.report_of(load(tiny_checkpoints["blip2-opt"], quantize.INT4, tmp_path).model).from_cache
    assert "does not match" in caplog.text
    assert first.generate(noise(1), first.prepare(Task.CAPTION), CAPTION).new_tokens == 6


def test_cache_key_names_everything_the_weights_depend_on(tiny_checkpoints):
    folder = str(tiny_checkpoints["blip2-opt"])
    base = quantize.cache_key(folder, None, quantize.INT4, 32, "cpu", torch.bfloat16)
    assert base["torch"] == torch.__version__ and base["torchao"] == quantize.torchao_version() is not None
    others = [quantize.cache_key(folder, None, quantize.INT8, 32, "cpu", torch.bfloat16),
              quantize.cache_key(folder, None, quantize.INT4, 64, "cpu", torch.bfloat16),
              quantize.cache_key(folder, None, quantize.INT4, 32, "cuda", torch.bfloat16),
              quantize.cache_key(folder, None, quantize.INT4, 32, "cpu", torch.float32),
              quantize.cache_key("Salesforce/blip2-opt-2.7b", "abc", quantize.INT4, 32, "cpu", torch.bfloat16),
              quantize.cache_key("Salesforce/blip2-opt-2.7b", "def", quantize.INT4, 32, "cpu", torch.bfloat16)]
    paths = {quantize.cache_path(key) for key in [base, *others]}
    assert len(paths) == 7
    weights = next(p for p in tiny_checkpoints["blip2-opt"].glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:  # the same folder with a rewritten weight file is another checkpoint
        assert quantize.cache_key(folder, None, quantize.INT4, 32, "cpu", torch.bfloat16) != base
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_int8_layer_uses_torchaos_row_scales_and_the_aten_kernel():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(torch.bfloat16)
    layer = quantize.quantize_layer(linear, quantize.INT8)
    assert isinstance(layer, quantize.Int8WeightOnlyLinear) and layer.weight.dtype == torch.int8
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    dequantized = layer.qweight.float() * layer.scales.float()[:, None]
    expected = torch.nn.functional.linear(x.float(), dequantized, linear.bias.float())
    assert torch.allclose(layer(x).float(), expected, rtol=0.02, atol=0.02)
    assert layer(x.float()).dtype == torch.float32
    assert quantize.relative_error(linear, layer) < 0.02
    int4 = quantize.quantize_layer(linear, quantize.INT4, group_size=32)
    assert 0.01 < quantize.relative_error(linear, int4) < 0.15
    assert not quantize.quantizable(nn.Linear(48, 64), quantize.INT4, 32)  # 48 input channels: not groups of 32
    assert not quantize.quantizable(nn.Linear(64, 40), quantize.INT4, 32)  # the int4 packing wants 16 | out
    # aten._weight_int8pack_mm gives wrong numbers for 40 input channels and crashes for 36: never handed them.
    assert not quantize.quantizable(nn.Linear(40, 64), quantize.INT8, 32)
    assert not quantize.quantizable(nn.Linear(36, 64), quantize.INT8, 32)
    assert quantize.quantizable(nn.Linear(48, 40), quantize.INT8, 32)


def test_layers_the_kernels_cannot_take_are_left_as_they_are_and_listed():
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    for method, skipped in ((quantize.INT8, ["1"]), (quantize.INT4, ["0", "1"])):
        copy = nn.Sequential(*[nn.Linear(m.in_features, m.out_features) for m in model]).to(torch.bfloat16)
        copy.load_state_dict(model.state_dict())
        report, layers = quantize.quantize_language_model(copy, method)
        assert report.skipped == skipped and sorted(layers) == sorted({"0", "1", "2"} - set(skipped))
        assert torch.isfinite(copy(x)).all()


# ---------------------------------------------------------------- decisions (pure, GPU paths included)

CPU = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True)
GPU_BF16 = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=True, cuda_name="A10G")
GPU_OLD = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=True, cuda_name="T4")


def billions(name: str) -> float:
    arch = CATALOG[name].architecture
    if CATALOG[name].language_model.value == "flan-t5":
        return language_model_billions({"d_model": arch.hidden, "d_ff": arch.mlp, "num_heads": arch.heads,
                                        "d_kv": 64, "num_layers": arch.layers, "vocab_size": arch.vocab})
    return language_model_billions({"hidden_size": arch.hidden, "num_hidden_layers": arch.layers,
                                    "ffn_dim": arch.mlp, "vocab_size": arch.vocab,
                                    "model_type": "llama" if "vicuna" in name else "opt"})


def test_language_model_sizes_are_estimated_from_the_config():
    assert 2.5 < billions("blip2-opt-2.7b") < 2.8
    assert 6.4 < billions("blip2-opt-6.7b") < 6.9
    assert 6.4 < billions("instructblip-vicuna-7b") < 6.9
    assert 10.5 < billions("blip2-flan-t5-xxl") < 11.5
    assert 2.6 < billions("blip2-flan-t5-xl") < 3.0
    assert language_model_billions({}) is None


def test_int8_cpu_is_refused_where_activation_outliers_break_it():
    opt = CATALOG["blip2-opt-2.7b"].language_model
    small = plan_load(opt, LoadOptions(quantization="int8-cpu"), CPU, language_billions=billions("blip2-opt-2.7b"))
    assert small.quantization == "int8-cpu"
    for name in ("blip2-opt-6.7b", "instructblip-vicuna-7b", "blip2-flan-t5-xxl"):
        assert billions(name) >= INT8_ACTIVATION_LIMIT_B
        with pytest.raises(ModelLoadError, match="outlier"):
            plan_load(CATALOG[name].language_model, LoadOptions(quantization="int8-cpu"), CPU,
                      language_billions=billions(name))
        for method in METHODS:  # weight-only keeps activations in bfloat16: offered for every size
            assert plan_load(CATALOG[name].language_model, LoadOptions(quantization=method), CPU,
                             language_billions=billions(name)).quantization == method


def test_weight_only_plans_on_cpu_and_gpu():
    opt = CATALOG["blip2-opt-2.7b"].language_model
    for method in METHODS:
        plan = plan_load(opt, LoadOptions(quantization=method), CPU)
        assert plan.device == "cpu" and plan.dtype == "bfloat16" and plan.device_map == {"": "cpu"}
        assert plan.precision_label == method
    # On a GPU, int4's kernel takes bfloat16 activations: OPT's float16 default becomes bfloat16 (with a note).
    plan = plan_load(opt, LoadOptions(quantization=quantize.INT4), GPU_BF16)
    assert plan.device == "cuda" and plan.dtype == "bfloat16" and any("bfloat16" in n for n in plan.notes)
    assert plan_load(opt, LoadOptions(quantization=quantize.INT8), GPU_BF16).dtype == "float16"
    with pytest.raises(ModelLoadError, match="compute capability 8.0"):
        plan_load(opt, LoadOptions(quantization=quantize.INT4), GPU_OLD)
    assert plan_load(opt, LoadOptions(quantization=quantize.INT8), GPU_OLD).quantization == quantize.INT8
    with pytest.raises(ModelLoadError, match="int8-weight-only"):
        plan_load(opt, LoadOptions(quantization="int8-cpu"), GPU_BF16)


def test_gpu_configs_follow_torchaos_documentation():
    """The configs the GPU path hands to torchao's quantize_ (built here, run only on a GPU)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    int4 = quantize._torchao_config(quantize.INT4, "cuda", quantize.INT4_GROUP_SIZE)
    assert isinstance(int4, Int4WeightOnlyConfig) and int4.group_size == 32
    assert int4.int4_packing_format == "tile_packed_to_4d" and int4.int4_choose_qparams_algorithm == "hqq"
    assert isinstance(quantize._torchao_config(quantize.INT8, "cuda", 128), Int8WeightOnlyConfig)
    assert isinstance(quantize._torchao_config(quantize.INT4, "cpu", 32), PrototypeInt4WeightOnlyConfig)


def test_kernel_choice_is_a_rule_that_every_load_repeats(tiny_checkpoints):
    """Item 4: 5 loads of 5 choose the same kernels, decided by a rule (no timing at start-up)."""
    choices = []
    for _ in range(5):
        loaded = LoadedModel.load(resolve(str(tiny_checkpoints["blip2-opt"])))
        language = speed.kernel_choice(loaded.model)
        if speed.packing_supported():
            assert language == {"packed": False, "rule": speed.KERNEL_RULE}
            assert "dense-lm" in speed.applied(loaded.model)
        choices.append((speed.applied(loaded.model), language, speed.kernel_choice(loaded.model, "vision")))
    assert all(choice == choices[0] for choice in choices)
    assert not any(isinstance(m, speed.PackedLinear) for m in loaded.model.modules())


# ---------------------------------------------------------------- the static-cache (GPU) fast path, run on a CPU


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-flan-t5"])
def test_static_cache_with_a_compiled_decode_step_gives_the_eager_tokens(tiny_checkpoints, family):
    """Item 6: the same engine call with transformers' static cache, and with its decode step compiled
    (torch.compile through transformers' CompileConfig; the "eager" backend on a CPU so that the test
    checks the graph capture in seconds), gives token for token what the dynamic cache gives."""
    from transformers import CompileConfig

    loaded = LoadedModel.load(resolve(str(tiny_checkpoints[family])))
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=8, num_beams=1)
    images = [noise(70 + i) for i in range(2)]
    eager = [loaded.generate(image, loaded.prepare(Task.CAPTION), settings).token_ids for image in images]
    loaded.set_static_cache(True)
    assert loaded.compile_config is None  # "auto" on a CPU: static cache, no compilation
    assert [loaded.generate(image, loaded.prepare(Task.CAPTION), settings).token_ids for image in images] == eager
    if family != "blip2-opt":
        return
    config = CompileConfig(backend="eager")
    config._compile_all_devices = True  # transformers' switch for compiling off a GPU ("useful for testing")
    loaded.set_static_cache(True, config)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    assert [loaded.generate(image, loaded.prepare(Task.CAPTION), settings).token_ids for image in images] == eager
    assert counters["stats"]["unique_graphs"] > 0  # the decode step really went through torch.compile
    # Chat turns keep their reusable dynamic cache on this path.
    reply = loaded.generate(images[0], loaded.prepare(Task.CHAT, question="what is it?", max_new_tokens=8), settings)
    assert reply.new_tokens == 8 and len(loaded.prefix_cache) == 1
    loaded.set_static_cache(False)
    assert not loaded.static_cache and loaded.compile_config is None


def test_static_cache_option_reaches_the_engine_and_the_command_line(tiny_checkpoints):
    from blip_app.config import parse_config

    loaded = LoadedModel.load(resolve(str(tiny_checkpoints["blip2-opt"])), LoadOptions(static_cache=True))
    assert loaded.static_cache and loaded.compile_config is None
    assert parse_config(["--static-cache"]).load.static_cache
    assert not parse_config([]).load.static_cache
    assert parse_config(["--quantization", "int4-weight-only"]).load.quantization == "int4-weight-only"


def test_kernel_table_measures_every_kind_with_its_error():
    from blip_app.devtools import speed as speed_tools

    table = speed_tools.kernel_table(out_features=64, in_features=64, layers=2, rounds=3,
                                     kinds=("bf16", "int8", "int8-torchao", "int4-g32"))
    assert set(table) == {"bf16", "int8", "int8-torchao", "int4-g32"}
    assert all(row["min_ms"] <= row["median_ms"] <= row["max_ms"] for row in table.values())
    assert table["bf16"]["error"] < table["int8"]["error"] < table["int4-g32"]["error"] < 0.15
    assert speed_tools.main(["kernels", "--shape", "32x32", "--layers", "1", "--rounds", "1", "--kinds", "bf16"]) == 0
