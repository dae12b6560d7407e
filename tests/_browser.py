"""Debian's chromium driven by Playwright, shared by the browser test files.

Importing this module skips the importing test module when chromium or playwright is missing (reported
as skipped, with the command that installs it); the ``browser`` and ``new_page`` fixtures live in
conftest.py and use it. Setup: ``apt-get install -y chromium`` and ``pip install
playwright`` (never ``playwright install``: its browser download does not work here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000  # the first request imports torch and loads a model

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
