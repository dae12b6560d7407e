"""blip_app against transformers itself, on tiny checkpoints shaped like the published ones.

The reference side is plain transformers: a separately loaded, unmodified model
(``AutoModelForImageTextToText.from_pretrained``), ``model.generate(**processor(images=..., text=...))``
with the checkpoint's own configuration (pad and decoder start untouched), and only the task's decoding
settings, written here from the references (LAVIS, the model cards). Stop tokens: the checkpoint's two
sources, read here from the loaded transformers objects: the language model's generation config ("\n"
on blip2-opt) and its tokenizer's eos (``</s>``), which LAVIS's models end on too.

* prompts: BLIP-2 captions with no prompt ("a photo of" on -coco checkpoints), "Question: {} Answer:",
  "Question: {} Short answer:"; InstructBLIP "A short image caption.", the bare question; chat turns
  "Question: {} Answer: {}." before "Question: {} Answer:" (turn 1 of InstructBLIP: the bare question).
* decoding: beams 5; BLIP-2 captions 30 tokens at most, at least 1 (-coco: 8), answers 10 tokens with
  length penalty 0 (OPT) or -1 (Flan-T5), chat 30 tokens; InstructBLIP free-form answers and chat 256
  tokens with repetition penalty 1.5, captions 10 to 80 tokens, short answers 10 tokens with length
  penalty -1. LAVIS passes only embeddings, so on OPT and Vicuna the penalty covers the generated tokens
  only: transformers' own RepetitionPenaltyLogitsProcessor with ``prompt_ignore_length`` does that here.

The blip_app side is the Service, as the UI and the API call it, with its own defaults (standard preset
for beam search, fast preset for greedy). Nothing from blip_app's engine feeds the reference side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList
from transformers import RepetitionPenaltyLogitsProcessor as Penalty

from blip_app.core.devices import LoadOptions
from blip_app.core.prompts import Turn
from blip_app.devtools.tiny import FAMILIES, make_tiny_checkpoint
from blip_app.tasks.service import Service

QUESTION = "what is in the picture?"
HISTORY = (("what is it?", "a red square"), ("is it big?", "no"))
NEWEST = "where is it?"


def image() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


@dataclass(frozen=True)
class Case:
    name: str
    prompt: dict[str, str]  # per prompt family: "blip2" / "instructblip"
    decoding: dict[str, dict]  # per "blip2-opt" ... : the reference settings of the task


def _chat(turns) -> str:
    return " ".join(f"Question: {q} Answer: {a}." for q, a in turns) + f" Question: {NEWEST} Answer:"


_INSTRUCT_FREE = {"max_new_tokens": 256, "min_new_tokens": 1, "penalty": 1.5, "length_penalty": 1.0}
CASES = {
    "caption": Case("caption", {"blip2": "", "instructblip": "A short image caption."}, {
        "blip2-opt": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "blip2-flan-t5": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "instructblip-flan-t5": {"max_new_tokens": 80, "min_new_tokens": 10, "penalty": 1.5, "length_penalty": 1.0},
        "instructblip-vicuna": {"max_new_tokens": 80, "min_new_tokens": 10, "penalty": 1.5, "length_penalty": 1.0},
    }),
    "answer": Case("answer", {"blip2": f"Question: {QUESTION} Answer:", "instructblip": QUESTION}, {
        "blip2-opt": {"max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0},
        "blip2-flan-t5": {"max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0},
        "instructblip-flan-t5": _INSTRUCT_FREE,
        "instructblip-vicuna": _INSTRUCT_FREE,
    }),
    "short answer": Case("short answer", {"blip2": f"Question: {QUESTION} Short answer:",
                                          "instructblip": f"Question: {QUESTION} Short answer:"}, {
        "blip2-opt": {"max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0},
        "blip2-flan-t5": {"max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0},
        "instructblip-flan-t5": {"max_new_tokens": 10, "min_new_tokens": 1, "penalty": 1.5, "length_penalty": -1.0},
        "instructblip-vicuna": {"max_new_tokens": 10, "min_new_tokens": 1, "penalty": 1.5, "length_penalty": -1.0},
    }),
    "chat turn 1": Case("chat turn 1", {"blip2": f"Question: {NEWEST} Answer:", "instructblip": NEWEST}, {
        "blip2-opt": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "blip2-flan-t5": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "instructblip-flan-t5": _INSTRUCT_FREE,
        "instructblip-vicuna": _INSTRUCT_FREE,
    }),
    "chat turn 3": Case("chat turn 3", {"blip2": _chat(HISTORY), "instructblip": _chat(HISTORY)}, {
        "blip2-opt": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "blip2-flan-t5": {"max_new_tokens": 30, "min_new_tokens": 1, "length_penalty": 1.0},
        "instructblip-flan-t5": _INSTRUCT_FREE,
        "instructblip-vicuna": _INSTRUCT_FREE,
    }),
}
COCO_CAPTION = {"max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0}  # LAVIS caption_coco eval


@pytest.fixture(scope="module")
def folders(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return {**tiny_checkpoints,
            "blip2-opt-coco": make_tiny_checkpoint(root / "opt", "blip2-opt", coco=True),
            "blip2-flan-t5-coco": make_tiny_checkpoint(root / "t5", "blip2-flan-t5", coco=True)}


@pytest.fixture(scope="module")
def service(folders):
    names = [str(path) for path in folders.values()]
    with_service = Service(names, LoadOptions(device="cpu", precision="float32"))
    yield with_service
    with_service.manager.close()


@pytest.fixture(scope="module")
def references(folders):
    """Each checkpoint loaded again, untouched, by transformers alone."""
    loaded = {}

    def get(key):
        if key not in loaded:
            folder = folders[key]
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            loaded[key] = (model, AutoProcessor.from_pretrained(folder))
        return loaded[key]

    return get


def reference_ids(model, processor, text: str, decoding: dict, beams: int) -> list[int]:
    inputs = processor(images=image(), text=text, return_tensors="pt")
    configured = model.language_model.generation_config.eos_token_id
    stops = [*(configured if isinstance(configured, list) else [configured]), processor.tokenizer.eos_token_id]
    kwargs = {"max_new_tokens": decoding["max_new_tokens"], "min_new_tokens": decoding["min_new_tokens"],
              "num_beams": beams, "do_sample": False, "eos_token_id": stops}
    if beams > 1:
        kwargs["length_penalty"] = decoding["length_penalty"]
    decoder_only = model.config.use_decoder_only_language_model
    if "penalty" in decoding:
        if decoder_only:  # the prompt is not penalised (LAVIS passes embeddings only)
            kwargs["logits_processor"] = LogitsProcessorList(
                [Penalty(decoding["penalty"], prompt_ignore_length=inputs["input_ids"].shape[1])])
        else:
            kwargs["repetition_penalty"] = decoding["penalty"]
    with torch.inference_mode():
        output = model.generate(**inputs, **kwargs)[0].tolist()
    return output[inputs["input_ids"].shape[1]:] if decoder_only else output[1:]


def ours(service, folder, case: str, beams: int) -> list[int]:
    preset = "standard" if beams > 1 else "fast"
    model = str(folder)
    if case in ("caption",):
        reply = service.caption(model, image(), preset=preset)
    elif case == "answer":
        reply = service.answer(model, image(), QUESTION, preset=preset)
    elif case == "short answer":
        reply = service.answer(model, image(), QUESTION, preset=preset, short=True)
    elif case == "chat turn 1":
        reply = service.chat(model, image(), [], NEWEST, preset=preset)
    else:
        reply = service.chat(model, image(), [Turn(q, a) for q, a in HISTORY], NEWEST, preset=preset)
    return list(reply.token_ids)


@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_same_tokens_as_transformers_on_the_published_layout(service, references, folders, family, case, beams):
    model, processor = references(family)
    spec = CASES[case]
    text = spec.prompt["instructblip" if family.startswith("instructblip") else "blip2"]
    expected = reference_ids(model, processor, text, spec.decoding[family], beams)
    assert ours(service, folders[family], case, beams) == expected


@pytest.mark.parametrize("beams", [1, 5], ids=["greedy", "beam"])
@pytest.mark.parametrize("family", ["blip2-opt-coco", "blip2-flan-t5-coco"])
def test_coco_caption_from_a_local_folder(service, references, folders, family, beams):
    model, processor = references(family)
    expected = reference_ids(model, processor, "a photo of", COCO_CAPTION, beams)
    reply = service.caption(str(folders[family]), image(), preset="standard" if beams > 1 else "fast")
    assert reply.prompt == "a photo of"
    assert list(reply.token_ids) == expected
