"""The tiny offline checkpoints load and run through the real transformers classes (no mocks, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import AutoModelForImageTextToText, AutoProcessor, Blip2ForImageTextRetrieval

from blip_app.devtools import tiny
from blip_app.devtools.tiny import FAMILIES, IMAGE_TOKEN, make_tiny_checkpoint, make_tiny_retrieval_checkpoint

ENGLISH = "A photo of a cat, 2 dogs; what's that?"
MORE_ENGLISH = [
    ENGLISH,
    "Zebras & kangaroos (unseen words) cost $15.99 at 10:30 pm!",
    "Question: Why is the sky blue? Answer: because of Rayleigh scattering.",
    "  leading and   repeated spaces, tabs\tand newlines\nstay legal",
]
NUM_QUERY_TOKENS = 4


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoints: dict[str, Path]) -> dict[str, tuple]:
    """{family: (model, processor)} loaded once through the Auto classes."""
    return {
        family: (AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path))
        for family, path in tiny_checkpoints.items()
    }


@pytest.fixture(scope="module")
def red() -> Image.Image:
    return Image.new("RGB", (64, 48), (255, 0, 0))


@pytest.fixture(scope="module")
def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))


def prompt_for(family: str) -> str:
    return "Describe the image." if family.startswith("instructblip") else "Question: what is it? Answer:"


def _logits(model, inputs) -> torch.Tensor:
    extra = {}
    if not model.config.use_decoder_only_language_model:
        extra["decoder_input_ids"] = torch.tensor([[model.config.text_config.decoder_start_token_id]])
    with torch.no_grad():
        return model(**inputs, **extra).logits


# --------------------------------------------------------------------------------------------------
# Modern layout
# --------------------------------------------------------------------------------------------------

EXPECTED_CLASSES = {
    "blip2-opt": ("Blip2ForConditionalGeneration", "Blip2Processor", "GPT2Tokenizer", "opt"),
    "blip2-flan-t5": ("Blip2ForConditionalGeneration", "Blip2Processor", "T5Tokenizer", "t5"),
    "instructblip-flan-t5": ("InstructBlipForConditionalGeneration", "InstructBlipProcessor", "T5Tokenizer", "t5"),
    "instructblip-vicuna": (
        "InstructBlipForConditionalGeneration",
        "InstructBlipProcessor",
        "LlamaTokenizer",
        "llama",
    ),
}


def test_coco_variant_has_the_coco_image_size(tmp_path):
    from blip_app.devtools.tiny import make_tiny_checkpoint as make

    path = make(tmp_path / "coco", "blip2-flan-t5", coco=True)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.vision_config.image_size == 364
    assert processor.image_processor.size.height == 364
    with pytest.raises(ValueError, match="no InstructBLIP -coco"):
        make(tmp_path / "x", "instructblip-vicuna", coco=True)


def test_all_families_are_built(tiny_checkpoints):
    assert tuple(tiny_checkpoints) == FAMILIES
    for family, path in tiny_checkpoints.items():
        assert path.name == family
        for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json"):
            assert (path / name).is_file(), name
        assert (path / "qformer_tokenizer").is_dir() == family.startswith("instructblip")


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_classes_and_image_tokens(loaded, family):
    model, processor = loaded[family]
    model_class, processor_class, tokenizer_class, text_model_type = EXPECTED_CLASSES[family]
    assert type(model).__name__ == model_class
    assert type(processor).__name__ == processor_class
    assert type(processor.tokenizer).__name__ == tokenizer_class
    assert model.config.text_config.model_type == text_model_type
    assert type(processor.image_processor).__name__.startswith("BlipImageProcessor")
    size = processor.image_processor.size
    assert size.height == size.width == model.config.vision_config.image_size == 30
    if family.startswith("instructblip"):
        assert type(processor.qformer_tokenizer).__name__ == "BertTokenizer"
        assert model.config.qformer_config.max_position_embeddings == 64
        assert processor.qformer_tokenizer.model_max_length == 64
        assert model.config.qformer_config.vocab_size == len(processor.qformer_tokenizer)

    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert processor.num_query_tokens == model.config.num_query_tokens == NUM_QUERY_TOKENS
    assert model.config.image_token_index == image_id
    rows = model.get_input_embeddings().weight.shape[0]
    if family == "instructblip-vicuna":
        assert rows == len(processor.tokenizer) > image_id
    else:  # padded to a multiple of 64 past the tokenizer, like blip2-opt (50304) and Flan-T5 (32128)
        assert rows % 64 == 0 and rows > len(processor.tokenizer) > image_id
    assert model.get_output_embeddings().weight.shape[0] == rows

    inputs = processor(images=Image.new("RGB", (20, 20)), text=prompt_for(family), return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids[:NUM_QUERY_TOKENS] == [image_id] * NUM_QUERY_TOKENS
    assert image_id not in ids[NUM_QUERY_TOKENS:]
    assert inputs["pixel_values"].shape == (1, 3, 30, 30)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids(loaded, tiny_checkpoints, family):
    model, processor = loaded[family]
    tokenizer, text_config = processor.tokenizer, model.config.text_config
    generation = json.loads((tiny_checkpoints[family] / "generation_config.json").read_text())
    if family == "blip2-opt":
        assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("</s>", "</s>", "<pad>")
        # Salesforce/blip2-opt-*: the language model stops on "\n" (50118 there), </s> is BOS.
        newline = tokenizer("\n", add_special_tokens=False).input_ids
        assert len(newline) == 1
        assert (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == (2, newline[0], 1)
        assert model.language_model.generation_config.eos_token_id == newline[0] != tokenizer.eos_token_id
        assert text_config.max_position_embeddings == 2048
    elif family.endswith("flan-t5"):
        assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
        assert (text_config.pad_token_id, text_config.eos_token_id, text_config.decoder_start_token_id) == (0, 1, 0)
        assert text_config.bos_token_id == 1
        assert text_config.feed_forward_proj == "gated-gelu"
        assert generation["decoder_start_token_id"] == 0
        # Like Flan-T5: the output matrix is not the input embedding matrix.
        assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    else:
        assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
        # The conversion script: bos and unk </s>, pad [PAD] added; the text config of
        # decapoda-research/llama-7b-hf: bos 0, eos 1, pad -1 (not the tokenizer's ids).
        assert (tokenizer.bos_token, tokenizer.unk_token, tokenizer.eos_token, tokenizer.pad_token) == (
            "</s>", "</s>", "</s>", "[PAD]")
        assert tokenizer.pad_token_id == len(tokenizer) - 2  # then <image>
        assert (text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id) == (0, 1, -1)
        assert text_config.max_position_embeddings == 2048
    if family.endswith("flan-t5"):
        assert tokenizer.pad_token_id == text_config.pad_token_id
        assert tokenizer.eos_token_id == text_config.eos_token_id
    for key in ("bos_token_id", "eos_token_id"):
        assert generation[key] == getattr(text_config, key)
    assert generation["pad_token_id"] == tokenizer.pad_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_text(loaded, red, family):
    model, processor = loaded[family]
    inputs = processor(images=red, text=prompt_for(family), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5)
    prompt_length = inputs["input_ids"].shape[1] if model.config.use_decoder_only_language_model else 1
    assert out.shape[0] == 1
    assert prompt_length < out.shape[1] <= prompt_length + 5
    assert isinstance(processor.batch_decode(out, skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-flan-t5"])
def test_blip2_generate_without_text(loaded, red, family):
    model, processor = loaded[family]
    inputs = processor(images=red, return_tensors="pt")
    assert set(inputs) == {"pixel_values"}
    out = model.generate(**inputs, max_new_tokens=5)
    assert out.shape[0] == 1 and out.shape[1] > 1


def test_the_image_changes_the_output(loaded, red, noise):
    generated_differ = []
    for family, (model, processor) in loaded.items():
        a = processor(images=red, text=prompt_for(family), return_tensors="pt")
        b = processor(images=noise, text=prompt_for(family), return_tensors="pt")
        assert not torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert not torch.allclose(_logits(model, a), _logits(model, b)), family
        out_a = model.generate(**a, max_new_tokens=10)
        out_b = model.generate(**b, max_new_tokens=10)
        generated_differ.append(out_a.shape != out_b.shape or not torch.equal(out_a, out_b))
    assert any(generated_differ)


def test_generation_is_varied(loaded, red):
    """A random model should not emit a single repeated id: the weights are not too small."""
    model, processor = loaded["blip2-flan-t5"]
    out = model.generate(**processor(images=red, text="What is it?", return_tensors="pt"), max_new_tokens=10)
    assert len(set(out[0, 1:].tolist())) > 1


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_english(tiny_checkpoints, family):
    processor = AutoProcessor.from_pretrained(tiny_checkpoints[family])
    tokenizer = processor.tokenizer
    ids = tokenizer(ENGLISH)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ENGLISH
    assert len(ids) < len(ENGLISH)  # words, not characters
    special = set(tokenizer.all_special_ids)
    text_ids = [i for i in ids if i not in special]
    assert text_ids and tokenizer.unk_token_id not in text_ids
    for text in MORE_ENGLISH:
        text_ids = [i for i in tokenizer(text)["input_ids"] if i not in special]
        assert tokenizer.unk_token_id not in text_ids, text
    if family.startswith("instructblip"):
        qformer = processor.qformer_tokenizer
        ids = qformer(ENGLISH)["input_ids"]
        assert ids[0] == qformer.cls_token_id and ids[-1] == qformer.sep_token_id
        assert qformer.unk_token_id not in ids
        decoded = qformer.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == ENGLISH.lower().replace(" ", "")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_class_pipeline_matches_tokenizer_json(tiny_checkpoints, family):
    """The transformers class rebuilds its pipeline on reload; it must agree with the saved tokenizer.json."""
    path = tiny_checkpoints[family]
    processor = AutoProcessor.from_pretrained(path)
    pairs = [(processor.tokenizer, Tokenizer.from_file(str(path / "tokenizer.json")))]
    if family.startswith("instructblip"):
        pairs.append((processor.qformer_tokenizer, Tokenizer.from_file(str(path / "qformer_tokenizer/tokenizer.json"))))
    for transformers_tokenizer, raw in pairs:
        for text in MORE_ENGLISH:
            assert transformers_tokenizer(text)["input_ids"] == raw.encode(text).ids, text


def test_bos_is_added_like_the_real_tokenizers(loaded):
    assert loaded["blip2-opt"][1].tokenizer("a cat")["input_ids"][0] == 2  # </s>, as facebook/opt
    assert loaded["instructblip-vicuna"][1].tokenizer("a cat")["input_ids"][0] == 2  # </s>, as the conversion
    t5 = loaded["blip2-flan-t5"][1].tokenizer("a cat")["input_ids"]
    assert t5[0] not in (0, 1) and t5[-1] == 1  # no bos, </s> appended


# --------------------------------------------------------------------------------------------------
# Determinism and options
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_files(tiny_checkpoints, tmp_path, family):
    again = make_tiny_checkpoint(tmp_path / family, family, seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_checkpoints[family] / name).read_bytes(), name


def test_other_seed_gives_other_weights(tiny_checkpoints, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", "blip2-opt", seed=1)
    assert (other / "model.safetensors").read_bytes() != (
        tiny_checkpoints["blip2-opt"] / "model.safetensors"
    ).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_checkpoints["blip2-opt"] / "tokenizer.json").read_bytes()


def test_options_num_query_tokens_and_max_positions(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "v", "instructblip-vicuna", num_query_tokens=2, max_positions=96)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.num_query_tokens == processor.num_query_tokens == 2
    assert model.config.text_config.max_position_embeddings == 96
    inputs = processor(images=Image.new("RGB", (8, 8)), text="Describe the image.", return_tensors="pt")
    assert inputs["input_ids"][0, :3].tolist() == [model.config.image_token_index] * 2 + [2]  # </s> as BOS
    model.generate(**inputs, max_new_tokens=2)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="blip2-opt"):
        make_tiny_checkpoint(tmp_path, "blip2-gpt4")


def test_building_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_checkpoint(tmp_path, "blip2-opt")
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------------------------------
# Legacy (pre-4.46) layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_layout_reloads_without_image_token(tiny_legacy_checkpoints, family):
    path = tiny_legacy_checkpoints[family]
    assert not (path / "processor_config.json").exists()
    assert json.loads((path / "preprocessor_config.json").read_text())["processor_class"].endswith("Processor")
    assert IMAGE_TOKEN not in (path / "tokenizer.json").read_text()
    config = json.loads((path / "config.json").read_text())
    assert config.get("image_token_index") is None

    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert getattr(processor, "num_query_tokens", None) is None
    assert model.config.image_token_index is None
    assert model.config.num_query_tokens == NUM_QUERY_TOKENS
    # transformers' processor adds <image> to the tokenizer by itself at load time, one id past the
    # language model's embeddings (tiny.py's module docstring).
    vocab_size = model.get_input_embeddings().weight.shape[0]
    assert len(processor.tokenizer) == vocab_size + 1
    assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab_size


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_checkpoints_fail_in_transformers_as_documented(tiny_legacy_checkpoints, red, family):
    """Pins the failure modes the engine has to repair (see the module docstring of blip_app.devtools.tiny)."""
    path = tiny_legacy_checkpoints[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    if family.startswith("instructblip"):
        with pytest.raises(TypeError):
            processor(images=red, text="Describe the image.", return_tensors="pt")
    else:
        inputs = processor(images=red, text="Question: what is it? Answer:", return_tensors="pt")
        assert processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in inputs["input_ids"][0].tolist()
        with pytest.raises(AttributeError):
            model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(TypeError):
            model.generate(**processor(images=red, return_tensors="pt"), max_new_tokens=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_legacy_checkpoints_can_be_repaired(tiny_legacy_checkpoints, red, noise, family):
    """The documented fix for old checkpoints works on the tiny legacy layout."""
    path = tiny_legacy_checkpoints[family]
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    processor.num_query_tokens = model.config.num_query_tokens
    model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model.config.image_token_index = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    a = processor(images=red, text=prompt_for(family), return_tensors="pt")
    b = processor(images=noise, text=prompt_for(family), return_tensors="pt")
    assert a["input_ids"][0, :NUM_QUERY_TOKENS].tolist() == [model.config.image_token_index] * NUM_QUERY_TOKENS
    assert not torch.allclose(_logits(model, a), _logits(model, b))
    model.generate(**a, max_new_tokens=3)


# --------------------------------------------------------------------------------------------------
# Image-text retrieval
# --------------------------------------------------------------------------------------------------


def test_retrieval_checkpoint_scores_image_text_pairs(tmp_path, red, noise):
    path = make_tiny_retrieval_checkpoint(tmp_path / "retrieval")
    model = Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert type(processor).__name__ == "Blip2Processor"
    assert type(processor.tokenizer).__name__ == "BertTokenizer"
    scores = []
    for image in (red, noise):
        inputs = processor(images=image, text="a red square", return_tensors="pt")
        with torch.no_grad():
            itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image
        assert itm.shape == (1, 2) and itc.shape == (1, 1)
        assert torch.isfinite(itm).all() and torch.isfinite(itc).all()
        scores.append(itm.softmax(dim=-1)[0, 1].item())
    assert scores[0] != scores[1]


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_command_line_writes_all_families_and_retrieval(tmp_path, caplog):
    caplog.set_level("INFO", logger="blip_app.devtools.tiny")
    assert tiny.main([str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FAMILIES, "retrieval"])
    lines = [r.getMessage() for r in caplog.records if r.name == "blip_app.devtools.tiny"]
    for family in FAMILIES:
        assert sum(f"tiny {family} checkpoint" in line for line in lines) == 1
