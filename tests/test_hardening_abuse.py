"""Attacks on a public Space (issue 15), each reproduced on loopback with tiny checkpoints.

Memory, CPU and disk held by hostile requests, handlers outside the rate limit, CSV injection, text
that import and chat disagree on, and the messages such requests get. Page handlers are called as
gradio calls them (uploads as file records in gradio's upload folder, ``preprocess=False``); the API and
the HTTP server are driven over loopback. Every loop is bounded; each test takes seconds.
"""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import _server
import numpy as np
import pytest
from PIL import Image

from blip_app.models.engine import DEVICE_LOCKS

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"


@pytest.fixture(scope="module")
def models(tiny_checkpoints: dict[str, Path]) -> list[str]:
    return [str(tiny_checkpoints["blip2-opt"]), str(tiny_checkpoints["instructblip-flan-t5"])]


class _Session:
    """What gradio hands a handler as its gr.Request, for one browser session."""

    def __init__(self, name: str = "abuse-tests", host: str = "127.0.0.1") -> None:
        self.session_hash = name
        self.username = None
        self.headers: dict[str, str] = {}
        self.client = SimpleNamespace(host=host)


def _no_progress(*args, **kwargs) -> None:
    return None


def upload(name: str, data: bytes) -> dict:
    """A file as gradio hands an upload to a handler with preprocess=False."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()) / "blip-app-abuse-tests" / os.urandom(6).hex()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    target.write_bytes(data)
    return {"path": str(target), "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def text_zip(members: int, prefix: str = "note") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for number in range(members):
            zf.writestr(f"{prefix}-{number:04d}.txt", "not a photo")
    return buffer.getvalue()


def noise_png(seed: int, side: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def wait_until(condition, timeout: float, every: float = 0.02) -> bool:
    return _server.wait_until(condition, timeout, every)


@pytest.fixture(scope="module")
def service(models: list[str]):
    from blip_app.config import parse_config
    from blip_app.tasks.service import Service

    config = parse_config([flag for m in models for flag in ("--model", m)] + ["--offline", "--trust-model", "none"])
    made = Service(config.offered_models, config.load, limits=config.limits)
    yield made
    made.manager.close()


def make_extras(service, models: list[str], *flags: str):
    """An Tools on ``service``, its chat accordion built in a page of its own (as build_ui does)."""
    import gradio as gr

    from blip_app.config import parse_config
    from blip_app.core.settings import Task
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter
    from blip_app.web.widgets import settings_panel

    config = parse_config([flag for m in models for flag in ("--model", m)] +
                          ["--offline", "--trust-model", "none", *flags])
    made = Tabs.create(service, config, RateLimiter(config.rate_limit_per_minute))
    with gr.Blocks():
        chat = {"state": gr.State(), "chatbot": gr.Chatbot(), "note": gr.Markdown(),
                "history_buttons": [gr.Button(), gr.Button(), gr.Button()],
                "settings": settings_panel(Task.CHAT, service.limits).controls}
        made.chat.chat_files(chat, gr.Image(), gr.Dropdown(), gr.Markdown())
    return made


def refusals(recorded: list) -> list[str]:
    return [str(w.message) for w in recorded if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------------------------------------------
# 2. Batch: every archive member counts, rows are not re-sent for free, the work stops when the page goes


def test_batch_counts_every_archive_member_against_one_cap(service, models: list[str]) -> None:
    extras = make_extras(service, models)  # --max-batch-images 100
    files = [upload("notes.zip", text_zip(1999))]
    started = time.monotonic()
    with pytest.warns(UserWarning) as recorded:
        views = list(extras.batch.run_batch(files, models[0], "short", _Session(), _no_progress, preset="fast"))
    assert len(views) == 1 and views[0][4].visible  # refused before anything ran: Run is back
    message = refusals(recorded)[0]
    assert "More than 100 files were given" in message and "every file in an archive counts" in message
    assert time.monotonic() - started < 5
    # two archives of 60 text files and one photo each: 122 entries in one run, one cap
    two = [upload("a.zip", text_zip(60, "a")), upload("b.zip", text_zip(60, "b")),
           upload("p1.png", noise_png(1)), upload("p2.png", noise_png(2))]
    with pytest.warns(UserWarning, match="More than 100 files were given"):
        assert len(list(extras.batch.run_batch(two, models[0], "short", _Session(), _no_progress, preset="fast"))) == 1


def test_batch_rows_that_cost_nothing_are_not_resent_one_by_one(service, models: list[str]) -> None:
    extras = make_extras(service, models, "--max-batch-images", "2000")
    files = [upload("notes.zip", text_zip(1999)), upload("photo.png", noise_png(3))]
    started = time.monotonic()
    views = list(extras.batch.run_batch(files, models[0], "short", _Session(), _no_progress, preset="fast",
                                  max_new_tokens=3))
    seconds = time.monotonic() - started
    tables = [view[0] for view in views if isinstance(view[0], list)]
    assert len(tables[-1]) == 2000 and "**1** of 2000 captioned" in views[-1][1]
    sent = sum(len(table) for table in tables)
    print(f"\n2,000 rows: {len(tables)} table views, {sent:,} rows sent, {seconds:.1f} s")
    assert len(tables) <= 12 and sent <= 12 * 2000  # was one view per row: 2,000 views, 2 million rows


def test_a_batch_stops_at_once_when_its_page_goes_away(service, models: list[str]) -> None:
    """gradio marks the event dead when the page's stream closes; the running captions stop at their next token."""
    from gradio.context import LocalContext

    extras = make_extras(service, models)
    loaded = service.manager.get(models[0])
    steps = []
    hook = loaded.model.language_model.register_forward_pre_hook(
        lambda module, args: (steps.append(time.monotonic()), time.sleep(0.05)) and None)
    event = SimpleNamespace(alive=True, closed=False)
    queue = SimpleNamespace(event_ids_to_events={"batch-event": event}, log_message=lambda **message: None)
    blocks = SimpleNamespace(_queue=queue, has_launched=False)
    files = [upload(f"p{n}.png", noise_png(10 + n)) for n in range(4)]
    returned = threading.Event()

    def page() -> None:  # gradio runs each step of the generator with its context set, in a worker thread
        LocalContext.event_id.set("batch-event")
        LocalContext.blocks.set(blocks)
        views = extras.batch.run_batch(files, models[0], "short", _Session("leaving"), _no_progress, preset="fast",
                                 max_new_tokens=60, min_new_tokens=60)
        next(views)  # "Working… 0 of 4"
        next(views)  # waits for the first caption: 60 steps of 50 ms or more
        returned.set()
        views.close()

    worker = threading.Thread(target=page, daemon=True)
    try:
        worker.start()
        assert wait_until(lambda: len(steps) >= 5, timeout=30)
        event.alive = False  # the page went away
        gone = time.monotonic()
        assert wait_until(returned.is_set, timeout=10)
        stopped = time.monotonic() - gone
        assert wait_until(lambda: not DEVICE_LOCKS.get("cpu").locked(), timeout=5)
        after = len([t for t in steps if t > gone + 0.5])
        print(f"\npage gone: the batch stopped {stopped:.2f} s later")
        assert stopped < 1.5 and after <= 1
    finally:
        hook.remove()
        worker.join(timeout=10)


# ------------------------------------------------------------------------------------------------
# 6. Search decodes its pictures one at a time


@pytest.fixture(scope="module")
def tiny_retrieval(tmp_path_factory: pytest.TempPathFactory) -> str:
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    return str(make_tiny_retrieval_checkpoint(tmp_path_factory.mktemp("retrieval") / "itm"))


class LiveDecodes:
    """Counts the pictures load_image has decoded that are still alive (PIL images hold their pixels)."""

    def __init__(self, monkeypatch) -> None:
        import weakref

        import blip_app.core.images
        import blip_app.tasks.batch

        self.alive = 0
        self.most = 0
        self.decoded = 0
        self._lock = threading.Lock()
        real = blip_app.core.images.load_image

        def counted(*args, **kwargs):
            picture = real(*args, **kwargs)
            with self._lock:
                self.alive += 1
                self.decoded += 1
                self.most = max(self.most, self.alive)
            weakref.finalize(picture, self._gone)
            return picture

        monkeypatch.setattr(blip_app.tasks.batch, "load_image", counted)
        monkeypatch.setattr("blip_app.web.common.load_image", counted)

    def _gone(self) -> None:
        with self._lock:
            self.alive -= 1


def test_search_holds_one_decoded_picture_at_a_time(models: list[str], tiny_retrieval: str, monkeypatch) -> None:
    from gradio_client import Client, handle_file

    from blip_app.config import parse_config
    from blip_app.tasks.service import Service
    from blip_app.web.common import inert
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter

    config = parse_config(["--model", models[0], "--offline", "--trust-model", tiny_retrieval])
    service = Service(config.offered_models, config.load)
    try:
        extras = Tabs.create(service, config, RateLimiter(0))
        photos = {f"p{n}.png": noise_png(20 + n, side=96) for n in range(12)}
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in list(photos.items())[6:]:
                zf.writestr(name, data)
        files = [upload(name, data) for name, data in list(photos.items())[:6]]
        files.append(upload("more.zip", archive.getvalue()))
        files.append(upload("broken.png", b"\x89PNG\r\n\x1a\n" + os.urandom(256)))
        live = LiveDecodes(monkeypatch)
        gallery, summary = extras.search.run_search(files, "a noisy square", _Session(), _no_progress)
        assert len(gallery) == 12 and inert("broken.png: This PNG file is truncated") in summary
        print(f"\nsearch of 12 photos: {live.decoded} decoded, at most {live.most} alive at once")
        assert live.decoded == 12 and live.most <= 2
    finally:
        service.manager.close()
    from _server import running_app

    with running_app(models[:1], "--trust-model", tiny_retrieval) as app:
        live = LiveDecodes(monkeypatch)
        client = Client(app.url, verbose=False, download_files=False)
        paths = []
        for name, data in photos.items():
            path = Path(upload(name, data)["path"])
            paths.append(handle_file(str(path)))
        hits = client.predict(paths, "a noisy square", api_name="/search")
        client.close()
    assert len(hits) == 12 and live.decoded == 12 and live.most <= 2


# ------------------------------------------------------------------------------------------------
# 5. Every handler that touches a model or decodes an upload is rate-limited and bounded

TOO_QUICK = "You are sending requests too quickly"


def _export_file(service, model: str) -> dict:
    from blip_app.core.images import image_digest, load_image
    from blip_app.core.settings import GenerationSettings
    from blip_app.tasks.exports import card_for, conversation_to_json

    digest = image_digest(load_image(EXAMPLES / "chelsea.jpg"))
    card = card_for(service, model, GenerationSettings(), image_sha256=digest)
    return upload("chat.json", conversation_to_json([("What is it?", "a cat")], card).encode())


def test_every_model_and_upload_handler_counts_against_the_rate_limit(service, models: list[str],
                                                                      tiny_retrieval: str) -> None:

    from blip_app.config import AppConfig, parse_config
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter
    from blip_app.web.tabs.chat import new_chat

    photo = upload("chelsea.jpg", (EXAMPLES / "chelsea.jpg").read_bytes())
    config = parse_config(["--model", models[0], "--offline", "--trust-model", tiny_retrieval])
    export = _export_file(service, models[0])
    calls = {
        "load_model": lambda h, e, who: list(h.picker.load_model(models[0], who, _no_progress)),
        "caption_preview": lambda h, e, who: h.caption.caption_preview(models[0], "short", who, _no_progress),
        "ask_preview": lambda h, e, who: h.ask.ask_preview("What is it?", False, models[0], who, _no_progress),
        "chat_preview": lambda h, e, who: h.chat.chat_preview("Hi", new_chat(), photo, models[0], who, _no_progress),
        "on_image": lambda h, e, who: h.chat.on_image(photo, new_chat(), who),
        "chat_import": lambda h, e, who: e.chat.chat_import(export, new_chat(), models[0], None, who),
    }
    for name, call in calls.items():
        limiter = RateLimiter(60, burst=2)
        handlers = Tabs.create(service, AppConfig(), limiter)
        extras = make_extras(service, models)
        extras.chat.limiter = limiter
        attacker = _Session(f"attack-{name}", host="10.0.0.66")
        with pytest.warns(UserWarning) as recorded:
            for _ in range(3):
                call(handlers, extras, attacker)
        assert any(TOO_QUICK in message for message in refusals(recorded)), (name, refusals(recorded))
        call(handlers, extras, _Session("someone else", host="10.0.0.7"))  # another client is not affected

    trusting = _trust_service(models, tiny_retrieval)  # the trust line runs the matching model
    try:
        scorer = Tabs.create(trusting, config, RateLimiter(60, burst=2))
        lines = [scorer.caption.score_caption(photo, "a cat", _Session("scores", host="10.0.0.66")) for _ in range(3)]
        assert "Image-text match:" in lines[0] and TOO_QUICK in lines[2] and "not available" in lines[2]
    finally:
        trusting.manager.close()


def _trust_service(models: list[str], tiny_retrieval: str):
    from blip_app.config import parse_config
    from blip_app.tasks.service import Service

    config = parse_config(["--model", models[0], "--offline", "--trust-model", tiny_retrieval])
    return Service(config.offered_models, config.load)


def test_model_switches_have_a_stricter_limit_of_their_own(service, models: list[str]) -> None:
    """10 switches in a row were accepted (each a multi-GB load at real size); choosing a loaded model costs no load."""
    import warnings

    from blip_app.config import AppConfig
    from blip_app.web.page import Tabs
    from blip_app.web.ratelimit import RateLimiter

    handlers = Tabs.create(service, AppConfig(), RateLimiter(60, burst=100))  # requests are not the limit here
    attacker = _Session("switcher", host="10.0.0.66")
    refused = []
    for number in range(6):
        for name in models:
            service.manager.unload(name)
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            list(handlers.picker.load_model(models[number % 2], attacker, _no_progress))
        refused.append(refusals(recorded))
    assert [bool(r) for r in refused] == [False, False, False, True, True, True], refused
    assert all("Models are being switched too often" in r[0] for r in refused[3:])
    assert models[0] not in service.manager.loaded_names()
    service.manager.get(models[0])
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        list(handlers.picker.load_model(models[0], attacker, _no_progress))  # already loaded: no load to refuse
    assert refusals(recorded) == []


def test_upload_decoders_share_a_bounded_concurrency(models: list[str], tiny_retrieval: str) -> None:
    """20 simultaneous 40-megapixel images through on_image took RSS from 890 to 1,899 MB: no limit at all."""
    import app as app_module
    from blip_app.config import parse_config

    config = parse_config(["--model", models[0], "--offline", "--trust-model", tiny_retrieval])
    demo, service = app_module.create_app(config)
    try:
        by_name = {getattr(fn.fn, "__name__", ""): fn for fn in demo.fns.values()}
        decoders = [by_name[name] for name in ("on_image", "chat_import", "score_caption", "score_answer")]
        for fn in decoders:
            assert fn.concurrency_limit == 2 and fn.concurrency_id == "decode", (fn.name, fn.concurrency_limit)
        for name in ("load_model", "caption_preview", "ask_preview", "chat_preview"):
            assert by_name[name].concurrency_limit not in (None,), name
    finally:
        service.manager.close()


# ------------------------------------------------------------------------------------------------
# 9. Chat exports are written only when someone downloads, and deleted on the uploads' schedule


def _download_files() -> set[Path]:
    import tempfile

    return {path for path in Path(tempfile.gettempdir()).glob("blip_app-downloads-*/*/*") if path.is_file()}


def test_a_chat_change_writes_no_export(models: list[str]) -> None:
    """Every chat change used to write a Markdown and a JSON copy of the conversation to a temp folder."""
    import gradio as gr

    import app as app_module
    from blip_app.config import parse_config

    config = parse_config(["--model", models[0], "--offline", "--trust-model", "none"])
    demo, service = app_module.create_app(config)
    try:
        before = _download_files()
        chat = {"image": "0" * 64, "turns": [["What is it?", "a secret"]]}
        listeners = [fn for fn in demo.fns.values()
                     if any(isinstance(demo.blocks.get(block), gr.State) and name == "change"
                            for block, name in fn.targets)]
        assert listeners
        for fn in listeners:
            positional = len(fn.inputs) - len(fn.input_keyword_names)
            values = [chat if isinstance(c, gr.State) else c.value for c in fn.inputs]
            fn.fn(*values[:positional], **dict(zip(fn.input_keyword_names, values[positional:])))
        assert _download_files() == before
    finally:
        service.manager.close()


def test_a_downloaded_export_is_deleted_on_the_uploads_schedule(service, models: list[str]) -> None:
    extras = make_extras(service, models, "--delete-uploads-after", "1")
    chat = {"image": "0" * 64, "turns": [["What is it?", "a secret"]]}
    assert extras.chat.export_markdown(chat, models[0], _Session(), preset="fast").value["path"]
    written = [path for path in extras.chat.downloads.root.rglob("*") if path.is_file()]
    assert len(written) == 1 and "a secret" in written[0].read_text(encoding="utf-8")
    path = written[0]  # (gradio serves a copy in its cache, which delete_cache removes on the same schedule)
    assert wait_until(lambda: not path.exists(), timeout=4), "the export outlived --delete-uploads-after 1"
    root = extras.chat.downloads.root
    extras.chat.downloads.close()  # at shutdown, everything goes
    assert not root.exists()


def test_the_export_buttons_download_a_file_built_on_the_click(models: list[str], new_page) -> None:
    pytest.importorskip("playwright.sync_api")
    from _server import running_app

    with running_app(models[:1], "--trust-model", "none") as app:
        page = new_page()
        page.goto(app.url)
        page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / "chelsea.jpg"))
        page.locator("#message textarea").fill("What is <b>it</b>?")
        page.locator("#send").click()
        page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length >= 1 && "
                               "!document.querySelector('#chatbot').innerText.includes('thinking')",
                               timeout=120_000)  # the first answer loads the model: slow on a busy machine
        page.wait_for_timeout(1000)  # whatever the chat change writes has been written by now
        page.locator("#chat-files").click()
        for button, suffix, needle in (("#chat-export-md", ".md", "What is \\<b\\>it\\</b\\>?"),
                                       ("#chat-export-json", ".json", '"question": "What is <b>it</b>?"')):
            page.locator(button).wait_for(state="visible")
            page.wait_for_function(f"() => !document.querySelector('{button}').disabled", timeout=60_000)
            written = _download_files()
            with page.expect_download(timeout=60_000) as caught:
                page.locator(button).click()
            download = caught.value
            assert download.suggested_filename.endswith(suffix)
            assert needle in Path(download.path()).read_text(encoding="utf-8")
            made = _download_files() - written
            assert [path.suffix for path in made] == [suffix], made  # written by this click, not before
        assert page.errors == []


# ------------------------------------------------------------------------------------------------
# 10. Import and chat: one set of limits and one cleaning


def _conversation_file(service, model: str, turns: list[tuple[str, str]]) -> bytes:
    from blip_app.core.settings import GenerationSettings
    from blip_app.tasks.exports import card_for, conversation_to_json

    card = card_for(service, model, GenerationSettings(), image_sha256="0" * 64)
    return conversation_to_json(turns, card).encode()


def test_import_refuses_what_chat_would_refuse_and_keeps_what_chat_takes(service, models: list[str]) -> None:
    import json

    from blip_app.tasks.service import ANSWER_CHARS_FACTOR
    from blip_app.web.tabs.chat import new_chat

    extras = make_extras(service, models)
    limit = service.max_message_chars
    imported = {}
    for case, (question, answer) in {
        "question at the limit": ("q" * limit, "a" * (limit * ANSWER_CHARS_FACTOR)),
        "question over the limit": ("q" * (limit + 1), "fine"),
        "answer over the limit": ("fine", "a" * (limit * ANSWER_CHARS_FACTOR + 1)),
        "twenty thousand characters": ("q" * 20_000, "a" * 20_000),
    }.items():
        data = _conversation_file(service, models[0], [(question, answer)])
        with pytest.warns(UserWarning) if "over" in case or "twenty" in case else _no_warning() as recorded:
            out = extras.chat.chat_import(upload("chat.json", data), new_chat("0" * 64), models[0], None, _Session())
        imported[case] = (out, refusals(recorded or []))
    out, messages = imported["question at the limit"]
    assert messages == [] and len(out[1]["turns"]) == 1
    for case in ("question over the limit", "twenty thousand characters"):
        assert f"the limit is {limit:,}" in imported[case][1][0] and "turn 1" in imported[case][1][0], case
    assert f"the limit is {limit * ANSWER_CHARS_FACTOR:,}" in imported["answer over the limit"][1][0]

    # a lone surrogate (JSON can carry "\ud800") is refused with a sentence, by import and by chat alike
    raw = _conversation_file(service, models[0], [("What is it?", "a cat")]).decode()
    broken = raw.replace("What is it?", "What is \\ud83d it?")
    assert "\\ud83d" in broken and json.loads(broken)["turns"][0]["question"] == "What is \ud83d it?"
    with pytest.warns(UserWarning, match="broken character") as recorded:
        out = extras.chat.chat_import(upload("chat.json", broken.encode()), new_chat("0" * 64), models[0], None, _Session())
    assert "turn 1" in refusals(recorded)[0] and "U+D83D" in refusals(recorded)[0]
    from blip_app.core.settings import Task
    from blip_app.errors import BadInputError

    with pytest.raises(BadInputError, match="The message holds a broken character"):
        service.request(Task.CHAT, question="hi \udc00", history=[])
    with pytest.raises(BadInputError, match="earlier answer holds a broken character"):
        service.request(Task.CHAT, question="hi", history=[["q", "a \ud800"]])


class _no_warning:
    def __enter__(self):
        return []

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------
# 11. Messages: their own sentence, the user's file name, plain text


@pytest.fixture(scope="module")
def api_app(models: list[str]):
    from _server import running_app

    with running_app(models[:1], "--trust-model", "none") as running:
        yield running


def _raw_call(app, api: str, data: list) -> tuple[str, str]:
    """POST /call/<api> as a raw client would (json.dumps escapes a lone surrogate as \\udXXX), then read its result."""
    import json

    import httpx

    with httpx.Client(base_url=app.url, timeout=30) as http:
        body = json.dumps({"data": data}).encode()
        event_id = http.post(f"/gradio_api/call/{api}", content=body,
                             headers={"content-type": "application/json"}).json()["event_id"]
        text = http.get(f"/gradio_api/call/{api}/{event_id}").text
    kind = "error" if "event: error" in text else "complete"
    payload = text.split("data:", 1)[1].strip() if "data:" in text else ""
    return kind, payload


def test_hostile_api_values_get_their_own_plain_sentence(api_app, models: list[str]) -> None:
    import json

    import httpx
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(api_app.url, verbose=False, download_files=False)
    image = handle_file(str(EXAMPLES / "chelsea.jpg"))
    generic = "Something went wrong"
    with pytest.raises(AppError) as caught:
        client.predict(image, 123, api_name="/caption")
    assert "The model must be given by its name, as text" in str(caught.value) and "int 123" in str(caught.value)
    with pytest.raises(AppError) as caught:
        client.predict(image, "<b>x</b>", api_name="/caption")
    assert "'<b>x</b>' is not offered" in str(caught.value) and "&lt;" not in str(caught.value)  # plain text
    with pytest.raises(AppError) as caught:
        client.predict(image, [5], "hi", models[0], api_name="/chat")
    assert "Each history entry must be a [question, answer] pair." in str(caught.value)
    client.close()

    with httpx.Client(base_url=api_app.url, timeout=30) as http:
        uploaded = http.post("/gradio_api/upload", files={"files": ("cat.jpg", (EXAMPLES / "chelsea.jpg").read_bytes(),
                                                                    "image/jpeg")}).json()[0]
    file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    kind, payload = _raw_call(api_app, "answer", [file, "What is \ud800 this?", models[0], "fast", *[None] * 8, False])
    assert kind == "error" and generic not in payload
    assert "The question holds a broken character (an unpaired UTF-16 surrogate, U+D800" in payload, payload
    kind, payload = _raw_call(api_app, "chat", [file, [["fine", "a \udfff b"]], "hi", models[0], "fast", *[None] * 8])
    assert kind == "error" and "earlier answer holds a broken character" in payload, payload

    with httpx.Client(base_url=api_app.url, timeout=30) as http:
        for fn_index in (9999, -5, "seven"):
            reply = http.post("/gradio_api/queue/join", json={"data": [], "fn_index": fn_index, "session_hash": "x1"})
            assert reply.status_code in (404, 422), (fn_index, reply.status_code, reply.text)
            assert "no event" in reply.json()["detail"], reply.text
        assert http.get("/gradio_api/info").status_code == 200  # still serving
    json.dumps(payload)


def test_a_refused_archive_is_named_as_the_user_named_it(service, models: list[str]) -> None:
    extras = make_extras(service, models)
    record = upload("holiday.zip", b"PK\x03\x04 this is not really a zip archive")
    with pytest.warns(UserWarning) as recorded:
        list(extras.batch.run_batch([record], models[0], "short", _Session(), _no_progress, preset="fast"))
    message = refusals(recorded)[0]
    assert message.startswith("holiday.zip is not a readable zip archive"), message
    assert record["path"] not in message and "/tmp" not in message and "gradio" not in message


# ------------------------------------------------------------------------------------------------
# 1. Request bodies are capped before they are read; sessions no page keeps open expire


def _raw_http(url: str, head: str, body: bytes = b"", *, timeout: float = 5.0) -> tuple[int, str, float]:
    """Send a request head (and maybe part of a body) on a raw socket; the status, body and seconds to answer."""
    import socket

    host, port = url.split("//")[1].rstrip("/").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    seconds = time.monotonic() - started
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace"), seconds


def test_a_body_over_the_cap_is_refused_before_it_is_read(api_app) -> None:
    from blip_app.config import parse_config
    from blip_app.web.server import request_body_limit

    limit = request_body_limit(parse_config([]))
    assert 5_000_000 < limit < 8_000_000  # a /chat call with the 500 longest turns kept fits
    host = api_app.url.split("//")[1].rstrip("/")
    # 36 MB announced, 1 KB sent: refused at once, nothing waits for the rest
    head = (f"POST /gradio_api/call/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {36 * 1024 * 1024}\r\n\r\n")
    status, body, seconds = _raw_http(api_app.url, head, b'{"data": [' + b" " * 1024)
    assert status == 413 and seconds < 2, (status, body, seconds)
    assert "the most this server accepts is" in body
    # no length announced (chunked): refused as soon as the cap is passed
    chunk = b"x" * (1024 * 1024)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limit // len(chunk) + 2))
    head = (f"POST /gradio_api/queue/join HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    status, body, seconds = _raw_http(api_app.url, head, chunked, timeout=20)
    assert status == 413, (status, body)
    # a legitimate long history still goes through
    import httpx

    with httpx.Client(base_url=api_app.url, timeout=30) as http:
        reply = http.post("/gradio_api/queue/join", json={"data": ["x" * 2_000_000], "fn_index": 0,
                                                          "session_hash": "long-but-fine"})
        assert reply.status_code == 200, reply.text


def test_sessions_no_page_keeps_open_are_expired(api_app, models: list[str]) -> None:
    """20 refused /chat calls of 1.2 MB, each in a new session, used to stay in memory (1,264 to 1,473 MB)."""
    import httpx

    demo = api_app.demo
    sessions = demo.blip_app_sessions
    history = [["q" * 1000, "a" * 1000]] * 600  # 1.2 MB, refused: more turns than any context holds
    with httpx.Client(base_url=api_app.url, timeout=30) as http:
        uploaded = http.post("/gradio_api/upload", files={"files": ("cat.jpg", (EXAMPLES / "chelsea.jpg").read_bytes(),
                                                                    "image/jpeg")}).json()[0]
        file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        stream = http.stream("GET", "/gradio_api/heartbeat/a-page-still-open")
        heartbeat = stream.__enter__()  # a page that stays open keeps its session
        try:
            demo.state_holder["a-page-still-open"]
            for _ in range(5):
                data = [file, history, "", models[0], "fast", *[None] * 8]  # refused: the message is empty
                event_id = http.post("/gradio_api/call/chat", json={"data": data}).json()["event_id"]
                assert "message is empty" in http.get(f"/gradio_api/call/chat/{event_id}").text
            assert len(demo.state_holder.session_data) >= 6  # the page's, and one per call
            idle = sessions.idle_s
            sessions.idle_s = 0.0
            try:
                time.sleep(0.1)
                sessions.sweep(demo)
            finally:
                sessions.idle_s = idle
            left = set(demo.state_holder.session_data)
            assert "a-page-still-open" in left and left <= set(sessions._open), (left, sessions._open)
            assert len(left) <= 2  # the open page, and perhaps an earlier test's client whose stream is closing
        finally:
            heartbeat.close()
            stream.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------
# 7. Forwarded addresses: only from configured proxies, and on a Space only the platform's entry


def _forged_calls(url: str, forwarded: list[str]) -> list[str]:
    """One /answer call per forged X-Forwarded-For, with an empty question (the rate limit comes first, then
    the service refuses it: no model runs); the event streams that came back."""
    import httpx

    results = []
    with httpx.Client(base_url=url, timeout=30) as http:
        uploaded = http.post("/gradio_api/upload", files={"files": ("cat.jpg", (EXAMPLES / "chelsea.jpg").read_bytes(),
                                                                    "image/jpeg")}).json()[0]
        file = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        for address in forwarded:
            headers = {"X-Forwarded-For": address}
            event_id = http.post("/gradio_api/call/answer", json={"data": [file, "", "x", "fast", *[None] * 8, False]},
                                 headers=headers).json()["event_id"]
            results.append(http.get(f"/gradio_api/call/answer/{event_id}", headers=headers).text)
    return results


def test_a_forged_forwarded_address_does_not_escape_the_rate_limit(models: list[str]) -> None:
    from _server import running_app

    forged = [f"203.0.113.{n}" for n in range(1, 9)]
    with running_app(models[:1], "--trust-model", "none", "--rate-limit", "6") as app:  # a burst of 2
        results = _forged_calls(app.url, forged)
    limited = [r for r in results if TOO_QUICK in r]
    assert len(limited) >= 5, results  # one client on loopback, whatever the header says
    with running_app(models[:1], "--trust-model", "none", "--rate-limit", "6", "--trusted-proxy", "127.0.0.1") as app:
        results = _forged_calls(app.url, forged)  # behind a configured proxy: one allowance per forwarded client
    assert not [r for r in results if TOO_QUICK in r], results


def test_on_a_space_only_the_entry_the_platform_proxy_adds_counts(monkeypatch) -> None:
    from blip_app.web.common import client_key

    monkeypatch.setenv("SPACE_ID", "someone/blip-app")
    seen = SimpleNamespace(username=None, client=SimpleNamespace(host="10.16.0.2"))
    keys = set()
    for forged in ("1.1.1.1", "2.2.2.2, 3.3.3.3", ""):
        request = SimpleNamespace(**vars(seen), headers={"x-forwarded-for": f"{forged}, 198.51.100.7".lstrip(", ")})
        keys.add(client_key(request))
    assert keys == {"198.51.100.7"}
    assert client_key(SimpleNamespace(**vars(seen), headers={})) == "10.16.0.2"


# ------------------------------------------------------------------------------------------------
# 8. Login: slowed down, then refused, per address; the real user is not locked out


def test_repeated_failed_logins_are_slowed_then_refused_for_that_address_only(models: list[str]) -> None:
    """50 wrong passwords took 0.87 s, all checked."""
    import httpx
    from _server import running_app

    with running_app(models[:1], "--trust-model", "none", "--auth", "alice:s3cret-pass") as app:
        started = time.monotonic()
        statuses = []
        with httpx.Client(base_url=app.url, timeout=30) as attacker:
            for attempt in range(50):
                reply = attacker.post("/login", data={"username": "alice", "password": f"guess-{attempt}"})
                statuses.append(reply.status_code)
            seconds = time.monotonic() - started
            refused = attacker.post("/login", data={"username": "alice", "password": "guess-again"})
        print(f"\n50 wrong passwords: {statuses.count(400)} checked, {statuses.count(429)} refused, {seconds:.1f} s")
        assert statuses.count(400) <= 8 and statuses.count(429) >= 42
        assert seconds >= 3  # the checked ones after the first three were slowed down
        assert refused.status_code == 429 and "Too many failed logins" in refused.json()["detail"]
        # the real user, elsewhere, is not affected
        elsewhere = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=app.url, transport=elsewhere, timeout=30) as user:
            started = time.monotonic()
            assert user.post("/login", data={"username": "alice", "password": "s3cret-pass"}).status_code == 200
            assert time.monotonic() - started < 2


def test_a_lockout_is_short_and_a_success_forgets_the_failures() -> None:
    from blip_app.web.server import LoginThrottle

    throttle = LoginThrottle(free=2, lock_after=4, max_delay=0.0, lockout_s=0.3)
    for _ in range(4):
        assert throttle.begin("a") is not None
        throttle.end("a", False)
    assert throttle.begin("a") is None and throttle.begin("b") == 0.0  # locked out, another address is not
    time.sleep(0.35)
    assert throttle.begin("a") is not None  # a minute at most (here 0.3 s), then another try
    throttle.end("a", True)
    assert throttle.begin("a") == 0.0  # the real user got in: the failures are forgotten
    flying = LoginThrottle(free=1, lock_after=3, max_delay=0.0)
    assert [flying.begin("c") is None for _ in range(4)] == [False, False, False, True]  # parallel guesses count


# ------------------------------------------------------------------------------------------------
# 4. Uploads: aborted ones swept, a rate limit per address, the temp folders cleaned at shutdown


def _aborted_upload(url: str, sent: int = 1024 * 1024, announced: int = 19 * 1024 * 1024) -> None:
    """Start a multipart upload of ``announced`` bytes, send ``sent`` of them and hang up."""
    import socket

    host, port = url.split("//")[1].rstrip("/").split(":")
    boundary = "blipappboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}:{port}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {announced}\r\n\r\n").encode() + head + os.urandom(sent))
        time.sleep(0.3)


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith("tmp") and p.is_file()]


def test_aborted_uploads_are_swept_and_uploads_are_rate_limited(models: list[str], tmp_path: Path,
                                                                monkeypatch) -> None:
    import httpx
    from _server import running_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with running_app(models[:1], "--trust-model", "none", "--rate-limit", "6") as app:
        folder = tmp_path / "gradio"
        for _ in range(3):
            _aborted_upload(app.url)
        assert wait_until(lambda: len(_partials(folder)) == 3, timeout=10), list(folder.iterdir())
        print(f"\n3 aborted uploads left {sum(p.stat().st_size for p in _partials(folder)) / 1e6:.1f} MB")
        uploads = app.demo.blip_app_uploads
        assert uploads.sweep() == 0  # fresh partials may still be arriving: left alone for a minute
        time.sleep(0.6)
        assert uploads.sweep(idle_s=0.5) == 3 and _partials(folder) == []
        statuses = []
        with httpx.Client(base_url=app.url, timeout=30) as http:
            for number in range(30):
                reply = http.post("/gradio_api/upload", files={"files": (f"p{number}.png", noise_png(number),
                                                                         "image/png")})
                statuses.append(reply.status_code)
            refused = http.post("/gradio_api/upload", files={"files": ("p.png", noise_png(99), "image/png")})
        assert statuses[:15] == [200] * 15 and statuses.count(429) >= 8, statuses  # burst 20, aborted ones too
        assert refused.status_code == 429 and "uploading files too quickly" in refused.json()["detail"]


def test_sigterm_cleans_the_apps_temp_folders(models: list[str], tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    import httpx
    from _server import free_port

    root = Path(__file__).resolve().parent.parent
    folder = tmp_path / "gradio"
    temp = tmp_path / "tmp"  # the server's own temporary folder: its downloads folder is made there
    temp.mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(folder), "TMPDIR": str(temp), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(root / "app.py"), "--model", models[0], "--offline",
                               "--trust-model", "none", "--port", str(port), "--rate-limit", "0"],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(url), timeout=90, every=0.5), "the app did not start"
        with httpx.Client(base_url=url, timeout=30) as http:
            uploaded = http.post("/gradio_api/upload", files={"files": ("cat.png", noise_png(5), "image/png")})
            assert uploaded.status_code == 200
        _aborted_upload(url)
        assert wait_until(lambda: len(_partials(folder)) == 1, timeout=10)
        assert Path(uploaded.json()[0]).exists()
        mine = set(temp.glob("blip_app-downloads-*"))
        assert mine  # the app's own folder for downloads
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    log = server.stderr.read()
    assert code == 0, log[-2000:]
    assert "Importing torch and transformers in the background" in log  # app.main's cold-start warm-up
    assert _partials(folder) == [] and not Path(uploaded.json()[0]).exists()
    assert not [path for path in mine if path.exists()]


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/gradio_api/info", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_sweepers_run_while_the_server_serves(models: list[str]) -> None:
    """app.main's launch blocks until the server stops: the session and upload sweepers must already run."""
    from _server import _pillow_globals_restored, free_port

    import app as app_module
    from blip_app.config import parse_config
    from blip_app.web import server

    config = parse_config(["--model", models[0], "--offline", "--trust-model", "none", "--port", str(free_port())])
    demo, service = app_module.create_app(config)
    with _pillow_globals_restored():
        serving = threading.Thread(target=server.launch, args=(demo, config), kwargs={"quiet": True}, daemon=True)
        serving.start()
        try:
            assert wait_until(lambda: _answers(f"http://127.0.0.1:{config.port}"), timeout=60, every=0.2)
            assert serving.is_alive()  # launch is still blocking, as in app.main
            assert demo.blip_app_sessions._thread.is_alive() and demo.blip_app_uploads._thread.is_alive()
        finally:
            demo.close()
            serving.join(timeout=20)
            service.manager.close()
