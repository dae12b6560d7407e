"""What the published checkpoints need beyond transformers' defaults (issue 10), point by point.

The comparison with transformers' own generate() on whole requests is tests/test_reference.py; these
tests pin each rule on its own, on tiny checkpoints shaped like the published ones (blip_app.devtools.tiny).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip_app.core.catalog import Family, LanguageModel, PromptStyle, resolve
from blip_app.core.devices import LoadOptions
from blip_app.core.prompts import Turn
from blip_app.core.settings import GenerationSettings, ModelTraits, Task, task_defaults
from blip_app.devtools.tiny import FAMILIES, make_tiny_checkpoint, newline_id
from blip_app.errors import BadInputError
from blip_app.models import manager as manager_module
from blip_app.models.engine import LoadedModel, _Job, clean_output
from blip_app.tasks.service import Service

GREEDY = GenerationSettings(max_new_tokens=12, num_beams=1)


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {family: LoadedModel.load(resolve(str(path)), LoadOptions(precision="float32"))
            for family, path in tiny_checkpoints.items()}


def fresh(tiny_checkpoints, family, **options) -> LoadedModel:
    return LoadedModel.load(resolve(str(tiny_checkpoints[family])), LoadOptions(precision="float32", **options))


# ---------------------------------------------------------------------------------- 1. stop tokens


def test_stop_tokens_are_the_models_own_and_the_tokenizers_eos(models):
    opt = models["blip2-opt"]
    assert opt.stop_ids == sorted({newline_id(opt.tokenizer), opt.tokenizer.eos_token_id})  # "\n" and </s>
    assert models["instructblip-vicuna"].stop_ids == [1, 2]  # decapoda's eos 1, the tokenizer's </s>
    assert models["blip2-flan-t5"].stop_ids == [1]
    for loaded in models.values():
        assert not set(loaded.stop_ids) & set(loaded.suppressed_ids)


def test_opt_stops_on_newline_and_never_answers_empty(tiny_checkpoints):
    loaded = fresh(tiny_checkpoints, "blip2-opt")
    newline = newline_id(loaded.tokenizer)
    head = loaded.model.language_model.get_output_embeddings().weight
    with torch.no_grad():  # make "\n" the likeliest token everywhere, as after a finished answer
        head[newline].mul_(40.0)
    for seed in (1, 2, 3):
        reply = loaded.generate(noise(seed), loaded.prepare(Task.CAPTION), GREEDY)
        assert reply.token_ids[-1] == newline and 2 <= reply.new_tokens < GREEDY.max_new_tokens
        assert reply.token_ids[0] != newline  # at least one token before a stop (LAVIS: min length 1)
    zero = replace(GREEDY, min_new_tokens=0)  # even when asked for none
    assert loaded.generate(noise(1), loaded.prepare(Task.CAPTION), zero).new_tokens >= 2


# -------------------------------------------------------------------- 2. the Q-Former reads the text


def qformer_texts(loaded: LoadedModel, prepared) -> list[str]:
    seen = []

    def grab(module, args, kwargs):
        seen.append(loaded.processor.qformer_tokenizer.decode(kwargs["input_ids"][0], skip_special_tokens=True))

    hook = loaded.model.qformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        loaded.features.clear()
        loaded.generate(noise(5), prepared, replace(GREEDY, max_new_tokens=2))
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("family", ["instructblip-flan-t5", "instructblip-vicuna"])
def test_instructblip_qformer_reads_the_language_models_text(models, family):
    loaded = models[family]
    short = loaded.prepare(Task.ANSWER, question="what is it?", short=True)
    assert short.qformer_text == short.prompt.text == "Question: what is it? Short answer:"
    assert qformer_texts(loaded, short) == ["question : what is it? short answer :"]
    history = [Turn(f"is it number {i}?", "no") for i in range(12)]
    chat = loaded.prepare(Task.CHAT, question="what colour is the car?", history=history)
    assert chat.qformer_text == chat.prompt.text
    (read,) = qformer_texts(loaded, chat)  # cut from the left: the newest question stays whole
    assert read.endswith("question : what colour is the car? answer :")
    assert not read.startswith("question : is it number 0")
    ids = loaded.processor.qformer_tokenizer(read).input_ids
    assert len(ids) <= min(128, loaded.spec.qformer_tokens)


# ---------------------------------------------------------------------------- 3. decoding defaults


def test_decoding_defaults_per_family_and_task():
    instruct = ModelTraits(Family.INSTRUCTBLIP, LanguageModel.VICUNA)
    free = task_defaults(Task.ANSWER, instruct)
    assert (free.num_beams, free.max_new_tokens, free.min_new_tokens, free.repetition_penalty,
            free.length_penalty) == (5, 256, 1, 1.5, 1.0)
    assert task_defaults(Task.CHAT, instruct) == free
    short = task_defaults(Task.ANSWER, instruct, short=True)
    assert (short.max_new_tokens, short.length_penalty) == (10, -1.0)
    caption = task_defaults(Task.CAPTION, instruct)
    assert (caption.min_new_tokens, caption.max_new_tokens) == (10, 80)
    opt, t5 = ModelTraits(), ModelTraits(Family.BLIP2, LanguageModel.FLAN_T5)
    assert (task_defaults(Task.CAPTION, opt).num_beams, task_defaults(Task.CAPTION, opt).max_new_tokens) == (5, 30)
    assert task_defaults(Task.CAPTION, replace(opt, coco=True)).min_new_tokens == 8
    assert task_defaults(Task.ANSWER, opt).length_penalty == 0.0
    assert task_defaults(Task.ANSWER, t5).length_penalty == -1.0
    assert task_defaults(Task.CHAT, t5).max_new_tokens == 30


def test_the_service_uses_the_models_defaults(tiny_checkpoints):
    vicuna = str(tiny_checkpoints["instructblip-vicuna"])
    service = Service([vicuna], LoadOptions(precision="float32"))
    try:
        free = service.answer(vicuna, noise(1), "what is it?", preset="fast")
        assert (free.settings.max_new_tokens, free.settings.repetition_penalty) == (256, 1.5)
        short = service.answer(vicuna, noise(1), "what is it?", preset="fast", short=True)
        assert (short.settings.max_new_tokens, short.settings.length_penalty) == (10, -1.0)
    finally:
        service.manager.close()


# ------------------------------------------------------------- 4. penalty on generated tokens only


def test_repetition_penalty_spares_the_prompt(tiny_checkpoints):
    loaded = fresh(tiny_checkpoints, "blip2-opt")
    prepared = loaded.prepare(Task.ANSWER, question="a cat a cat a cat a cat?")
    prompt_ids = set(prepared.input_ids)
    seen = []
    original = loaded.model.language_model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return original(**kwargs)

    loaded.model.language_model.generate = spy
    loaded.generate(noise(1), prepared, replace(GREEDY, repetition_penalty=1.5))
    (kwargs,) = seen
    assert "repetition_penalty" not in kwargs  # transformers' own penalty would cover the prompt
    (penalty,) = kwargs["logits_processor"]
    assert penalty.penalty == 1.5 and penalty.prompt_ignore_length == len(prepared.input_ids)
    scores = torch.zeros(1, 600) + 1.0
    ids = torch.tensor([list(prepared.input_ids) + [300]])
    out = penalty(ids, scores.clone())
    assert out[0, 300] < 1.0 and all(out[0, i] == 1.0 for i in prompt_ids if i != 300)


# --------------------------------------------------------------------- 5. user text is plain text


TYPED = ["<image>", "</s>", "<pad>", "[PAD]", "<unk>", "<s>", "[SEP]", "[CLS]", "<extra_id_0>", "[DEC]"]


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_typed_by_a_user_are_plain_text(models, family):
    loaded = models[family]
    question = "What is " + " ".join(TYPED) + " this?"
    prepared = loaded.prepare(Task.ANSWER, question=question)
    special = set(loaded.tokenizer.all_special_ids) | {loaded.image_token_id}
    prompt = prepared.input_ids[prepared.image_tokens:]
    assert prepared.input_ids.count(loaded.image_token_id) == loaded.spec.num_query_tokens
    bos = [loaded.tokenizer.bos_token_id] if prompt[0] == loaded.tokenizer.bos_token_id else []
    body = prompt[len(bos):]
    if not loaded.spec.decoder_only:  # T5 appends </s>
        body = body[:-1]
    assert not set(body) & special
    reply = loaded.generate(noise(1), prepared, replace(GREEDY, max_new_tokens=3))
    assert reply.new_tokens >= 1
    if family.startswith("instructblip"):
        texts = qformer_texts(loaded, prepared)
        qformer = loaded.processor.qformer_tokenizer
        ids = qformer(texts[0]).input_ids
        assert ids.count(qformer.sep_token_id) == 1 and ids.count(qformer.cls_token_id) == 1


def test_a_malformed_row_fails_alone_and_its_batch_neighbours_are_served(models):
    loaded = models["blip2-opt"]
    good = loaded.prepare(Task.CAPTION)
    bad = replace(good, input_ids=(loaded.image_token_id,) + good.input_ids)  # one image position too many
    jobs = [_Job(noise(1), good, "a", threading.Event(), None), _Job(noise(2), bad, "b", threading.Event(), None),
            _Job(noise(3), good, "c", threading.Event(), None)]
    loaded._run(jobs, GREEDY)
    assert isinstance(jobs[1].error, BadInputError) and "5 image positions" in str(jobs[1].error)
    assert jobs[0].error is None and jobs[2].error is None and jobs[0].new_ids and jobs[2].new_ids
    assert jobs[0].batch_size == 2


def test_command_line_question_with_an_image_token(tiny_checkpoints, tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "blip_app", "ask", str(photo), "What is <image> this?", "--model",
         str(tiny_checkpoints["blip2-opt"]), "--preset", "fast"],
        capture_output=True, text=True, timeout=120, cwd=root,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "unexpected failure" not in result.stderr


# ----------------------------------------------------------------------------- 6. output cleaning


GOLDEN = [
    ("a dog. Question: what is it? Answer: a cat", "a dog.", True),
    ("a dog Question: is it big? Answer: no", "a dog", True),
    ("yes.\nQuestion: why?", "yes.", True),
    ("it is red.\nQ: and the car?", "it is red.", True),
    ("it is red. Q: and the car?", "it is red.", True),
    ("Answer: red", "red", False),
    ("answer: red", "red", False),
    ("Short answer: two", "two", False),
    ("Answer: red. Question: and?", "red.", True),
    ("the answer to your question: it is red", "the answer to your question: it is red", False),
    ("my question: is it red?", "my question: is it red?", False),
    ("Question: what is it?", "Question: what is it?", False),  # no answer started: nothing to cut
    ("FAQ: none", "FAQ: none", False),
    ("a Q: tip", "a Q: tip", False),
    ("It said Answer: no.", "It said Answer: no.", False),
    ("two\x00 cats", "two cats", False),
    ("  a cat on a mat  ", "a cat on a mat", False),
    ("", "", False),
]


@pytest.mark.parametrize(("raw", "clean", "cut"), GOLDEN)
def test_output_cleaning_golden_table(raw, clean, cut):
    assert clean_output(raw) == (clean, cut)


# ----------------------------------------------------------------------------- 7. Q-Former precision


@pytest.mark.parametrize("family", FAMILIES)
def test_qformer_queries_and_projection_stay_float32_in_bfloat16(tiny_checkpoints, family):
    loaded = LoadedModel.load(resolve(str(tiny_checkpoints[family])), LoadOptions(precision="bfloat16"))
    model = loaded.model
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())
    assert all(p.dtype == torch.float32 for p in model.language_projection.parameters())
    assert model.query_tokens.dtype == torch.float32
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    features = loaded.image_features(noise(1), loaded.prepare(Task.CAPTION).qformer_text)
    assert features.dtype == torch.bfloat16
    assert loaded.generate(noise(1), loaded.prepare(Task.CAPTION), replace(GREEDY, max_new_tokens=3)).new_tokens
    inputs = loaded.processor(images=noise(1), text="a photo of", return_tensors="pt")
    with torch.inference_mode():  # transformers' own path still runs on the float32 modules
        model.generate(**inputs, max_new_tokens=2)


# ------------------------------------------------------------------------------ 8. caches, memory


def chat_once(loaded: LoadedModel) -> None:
    loaded.generate(noise(9), loaded.prepare(Task.CHAT, question="what is it?", history=[Turn("hi?", "a cat")]),
                    replace(GREEDY, max_new_tokens=3))


def test_caches_are_cleared_on_out_of_memory_and_counted_in_the_budget(tiny_checkpoints, monkeypatch):
    loaded = fresh(tiny_checkpoints, "blip2-opt")
    chat_once(loaded)
    assert len(loaded.prefix_cache) == 1 and loaded.cache_bytes > 0
    weights = loaded.model.get_memory_footprint()
    assert manager_module._footprint(loaded) == weights + loaded.cache_bytes
    monkeypatch.setattr(loaded, "_generate_ids", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(Exception, match="ran out of memory"):
        chat_once(loaded)
    assert len(loaded.prefix_cache) == 0 and len(loaded.features) == 0 and loaded.cache_bytes == 0


def test_caches_are_cleared_when_a_model_is_freed(tiny_checkpoints):
    loaded = fresh(tiny_checkpoints, "blip2-opt")
    chat_once(loaded)
    manager_module._free(loaded)
    assert len(loaded.prefix_cache) == 0 and len(loaded.features) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_past_the_tokenizer_are_never_generated(tiny_checkpoints, family):
    loaded = fresh(tiny_checkpoints, family)
    head = loaded.model.language_model.get_output_embeddings().weight
    size = len(loaded.tokenizer)
    with torch.no_grad():  # make the unused rows (and pad, <image>) the likeliest tokens
        for index in loaded.suppressed_ids:
            head[index] = head[:size].abs().max() * 50
    if family != "instructblip-vicuna":
        assert head.shape[0] > size  # the published OPT and T5 embeddings have such rows
    for settings in (GREEDY, replace(GREEDY, num_beams=3)):
        reply = loaded.generate(noise(3), loaded.prepare(Task.CAPTION), settings)
        assert reply.token_ids and all(t < size for t in reply.token_ids)
        assert not set(reply.token_ids) & set(loaded.suppressed_ids)


@pytest.mark.parametrize("family", ["blip2-opt", "blip2-flan-t5"])
def test_a_local_coco_checkpoint_is_recognised(tmp_path, family):
    folder = make_tiny_checkpoint(tmp_path / "coco", family, coco=True)
    loaded = LoadedModel.load(resolve(str(folder)))
    assert loaded.spec.prompt_style is PromptStyle.BLIP2_COCO and loaded.spec.traits.coco
    assert loaded.prepare(Task.CAPTION).prompt.text == "a photo of"
