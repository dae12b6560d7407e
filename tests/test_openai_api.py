"""The OpenAI-compatible /v1, driven by the official openai SDK against the real app on loopback.

The server runs the real Service and engine on tiny checkpoints of two families. Their output is
random text, so answers are compared with what the Service gives for the same request directly (and
with the page's own /chat endpoint for a conversation): the same decoding must give the same text.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from _server import RunningApp, running_app, wait_until
from PIL import Image

from blip_app.core.images import load_image
from blip_app.core.settings import Task

EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.jpg"
IMAGE_URL = "data:image/jpeg;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
KEY = "test-key-0123"


def image_part(url: str = IMAGE_URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_url(color: tuple[int, int, int], size: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def models(tiny_checkpoints: dict[str, Path]) -> list[str]:
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


@pytest.fixture(scope="module")
def app(models: list[str]) -> RunningApp:
    with running_app(models) as running:
        yield running


@pytest.fixture(scope="module")
def client(app: RunningApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def picture():
    return load_image(EXAMPLE)


def direct(app: RunningApp, model: str, picture, task: Task, **kwargs) -> object:
    """The Service's own reply to the same request (no HTTP)."""
    service = app.service
    return service.run(model, picture, service.request(task, **kwargs))


# ------------------------------------------------------------------------------------------- models


def test_the_model_list_names_the_captioning_models_with_their_state(client: openai.OpenAI, models: list[str]) -> None:
    listed = client.models.list()
    assert [model.id for model in listed.data] == models  # the image-text matching model is not listed
    for model in listed.data:
        assert model.object == "model" and model.owned_by == "blip_app"
        assert model.blip_app["state"] in {"loaded", "folder"}
    assert client.models.retrieve(models[1]).id == models[1]
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert "not offered" in caught.value.body["message"]


# --------------------------------------------------------------------------------------- the tasks


def test_an_image_with_no_text_is_captioned_as_the_service_captions_it(client, app, models, picture) -> None:
    reply = client.chat.completions.create(model=models[0], max_tokens=8,
                                           messages=[{"role": "user", "content": [image_part()]}])
    expected = direct(app, models[0], picture, Task.CAPTION, overrides={"max_new_tokens": 8})
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason in ("stop", "length")
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.blip_app["task"] == "caption" and reply.blip_app["prompt"] == expected.prompt
    assert reply.usage.completion_tokens == expected.new_tokens
    assert reply.usage.prompt_tokens == expected.prompt_tokens + expected.image_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_question_is_answered_as_the_service_answers_it(client, app, models, picture) -> None:
    for model in models:
        reply = client.chat.completions.create(
            model=model, max_completion_tokens=6, extra_body={"task": "answer", "short": True},
            messages=[{"role": "system", "content": "You are helpful."},  # ignored, and said so
                      {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part()]}])
        expected = direct(app, model, picture, Task.ANSWER, question="What is it?", short=True,
                          overrides={"max_new_tokens": 6})
        assert reply.choices[0].message.content == expected.text
        assert reply.blip_app["prompt"] == expected.prompt and "Short answer:" in expected.prompt
        assert reply.blip_app["ignored_messages"] == ["system"]


def test_a_three_turn_conversation_carries_its_history_as_chat_does(client, app, models, picture) -> None:
    from gradio_client import Client, handle_file

    model = models[1]
    messages: list[dict] = []
    history: list[list[str]] = []
    for number, question in enumerate(("What is this?", "What color is it?", "Is it awake?")):
        content = [{"type": "text", "text": question}] + ([image_part()] if number == 0 else [])
        messages.append({"role": "user", "content": content})
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                               extra_body={"preset": "fast"})
        expected = direct(app, model, picture, Task.CHAT, question=question, history=history, preset="fast",
                          overrides={"max_new_tokens": 8})
        answer = reply.choices[0].message.content
        assert answer == expected.text and reply.blip_app["prompt"] == expected.prompt
        assert reply.blip_app["task"] == "chat"
        messages.append({"role": "assistant", "content": answer})
        history.append([question, answer])
    assert expected.prompt.count("Question:") == 3  # both earlier turns are in the last prompt
    page = Client(app.url, verbose=False, download_files=False)
    by_chat = page.predict(handle_file(EXAMPLE), history[:2], history[2][0], model, "fast", 8, api_name="/chat")
    assert by_chat == history[2][1]


def test_streaming_sends_the_same_text_ending_with_usage_and_done(client, app, models) -> None:
    request = {"model": models[0], "max_tokens": 12, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part()]}]}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(chunk.usage is None for chunk in chunks[:-1])
    plain = list(client.chat.completions.create(**request, stream=True))
    assert all(chunk.usage is None for chunk in plain) and all(chunk.choices for chunk in plain)
    with httpx.stream("POST", app.url + "v1/chat/completions", json={**request, "stream": True}, timeout=60) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_a_stop_sequence_ends_the_answer_before_it(client, models) -> None:
    request = {"model": models[0], "max_tokens": 16, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part()]}]}
    text = client.chat.completions.create(**request).choices[0].message.content
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = client.chat.completions.create(**request, stop=[stop, "never there"])
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(**request, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.find(stop)]


# ------------------------------------------------------------------------------------------ errors


def refused(client: openai.OpenAI, kind: type, **request) -> dict:
    request.setdefault("model", client._test_model)
    with pytest.raises(kind) as caught:
        client.chat.completions.create(**request)
    assert caught.value.body["type"]  # OpenAI's error shape: message, type, param, code
    return caught.value.body


@pytest.fixture()
def strict(client: openai.OpenAI, models: list[str]) -> openai.OpenAI:
    client._test_model = models[0]
    return client


@pytest.mark.parametrize(("url", "words"), [
    ("http://example.com/cat.jpg", "never fetches"),
    ("https://example.com/cat.jpg", "never fetches"),
    ("file:///etc/passwd", "never reads its own files"),
    ("data:image/png;base64,%%%", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("ftp://example.com/cat.jpg", "base64 data: URL"),
])
def test_image_urls_other_than_inline_data_are_refused_saying_why(strict, url: str, words: str) -> None:
    body = refused(strict, openai.BadRequestError, messages=[{"role": "user", "content": [image_part(url)]}])
    assert words in body["message"] and body["param"] == "messages"


@pytest.mark.parametrize(("request_", "words"), [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no image"),
    ({"messages": [{"role": "user", "content": [image_part(png_url((255, 0, 0))), image_part(png_url((0, 0, 255)))]}]},
     "one image per conversation"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": [image_part()]}]},
     "start with a user message"),
    ({"messages": [{"role": "user", "content": [image_part()]}, {"role": "assistant", "content": "a cat"}]},
     "last message must be the user's"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "role"),
    ({"messages": [{"role": "user", "content": [image_part()]}], "n": 2}, "one answer"),
    ({"messages": [{"role": "user", "content": [image_part()]}], "temperature": 9}, "temperature"),
    ({"messages": [{"role": "user", "content": [image_part()]}], "max_tokens": 100000}, "max_new_tokens"),
    ({"messages": [{"role": "user", "content": [image_part()]}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image_part()]}],
      "extra_body": {"task": "caption"}}, "caption takes the image alone"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "   "}, image_part()]}],
      "extra_body": {"task": "answer"}}, "empty"),
    ({"messages": [{"role": "user", "content": [image_part()]}], "extra_body": {"preset": "turbo"}}, "preset"),
])
def test_bad_requests_get_a_400_naming_the_problem(strict, request_: dict, words: str) -> None:
    assert words in refused(strict, openai.BadRequestError, **request_)["message"]


def test_the_same_image_sent_again_in_a_later_turn_counts_once(client, models) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image_part()]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": [{"type": "text", "text": "Is it big?"}, image_part()]}]
    assert isinstance(client.chat.completions.create(model=models[0], messages=messages, max_tokens=4)
                      .choices[0].message.content, str)


def test_raw_http_bad_json_and_unknown_model(app: RunningApp, models: list[str]) -> None:
    url = app.url + "v1/chat/completions"
    bad = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    unknown = httpx.post(url, json={"model": "nope", "messages": [{"role": "user", "content": [image_part()]}]},
                         timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert models[0] in unknown.json()["error"]["message"]  # names the choices


@pytest.fixture(scope="module")
def guarded(models: list[str]) -> RunningApp:
    """A server with a key, a small upload limit and a queue of one."""
    with running_app(models[:1], "--api-key", KEY, "--max-upload-mb", "0.05", "--queue-size", "1") as running:
        yield running


def test_a_key_is_required_as_a_bearer_token(guarded: RunningApp, models: list[str]) -> None:
    wrong = openai.OpenAI(base_url=guarded.url + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and "not the one this server requires" in caught.value.body["message"]
    no_header = httpx.get(guarded.url + "v1/models", timeout=10)
    assert no_header.status_code == 401 and "Authorization: Bearer" in no_header.json()["error"]["message"]
    good = openai.OpenAI(base_url=guarded.url + "v1", api_key=KEY, max_retries=0)
    assert [model.id for model in good.models.list().data] == models[:1]


def test_too_large_bodies_and_images_get_413(guarded: RunningApp, models: list[str]) -> None:
    client = openai.OpenAI(base_url=guarded.url + "v1", api_key=KEY, max_retries=0)
    big = png_url((1, 2, 3), size=1)[:-4] + base64.b64encode(bytes(80_000)).decode()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": [image_part(big)]}])
    assert caught.value.status_code == 413 and "limit" in caught.value.body["message"]
    huge = httpx.post(guarded.url + "v1/chat/completions", content=b"x" * 12_000_000,
                      headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=30)
    assert huge.status_code == 413 and "the most this server accepts" in huge.json()["error"]["message"]


def test_the_rate_limit_answers_429_with_retry_after(models: list[str]) -> None:
    request = {"model": models[0], "max_tokens": 2, "messages": [{"role": "user", "content": [image_part()]}]}
    with running_app(models[:1], "--rate-limit", "3") as limited:  # bursts of one request
        client = openai.OpenAI(base_url=limited.url + "v1", api_key="unused", max_retries=0)
        client.chat.completions.create(**request)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**request)
    assert caught.value.status_code == 429 and "too quickly" in caught.value.body["message"]
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_a_full_queue_answers_503(guarded: RunningApp, models: list[str], monkeypatch) -> None:
    from blip_app.web import openai_api

    release = threading.Event()
    started = []
    real_run = guarded.service.run

    def held(*args, **kwargs):
        started.append(1)
        release.wait(30)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(guarded.service, "run", held)
    monkeypatch.setattr(guarded.service, "stream", lambda *a, **k: iter([held(*a, **k)]))
    request = {"model": models[0], "max_tokens": 2, "messages": [{"role": "user", "content": [image_part()]}]}
    client = openai.OpenAI(base_url=guarded.url + "v1", api_key=KEY, max_retries=0, timeout=60)
    admitted = openai_api.RUNNING + 1  # running, and the queue of one
    with concurrent.futures.ThreadPoolExecutor(admitted) as pool:
        waiting = [pool.submit(client.chat.completions.create, **request) for _ in range(admitted)]
        assert wait_until(lambda: len(started) == openai_api.RUNNING, timeout=30)
        time.sleep(0.3)
        try:
            with pytest.raises(openai.InternalServerError) as caught:
                client.chat.completions.create(**request, stream=True)
            assert caught.value.status_code == 503 and "busy" in caught.value.body["message"]
        finally:
            release.set()
        assert all(isinstance(f.result().choices[0].message.content, str) for f in waiting)


# ----------------------------------------------------------------------------- cancel, concurrency


def test_a_client_that_disconnects_mid_stream_stops_the_generation(app, models, monkeypatch) -> None:
    seen: dict = {}
    real_stream = app.service.stream

    def watched(model, picture, request, *, cancel=None, **kwargs):
        seen["cancel"] = cancel
        seen["partials"] = 0
        try:
            for reply in real_stream(model, picture, request, cancel=cancel, **kwargs):
                if reply.finished:
                    seen["finished"] = True
                seen["partials"] += 1
                yield reply
        except BaseException as exc:
            seen["ended"] = type(exc).__name__
            raise
        seen.setdefault("ended", "end")

    monkeypatch.setattr(app.service, "stream", watched)
    body = {"model": models[0], "stream": True, "max_tokens": 200, "temperature": 0,
            "extra_body": {"min_new_tokens": 200},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image_part()]}]}
    client = openai.OpenAI(base_url=app.url + "v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(**body)
    next(iter(stream))  # the first chunk arrived: the generation is under way
    assert wait_until(lambda: seen.get("partials", 0) >= 1, timeout=30)
    stream.close()
    assert wait_until(lambda: "ended" in seen, timeout=15), seen
    assert seen["cancel"].is_set() and not seen.get("finished") and seen["partials"] < 200, seen


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(app, models, monkeypatch) -> None:
    seen: dict = {}

    def long_run(model, picture, request, *, cancel=None, **kwargs):
        seen["cancel"] = cancel
        seen["stopped"] = cancel.wait(20)  # the engine stops at its next token once this is set
        from blip_app.errors import CancelledError

        raise CancelledError("The request was cancelled.")

    monkeypatch.setattr(app.service, "run", long_run)
    body = {"model": models[0], "messages": [{"role": "user", "content": [image_part()]}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(app.url + "v1/chat/completions", json=body, timeout=httpx.Timeout(1.5, connect=5))
    assert wait_until(lambda: "stopped" in seen, timeout=10) and seen["stopped"], seen


def test_eight_concurrent_clients_are_all_served_correctly(client, app, models, picture) -> None:
    def ask(number: int) -> tuple[int, str]:
        model = models[number % 2]
        if number % 3 == 0:
            content = [image_part()]
        else:
            content = [{"type": "text", "text": f"What is thing {number}?"}, image_part()]
        reply = client.chat.completions.create(model=model, max_tokens=6,
                                               messages=[{"role": "user", "content": content}])
        return number, reply.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(pool.map(ask, range(8)))
    assert sorted(answers) == list(range(8))
    for number, text in answers.items():
        model = models[number % 2]
        if number % 3 == 0:
            expected = direct(app, model, picture, Task.CAPTION, overrides={"max_new_tokens": 6})
        else:
            expected = direct(app, model, picture, Task.CHAT, question=f"What is thing {number}?",
                              overrides={"max_new_tokens": 6})
        assert text == expected.text, number


# ------------------------------------------------------------------------------------- unit checks


def test_a_page_login_without_a_key_keeps_v1_closed(models: list[str]) -> None:
    with running_app(models[:1], "--auth", "ann:secret-pass") as running:
        answer = httpx.get(running.url + "v1/models", timeout=10)
    assert answer.status_code == 401 and "--api-key" in answer.json()["error"]["message"]


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch) -> None:
    from blip_app.config import parse_config

    monkeypatch.setenv("BLIP_APP_API_KEY", "from-env")
    assert parse_config(["--model", "blip2-opt-2.7b"]).api_key == "from-env"
    assert parse_config(["--model", "blip2-opt-2.7b", "--api-key", "flag"]).api_key == "flag"
    assert "from-env" not in repr(parse_config(["--model", "blip2-opt-2.7b"]))  # kept out of logs


def test_messages_are_read_into_the_history_chat_takes() -> None:
    from blip_app.web.openai_api import read_call

    body = {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [image_part(png_url((9, 9, 9)))]},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it big?"}]},
        {"role": "user", "content": "And old?"}]}
    call = read_call(body, 10**6, 2000)
    assert call.task is Task.CHAT and call.history == [["What is it?", "a cat"]]
    assert call.question == "Is it big?\nAnd old?" and call.ignored == ["developer"]
    assert json.loads(json.dumps(call.overrides)) == {}
    sampled = read_call({**body, "temperature": 0.7, "seed": 3}, 10**6, 2000).overrides
    assert sampled == {"temperature": 0.7, "do_sample": True, "num_beams": 1, "seed": 3}
    greedy = read_call({**body, "temperature": 0}, 10**6, 2000).overrides
    assert greedy == {"do_sample": False, "num_beams": 1}
    beams = read_call({**body, "temperature": 0, "beams": 3}, 10**6, 2000).overrides
    assert beams == {"do_sample": False, "num_beams": 3}
