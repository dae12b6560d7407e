"""The image-text matching model and the features of the captioning models, on tiny offline checkpoints.

The retrieval model's own pieces are checked against transformers' ``Blip2ForImageTextRetrieval.forward``
and the captioning models' features against ``Blip2Model.get_*_features`` on the same weights.
"""

from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
from PIL import Image

from blip_app.cli import commands as cli_commands
from blip_app.core.catalog import CatalogEntry, resolve_model
from blip_app.core.devices import Hardware, LoadOptions
from blip_app.errors import BadInputError, UnsupportedCheckpointError
from blip_app.models.engine import LoadedModel
from blip_app.models.loading import Loader, load_model
from blip_app.models.manager import GB, ModelManager
from blip_app.models.retrieval import (
    CONFIDENCE_THRESHOLDS,
    RetrievalEntry,
    RetrievalModel,
    confidence_label,
    embed,
    generative_features,
    plan_retrieval_load,
    search,
    trust_score,
    trust_text,
)
from blip_app.tasks.service import Service

RED = Image.new("RGB", (40, 30), "red")
BLUE = Image.new("RGB", (40, 30), "blue")
STRIPES = Image.frombytes("RGB", (32, 32), bytes((x * 7) % 256 for x in range(32 * 32 * 3)))
TEXTS = ["a red square", "a small blue dog sitting on the grass"]
FP32 = LoadOptions(precision="float32")


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory):
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    return make_tiny_retrieval_checkpoint(tmp_path_factory.mktemp("retrieval") / "itm")


@pytest.fixture(scope="module")
def itm(tiny_retrieval) -> RetrievalModel:
    model = load_model(resolve_model(str(tiny_retrieval)), FP32)
    assert isinstance(model, RetrievalModel)
    return model


def forward(model: RetrievalModel, images, texts, itm_head: bool) -> torch.Tensor:
    inputs = model.processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model.model(**inputs, use_image_text_matching_head=itm_head).logits_per_image


def test_itm_score_is_the_heads_match_probability(itm):
    scores = itm.itm_scores([RED, BLUE], TEXTS)
    expected = forward(itm, [RED, BLUE], TEXTS, True).softmax(dim=1)[:, 1]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in scores)
    red, blue = itm.itm_score(RED, TEXTS[0]), itm.itm_score(BLUE, TEXTS[0])
    assert abs(red - blue) > 1e-3  # the image matters


def test_itc_similarity_is_the_contrastive_logit(itm):
    matrix = itm.itc_matrix([RED, BLUE], TEXTS)
    assert torch.allclose(matrix, forward(itm, [RED, BLUE], TEXTS, False), atol=1e-5)
    assert itm.itc_similarity(BLUE, TEXTS[1]) == pytest.approx(float(matrix[1, 1]), abs=1e-6)


def test_embeddings_are_projected_normalised_and_give_the_similarity(itm):
    images = itm.embed_images([RED, BLUE, STRIPES])
    texts = itm.embed_texts(TEXTS)
    assert images.shape == (3, itm.num_query_tokens, 16) and texts.shape == (2, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3, itm.num_query_tokens), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)
    best = (images[2] @ texts[0]).max()
    assert float(best) == pytest.approx(itm.itc_similarity(STRIPES, TEXTS[0]), abs=1e-5)


@pytest.mark.parametrize("method", ["itm", "itc"])
def test_rank_is_ordered_by_the_scores_it_reports(itm, method):
    images = [RED, BLUE, STRIPES]
    ranked = itm.rank(images, TEXTS[0], method=method)
    assert sorted(i for i, _ in ranked) == [0, 1, 2]
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True)
    for index, score in ranked:
        single = itm.itm_score(images[index], TEXTS[0]) if method == "itm" else itm.itc_similarity(
            images[index], TEXTS[0])
        assert score == pytest.approx(single, abs=1e-5)
    with pytest.raises(ValueError, match="ranking method"):
        itm.rank(images, TEXTS[0], method="cosine")


def test_the_vision_encoder_runs_once_per_picture(tiny_retrieval):
    model = load_model(resolve_model(str(tiny_retrieval)), FP32)
    calls = []
    model.model.vision_model.register_forward_hook(lambda module, args, output: calls.append(args))
    model.itm_score(RED, TEXTS[0])
    model.itm_score(RED.copy(), TEXTS[1])  # another object, the same picture
    model.embed_images([RED, RED])
    model.rank([RED, BLUE], "red", method="itc")
    assert len(calls) == 2  # red once, blue once
    assert model.features.hits > 0


def test_bfloat16_gives_nearly_the_float32_scores(tiny_retrieval, itm):
    half = load_model(resolve_model(str(tiny_retrieval)), LoadOptions(device="cpu", precision="bfloat16"))
    assert half.plan.dtype == "bfloat16" and half.vision_dtype == torch.bfloat16
    assert half.itm_score(RED, TEXTS[0]) == pytest.approx(itm.itm_score(RED, TEXTS[0]), abs=0.03)
    assert half.embed_texts(TEXTS).dtype == torch.float32


@pytest.mark.parametrize(
    ("score", "label"),
    [(1.0, "very likely"), (0.8, "very likely"), (0.79, "likely"), (0.5, "likely"), (0.49, "uncertain"),
     (0.2, "uncertain"), (0.19, "unlikely"), (0.0, "unlikely")],
)
def test_confidence_label_thresholds(score, label):
    assert confidence_label(score) == label


def test_confidence_thresholds_are_ordered_and_refuse_nan():
    bounds = [bound for bound, _ in CONFIDENCE_THRESHOLDS]
    assert bounds == sorted(bounds, reverse=True) and bounds[-1] == 0.0
    with pytest.raises(ValueError):
        confidence_label(math.nan)


def test_trust_text_scores_question_and_answer_together():
    assert trust_text("caption", "", "a dog on a beach") == "a dog on a beach"
    assert trust_text("answer", "What animal is it?", "a dog") == "What animal is it? a dog"


def test_the_retrieval_catalog_resolves_and_plans_its_precision():
    ref = resolve_model("Salesforce/BLIP2-itm-vit-g")
    assert isinstance(ref.entry, RetrievalEntry) and ref.source == "Salesforce/blip2-itm-vit-g"
    assert ref.label == "blip2-itm-vit-g" and ref.entry.family.value == "blip2-itm"
    assert isinstance(resolve_model("blip2-opt-2.7b").entry, CatalogEntry)
    gpu = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=True)
    assert plan_retrieval_load(LoadOptions(), gpu).dtype == "float16"
    assert plan_retrieval_load(LoadOptions(), Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True)).dtype == "bfloat16"
    assert plan_retrieval_load(LoadOptions(), Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False)).dtype == "float32"
    plan = plan_retrieval_load(LoadOptions(quantization="8bit"), gpu)
    assert plan.quantization == "none" and "not quantised" in plan.notes[-1]


def test_the_catalog_name_loads_from_a_local_snapshot(tiny_retrieval):
    model = load_model(resolve_model("blip2-itm-vit-g"), FP32, source=str(tiny_retrieval))
    assert isinstance(model, RetrievalModel) and model.name == "blip2-itm-vit-g"


def test_a_captioning_checkpoint_is_not_loaded_as_a_matching_model(tiny_checkpoints):
    ref = resolve_model(str(tiny_checkpoints["blip2-opt"]))
    with pytest.raises(UnsupportedCheckpointError, match="not an image-text matching one"):
        RetrievalModel.load(ref, FP32)
    assert isinstance(load_model(ref, FP32), LoadedModel)


def test_one_place_says_whether_a_model_is_a_matching_one(tiny_checkpoints, tiny_retrieval, tmp_path):
    """The manager asks checkpoints.is_matching (through its Loader): by catalog entry, else config.json on
    disk; a hub checkpoint that is not downloaded counts as captioning and nothing is downloaded."""
    from blip_app.errors import ModelLoadError
    from blip_app.models.checkpoints import is_matching

    opt, itm = str(tiny_checkpoints["blip2-opt"]), str(tiny_retrieval)
    offline = LoadOptions(cache_dir=str(tmp_path), local_files_only=True)
    manager = ModelManager(["blip2-itm-vit-g", "blip2-opt-2.7b", opt, itm, "someone/unknown-blip2"], offline,
                           loader=Loader())
    answers = {name: manager.is_matching(name) for name in manager.names}
    assert answers == {"blip2-itm-vit-g": True, "blip2-opt-2.7b": False, opt: False, itm: True,
                       "someone/unknown-blip2": False}
    assert not manager.is_matching("not-offered") and not list(tmp_path.iterdir())  # nothing downloaded
    with pytest.raises(ModelLoadError, match="not in the local cache"):  # when loading, it must know
        is_matching(manager.ref("someone/unknown-blip2"), offline, download=True)


def test_the_manager_holds_both_kinds_within_its_budget(tiny_checkpoints, tiny_retrieval):
    opt, itm_path = str(tiny_checkpoints["blip2-opt"]), str(tiny_retrieval)
    sizes = [load_model(resolve_model(p), FP32).model.get_memory_footprint() for p in (opt, itm_path)]
    manager = ModelManager([opt, itm_path], FP32, loader=Loader(), memory_budget_gb=1.2 * max(sizes) / GB)
    service = Service([opt, itm_path], FP32, manager=manager)
    caption = service.caption(opt, RED, preset="fast").text
    trust = trust_score(service, itm_path, RED, caption or "a picture")
    assert 0.0 <= trust.score <= 1.0 and trust.label == confidence_label(trust.score)
    assert str(round(trust.score, 2)) in trust.hover
    assert manager.loaded_names() == [itm_path]  # the captioning model was evicted to make room
    with pytest.raises(BadInputError, match="captioning model, not an image-text matching one"):
        trust_score(service, opt, RED, "a red square")


def test_search_ranks_files_by_match_probability(tiny_retrieval, tmp_path):
    paths = []
    for name, image in (("red.png", RED), ("blue.png", BLUE), ("stripes.png", STRIPES)):
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    itm_path = str(tiny_retrieval)
    manager = ModelManager([itm_path], FP32, loader=Loader())
    hits = search(manager, itm_path, paths, "a red square")
    assert sorted(h.name for h in hits) == ["blue.png", "red.png", "stripes.png"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    model = manager.get(itm_path)
    for hit in hits:
        assert hit.score == pytest.approx(model.itm_score(Image.open(paths[hit.index]).convert("RGB"),
                                                          "a red square"), abs=1e-5)
        assert hit.label == confidence_label(hit.score) and -1.0 <= hit.similarity <= 1.0
    with pytest.raises(BadInputError, match="search text is empty"):
        search(manager, itm_path, paths, "  ")
    with pytest.raises(BadInputError, match="Add some images"):
        search(manager, itm_path, [], "red")


def test_captioning_features_are_those_blip2model_exposes(tiny_checkpoints):
    from transformers import Blip2Model

    for family in ("blip2-opt", "blip2-flan-t5"):
        path = str(tiny_checkpoints[family])
        loaded = LoadedModel.load(resolve_model(path), FP32)
        features = generative_features(loaded, image=RED, text="a red square")
        reference = Blip2Model.from_pretrained(path, dtype=torch.float32).eval()
        pixels = loaded.pixel_values(RED)
        ids = loaded.tokenizer("a red square", return_tensors="pt")
        with torch.inference_mode():
            image = reference.get_image_features(pixel_values=pixels).pooler_output[0]
            queries = reference.get_qformer_features(pixel_values=pixels)[0]
            text = reference.get_text_features(**ids).last_hidden_state[0]
        assert torch.allclose(features["image"], image, atol=1e-5), family
        assert torch.allclose(features["qformer"], queries, atol=1e-5), family
        assert torch.allclose(features["text"], text, atol=1e-5), family


def test_instructblip_query_features_follow_the_instruction(tiny_checkpoints):
    loaded = LoadedModel.load(resolve_model(str(tiny_checkpoints["instructblip-vicuna"])), FP32)
    plain = generative_features(loaded, image=RED)
    told = generative_features(loaded, image=RED, instruction="count the dogs")
    assert plain["qformer"].shape == (loaded.spec.num_query_tokens, 32)
    assert torch.allclose(plain["image"], told["image"]) and not torch.allclose(plain["qformer"], told["qformer"])
    with pytest.raises(BadInputError):
        generative_features(loaded)


def embed_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_commands.add_embed_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["embed", *argv])


def test_embed_api_gives_every_kind(tiny_checkpoints, tiny_retrieval):
    itm_path, opt = str(tiny_retrieval), str(tiny_checkpoints["blip2-opt"])
    manager = ModelManager([itm_path, opt], FP32, loader=Loader())
    found = embed(manager, itm_path, [RED, "a red square"], names=["red.png", "a red square"])
    assert [(e.source, e.kind) for e in found] == [
        ("red.png", "image"), ("red.png", "qformer"), ("red.png", "itc-image"),
        ("a red square", "qformer-text"), ("a red square", "itc-text")]
    assert found[-1].norm == pytest.approx(1.0, abs=1e-5) and found[2].shape == (4, 16)
    assert torch.allclose(found[-1].values, manager.get(itm_path).embed_texts(["a red square"])[0])
    kinds = [e.kind for e in embed(manager, opt, [RED, "a red square"])]
    assert kinds == ["image", "qformer", "text"]


def test_embed_command_prints_and_writes_json(tiny_retrieval, tmp_path):
    RED.save(tmp_path / "red.png")
    out = io.StringIO()
    assert cli_commands.cmd_embed(embed_args(str(tmp_path / "red.png"), "a red square", "--model",
                                          str(tiny_retrieval), "--precision", "float32"), out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "itc-text" in lines[-1] and "norm    1.0000" in lines[-1]
    assert "4x16" in lines[2] and "..." in lines[0]
    out = io.StringIO()
    cli_commands.cmd_embed(embed_args("a red square", "--model", str(tiny_retrieval), "--json"), out)  # auto: bf16
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["kind"] for r in rows] == ["qformer-text", "itc-text"]
    assert len(rows[1]["vector"]) == 16 and rows[1]["norm"] == pytest.approx(1.0, abs=0.01)
    assert math.sqrt(sum(v * v for v in rows[1]["vector"])) == pytest.approx(rows[1]["norm"], abs=1e-4)
