"""The README's screenshots, taken in headless Chromium: the page with a streamed Markdown
answer (code block included) and the dashboard under load.

They are written to ``docs/`` when ``TOKENSPOUT_SCREENSHOTS=docs`` (how the README's were
made); otherwise to a temporary folder, so that ``make test`` leaves the tree clean."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import _start, free_port
from tests.web.test_dashboard import LEGEND, Load
from tests.web.test_markdown import ScriptedEngine
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.config import ServerConfig

pytestmark = pytest.mark.browser

ANSWER = """### Reading a file line by line

Open it with a **context manager**, so it is closed even if an error is raised, and
iterate over the file object: it yields one line at a time without loading the whole file.

```python
from pathlib import Path

def count_words(path: Path) -> int:
    with path.open(encoding="utf-8") as lines:
        return sum(len(line.split()) for line in lines)
```

| Approach | Memory | Notes |
| --- | --- | --- |
| `for line in f` | one line | the usual way |
| `f.read()` | whole file | fine for small files |

- Pass `encoding` explicitly: the default depends on the platform.
- See the [Python tutorial](https://docs.python.org/3/tutorial/inputoutput.html).
"""


def folder(tmp_path: Path) -> Path:
    if os.environ.get("TOKENSPOUT_SCREENSHOTS") == "docs":
        return Path(__file__).parents[2] / "docs"
    return tmp_path


def test_screenshot_of_a_markdown_answer(start_server, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    engine = ScriptedEngine(ANSWER, itl_ms=5)
    server = start_server(engine)
    page = browser.new_page(viewport={"width": 1200, "height": 860})
    try:
        page.goto(server.url)
        page.fill("#max-tokens", str(len(engine.tokens)))
        page.fill("#prompt", "How do I read a file line by line in Python?")
        page.press("#prompt", "Enter")
        page.wait_for_selector("#send:not([disabled])", timeout=15_000)
        assert page.locator(".answer .code .lang").text_content() == "python"
        path = folder(tmp_path) / "page-markdown.png"
        page.screenshot(path=str(path))
    finally:
        page.close()
    assert path.stat().st_size > 10_000


@pytest.mark.slow  # 20 s of samples: `make test-slow` (CI) takes it
def test_screenshot_of_the_dashboard_under_load(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    _, stop = _start(SyntheticEngine(ttft_ms=40, itl_ms=20), ServerConfig(), port)
    loads = [Load(port) for _ in range(4)]
    page = browser.new_page(viewport={"width": 1280, "height": 980}, bypass_csp=True)
    try:
        page.goto(f"http://127.0.0.1:{port}/dashboard")
        tokens = LEGEND.format(chart="throughput", series="tokens/s")
        page.wait_for_function(
            f"Number(document.body.dataset.samples) >= 20 && Number({tokens}?.dataset.value) > 0",
            timeout=60_000,
        )
        path = folder(tmp_path) / "dashboard.png"
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.close()
        for load in loads:
            load.close()
        stop()
    assert path.stat().st_size > 10_000
