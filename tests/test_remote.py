"""Remote models: a model that a second blip_app process serves on loopback, offered here as
``remote:<URL>#<id>`` and used through the Service like a local one.

The second process is the real app (``python app.py``) on tiny checkpoints, with a key. The same tiny
checkpoint loaded here directly gives the reference: the remote path must give the same text and the
same prompt.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from _server import free_port, running_app, wait_until

from blip_app.core.images import load_image
from blip_app.core.remote import parse_remote
from blip_app.core.settings import Task
from blip_app.errors import BadInputError, GenerationError, ModelLoadError, UnknownModelError
from blip_app.tasks.service import Service

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"
KEY = "remote-key-42"


@pytest.fixture(scope="module")
def folders(tiny_checkpoints: dict[str, Path]) -> list[str]:
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


@pytest.fixture(scope="module")
def server(folders: list[str]):
    """A second blip_app process serving /v1 on loopback, with a key and a cap of 40 new tokens."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BLIP_APP_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), *[a for f in folders for a in ("--model", f)], "--offline",
         "--trust-model", "none", "--port", str(port), "--rate-limit", "0", "--max-new-tokens-cap", "40"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"

    def up() -> bool:
        try:
            return httpx.get(url + "/models", headers={"authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(up, timeout=90, every=0.3), "the remote app did not start"
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture()
def keyed(monkeypatch) -> None:
    monkeypatch.setenv("BLIP_APP_REMOTE_API_KEY", KEY)


@pytest.fixture(scope="module")
def local(folders: list[str]) -> Service:
    """The same checkpoints loaded in this process: the reference."""
    service = Service(folders)
    yield service
    service.manager.close()


@pytest.fixture(scope="module")
def picture():
    return load_image(EXAMPLE)


def remote_name(url: str, folder: str) -> str:
    return f"remote:{url}#{folder}"


def test_the_name_syntax_is_checked_at_start_up() -> None:
    target = parse_remote("remote:http://10.0.0.7:7860/v1/#blip2-opt-2.7b")
    assert (target.base_url, target.model, target.label) == ("http://10.0.0.7:7860/v1", "blip2-opt-2.7b",
                                                            "blip2-opt-2.7b @ 10.0.0.7:7860")
    for bad, words in (("remote:http://h:1/v1", "names no model"), ("remote:ftp://h/v1#m", "http:// or https://"),
                       ("remote:http://u:p@h/v1#m", "BLIP_APP_REMOTE_API_KEY"),
                       ("remote:http://h:x/v1#m", "malformed")):
        with pytest.raises(UnknownModelError, match=words):
            parse_remote(bad)
    from blip_app.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--model", "remote:http://h:1/v1"])


def test_caption_answer_and_chat_through_the_remote_match_the_local_model(server, keyed, local, folders,
                                                                         picture) -> None:
    names = [remote_name(server, folder) for folder in folders]
    service = Service(names)
    try:
        assert [state.state for state in service.models()] == ["remote", "remote"]
        assert "not contacted yet" in service.models()[0].detail
        for name, folder in zip(names, folders):
            for task, inputs in ((Task.CAPTION, {}), (Task.ANSWER, {"question": "What is it?", "short": True}),
                                 (Task.CHAT, {"question": "Is it awake?", "preset": "fast",
                                              "history": [["What is it?", "a cat"], ["What color?", "grey"]]})):
                request = service.request(task, overrides={"max_new_tokens": 8}, **inputs)
                remote = service.run(name, picture, request)
                reference = local.run(folder, picture, local.request(task, overrides={"max_new_tokens": 8}, **inputs))
                assert remote.text == reference.text, (name, task)
                assert remote.prompt == reference.prompt and remote.new_tokens == reference.new_tokens
                assert remote.settings == reference.settings  # the remote resolved them for its own model
        states = service.models()
        assert [state.state for state in states] == ["remote", "remote"]
        assert "answered" in states[0].detail and states[0].family == "blip2"
        assert service.load(names[1]).startswith(f"{names[1]} is ready")
    finally:
        service.manager.close()


def test_streaming_through_the_remote_gives_the_local_text(server, keyed, local, folders, picture) -> None:
    service = Service([remote_name(server, folders[0])])
    try:
        request = service.request(Task.CHAT, question="What is it?", preset="fast", overrides={"max_new_tokens": 12})
        replies = list(service.stream(service.manager.names[0], picture, request))
        reference = local.run(folders[0], picture, local.request(Task.CHAT, question="What is it?", preset="fast",
                                                                 overrides={"max_new_tokens": 12}))
        assert replies[-1].finished and replies[-1].text == reference.text
        assert all(not reply.finished for reply in replies[:-1])
    finally:
        service.manager.close()


def test_remote_refusals_and_failures_become_the_apps_own_messages(server, keyed, folders, picture,
                                                                   monkeypatch) -> None:
    dead = f"remote:http://127.0.0.1:{free_port()}/v1#x"
    name = remote_name(server, folders[0])
    service = Service([name, remote_name(server, "not-there"), dead], time_limit_s=0.05)
    try:
        # this side's cap is 512; the remote's is 40: its 400 comes back as the app's BadInputError
        with pytest.raises(BadInputError, match="max_new_tokens"):
            service.run(name, picture, service.request(Task.CAPTION, overrides={"max_new_tokens": 60}))
        with pytest.raises(UnknownModelError, match="does not offer the model 'not-there'"):
            service.run(service.manager.names[1], picture, service.request(Task.CAPTION))
        with pytest.raises(ModelLoadError, match="cannot be reached"):
            service.run(dead, picture, service.request(Task.CAPTION))
        states = {state.name: state for state in service.models()}
        assert states[dead].state == "unreachable" and "cannot be reached" in states[dead].detail
        assert states[service.manager.names[1]].state == "unreachable"
        # beam search sends nothing before it ends: the 0.05 s time limit passes first
        slow = service.request(Task.CAPTION, overrides={"max_new_tokens": 40, "min_new_tokens": 40, "num_beams": 4})
        with pytest.raises(GenerationError, match="did not answer within"):
            service.run(name, picture, slow)
        monkeypatch.setenv("BLIP_APP_REMOTE_API_KEY", "wrong")
        service.manager.unload(name)
        with pytest.raises(ModelLoadError, match="BLIP_APP_REMOTE_API_KEY"):
            service.run(name, picture, service.request(Task.CAPTION))
    finally:
        service.manager.close()


def test_a_remote_model_in_the_picker_and_behind_this_apps_own_v1(server, keyed, folders, local, picture) -> None:
    from blip_app.web.common import model_choices, model_status

    name = remote_name(server, folders[0])
    with running_app([name, folders[1]], "--trust-model", "none") as app:
        states = app.service.models()
        assert model_choices(states)[0] == (f"{folders[0]} @ {parse_remote(name).host} · remote", name)
        assert model_status(states, name).startswith("**Remote**")
        client = openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0)
        listed = [model.id for model in client.models.list().data]
        assert listed == [name, folders[1]]
        import base64

        url = "data:image/jpeg;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
        reply = client.chat.completions.create(model=name, max_tokens=8,
                                               messages=[{"role": "user", "content": [
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
        reference = local.run(folders[0], picture, local.request(Task.CAPTION, overrides={"max_new_tokens": 8}))
        assert reply.choices[0].message.content == reference.text
