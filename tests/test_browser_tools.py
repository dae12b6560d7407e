"""The Search and Compare tabs in a real browser: Debian's chromium driven by Playwright, against the real app.

The app offers two tiny captioning checkpoints and a tiny image-text matching checkpoint (random weights:
the texts are gibberish, the scores real). Saves tests/artifacts/search.png and tests/artifacts/compare.png.

Browser set-up: tests/_browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from _browser import TIMEOUT_MS  # noqa: F401 - importing it skips this module without chromium or playwright
from _server import RunningApp, running_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
EXAMPLES = ROOT / "assets" / "examples"
PHOTOS = ["chelsea.jpg", "rocket.jpg", "coffee.jpg"]


@pytest.fixture(scope="module")
def app(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    from blip_app.devtools.tiny import make_tiny_retrieval_checkpoint

    retrieval = make_tiny_retrieval_checkpoint(tmp_path_factory.mktemp("retrieval") / "itm")
    models = [tiny_checkpoints["blip2-opt"], tiny_checkpoints["instructblip-flan-t5"]]
    with running_app(models, "--trust-model", str(retrieval)) as running:
        yield running


@pytest.fixture()
def page(new_page, app: RunningApp):
    page = new_page()
    page.goto(app.url)
    page.locator("#model-status").get_by_text("Not loaded").or_(
        page.locator("#model-status").get_by_text("Ready")).first.wait_for()
    return page


def screenshot(page, name: str) -> None:
    page.mouse.move(0, 0)
    page.wait_for_timeout(300)  # transitions
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_search_ranks_three_uploaded_images_with_their_scores(page) -> None:
    page.get_by_role("tab", name="Search").click()
    page.locator("#search-files input[type=file]").set_input_files([str(EXAMPLES / name) for name in PHOTOS])
    for name in PHOTOS:  # uploaded: each file is listed
        page.locator(f'#search-files td.filename[aria-label="{name}"]').wait_for(state="attached")
    page.locator("#search-query textarea").fill("a cat with green eyes")
    page.locator("#search-run").click()
    captions = page.locator("#search-results .caption-label")
    page.wait_for_function("() => document.querySelectorAll('#search-results .caption-label').length === 3")
    shown = [captions.nth(i).inner_text() for i in range(3)]
    parsed = [re.fullmatch(r"(\d\.\d\d) (very likely|likely|uncertain|unlikely) · (\S+)", text) for text in shown]
    assert all(parsed), shown
    scores = [float(match.group(1)) for match in parsed]
    assert scores == sorted(scores, reverse=True)
    assert sorted(match.group(3) for match in parsed) == sorted(PHOTOS)
    assert page.locator("#search-results img").count() == 3
    assert "3 images ranked" in page.locator("#search-summary").inner_text()
    screenshot(page, "search.png")
    assert page.errors == []


def test_two_models_side_by_side_show_two_columns_with_times(page, app: RunningApp) -> None:
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / "chelsea.jpg"))
    page.locator("#image img").first.wait_for()
    page.get_by_role("tab", name="Compare").click()
    ticked = page.locator("#compare-models input[type=checkbox]:checked")
    assert ticked.count() == 2  # the first two models, ready to go
    page.locator("#compare-run").click()
    page.wait_for_function(
        """() => { const metas = document.querySelectorAll('.compare-card .compare-meta');
                   return metas.length === 2 && !document.body.innerText.includes('checking the match'); }""")
    cards = page.locator(".compare-card")
    assert cards.count() == 2
    for index in range(2):
        meta = cards.nth(index).locator(".compare-meta").inner_text()
        assert re.search(r"\d+\.\d\d s", meta), meta
        assert "Image-text match:" in meta
        title = cards.nth(index).locator(".trust").get_attribute("title")
        assert "match probability" in title
    names = [cards.nth(i).locator(".compare-model").inner_text() for i in range(2)]
    assert names == ["blip2-opt", "instructblip-flan-t5"]
    assert not page.locator("#compare-2").is_visible()
    screenshot(page, "compare.png")
    assert page.errors == []
