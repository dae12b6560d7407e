"""Real-size random checkpoints (shrunk here), the CPU accelerations, and the bench end to end (tiny)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pytest
import torch

from blip_app.core.catalog import CATALOG
from blip_app.devtools import realsize
from blip_app.devtools import speed as speed_tools
from blip_app.models import speed

SCALE = 1 / 64  # same code path as the real size, a few million parameters


@pytest.fixture(scope="module")
def shrunk_opt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return realsize.build_realsize("blip2-opt-2.7b", root=tmp_path_factory.mktemp("realsize"), scale=SCALE)


# -------------------------------------------------------------------------------------------- realsize


def test_real_sizes_give_the_published_parameter_count() -> None:
    """Built on the meta device only (nothing allocated): 3.74 B parameters for blip2-opt-2.7b."""
    from accelerate import init_empty_weights
    from transformers import Blip2ForConditionalGeneration

    entry = CATALOG["blip2-opt-2.7b"]
    sizes = realsize.real_sizes(entry)
    processor = realsize.build_processor(entry, sizes)
    config = realsize.build_config(entry, sizes, processor.tokenizer)
    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(config)
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    assert 3.70e9 < params < 3.78e9
    assert config.text_config.vocab_size == 50272
    assert config.image_token_index == 50265  # after the 50265 tokens of OPT's tokenizer, as in the real one
    assert len(processor.tokenizer) == 50266


def test_shrunk_checkpoint_loads_like_a_real_one(shrunk_opt: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    marker = json.loads((shrunk_opt / realsize.MARKER).read_text())
    assert marker["format"] == realsize.FORMAT_VERSION and marker["name"] == "blip2-opt-2.7b"
    processor = AutoProcessor.from_pretrained(shrunk_opt)
    model = AutoModelForImageTextToText.from_pretrained(shrunk_opt)
    text = model.config.text_config
    assert text.vocab_size == 50272  # the real vocabulary, even shrunk
    assert model.dtype == torch.bfloat16
    assert model.language_model.lm_head.weight is model.language_model.get_input_embeddings().weight
    assert processor.num_query_tokens == model.config.num_query_tokens
    assert processor.image_processor.size["height"] == model.config.vision_config.image_size
    # Every id the model can produce decodes to some text (the tokenizer is padded to the embeddings).
    # The filler tokens come back as themselves when their text is encoded again, as a real BPE vocabulary's
    # do: a generated answer costs the next turn's history as many tokens as were generated.
    ids = [50000, 40000, 31000, 20000]
    text = processor.tokenizer.decode(ids)
    assert text.split() and all(word.isalpha() for word in text.split())
    assert processor.tokenizer(text, add_special_tokens=False).input_ids == ids
    assert realsize.parameter_count(shrunk_opt) == sum(p.numel() for p in model.parameters())


def test_build_is_deterministic_and_cached(tmp_path: Path, shrunk_opt: Path) -> None:
    started = time.perf_counter()
    again = realsize.build_realsize("blip2-opt-2.7b", root=shrunk_opt.parent, scale=SCALE)
    assert again == shrunk_opt and time.perf_counter() - started < 1.0
    other = realsize.build_realsize("blip2-opt-2.7b", tmp_path / "copy", scale=SCALE)
    assert (other / "model.safetensors").read_bytes() == (shrunk_opt / "model.safetensors").read_bytes()
    assert not realsize.is_built(other, "blip2-opt-2.7b", scale=SCALE, seed=1)
    assert realsize.checkpoint_dir("blip2-opt-2.7b", root=tmp_path).name == "blip2-opt-2.7b"
    assert realsize.checkpoint_dir("blip2-opt-2.7b", root=tmp_path, scale=SCALE).name.startswith("blip2-opt-2.7b-")


@pytest.mark.parametrize("name", ["blip2-flan-t5-xl", "instructblip-vicuna-7b", "instructblip-flan-t5-xl"])
def test_other_families_build_and_answer(tmp_path: Path, name: str) -> None:
    from PIL import Image

    from blip_app.tasks.service import Service

    folder = realsize.build_realsize(name, root=tmp_path, scale=SCALE)
    service = Service([str(folder)])
    reply = service.answer(str(folder), Image.new("RGB", (40, 30), (200, 30, 30)), "What is it?",
                           preset="fast", overrides={"max_new_tokens": 4, "min_new_tokens": 4})
    assert reply.new_tokens == 4 and reply.text


# -------------------------------------------------------------------------------------------- speed


def test_packed_linear_matches_the_dense_layer() -> None:
    if not speed.packing_supported():
        pytest.skip("oneDNN bfloat16 packing is not available on this CPU")
    layer = torch.nn.Linear(48, 40).to(torch.bfloat16)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16)
    expected = layer(x)
    parent = torch.nn.Sequential(layer)
    assert speed.pack_linears(parent) == 1
    packed = parent[0]
    assert isinstance(packed, speed.PackedLinear) and packed.weight.dtype == torch.bfloat16
    assert torch.equal(packed(x), expected)
    assert packed(x.float()).dtype == torch.float32


def test_cpu_defaults_keep_outputs_and_free_the_mapped_file(shrunk_opt: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(shrunk_opt, dtype=torch.bfloat16).eval()
    ids = torch.randint(4, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.language_model(input_ids=ids).logits
    assert speed.mapped_bytes(model) > 0
    # Resident copies and packed kernels give the same numbers up to bfloat16 rounding (oneDNN blocks
    # some multi-row products differently from the dense kernel; eager attention, the last default, is
    # another algorithm: tests/test_engine.py checks the accuracy of the whole).
    applied = speed.apply_cpu_defaults(model, language_attention=None)
    assert "resident" in applied and "lm-eager" not in applied
    assert speed.mapped_bytes(model) == 0
    assert speed.apply_cpu_defaults(model, language_attention=None) == applied  # idempotent
    with torch.inference_mode():
        got = model.language_model(input_ids=ids).logits
        assert torch.allclose(got.float(), expected.float(), rtol=0.02, atol=0.01 * expected.abs().max().item())
    assert "lm-eager" in speed.apply_cpu_defaults(model)
    assert model.get_memory_footprint() > 0  # the manager's memory accounting still works


def test_int8_runs_and_is_close(shrunk_opt: Path) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(shrunk_opt, dtype=torch.bfloat16).eval()
    ids = torch.randint(4, 400, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.language_model(input_ids=ids).logits.float()
        assert speed.quantize_int8(model.language_model) > 0
        got = model.language_model(input_ids=ids).logits.float()
    assert "int8" in speed.applied(model)
    assert torch.allclose(got, expected, atol=0.05 * expected.abs().max().item())


def test_bandwidth_and_other_load_are_measured() -> None:
    bandwidth = speed_tools.measure_bandwidth(gigabytes=0.02, repeats=1)
    assert bandwidth["best"] > 0 and set(bandwidth) > {"sum_float64", "sum_float32"}
    with speed_tools.OtherLoad() as load:
        sum(range(10000))
    assert 0.0 <= load.share


# -------------------------------------------------------------------------------------------- bench


def _bench_args(*argv: str) -> argparse.Namespace:
    from blip_app.devtools import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bench_pairs_the_usual_loop_with_each_quantization(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from blip_app.devtools import bench

    out, markdown = tmp_path / "bench.json", tmp_path / "bench.md"
    args = _bench_args("--model", str(tiny_checkpoints["blip2-opt"]), "--quick", "--json", str(out),
                       "--markdown", str(markdown), "--bandwidth-gb", "0.02",
                       "--quantization", "none,int4-weight-only", "--quantized-cache-dir", str(tmp_path / "q"),
                       "--load-pairs", "1")
    started = time.perf_counter()
    result = bench.run_bench(args)
    assert time.perf_counter() - started < 120
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"none", "int4-weight-only"} and saved["pairs"] == 2
    for name, run in saved["runs"].items():
        for path in bench.REQUIRED_METRICS:
            value = run
            for part in path.split("."):
                assert part in value, f"{name}: {path} missing from the bench JSON"
                value = value[part]
        assert run["both_in_memory"]
        # A B A B: every pair has a baseline block and a blip_app block, with the bandwidth beside them.
        assert len(run["pairs"]) == 2
        for pair in run["pairs"]:
            assert len(pair["baseline"]["chat_turns_s"]) == 5 and len(pair["app"]["chat_turns_s"]) == 5
            assert pair["bandwidth_gbs"] > 0 and pair["app"]["four_different_batches"]
        assert run["ratios"]["chat_turn_5"]["n"] == 2
        assert run["ratios"]["chat_turn_5"]["min"] <= run["ratios"]["chat_turn_5"]["median"] <= \
            run["ratios"]["chat_turn_5"]["max"]
    int4 = saved["runs"]["int4-weight-only"]
    assert int4["warm_from_cache"] and int4["quantize_s"] > 0
    # Start-up times in pairs: a bfloat16 start, then at once a warm start from the quantized cache, each in
    # a new process timed from its first line (imports included: more than the load alone).
    rounds = saved["loads"]["rounds"]
    assert len(rounds) == 1 and all(r["none"] > r["none_load_only"] > 0 and r["int4-weight-only_from_cache"]
                                    for r in rounds)
    assert int4["warm_x_bf16_load"]["n"] == 1
    # The vision encoder's own pass over 4 images is measured beside the 4 concurrent captions, and the
    # chat's last turn says how many of its prompt tokens were computed rather than reused.
    assert int4["vision_four_x_one"]["n"] == 2 and int4["vision_four_x_one"]["median"] > 0
    assert 0 < int4["chat_turn_5_tokens"]["computed"]["median"] < int4["chat_turn_5_tokens"]["prompt"]["median"]
    assert 0 < int4["layer_errors"]["all"]["median"] < 0.15 and "fc1" in int4["layer_errors"]["by_kind"]
    assert saved["runs"]["none"]["layer_errors"] is None and 0 < saved["runs"]["none"]["bf16_layer_error"] < 0.02
    assert int4["decode_bytes"] < 0.5 * saved["runs"]["none"]["decode_bytes"]
    metrics = {(row["quantization"], row["metric"]) for row in saved["targets"]}
    assert ("int4-weight-only", "chat turn 5, speed-up") in metrics
    assert ("int4-weight-only", "warm start / bfloat16 load") in metrics
    assert ("none", "chat turn 5, speed-up") in metrics
    text = markdown.read_text()
    assert "### int4-weight-only" in text and "speed-up per pair: median (min-max)" in text and "### Targets" in text
    assert result["targets"] == saved["targets"]


def test_bench_frees_the_other_side_when_both_do_not_fit(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from blip_app.devtools import bench

    args = _bench_args("--model", str(tiny_checkpoints["blip2-flan-t5"]), "--quick", "--bandwidth-gb", "0.02",
                       "--quantization", "int8-weight-only", "--memory-gb", "0", "--quantized-cache-dir",
                       str(tmp_path / "q"))
    run = bench.run_bench(args)["runs"]["int8-weight-only"]
    assert not run["both_in_memory"]
    # Each pair loads the baseline again (the app was freed for it) and then the app again.
    assert all("baseline_load_s" in pair and "app_load_s" in pair for pair in run["pairs"])


def test_paired_ratios_are_taken_pair_by_pair() -> None:
    from blip_app.devtools import bench

    def block(scale: float) -> dict:
        return {"caption_new_s": 2 * scale, "caption_known_s": scale, "decode_s_per_token": 0.1 * scale,
                "ttft_s": scale, "chat_turns_s": [scale] * 5, "four_different_s": 3 * scale,
                "four_same_s": 2 * scale, "one_request_s": 2 * scale}

    # The host gets twice as slow in the second pair; blip_app is 2x faster in both: the ratios say 2, 2.
    pairs = [{"baseline": block(2.0), "app": block(1.0), "bandwidth_gbs": 20, "bandwidth_after_gbs": 10,
              "baseline_decode_bytes": 2e9},
             {"baseline": block(4.0), "app": block(2.0), "bandwidth_gbs": 10, "bandwidth_after_gbs": 10,
              "baseline_decode_bytes": 2e9}]
    out = {"pairs": pairs, "decode_bytes": 1e9}
    bench._summarise(out, True)
    assert out["ratios"]["chat_turn_5"] == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 2}
    assert out["four_different_x_one"]["median"] == 1.5
    assert out["decode_floor_s"]["min"] == 0.1  # bytes over the lower of the two bandwidths around the pair
    assert math.isclose(out["ratios"]["four_different"]["median"], 4 * 2 * 2 / 3)
