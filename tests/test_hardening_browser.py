"""Hostile output and users who leave, in a real browser: Debian's chromium driven by Playwright.

The server runs in this process on tiny checkpoints, so the tests can make the model "say" anything
(its ``decode`` is replaced) and can count its forward passes.
Browser set-up: tests/_browser.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import TIMEOUT_MS  # skips this module without chromium or playwright
from _server import ROOT, RunningApp, running_app

from blip_app.models.engine import DEVICE_LOCKS, LoadedModel

EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"
HOSTILE = ("<img src=http://127.0.0.1:9/x.png onerror=alert(1)> <script>alert(2)</script> "
           "![p](http://127.0.0.1:9/p.png) <a href=javascript:alert(3)>link</a> **bold**")


@pytest.fixture(scope="module")
def app(tiny_checkpoints: dict[str, Path]) -> Iterator[RunningApp]:
    with running_app([tiny_checkpoints["blip2-opt"]]) as running:
        yield running


@pytest.fixture()
def page(new_page):
    page = new_page()
    page.problems = page.errors  # uncaught script errors and dialogs
    page.remote = []  # requests to the hostile text's address
    page.on("request", lambda request: page.remote.append(request.url) if ":9/" in request.url else None)
    return page


def open_with_image(page, url: str) -> None:
    page.goto(url)
    page.locator("#model-status").get_by_text("Not loaded").or_(
        page.locator("#model-status").get_by_text("Ready")).first.wait_for()
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLE))
    page.locator("#image img").first.wait_for()


class Steps:
    """Counts and slows the language model's forward passes; answers always run to max_new_tokens
    (a random tiny model may otherwise end early)."""

    def __init__(self, app: RunningApp, delay: float) -> None:
        self.count = 0
        self.delay = delay
        self.lm = app.service.manager.get(app.service.manager.names[0]).model.language_model
        self.handle = self.lm.register_forward_pre_hook(self._hook)
        generate = self.lm.generate

        def full_length(*args, **kwargs):
            return generate(*args, **{**kwargs, "min_new_tokens": kwargs["max_new_tokens"]})

        self.lm.generate = full_length

    def _hook(self, module, args) -> None:
        self.count += 1
        time.sleep(self.delay)

    def remove(self) -> None:
        self.handle.remove()
        del self.lm.generate


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_hostile_model_output_is_shown_as_text(app: RunningApp, page, monkeypatch) -> None:
    monkeypatch.setattr(LoadedModel, "decode", lambda self, ids: HOSTILE)
    open_with_image(page, app.url)
    page.locator("#message textarea").fill(HOSTILE)
    page.locator("#send").click()
    page.wait_for_function(
        """(text) => { const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                       return bots.length === 1 && bots[0].innerText.trim().startsWith(text)
                              && bots[0].innerText.includes('— '); }""", arg=HOSTILE)  # then who wrote it
    chatbot = page.locator("#chatbot")
    assert page.locator("#chatbot [data-testid=user]").first.inner_text().strip() == HOSTILE
    assert chatbot.locator("img").count() == 0 and chatbot.locator("script").count() == 0
    assert chatbot.locator("a").count() == 0 and chatbot.locator("strong").count() == 0

    page.get_by_role("tab", name="Caption").click()  # a plain text box: shown as text too
    page.locator("#caption-run").click()
    page.wait_for_function("""(text) => document.querySelector('#caption-output textarea').value === text""",
                           arg=HOSTILE)
    page.wait_for_timeout(500)  # give any injected image or script the time to load or run
    assert page.remote == [] and page.problems == []


def test_stop_mid_stream_stops_the_generation_and_frees_the_device(app: RunningApp, page) -> None:
    open_with_image(page, app.url)
    page.locator("#message textarea").fill("warm up")
    page.locator("#send").click()
    page.locator("#chatbot [data-testid=bot]").first.wait_for()
    page.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('thinking…')")
    steps = Steps(app, delay=0.2)
    try:
        page.locator("#message textarea").fill("Tell me a long story.")
        # the fast preset streams; its 60 new tokens take 12 s or more
        page.locator("#send").click()
        assert wait_until(lambda: steps.count >= 5, timeout=30)
        page.locator("#chat-stop").click()
        assert wait_until(lambda: not DEVICE_LOCKS.get("cpu").locked(), timeout=5)
        stopped = steps.count
        time.sleep(0.5)
        assert steps.count <= stopped + 1 and stopped < 55  # stopped before its 60 tokens, nothing after
        page.get_by_text("Stopped").first.wait_for()
    finally:
        steps.remove()
    assert page.problems == []


def test_a_user_who_closes_the_tab_mid_stream_stops_the_generation(app: RunningApp, browser) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_with_image(page, app.url)
    steps = Steps(app, delay=0.3)  # the 60 tokens of a chat answer take 18 s or more
    try:
        page.locator("#message textarea").fill("Tell me a long story.")
        page.locator("#send").click()
        assert wait_until(lambda: steps.count >= 5, timeout=30)
        context.close()  # the tab is gone: its event stream and heartbeat close
        closed = time.monotonic()
        assert wait_until(lambda: not DEVICE_LOCKS.get("cpu").locked(), timeout=20), "generation went on"
        print(f"\ntab closed: generation stopped {time.monotonic() - closed:.1f} s later, after {steps.count} steps")
        stopped = steps.count
        time.sleep(0.5)
        assert steps.count <= stopped + 1 and stopped < 50
        assert not [t for t in threading.enumerate() if t.name.startswith("generate-") and t.is_alive()]
    finally:
        steps.remove()
