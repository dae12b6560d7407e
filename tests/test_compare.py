"""Side by side on tiny checkpoints: models in turn within a memory budget, trust scores, failures per column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from blip_app.core.catalog import resolve_model
from blip_app.core.devices import LoadOptions
from blip_app.errors import BadImageError, BadInputError, SettingsError, UnknownModelError
from blip_app.models.loading import Loader, load_model
from blip_app.models.manager import GB, ModelManager
from blip_app.models.retrieval import confidence_label, trust_score, trust_text
from blip_app.tasks.compare import compare, iter_compare
from blip_app.tasks.service import Service

RED = Image.new("RGB", (40, 30), "red")
FP32 = LoadOptions(precision="float32")


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory):
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    return str(make_tiny_retrieval_checkpoint(tmp_path_factory.mktemp("retrieval") / "itm"))


@pytest.fixture(scope="module")
def generative(tiny_checkpoints):
    return [str(tiny_checkpoints[f]) for f in ("blip2-opt", "blip2-flan-t5", "instructblip-vicuna")]


def make_service(models, budget_gb=None):
    manager = ModelManager(models, FP32, loader=Loader(), memory_budget_gb=budget_gb)
    return Service(models, FP32, manager=manager)


def largest_footprint(paths) -> int:
    return max(load_model(resolve_model(p), FP32).model.get_memory_footprint() for p in paths)


def test_three_models_answer_in_turn_within_a_budget_for_one(generative, tiny_retrieval):
    models = [*generative, tiny_retrieval]
    service = make_service(models, budget_gb=1.2 * largest_footprint(models) / GB)
    results = compare(service, generative, RED, "caption", preset="fast", overrides={"max_new_tokens": 6},
                      trust=tiny_retrieval)
    assert [r.model for r in results] == generative
    for result in results:
        assert result.done and result.error is None and isinstance(result.text, str)
        assert 0 < result.seconds <= result.total_seconds
        if result.text:
            assert 0.0 <= result.trust <= 1.0 and result.trust_label == confidence_label(result.trust)
            again = trust_score(service, tiny_retrieval, RED, result.text)
            assert result.trust == pytest.approx(again.score, abs=1e-6)
    assert service.manager.loaded_names() == [tiny_retrieval]  # each model pushed out the one before
    alone = service.caption(generative[1], RED, preset="fast", overrides={"max_new_tokens": 6})
    assert results[1].text == alone.text


def test_columns_arrive_one_model_at_a_time(generative):
    service = make_service(generative[:2])
    steps = list(iter_compare(service, generative[:2], RED, "answer", "what colour is it?", preset="fast"))
    assert [[r.done for r in step] for step in steps] == [[True, False], [True, True]]
    assert steps[-1][0].text == steps[0][0].text and all(r.trust is None for r in steps[-1])
    assert json.dumps([r.as_dict() for r in steps[-1]])


def test_answer_trust_scores_question_and_answer(generative, tiny_retrieval):
    service = make_service([generative[0], tiny_retrieval])
    question = "what colour is it?"
    [result] = compare(service, [generative[0]], RED, "answer", question, preset="fast", trust=tiny_retrieval)
    expected = trust_score(service, tiny_retrieval, RED, trust_text("answer", question, result.text))
    assert result.trust == pytest.approx(expected.score, abs=1e-6)


def test_a_failing_model_leaves_the_others_standing(generative, tiny_retrieval, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(generative[0]) / "config.json").read_text())  # no weights
    models = [generative[0], str(broken), tiny_retrieval]
    service = make_service(models)
    results = compare(service, models, RED, "caption", preset="fast", trust=tiny_retrieval)
    assert results[0].error is None and results[0].text is not None
    assert results[1].text is None and results[1].error.startswith("Could not load")
    assert results[2].text is None and "image-text matching model; it cannot caption" in results[2].error
    assert results[1].trust is None and results[2].trust is None


def test_requests_are_checked_before_any_model_loads(generative, tiny_retrieval):
    service = make_service([*generative, tiny_retrieval])
    cases = [
        (dict(models=[*generative, tiny_retrieval], task="caption"), BadInputError, "at most 3"),
        (dict(models=[generative[0], generative[0]], task="caption"), BadInputError, "chosen twice"),
        (dict(models=[None, ""], task="caption"), BadInputError, "at least one model"),
        (dict(models=["nonsense"], task="caption"), UnknownModelError, "not offered"),
        (dict(models=generative[:1], task="answer", question=" "), BadInputError, "question is empty"),
        (dict(models=generative[:1], task="chat", question="hi"), BadInputError, "not a conversation"),
        (dict(models=generative[:1], task="caption", overrides={"top_p": 3}), SettingsError, "top_p"),
        (dict(models=generative[:1], task="caption", trust="other"), UnknownModelError, "not offered"),
        (dict(models=generative[:1], task="caption", image=None), BadImageError, "No image"),
    ]
    for kwargs, error, message in cases:
        kwargs.setdefault("image", RED)
        with pytest.raises(error, match=message):
            compare(service, **kwargs)
    assert service.manager.loaded_names() == []
