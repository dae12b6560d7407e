"""The app's API for scripts, driven over HTTP with gradio_client against the real app on loopback.

The server runs the real Service and engine on tiny checkpoints of two families, offered as folder
paths; their output is random text, so answers are checked for type, not content.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _server import RunningApp, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "chelsea.jpg"
# web/api.py: four generation endpoints and the matching model's three (the default trust model is offered)
ENDPOINTS = {"/caption", "/answer", "/chat", "/models", "/trust", "/search", "/embed"}


@pytest.fixture(scope="module")
def models(tiny_checkpoints: dict[str, Path]) -> list[str]:
    """Two families, offered by folder path: BLIP-2 + OPT first (the default), InstructBLIP + Flan-T5."""
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


@pytest.fixture(scope="module")
def app(models: list[str]) -> RunningApp:
    with running_app(models) as running:
        yield running


@pytest.fixture(scope="module")
def client(app: RunningApp) -> Client:
    return Client(app.url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def image() -> dict:
    return handle_file(EXAMPLE)


def refused(client: Client, *args, api_name: str, **kwargs) -> str:
    """The message of the error the server answers with."""
    with pytest.raises(AppError) as caught:
        client.predict(*args, api_name=api_name, **kwargs)
    return str(caught.value)


def test_the_api_lists_exactly_its_endpoints(client: Client) -> None:
    info = client.view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == ENDPOINTS
    assert info["unnamed_endpoints"] == {}
    caption = [p["parameter_name"] for p in info["named_endpoints"]["/caption"]["parameters"]]
    assert caption[:3] == ["image", "model", "preset"]
    assert caption[-1] == "detailed"
    chat = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert chat[:4] == ["image", "history", "message", "model"]


def test_caption_with_each_preset(client: Client, image: dict, models: list[str]) -> None:
    # The tiny OPT has 256 positions: the detailed preset's 256 new tokens would not fit beside the image.
    for preset, detailed in (("standard", False), ("fast", False), ("detailed", True)):
        caption = client.predict(image, models[0], preset, max_new_tokens=20, detailed=detailed, api_name="/caption")
        assert isinstance(caption, str)


def test_answer_on_both_families(client: Client, image: dict, models: list[str]) -> None:
    for model in models:
        answer = client.predict(image, "What color is the cat?", model, short=True, api_name="/answer")
        assert isinstance(answer, str)


def test_three_turn_chat(client: Client, image: dict, models: list[str]) -> None:
    history: list[list[str]] = []
    for message in ("What is this?", "What color is it?", "Is it awake?"):
        answer = client.predict(image, history, message, models[1], preset="fast", max_new_tokens=12,
                                api_name="/chat")
        assert isinstance(answer, str)
        history.append([message, answer])
    assert len(history) == 3


def test_models_lists_both_with_their_states(client: Client, image: dict, models: list[str]) -> None:
    listed = client.predict(api_name="/models")
    assert [entry["name"] for entry in listed] == models
    for entry in listed:
        assert set(entry) == {"name", "label", "family", "state", "detail", "description"}
        assert entry["state"] in {"loaded", "parked", "loading", "on disk", "download", "folder"}


def test_switching_back_and_forth_between_models(client: Client, image: dict, models: list[str]) -> None:
    for model in (models[0], models[1], models[0], models[1]):
        assert isinstance(client.predict(image, "What is it?", model, "fast", api_name="/answer"), str)
    states = {entry["name"]: entry["state"] for entry in client.predict(api_name="/models")}
    assert states == {models[0]: "loaded", models[1]: "loaded"}


def test_an_unknown_model_is_refused_by_name(client: Client, image: dict, models: list[str]) -> None:
    message = refused(client, image, "no-such-model", api_name="/caption")
    assert "no-such-model" in message and "not offered" in message
    assert models[0] in message  # names the choices


def test_an_empty_question_is_refused(client: Client, image: dict) -> None:
    assert "empty" in refused(client, image, "   ", api_name="/answer")


def test_a_corrupt_image_is_refused(client: Client, tmp_path: Path) -> None:
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(os.urandom(4096))
    message = refused(client, handle_file(corrupt), api_name="/caption")
    assert "image" in message.lower()


def test_out_of_range_settings_are_refused(client: Client, image: dict) -> None:
    assert "num_beams" in refused(client, image, num_beams=99, api_name="/caption")
    assert "temperature" in refused(client, image, "Hi", do_sample=True, temperature=-1, api_name="/answer")


def test_a_path_outside_the_uploads_is_refused(client: Client) -> None:
    # A bare record is not uploaded by the client and not checked by gradio: the app refuses it itself.
    message = refused(client, {"path": str(EXAMPLE)}, api_name="/caption")
    assert "uploaded file" in message


def test_a_malformed_history_is_refused(client: Client, image: dict) -> None:
    assert "pair" in refused(client, image, [["only a question"]], "And now?", api_name="/chat")


def test_the_server_still_answers_after_errors(client: Client, image: dict, models: list[str]) -> None:
    refused(client, image, "no-such-model", api_name="/caption")
    assert isinstance(client.predict(image, models[0], api_name="/caption"), str)


def test_text_for_people_is_made_inert() -> None:
    from blip_app.web.common import inert

    shown = inert("<img src=x onerror=alert(1)> ![a](http://x/a.png) [l](javascript:x) www.a.com $$x$$ `c`")
    assert "<" not in shown.replace("\\<", "")
    for mark in "![]()`$":
        assert mark not in shown.replace("\\" + mark, "")
    assert inert("    indented\n# title") == "indented\n\\# title"


def test_untouched_sliders_leave_the_preset_in_charge() -> None:
    from blip_app.core.settings import Preset, Task, preset_settings
    from blip_app.web.common import split_settings

    defaults = preset_settings(Task.CHAT, Preset.FAST)
    untouched = {"preset": "fast", "num_beams": defaults.num_beams, "max_new_tokens": defaults.max_new_tokens}
    assert split_settings(Task.CHAT, untouched) == ("fast", {})
    assert split_settings(Task.CHAT, {**untouched, "max_new_tokens": 7}) == ("fast", {"max_new_tokens": 7})


# ------------------------------------------------------------------------------------------------
# The chat handler itself, on the same Service (no browser): what the page is told.


class _Session:
    session_hash = "test-session"


def _no_progress(*args, **kwargs) -> None:
    return None


def _handlers(service):
    from blip_app.config import AppConfig
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter

    return Tabs.create(service, AppConfig(), RateLimiter(0))


SCRIPTED = {"opt": "blip2-opt", "instructblip-t5": "instructblip-flan-t5"}


@pytest.fixture()
def scripted() -> list:
    """The models a scripted service loaded (``_scripted.ScriptedModel``), to read what each was asked."""
    return []


@pytest.fixture()
def handlers(scripted: list):
    """The page's handlers on a Service whose manager loads scripted models (no weights, no server)."""
    from _scripted import scripted_loader

    from blip_app.core.devices import LoadOptions
    from blip_app.models.manager import ModelManager
    from blip_app.tasks.service import Service

    manager = ModelManager(list(SCRIPTED), LoadOptions(), loader=scripted_loader(SCRIPTED, loaded=scripted))
    return _handlers(Service(list(SCRIPTED), manager=manager))


@pytest.fixture()
def engine_handlers(app: RunningApp):
    """The page's handlers on the running app's Service: the real engine on tiny checkpoints."""
    return _handlers(app.service)


@pytest.fixture()
def uploaded(tmp_path: Path) -> dict:
    """The image as gradio hands an upload to a handler (preprocess=False): a record in its upload folder."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "blip-app-tests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "chelsea.jpg"
    path.write_bytes(EXAMPLE.read_bytes())
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def _conversation(uploaded: dict, turns: list[list[str]]) -> dict:
    from blip_app.core.images import image_digest, load_image

    return {"image": image_digest(load_image(uploaded["path"])), "turns": turns}


def _views(handlers, message: str, chat: dict, uploaded: dict, model: str, **settings) -> list[tuple]:
    return list(handlers.chat.chat_send(message, chat, uploaded, model, _Session(), _no_progress,
                                   preset="fast", **settings))


def test_the_chat_says_when_older_turns_were_dropped(handlers, uploaded: dict, scripted: list) -> None:
    long_answer = " ".join(["the cat is sitting on a warm blanket"] * 80)  # 640 words: 4 pass 2,048 positions
    chat = _conversation(uploaded, [[f"question {n}?", long_answer] for n in range(4)])
    final = _views(handlers, "And now?", chat, uploaded, "opt", max_new_tokens=8)[-1]
    chatbot, state, note = final[:3]
    assert "oldest turn(s) no longer fit" in note
    assert len(state["turns"]) == 5 and state["turns"][-1] == ["And now?", "opt chat: And now?"]
    assert len(chatbot) == 10 and chatbot[-2] == {"role": "user", "content": "And now\\?"}  # escaped: inert
    prompt = scripted[0].calls[-1].prompt
    assert prompt.dropped_turns >= 1 and "question 3?" in prompt.text and "question 0?" not in prompt.text


def test_the_history_reaches_the_model_in_order(handlers, uploaded: dict, scripted: list) -> None:
    chat = _conversation(uploaded, [["What is it?", "a cat"], ["What colour?", "grey"]])
    state = _views(handlers, "Is it awake?", chat, uploaded, "instructblip-t5")[-1][1]
    assert state["turns"][-1] == ["Is it awake?", "instructblip-t5 chat: Is it awake?"]
    text = scripted[0].calls[-1].prompt.text
    assert text.index("What is it?") < text.index("a cat") < text.index("What colour?") < text.index("Is it awake?")


def test_stop_before_the_answer_keeps_the_history(handlers, uploaded: dict) -> None:
    from blip_app.core.settings import Task

    chat = _conversation(uploaded, [["hi", "hello"]])
    views = handlers.chat.chat_send("What is it?", chat, uploaded, "opt", _Session(), _no_progress, preset="fast")
    pending = next(views)
    assert pending[0][-1]["content"] == "*thinking…*"
    handlers.chat.stop(_Session(), Task.CHAT)
    final = list(views)[-1]
    chatbot, state, note, message = final[:4]
    assert "Stopped" in note and message == "What is it?"  # the question is back in the box
    assert state["turns"] == [["hi", "hello"]] and len(chatbot) == 2


def test_an_error_keeps_the_history(handlers, uploaded: dict) -> None:
    chat = _conversation(uploaded, [["hi", "hello"]])
    final = _views(handlers, "What is it?", chat, uploaded, "no-such-model")[-1]
    chatbot, state, _, message = final[:4]
    assert state["turns"] == [["hi", "hello"]] and len(chatbot) == 2 and message == "What is it?"


def test_a_client_over_its_rate_limit_is_told_to_wait(tiny_checkpoints, tmp_path: Path) -> None:
    model = str(tiny_checkpoints["blip2-opt"])
    picture = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(picture)
    with running_app([model], "--rate-limit", "3") as running:  # a burst of one, then one every 20 s
        client = Client(running.url, verbose=False)
        assert isinstance(client.predict(handle_file(str(picture)), model, "fast", api_name="/caption"), str)
        with pytest.raises(AppError, match="sending requests too quickly; please wait"):
            client.predict(handle_file(str(picture)), model, "fast", api_name="/caption")
        assert client.predict(api_name="/models")  # listing models is not limited


def test_a_chat_turn_is_one_pass_through_the_service(engine_handlers, uploaded: dict, models: list[str],
                                                     monkeypatch) -> None:
    """The turn prepares its prompt once (the inspector's prompt is the stream's first event) and hashes the
    image once (the digest is handed down to the engine's feature cache)."""
    from blip_app.core import images
    from blip_app.models import engine
    from blip_app.web.tabs import chat as chat_tab

    handlers = engine_handlers
    handlers.service.load(models[0])
    chat = _conversation(uploaded, [["what is it?", "a cat"]])
    counts = {"prepare": 0, "digest": 0}
    prepare, digest = engine.LoadedModel.prepare, images.image_digest

    def counting_prepare(self, *args, **kwargs):
        counts["prepare"] += 1
        return prepare(self, *args, **kwargs)

    def counting_digest(image):
        counts["digest"] += 1
        return digest(image)

    monkeypatch.setattr(engine.LoadedModel, "prepare", counting_prepare)
    monkeypatch.setattr(chat_tab, "image_digest", counting_digest)
    monkeypatch.setattr(engine, "image_digest", counting_digest)
    views = _views(handlers, "And the colour?", chat, uploaded, models[0], max_new_tokens=4)
    state = views[-1][1]
    assert len(state["turns"]) == 2 and state["turns"][-1][0] == "And the colour?"
    assert counts == {"prepare": 1, "digest": 1}
