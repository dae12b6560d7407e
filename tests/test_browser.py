"""The page in a real browser: Debian's chromium driven by Playwright, against the real app on loopback.

Runs the real Service and engine on tiny checkpoints (random text). Saves tests/artifacts/browser.png.
``test_readme_screenshot`` renders the README picture into tests/artifacts/screenshot.png, and into
assets/screenshot.png when BLIP_APP_UPDATE_SCREENSHOT=1 (tiny random checkpoints: nothing is staged).

Browser set-up: tests/_browser.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import TIMEOUT_MS  # skips this module without chromium or playwright
from _server import RunningApp, running_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"


@pytest.fixture()
def page(new_page):
    return new_page()


def open_app(page, url: str) -> None:
    page.goto(url)
    page.locator("#model-status").get_by_text("Not loaded").or_(page.locator("#model-status").get_by_text(
        "Ready")).or_(page.locator("#model-status").get_by_text("Not downloaded")).first.wait_for()


def upload(page, path: Path) -> None:
    page.locator("#image input[type=file]").set_input_files(str(path))
    page.locator("#image img").first.wait_for()


def wait_for_output(page, selector: str) -> str:
    """The final text of a caption/answer box (not empty, not the placeholder while it thinks)."""
    page.wait_for_function(
        """(selector) => { const box = document.querySelector(selector + ' textarea');
                           return box && box.value !== '' && box.value !== 'thinking…'
                                  && !box.value.endsWith('▍'); }""", arg=selector)
    return page.locator(f"{selector} textarea").input_value()


def finished_answers(app: RunningApp) -> list[int]:
    """Count, in the server (same process), the answers the engine has finished streaming."""
    done = [0]

    def counted(method):
        def counting(*args, **kwargs):
            try:
                yield from method(*args, **kwargs)
            finally:
                done[0] += 1

        return counting

    # Caption and Ask stream their answer; a chat turn takes the service's events (prompt, then answer).
    app.service.stream = counted(app.service.stream)
    app.service.events = counted(app.service.events)
    return done


def answered(page, done: list[int], action, answers: int) -> None:
    """Run ``action`` (a click); wait until the server has finished the answer it asked for and the page
    shows it: ``answers`` answers in the chat, none pending, and Undo enabled (it is turned on only once
    the event has completed)."""
    before = done[0]
    action()
    for _ in range(TIMEOUT_MS // 50):
        if done[0] > before:
            break
        page.wait_for_timeout(50)
    assert done[0] > before, "the server never finished the answer"
    page.wait_for_function(
        """(answers) => { const chat = document.querySelector('#chatbot');
                          const undo = Array.from(document.querySelectorAll('button'))
                                            .find((b) => b.innerText.includes('Undo'));
                          return chat.querySelectorAll('[data-testid=bot]').length === answers
                                 && !chat.innerText.includes('thinking…') && !chat.innerText.includes('▍')
                                 && undo !== undefined && !undo.disabled; }""", arg=answers)


def chat(page, done: list[int], message: str) -> None:
    """Send a chat message and wait until its answer is shown in full."""
    answers = page.locator("#chatbot [data-testid=bot]").count()
    page.locator("#message textarea").fill(message)
    answered(page, done, page.locator("#send").click, answers + 1)


def choose_model(page, name: str, status: str | None = None) -> None:
    """Pick the model ``name`` in the picker; wait until the status line says Ready and shows ``status``."""
    page.locator("#model input").click()
    page.get_by_role("option").filter(has_text=name).first.click()
    page.wait_for_function(
        """(text) => { const shown = document.querySelector('#model-status').innerText;
                       return shown.includes(text) && shown.includes('Ready') && !shown.includes('Loading'); }""",
        arg=status or name)


@pytest.fixture(scope="module")
def app(tiny_checkpoints: dict[str, Path]) -> Iterator[RunningApp]:
    with running_app([tiny_checkpoints["blip2-opt"], tiny_checkpoints["instructblip-flan-t5"]]) as running:
        running.done = finished_answers(running)
        yield running


def test_caption_ask_chat_and_switch_model(app: RunningApp, page, tiny_checkpoints: dict[str, Path]) -> None:
    open_app(page, app.url)
    upload(page, EXAMPLE)

    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption-run").click()
    assert wait_for_output(page, "#caption-output")

    page.get_by_role("tab", name="Ask").click()
    page.locator("#question textarea").fill("What color is the cat?")
    page.locator("#ask-run").click()
    assert wait_for_output(page, "#answer-output")

    page.get_by_role("tab", name="Chat").click()
    chat(page, app.done, "What animal is this?")
    hostile = "<img src=http://127.0.0.1:9/x.png onerror=alert(1)> ![a](http://127.0.0.1:9/a.png) **b**"
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url) if ":9/" in request.url else None)
    chat(page, app.done, hostile)
    users = page.locator("#chatbot [data-testid=user]")
    assert users.count() == 2
    assert users.nth(1).inner_text().strip() == hostile  # shown as typed: no image, no bold
    assert page.locator("#chatbot img").count() == 0 and not requests

    choose_model(page, "instructblip-flan-t5")
    assert "instructblip-flan-t5" in page.locator("#model-status").inner_text()
    chat(page, app.done, "Is it awake?")
    assert page.locator("#chatbot [data-testid=bot]").count() == 3
    choose_model(page, "blip2-opt")

    page.locator("#chatbot").scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser.png"), full_page=True)
    assert page.errors == []


def test_undo_regenerate_and_a_new_image(app: RunningApp, page) -> None:
    open_app(page, app.url)
    upload(page, EXAMPLE)
    chat(page, app.done, "What is this?")
    chat(page, app.done, "And now?")
    bots = page.locator("#chatbot [data-testid=bot]")
    assert bots.count() == 2

    page.get_by_role("button", name="↶ Undo").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length === 1")
    assert page.locator("#message textarea").input_value() == "And now?"

    answered(page, app.done, page.get_by_role("button", name="↻ Regenerate").click, 2)  # the replaced one stays
    assert bots.count() == 2 and "Replaced answer 1" in bots.first.inner_text()
    assert page.locator("#chatbot [data-testid=user]").first.inner_text().strip() == "What is this?"

    upload(page, ROOT / "assets" / "examples" / "rocket.jpg")  # a new image starts a new conversation
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]').length === 0")
    assert not page.get_by_role("button", name="↶ Undo").is_enabled()
    assert page.errors == []


def test_a_corrupt_upload_is_refused_with_its_sentence(app: RunningApp, page, tmp_path: Path) -> None:
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2048))
    open_app(page, app.url)
    page.locator("#image input[type=file]").set_input_files(str(corrupt))
    toast = page.locator("[data-testid=toast-body]").first
    toast.wait_for()
    assert "PNG" in toast.inner_text()  # the sentence of blip_app.core.images, not a generic error
    page.wait_for_function("() => document.querySelectorAll('#image img').length === 0")  # removed again
    assert page.errors == []


def test_readme_screenshot(tiny_checkpoints: dict[str, Path], page, tmp_path: Path, monkeypatch) -> None:
    """The picture for the README: a chat in progress about an example photo.

    Nothing is staged: the app runs the tiny offline checkpoints (random weights, so the answers are
    random words), offered under short folder names so that the picker stays readable.
    """
    (tmp_path / "tiny").mkdir()
    for family in ("blip2-opt", "instructblip-flan-t5"):
        (tmp_path / "tiny" / family).symlink_to(tiny_checkpoints[family], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    with running_app(["tiny/instructblip-flan-t5", "tiny/blip2-opt"]) as running:
        done = finished_answers(running)
        open_app(page, running.url)
        choose_model(page, "instructblip-flan-t5")
        page.locator(".gallery-item").first.click()  # the first example: the cat, with a chat opener
        page.locator("#image img").first.wait_for()
        answered(page, done, page.locator("#send").click, 1)
        chat(page, done, "What color are its eyes?")
        page.locator("#message textarea").fill("Is it a kitten or a grown-up cat?")
        page.mouse.move(0, 0)
        page.wait_for_timeout(400)  # let the buttons' transitions finish
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "screenshot.png"))
        assert page.errors == []
    if os.environ.get("BLIP_APP_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTIFACTS / "screenshot.png", ROOT / "assets" / "screenshot.png")
