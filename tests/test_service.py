"""The Service's own rules on tiny checkpoints: how a request is fitted into a model's context."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_app.core.images import load_image
from blip_app.core.settings import Task
from blip_app.errors import PromptTooLongError
from blip_app.tasks.service import Service

EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.jpg"
REQUESTS = [(Task.CAPTION, {}), (Task.ANSWER, {"question": "What is it?"}),
            (Task.CHAT, {"question": "And the colour?", "history": [["What is it?", "a cat"]] * 3})]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Service, str]:
    """A BLIP-2 OPT whose context (40 positions) cannot hold the Detailed preset's 256 new tokens."""
    from blip_app.devtools.tiny import make_tiny_checkpoint

    folder = str(make_tiny_checkpoint(tmp_path_factory.mktemp("small") / "opt", "blip2-opt", max_positions=40))
    service = Service([folder])
    yield service, folder
    service.manager.close()


@pytest.mark.parametrize(("task", "inputs"), REQUESTS, ids=[t.value for t, _ in REQUESTS])
def test_the_detailed_preset_is_clamped_to_what_the_context_leaves(small, task: Task, inputs: dict) -> None:
    service, model = small
    request = service.request(task, preset="detailed", **inputs)
    prepared = service.inspect(model, request)
    room = 40 - 4  # positions minus image tokens
    left = room - service.inspect(model, service.request(task, preset="fast", question=inputs.get("question", ""))
                                  ).prompt_tokens
    assert prepared.prompt.notes == (f"Max new tokens lowered from 256 to {left}: that is what this model's context "
                                     "of 40 tokens leaves after the image and the prompt.",)
    reply = service.run(model, load_image(EXAMPLE), request)
    assert reply.settings.max_new_tokens == left and 1 <= reply.new_tokens <= left
    assert reply.settings.min_new_tokens <= left


def test_a_request_that_fits_gets_no_note(small) -> None:
    service, model = small
    assert service.inspect(model, service.request(Task.CAPTION, preset="fast", overrides={"max_new_tokens": 5})
                           ).prompt.notes == ()


def test_a_prompt_too_long_for_any_answer_is_named_without_zero_tokens(small) -> None:
    service, model = small
    request = service.request(Task.ANSWER, question="word " * 60, preset="fast")
    with pytest.raises(PromptTooLongError) as raised:
        service.run(model, load_image(EXAMPLE), request)
    message = str(raised.value)
    assert message == ("The question is too long for this model: beside the image (4 tokens), its context of 40 "
                       "tokens holds at most 35 tokens of text and a one-token answer. Please shorten it.")


def test_the_model_libraries_are_imported_in_the_background() -> None:
    """The first request used to pay for importing torch, transformers and the BLIP-2 classes (item 7)."""
    code = ("import sys, time; from blip_app.tasks.service import import_models_in_background as start; "
            "heavy = ('torch', 'transformers.models.blip_2.modeling_blip_2', "
            "'transformers.models.instructblip.modeling_instructblip', 'blip_app.models.engine'); "
            "before = [m for m in heavy if m in sys.modules]; thread = start(); returned = time.monotonic(); "
            "thread.join(120); print(before, thread.daemon, [m for m in heavy if m not in sys.modules])")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "[] True []"
