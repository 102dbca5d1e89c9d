"""Browser fixtures: Debian's Chromium driven by Playwright (its bundled driver; browsers
are never downloaded). A missing Chromium or Playwright fails the browser tests with the
way to fix it: they are never skipped, so CI cannot pass without having run them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

CHROMIUM = Path(os.environ.get("KS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: run `bash scripts/ensure-browser.sh` "
            "(apt-get install chromium) or `make install-test`",
            pytrace=False,
        )
    return CHROMIUM


@pytest_asyncio.fixture
async def browser(chromium: Path) -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "Playwright is missing: pip install -e '.[test]' (never `playwright install`: "
            "the tests use Debian's Chromium)",
            pytrace=False,
        )
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()
