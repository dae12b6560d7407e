"""Shared pytest fixtures: tiny offline checkpoints of the four model families.

The environment is fixed at import time, before transformers is imported anywhere: one thread (tiny
models are dominated by thread start-up: more threads only slow them down) and no Hugging Face Hub access.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so that `pytest` (not only `python -m pytest`) finds blip_app
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family: folder} of the four tiny checkpoints in the modern layout, built once per session."""
    from blip_app.devtools.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_legacy_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family: folder} of the four tiny checkpoints in the pre-4.46 layout (no <image> token)."""
    from blip_app.devtools.tiny import FAMILIES, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny-legacy")
    return {family: make_tiny_checkpoint(root / family, family, legacy=True) for family in FAMILIES}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless chromium per test module (Debian's, driven by Playwright: tests/_browser.py)."""
    from _browser import CHROMIUM, CHROMIUM_ARGS, sync_api

    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture()
def new_page(browser) -> Iterator[object]:
    """Makes fresh browser contexts and pages; ``page.errors`` collects uncaught script errors and dialogs."""
    from _browser import TIMEOUT_MS

    contexts = []

    def make():
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(f"page error: {error}"))
        page.on("dialog", lambda dialog: (page.errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        return page

    yield make
    for context in contexts:
        context.close()
