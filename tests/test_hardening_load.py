"""Many users at once against the running app on loopback (gradio_client, threads, tiny checkpoints).

Every test is bounded in time: ``BLIP_APP_LOAD_SECONDS`` (default 20) is how long the looping tests
keep their clients busy; each test stays well under two minutes on a slow two-core machine.
What is checked: no unexpected error, a fair share for every client, identical greedy requests give
identical outputs, no conversation leaks into another, a full queue refuses quickly with a "try
again" sentence, a cancelled or abandoned request stops generating and frees the device, jobs never
overlap on the device, and switching models under load serves each request by the model it asked for
with no model left behind in memory.
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import weakref
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from _server import running_app, wait_until
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from blip_app.models.engine import DEVICE_LOCKS, LoadedModel

LOAD_SECONDS = float(os.environ.get("BLIP_APP_LOAD_SECONDS", "20"))
CLIENTS = 8


def picture(folder: Path, seed: int) -> dict:
    path = folder / f"noise-{seed}.png"
    if not path.exists():
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return handle_file(str(path))


@pytest.fixture(scope="module")
def models(tiny_checkpoints: dict[str, Path]) -> list[str]:
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


class DeviceLog:
    """Records when each batch runs on the device (LoadedModel._run, which runs under the device lock)
    and counts the language model's forward passes per generating thread."""

    def __init__(self, monkeypatch) -> None:
        self.runs: list[tuple[float, float, str]] = []
        self.steps: Counter[int] = Counter()
        self._lock = threading.Lock()
        run = LoadedModel._run
        log = self

        def recorded(self, jobs, settings, on_text=None):
            started = time.monotonic()
            try:
                return run(self, jobs, settings, on_text)
            finally:
                with log._lock:
                    log.runs.append((started, time.monotonic(), self.name))

        monkeypatch.setattr(LoadedModel, "_run", recorded)

    def count_steps(self, model, delay: float = 0.0) -> None:
        """Count (and optionally slow down) the forward passes of ``model``'s language model."""
        def pre_hook(module, args, kwargs):
            with self._lock:
                self.steps[threading.get_ident()] += 1
            if delay:
                time.sleep(delay)

        model.model.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())

    def assert_no_overlap(self) -> None:
        runs = sorted(self.runs)
        for (_, end, _), (start, _, _) in zip(runs, runs[1:]):
            assert start >= end, "two jobs ran on the device at the same time"


def device_is_free() -> bool:
    return not DEVICE_LOCKS.get("cpu").locked()


def named_threads() -> Counter[str]:
    """Threads other than the worker pools (anyio's, gradio_client's), which keep idle workers, and the
    gradio_client heartbeat threads of this process's clients (they end at their next beat)."""
    return Counter(t.name for t in threading.enumerate()
                   if not t.name.startswith(("AnyIO worker", "ThreadPoolExecutor"))
                   and not t.name.endswith("(_stream_heartbeat)"))


# ------------------------------------------------------------------------------------------------
# 8 clients looping caption, VQA and chat


def test_eight_clients_looping_get_fair_correct_and_separate_answers(models: list[str], tmp_path: Path,
                                                                     monkeypatch) -> None:
    shared = picture(tmp_path, 0)
    with running_app(models) as app:
        device = DeviceLog(monkeypatch)
        reference = Client(app.url, verbose=False, download_files=False)
        expected = {model: reference.predict(shared, model, "fast", max_new_tokens=8, api_name="/caption")
                    for model in models}
        before = named_threads()
        stop_at = time.monotonic() + LOAD_SECONDS
        served: Counter[int] = Counter()
        errors: list[str] = []
        shared_captions: list[tuple[str, str]] = []
        chats: dict[int, list[tuple[str, dict, list[list[str]], str, str]]] = defaultdict(list)

        def user(index: int) -> None:
            client = Client(app.url, verbose=False, download_files=False)
            own = picture(tmp_path, 100 + index)
            model = models[index % 2]
            history: list[list[str]] = []
            turn = 0
            try:
                while time.monotonic() < stop_at:
                    try:
                        kind = turn % 3
                        if kind == 0:
                            text = client.predict(shared, model, "fast", max_new_tokens=8, api_name="/caption")
                            shared_captions.append((model, text))
                        elif kind == 1:
                            client.predict(own, f"What is in picture {index}?", model, "fast", max_new_tokens=6,
                                           api_name="/answer")
                        else:
                            message = f"Client {index} asks question {turn}?"
                            answer = client.predict(own, history, message, model, "fast", max_new_tokens=6,
                                                    api_name="/chat")
                            chats[index].append((model, own, [list(t) for t in history], message, answer))
                            history = history + [[message, answer]] if len(history) < 4 else []
                        served[index] += 1
                    except Exception as exc:  # noqa: BLE001 - every failure is a finding
                        errors.append(f"client {index}: {type(exc).__name__}: {exc}")
                    turn += 1
            finally:
                client.close()

        workers = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(CLIENTS)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=LOAD_SECONDS + 60)
        assert not any(worker.is_alive() for worker in workers), "a client never finished"

        assert errors == []
        counts = [served[i] for i in range(CLIENTS)]
        mean = sum(counts) / CLIENTS
        assert min(counts) >= max(3, 0.3 * mean), f"unfair shares: {counts}"
        # identical greedy requests, batched or not, give identical outputs
        assert shared_captions and all(text == expected[model] for model, text in shared_captions)
        # no conversation leaks: a sequential replay of every chat turn gives the same answer
        replay = [turn for turns in chats.values() for turn in turns[:6]]
        assert len(replay) >= CLIENTS
        for model, own, history, message, answer in replay:
            assert reference.predict(own, history, message, model, "fast", max_new_tokens=6,
                                     api_name="/chat") == answer, f"{message!r} was answered differently"
        device.assert_no_overlap()
        # nothing left behind
        assert device_is_free()
        assert all(count == 0 for count in app.service.manager._users.values())
        # threads: no generation thread is left, and the worker pool stays bounded by the load it served
        # (anyio keeps idle workers until its next call prunes them)
        assert wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith("generate-")], 10)
        assert named_threads() == before, (before, named_threads())
        pools = [t.name for t in threading.enumerate() if t.name.startswith(("AnyIO worker", "ThreadPoolExecutor"))]
        assert len(pools) <= 3 * CLIENTS, pools
        reference.close()
        print(f"\n8 clients for {LOAD_SECONDS:.0f} s: served {counts} (total {sum(counts)}), "
              f"{len(device.runs)} device runs")


# ------------------------------------------------------------------------------------------------
# A burst beyond the queue


def test_a_burst_beyond_the_queue_is_refused_quickly_and_the_accepted_finish(models: list[str],
                                                                           tmp_path: Path) -> None:
    import httpx

    from blip_app.web.server import BUSY_MESSAGE

    image = picture(tmp_path, 1)
    with running_app(models[:1], "--queue-size", "2") as app:
        client = Client(app.url, verbose=False, download_files=False)
        client.predict(image, models[0], "fast", max_new_tokens=4, api_name="/caption")  # loaded, warm
        lock = DEVICE_LOCKS.get("cpu")
        lock.acquire()  # the device is busy: requests pile up in the queue
        try:
            submitted = time.monotonic()
            jobs = [client.submit(image, models[0], "fast", max_new_tokens=4, api_name="/caption") for _ in range(16)]
            refused, pending = [], []
            wait_until(lambda: sum(job.done() for job in jobs) >= 8, timeout=10)
            time.sleep(1.0)  # let any other refusal arrive
            for job in jobs:
                if not job.done():
                    pending.append(job)
                    continue
                exc = job.exception()
                assert exc is not None, "a request finished while the device was held"
                refused.append(exc)
            refused_within = time.monotonic() - submitted
            # a raw HTTP client gets a sentence too
            response = httpx.post(f"{app.url}gradio_api/call/caption",
                                  json={"data": [image, models[0], "fast"]}, timeout=10)
            assert response.status_code == 503 and response.json() == {"detail": BUSY_MESSAGE}
        finally:
            lock.release()
        assert len(refused) >= 8 and 2 <= len(pending) <= 8, (len(refused), len(pending))
        assert refused_within < 12  # typically well under a second after submission
        for exc in refused:
            assert "try again" in str(exc).lower(), exc
            assert type(exc).__name__ == "QueueError"
        for job in pending:  # the accepted ones finish once the device is free
            assert isinstance(job.result(timeout=60), str)
        assert device_is_free()
        assert isinstance(client.predict(image, models[0], "fast", max_new_tokens=4, api_name="/caption"), str)
        client.close()


# ------------------------------------------------------------------------------------------------
# Cancel and disconnect mid-generation


def test_a_cancelled_api_request_stops_generating_and_frees_the_device(models: list[str], tmp_path: Path,
                                                                      monkeypatch) -> None:
    image = picture(tmp_path, 2)
    with running_app(models[:1]) as app:
        client = Client(app.url, verbose=False, download_files=False)
        client.predict(image, [], "Hi", models[0], "fast", max_new_tokens=2, api_name="/chat")
        device = DeviceLog(monkeypatch)
        device.count_steps(app.service.manager.get(models[0]), delay=0.05)
        long = {"max_new_tokens": 200, "min_new_tokens": 200}
        job = client.submit(image, [], "Tell me everything.", models[0], "fast", **long, api_name="/chat")
        assert wait_until(lambda: device.total_steps >= 5, timeout=30)
        # and a second request, waiting for the device behind the first, is cancelled too
        waiting = client.submit(image, "Waiting?", models[0], "fast", max_new_tokens=200, min_new_tokens=200,
                                api_name="/answer")
        time.sleep(0.3)
        job.cancel()
        waiting.cancel()
        assert wait_until(device_is_free, timeout=5), "the device lock was not released"
        stopped_at = device.total_steps
        time.sleep(1.0)
        assert device.total_steps <= stopped_at + 1, "generation went on after the cancel"
        assert stopped_at < 150  # far from the 200 (+1) steps of a full answer
        # the next job runs, alone on the device
        assert isinstance(client.predict(image, "Next?", models[0], "fast", max_new_tokens=4, api_name="/answer"),
                          str)
        device.assert_no_overlap()
        assert all(count == 0 for count in app.service.manager._users.values())
        client.close()


def test_a_client_that_closes_its_event_stream_stops_its_generation(models: list[str], tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A raw HTTP client (POST /call/chat, then GET the event stream) goes away mid-generation.

    gradio notices a closed stream when its next message is due (it waits up to 10 s for one), marks
    the event dead, and the app's watcher stops the generation.
    """
    import httpx

    image_path = tmp_path / "cat.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(image_path)
    with running_app(models[:1]) as app:
        client = Client(app.url, verbose=False, download_files=False)
        client.predict(handle_file(str(image_path)), [], "Hi", models[0], "fast", max_new_tokens=2, api_name="/chat")
        device = DeviceLog(monkeypatch)
        device.count_steps(app.service.manager.get(models[0]), delay=0.1)  # 200 steps: 20 s or more
        with httpx.Client(base_url=app.url, timeout=30) as http:
            with image_path.open("rb") as handle:
                uploaded = http.post("/gradio_api/upload", files={"files": ("cat.png", handle, "image/png")}).json()[0]
            file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
            data = [file, [], "Tell me everything.", models[0], "fast", 200, 200, None, None, None, None, None, None]
            event_id = http.post("/gradio_api/call/chat", json={"data": data}).json()["event_id"]
        host, port = app.url.split("//")[1].rstrip("/").split(":")
        stream = socket.create_connection((host, int(port)), timeout=30)
        stream.sendall(f"GET /gradio_api/call/chat/{event_id} HTTP/1.1\r\nHost: {host}\r\n"
                       "Accept: text/event-stream\r\n\r\n".encode())
        assert wait_until(lambda: device.total_steps >= 5, timeout=30)
        stream.shutdown(socket.SHUT_RDWR)  # the client goes away
        stream.close()
        closed_at = time.monotonic()
        assert wait_until(device_is_free, timeout=15), "generation went on after the client left"
        stopped_after = time.monotonic() - closed_at
        steps = device.total_steps
        time.sleep(0.5)
        assert device.total_steps <= steps + 1 and steps < 190
        assert stopped_after < 14
        print(f"\nclient gone: generation stopped {stopped_after:.1f} s later, after {steps} of 200 steps")
        assert isinstance(client.predict(handle_file(str(image_path)), "Next?", models[0], "fast", max_new_tokens=3,
                                         api_name="/answer"), str)
        device.assert_no_overlap()
        client.close()


# ------------------------------------------------------------------------------------------------
# Switching models under load


def test_model_switches_under_load_serve_each_request_by_its_model_and_free_the_other(
        models: list[str], tmp_path: Path, monkeypatch) -> None:
    import psutil

    def tagged(reply_fn):
        def reply(self, job, settings):
            from dataclasses import replace

            result = reply_fn(self, job, settings)
            return replace(result, text=f"[{self.name}] {result.text}")

        return reply

    monkeypatch.setattr(LoadedModel, "_reply", tagged(LoadedModel._reply))
    weights: list[weakref.ref] = []
    init = LoadedModel.__init__

    def tracked(self, name, model, *args, **kwargs):
        weights.append(weakref.ref(model))
        init(self, name, model, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "__init__", tracked)

    # A budget that holds the larger tiny model, never both.
    sizes = [sum(p.stat().st_size for p in Path(m).glob("*.safetensors")) for m in models]
    # A model takes about half its float32 file (bfloat16), and so does the manager's estimate.
    budget_gb = (max(sizes) / 2 + min(sizes) / 4) / 1024**3
    image = picture(tmp_path, 3)
    with running_app(models, "--memory-budget-gb", f"{budget_gb:.9f}") as app:
        manager = app.service.manager
        client = Client(app.url, verbose=False, download_files=False)
        for model in models:  # both load, one after the other: the first is evicted for the second
            assert client.predict(image, "Hi?", model, "fast", max_new_tokens=3, api_name="/answer").startswith(
                f"[{model}]")
        assert manager.loaded_names() == [models[1]]
        gc.collect()
        rss_start = psutil.Process().memory_info().rss
        stop_at = time.monotonic() + LOAD_SECONDS / 2
        wrong, errors, served = [], [], Counter()

        def user(index: int) -> None:
            own = Client(app.url, verbose=False, download_files=False)
            turn = index
            try:
                while time.monotonic() < stop_at:
                    model = models[turn % 2]
                    turn += 1
                    try:
                        text = own.predict(image, f"Which model, {turn}?", model, "fast", max_new_tokens=3,
                                           api_name="/answer")
                    except AppError as exc:
                        errors.append(str(exc))
                        continue
                    served[model] += 1
                    if not text.startswith(f"[{model}]"):
                        wrong.append((model, text))
            finally:
                own.close()

        workers = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=LOAD_SECONDS + 60)
        assert wrong == []
        # a request may have to wait for the other model's users; it never gets the wrong model
        assert all("try again" in error for error in errors), errors
        assert served[models[0]] >= 3 and served[models[1]] >= 3, served
        assert len(manager.loaded_names()) == 1 and not manager._parked  # the budget holds one model
        assert all(count == 0 for count in manager._users.values())
        switches = len(weights)
        gc.collect()
        alive = [ref for ref in weights if ref() is not None]
        # every model the manager let go of is gone from memory: only the one it holds is alive
        assert len(alive) == 1, f"{len(alive)} models alive after {switches} loads"
        rss_end = psutil.Process().memory_info().rss
        assert rss_end - rss_start < 200 * 2**20, (rss_start, rss_end)
        print(f"\nswitching: {dict(served)} served, {switches} loads, {len(errors)} busy, "
              f"RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MB")
        client.close()
