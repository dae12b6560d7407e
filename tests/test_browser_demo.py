"""The page as a demo shows it, in Debian's chromium at 1366x900 (a laptop) and 390x844 (a phone).

One app and one browser for the module; each test loads the page once and asserts every item of issue 11
that it can see there, then saves a screenshot of every tab into SCREENSHOTS (printed), which the README's
docs/screenshots/ are copied from. Tiny random checkpoints: the answers are random words.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import TIMEOUT_MS  # skips this module without chromium or playwright
from _server import RunningApp, running_app
from test_browser import answered, finished_answers, upload, wait_for_output

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "chelsea.jpg"
SCREENSHOTS = Path(os.environ.get("BLIP_APP_SCREENSHOTS", Path(__file__).resolve().parent / "artifacts" / "screens"))
TABS = ("Chat", "Caption", "Ask", "Compare", "Search", "Batch")
LAPTOP, PHONE = {"width": 1366, "height": 900}, {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def app(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    """Two tiny models under short folder names, the tiny matching model, and a catalog model that is not
    downloaded while the server is offline (an empty hub cache)."""
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    root = tmp_path_factory.mktemp("demo")
    for family in ("blip2-opt", "instructblip-flan-t5"):
        (root / family).symlink_to(tiny_checkpoints[family], target_is_directory=True)
    matcher = make_tiny_retrieval_checkpoint(root / "retrieval")
    models = [root / "blip2-opt", root / "instructblip-flan-t5", "blip2-opt-2.7b"]
    with running_app(models, "--trust-model", str(matcher), cache_dir=root / "empty-cache") as running:
        running.done = finished_answers(running)
        print(f"\nscreenshots: {SCREENSHOTS}")
        yield running


def _page(browser, viewport: dict):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(f"page error: {error}"))
    return context, page


def _open(page, url: str) -> None:
    page.goto(url)
    page.locator("#model-status").get_by_text("Not loaded").or_(page.locator("#model-status").get_by_text(
        "Ready")).first.wait_for()


def _shoot(page, size: str, tab: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{size}-{tab.lower()}.png"), full_page=True)


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def _send(page, done: list[int], message: str) -> None:
    answers = page.locator("#chatbot .message-row.bot-row, #chatbot [data-testid=bot]").count()
    page.locator("#message textarea").fill(message)
    answered(page, done, page.locator("#send").click, answers + 1)


def test_the_laptop_page(app: RunningApp, browser) -> None:
    context, page = _page(browser, LAPTOP)
    try:
        _open(page, app.url)
        status = page.locator("#model-status")
        # 4. the catalog model cannot be downloaded offline: marked in the picker before anyone clicks
        page.locator("#model input").click()
        offline = page.get_by_role("option").filter(has_text="blip2-opt-2.7b")
        assert "unavailable" in offline.inner_text()
        offline.click()
        page.wait_for_function("() => document.querySelector('#model-status').innerText.includes('Unavailable')")
        assert "runs offline" in status.inner_text() and "blip2-opt is used instead" in status.inner_text()
        assert page.locator("#model input").input_value().startswith("blip2-opt ·")  # fell back to one that works
        assert page.locator("[data-testid=toast-body]").count() == 0  # said in place, not in a toast
        assert "/" not in status.inner_text()  # 6. no server path in the status

        # 6. the chat invites a question once the picture is there
        upload(page, EXAMPLE)
        page.get_by_text("Ask anything about the picture").wait_for()
        assert page.get_by_text("Upload an image to start").count() == 0 or not page.get_by_text(
            "Upload an image to start", exact=False).first.is_visible()

        # 6. text typed right after Send survives the answer; 2. the answer names its model and preset
        page.locator("#message textarea").fill("What animal is this?")

        def send_then_type() -> None:
            page.locator("#send").click()
            page.wait_for_function("() => document.querySelector('#message textarea').value === ''")  # taken
            page.locator("#message textarea").fill("and its colour?")  # while the answer is being written

        answered(page, app.done, send_then_type, 1)
        assert page.locator("#message textarea").input_value() == "and its colour?"
        bot = page.locator("#chatbot [data-testid=bot]")
        assert "— blip2-opt · Fast" in bot.last.inner_text()

        # 1. Regenerate gives a new answer, by sampling, says so, and keeps the replaced one
        first = bot.last.inner_text()
        # the replaced answer stays, folded, as a message of its own before the new one
        answered(page, app.done, page.get_by_role("button", name="↻ Regenerate").click, bot.count() + 1)
        page.get_by_text("Replaced answer 1").wait_for()
        assert "Regenerated by sampling" in page.locator("#chat-note").inner_text()
        assert bot.last.inner_text() != first and "sampled, seed" in bot.last.inner_text()

        # 2. a model switch is marked in the conversation
        page.locator("#model input").click()
        page.get_by_role("option").filter(has_text="instructblip-flan-t5").first.click()
        page.wait_for_function("() => document.querySelector('#model-status').innerText.includes('Ready')")
        page.locator("#message textarea").fill("Is it awake?")
        answered(page, app.done, page.locator("#send").click, bot.count() + 1)
        assert "Model switched to instructblip-flan-t5" in bot.last.inner_text()
        _shoot(page, "1366", "Chat")

        # 6. the trust line names what it measures; 5. the Detailed preset works on this model
        page.get_by_role("tab", name="Caption").click()
        page.get_by_text("Detailed description").click()
        page.locator("#caption-run").click()
        assert wait_for_output(page, "#caption-output")
        page.wait_for_function("() => document.querySelector('#caption-trust').innerText.includes('Image-text match:')")
        assert "Confidence" not in page.locator("#caption-trust").inner_text()
        assert page.locator("[data-testid=toast-body]").count() == 0
        _shoot(page, "1366", "Caption")

        # 6. a warning toast appears at the bottom, not over the status line
        page.get_by_role("tab", name="Ask").click()
        page.locator("#ask-run").click()  # no question: a warning
        toast = page.locator("[data-testid=toast-body]").first
        toast.wait_for()
        assert toast.bounding_box()["y"] > _box(page, "#model-status")["y"] + _box(page, "#model-status")["height"]
        assert toast.bounding_box()["y"] > LAPTOP["height"] / 2
        _shoot(page, "1366", "Ask")

        # 6. Search and Batch hide the picture panel they would ignore; the others show it
        for tab in ("Compare", "Search", "Batch"):
            page.get_by_role("tab", name=tab).click()
            expected = tab == "Compare"
            page.wait_for_function("(shown) => { const c = document.querySelector('#image-column');"
                                   " return (c !== null && c.offsetParent !== null) === shown; }", arg=expected)
            _shoot(page, "1366", tab)
        page.get_by_role("tab", name="Chat").click()
        page.locator("#image").wait_for(state="visible")
        assert page.errors == []
    finally:
        context.close()


def test_the_phone_page(app: RunningApp, browser, tmp_path: Path) -> None:
    from PIL import Image

    context, page = _page(browser, PHONE)
    try:
        _open(page, app.url)
        upload(page, EXAMPLE)
        header, picker, status = _box(page, "#header"), _box(page, "#model"), _box(page, "#model-status")
        # 3. a short header; the status under the picker, as wide as the page (it was a 50 px column)
        assert header["height"] < 110, header
        assert status["y"] >= picker["y"] + picker["height"] - 1 and status["width"] > 300, (picker, status)
        # 3. the image, then the conversation, both starting on the first screen
        image, chatbot = _box(page, "#image"), _box(page, "#chatbot")
        assert image["y"] < chatbot["y"] < PHONE["height"] - 150, (image, chatbot)
        assert _box(page, "#examples")["y"] > chatbot["y"]  # the examples come after the conversation
        # 3. every tab reachable by its name (no unlabeled "…" menu)
        assert page.get_by_role("button", name="More tabs").count() == 0
        for tab in TABS:
            assert page.get_by_role("tab", name=tab).is_visible(), tab
        _shoot(page, "390", "Chat")
        for tab in TABS[1:5]:
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(300)
            _shoot(page, "390", tab)

        # 3. the Batch run on a phone: both files listed, the table filled and readable
        page.get_by_role("tab", name="Batch").click()
        photos = []
        for name, colour in (("a-rather-long-file-name-of-a-red-photo.png", "red"), ("blue.png", "blue")):
            Image.new("RGB", (48, 32), colour).save(tmp_path / name)
            photos.append(str(tmp_path / name))
        page.locator("#batch-files input[type=file]").set_input_files(photos)
        page.wait_for_function("() => document.querySelector('#batch-files').innerText.includes('blue')")
        page.locator("#batch-run").click()
        page.wait_for_function("() => document.querySelector('#batch-summary').innerText.startsWith('Done')")
        assert page.locator("#batch-table").get_by_text("blue.png").count() >= 1
        files = _box(page, "#batch-files")
        assert files["height"] >= 150  # both files listed, not one and a half
        # 3. readable tables: the columns keep their width (the table scrolls sideways), a header is one line,
        # and each header stands over its own column
        columns = page.evaluate("""() => {
            const table = document.querySelector('#batch-table');
            const box = (cell) => { const r = cell.getBoundingClientRect(); return [r.x, r.width, r.height]; };
            // gradio 6 draws the header as a table and the rows as a virtual list of div cells
            const row = [...table.querySelectorAll('.virtual-row')].find((r) => r.innerText.includes('blue.png'));
            return {head: [...table.querySelectorAll('thead th')].map(box),
                    body: [...row.querySelectorAll('.body-cell')].map(box)};
        }""")
        head, body = columns["head"][-4:], columns["body"][-4:]
        print("batch table columns (x, width, height):", head, body)
        assert all(width >= 60 for _, width, _ in head), head
        assert all(height < 2 * head[0][2] for _, _, height in head) and head[2][2] < 40, head  # "seconds": one line
        assert all(abs(h[0] - b[0]) < 2 for h, b in zip(head, body)), (head, body)
        _shoot(page, "390", "Batch")
        assert page.errors == []
    finally:
        context.close()


def test_copy_the_screenshots_into_the_docs() -> None:
    """The final set goes to docs/screenshots/ and the README's picture (run with BLIP_APP_UPDATE_SCREENSHOT=1)."""
    shots = sorted(SCREENSHOTS.glob("*.png"))
    assert len(shots) == 2 * len(TABS), [s.name for s in shots]
    if os.environ.get("BLIP_APP_UPDATE_SCREENSHOT") == "1":
        target = ROOT / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy(shot, target / shot.name)
