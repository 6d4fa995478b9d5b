"""One headless Chromium per test module, from Debian's ``chromium`` package (``make dev``
installs it); Playwright's own browser downloads are never used."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
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


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A Playwright ``Browser``; skips loudly where Chromium is not installed."""
    if not os.access(CHROMIUM, os.X_OK):
        message = (
            f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing; "
            "`apt-get install -y chromium` (make dev does it) to run them"
        )
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
