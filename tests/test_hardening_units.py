"""The pieces behind the hardening fixes, tested on their own (no server).

- a request that is cancelled while it waits for the device leaves at once (engine);
- a cancel event set around a call reaches Service.run / Service.stream (service.cancelled_by);
- a huge chat history costs no more than the turns that could ever fit (service);
- ``--delete-uploads-after`` (config);
- the async wrapper of the API functions keeps what gr.api reads from them (ui).
"""

from __future__ import annotations

import inspect
import threading
import time
import typing
from pathlib import Path

import pytest
from PIL import Image

from blip_app.core.catalog import resolve
from blip_app.core.settings import GenerationSettings, Task
from blip_app.errors import BadInputError, CancelledError
from blip_app.models.engine import DEVICE_LOCKS, LoadedModel

RED = Image.new("RGB", (32, 32), (200, 30, 30))
GREEDY = GenerationSettings(max_new_tokens=4, num_beams=1)


@pytest.fixture(scope="module")
def opt(tiny_checkpoints: dict[str, Path]) -> LoadedModel:
    return LoadedModel.load(resolve(str(tiny_checkpoints["blip2-opt"])))


def _waiting(call) -> tuple[threading.Event, threading.Thread, list]:
    cancel = threading.Event()
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(call(cancel))
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return cancel, thread, outcome


@pytest.mark.parametrize("task", [Task.CHAT, Task.CAPTION])  # the single path and the batching path
def test_a_request_cancelled_while_waiting_for_the_device_leaves_at_once(opt: LoadedModel, task: Task) -> None:
    prepared = opt.prepare(task, question="hello?")
    lock = DEVICE_LOCKS.get("cpu")
    assert lock.acquire(timeout=10)
    try:
        cancel, thread, outcome = _waiting(lambda c: opt.generate(RED, prepared, GREEDY, cancel=c))
        time.sleep(0.3)
        assert thread.is_alive()  # waiting for the device
        cancel.set()
        thread.join(timeout=1.0)
        assert not thread.is_alive(), "a cancelled request kept waiting for the device"
        assert isinstance(outcome[0], CancelledError)
    finally:
        lock.release()
    assert not opt._batcher._pending  # nothing left queued
    assert isinstance(opt.generate(RED, prepared, GREEDY).text, str)


def test_a_lock_timeout_still_says_busy(opt: LoadedModel) -> None:
    from blip_app.errors import BusyError

    lock = DEVICE_LOCKS.get("cpu")
    assert lock.acquire(timeout=10)
    try:
        with pytest.raises(BusyError):
            opt.generate(RED, opt.prepare(Task.CHAT, question="hi?"), GREEDY, lock_timeout=0.2)
    finally:
        lock.release()


def test_a_cancel_event_set_around_a_call_reaches_the_service(tiny_checkpoints: dict[str, Path]) -> None:
    from blip_app.tasks.service import Service, cancelled_by

    model = str(tiny_checkpoints["blip2-opt"])
    service = Service([model])
    try:
        request = service.request(Task.CHAT, question="hello?", preset="fast")
        cancel = threading.Event()
        cancel.set()
        with cancelled_by(cancel), pytest.raises(CancelledError):
            service.run(model, RED, request)
        with cancelled_by(cancel), pytest.raises(CancelledError):
            list(service.stream(model, RED, request))
        assert isinstance(service.run(model, RED, request).text, str)  # outside the block: not cancelled
    finally:
        service.manager.close()


def test_a_huge_history_is_cut_to_the_turns_that_could_fit(tiny_checkpoints: dict[str, Path]) -> None:
    from blip_app.tasks.service import MAX_HISTORY_TURNS, Service

    service = Service([str(tiny_checkpoints["blip2-opt"])])
    started = time.monotonic()
    request = service.request(Task.CHAT, question="and?", history=[["q", "a"]] * 300_000 + [["last", "one"]])
    assert time.monotonic() - started < 2.0
    assert len(request.history) == MAX_HISTORY_TURNS and request.older_turns == 300_001 - MAX_HISTORY_TURNS
    assert request.history[-1].question == "last"
    assert service.request(Task.CHAT, question="and?", history=[["q", "a"]] * 3).older_turns == 0
    for bad in ("not a list", 5, {"q": "a"}):
        with pytest.raises(BadInputError, match="list of \\[question, answer\\] pairs"):
            service.request(Task.CHAT, question="and?", history=bad)


def test_delete_uploads_after_flag() -> None:
    from blip_app.config import parse_config

    assert parse_config([]).delete_uploads_after_s == 3600
    assert parse_config(["--delete-uploads-after", "60"]).delete_uploads_after_s == 60
    assert parse_config(["--delete-uploads-after", "0"]).delete_uploads_after_s == 0
    with pytest.raises(SystemExit):
        parse_config(["--delete-uploads-after", "-5"])


def test_the_api_wrapper_keeps_what_gr_api_reads() -> None:
    import gradio as gr

    from blip_app.web.api import _stops_when_abandoned

    def caption(image: dict, model: str = "m", max_new_tokens: int | None = None, request: gr.Request = None) -> str:
        """Doc."""
        return "x"

    wrapped = _stops_when_abandoned(caption)
    assert inspect.iscoroutinefunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(caption)
    hints = typing.get_type_hints(wrapped, localns={"gr": gr})
    assert hints == typing.get_type_hints(caption, localns={"gr": gr}) and hints["request"] is gr.Request
    assert wrapped.__name__ == "caption" and wrapped.__doc__ == "Doc."


def test_two_models_loading_at_once_stay_within_the_memory_budget(tiny_checkpoints: dict[str, Path]) -> None:
    """Found by scripts/soak.py: three tiny models under a budget for two ended up all loaded.

    While model C loads (slowly), model B is asked for: the manager used to check B against the models
    already loaded (A), not against A + C, so A, B and C all ended up in memory (on a GPU, an
    out-of-memory). Loads in flight now hold a reservation.
    """
    from blip_app.core.devices import LoadOptions
    from blip_app.models.loading import Loader
    from blip_app.models.manager import GB, ModelManager

    paths = [str(tiny_checkpoints[f]) for f in ("blip2-opt", "instructblip-flan-t5", "blip2-flan-t5")]
    sizes = [LoadedModel.load(resolve(p)).model.get_memory_footprint() for p in paths]
    budget = (sum(sizes) - min(sizes) / 2) / GB  # any two fit, never all three

    def slow_for_the_last(ref, options, **kwargs):
        if ref.name == paths[2]:
            time.sleep(1.0)
        return LoadedModel.load(ref, options, **kwargs)

    manager = ModelManager(paths, LoadOptions(), memory_budget_gb=budget, loader=Loader(load=slow_for_the_last))
    try:
        manager.get(paths[0])
        loading = threading.Thread(target=manager.get, args=(paths[2],))
        loading.start()
        time.sleep(0.3)
        manager.get(paths[1])
        loading.join()
        used = sum(m.model.get_memory_footprint() for m in manager._loaded.values())
        assert used <= budget * GB, f"{len(manager.loaded_names())} models, {used} bytes, budget {budget * GB:.0f}"
    finally:
        manager.close()


# ------------------------------------------------------------------------------------------------
# Loading while others load or generate (found by scripts/soak.py: "Tensor.item() cannot be called on meta
# tensors" in requests, and a model loaded with freshly initialised embeddings, while models switched)


def _run_together(*calls, seconds: float = 20.0) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(call) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds)
    assert not any(thread.is_alive() for thread in threads)
    return errors


def test_loading_models_while_others_load_and_generate_is_safe(tiny_checkpoints: dict[str, Path]) -> None:
    import torch
    from transformers import PreTrainedModel

    tie_weights = PreTrainedModel.tie_weights
    t5 = resolve(str(tiny_checkpoints["instructblip-flan-t5"]))
    reference = LoadedModel.load(t5)
    prepared = reference.prepare(Task.ANSWER, question="what is it?")
    expected = reference.generate(RED, prepared, GREEDY).token_ids
    busy = LoadedModel.load(resolve(str(tiny_checkpoints["blip2-flan-t5"])))
    busy_prepared = busy.prepare(Task.CHAT, question="and?")
    loaded: list[LoadedModel] = []
    stop = threading.Event()

    def generate_meanwhile() -> None:
        while not stop.is_set():
            busy.generate(RED, busy_prepared, GREEDY)

    def load_three() -> None:
        for _ in range(3):
            loaded.append(LoadedModel.load(t5))

    generating = threading.Thread(target=lambda: errors.extend(_run_together(generate_meanwhile)), daemon=True)
    errors: list[BaseException] = []
    generating.start()
    try:
        errors += _run_together(load_three, load_three, load_three)
    finally:
        stop.set()
        generating.join(timeout=20)
        corrupted = PreTrainedModel.tie_weights is not tie_weights or torch.get_default_dtype() != torch.float32
        PreTrainedModel.tie_weights = tie_weights  # never leave the process broken for the other tests
        torch.set_default_dtype(torch.float32)
    assert errors == []
    assert not corrupted
    for model in loaded:  # every copy loaded in the crowd is the same model as the one loaded alone
        assert model.generate(RED, prepared, GREEDY).token_ids == expected


def test_a_load_waiting_for_room_never_slips_in_as_another_finishes(tiny_checkpoints: dict[str, Path]) -> None:
    """Found by test_hardening_load's switching test (two tiny models, a budget for one, both in memory).

    B loads (slowly); A is asked for meanwhile and waits for room, since B's bytes are reserved. When B is
    done, its reservation ends and A is woken before B counts as loaded: A sees an empty manager and loads too.
    """
    from blip_app.core.devices import LoadOptions
    from blip_app.models.loading import Loader
    from blip_app.models.manager import GB, ModelManager

    paths = [str(tiny_checkpoints[f]) for f in ("blip2-opt", "instructblip-flan-t5")]
    sizes = [LoadedModel.load(resolve(p)).model.get_memory_footprint() for p in paths]
    budget = max(sizes) * 1.2 / GB  # one model at a time

    def slow_for_the_second(ref, options, **kwargs):
        if ref.name == paths[1]:
            time.sleep(1.0)
        return LoadedModel.load(ref, options, **kwargs)

    manager = ModelManager(paths, LoadOptions(), memory_budget_gb=budget, loader=Loader(load=slow_for_the_second))
    _widen_the_gap_after_a_notify(manager)
    try:
        loading = threading.Thread(target=manager.get, args=(paths[1],))
        loading.start()
        time.sleep(0.3)
        manager.get(paths[0])
        loading.join()
        used = sum(m.model.get_memory_footprint() for m in manager._loaded.values())
        assert used <= budget * GB, f"{len(manager.loaded_names())} models, {used} bytes, budget {budget * GB:.0f}"
    finally:
        manager.close()


def _widen_the_gap_after_a_notify(manager) -> None:
    """Make the thread that wakes the others pause before it takes the manager's lock again.

    Nothing changes but timing: a thread that just called ``notify_all`` sleeps 0.3 s before its next
    ``with manager._lock``, as a busy two-core machine may make it do; any state the manager leaves
    between two of its critical sections is then seen by the woken threads.
    """
    real_lock, real_condition = manager._lock, manager._released
    just_notified = threading.local()

    class Condition:
        def __getattr__(self, name):
            return getattr(real_condition, name)

        def notify_all(self) -> None:
            real_condition.notify_all()
            just_notified.flag = True

    class Lock:
        def __enter__(self):
            if getattr(just_notified, "flag", False):
                just_notified.flag = False
                time.sleep(0.3)
            return real_lock.__enter__()

        def __exit__(self, *exc):
            return real_lock.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(real_lock, name)

    manager._lock, manager._released = Lock(), Condition()
