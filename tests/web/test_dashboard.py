"""The dashboard at ``/dashboard`` in headless Chromium: it draws, it updates while load
runs, and it carries on across a server restart on the same port."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import _start, free_port
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.config import ServerConfig

pytestmark = pytest.mark.browser

LEGEND = 'document.querySelector(\'[data-chart="{chart}"] [data-series="{series}"]\')'
# How many pixels of the first series' colour (#2f6fde) a chart's canvas has.
LINE_PIXELS = """(chart) => {
  const canvas = document.querySelector(`[data-chart="${chart}"] canvas`);
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - 47) < 30 && Math.abs(data[i + 1] - 111) < 30
        && Math.abs(data[i + 2] - 222) < 30 && data[i + 3] > 200) n++;
  }
  return n;
}"""


class Load:
    """Streams chat completions and reports browser telemetry until stopped; connection
    errors (the server restarting) are expected and retried."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = {"messages": [{"role": "user", "content": "load"}], "max_tokens": 40}
        telemetry = {"transport": "sse", "ttft_ms": 30, "first_paint_ms": 45,
                     "complete_ms": 400, "long_frames": 0}  # fmt: skip
        while not self.stop.is_set():
            try:
                with httpx.stream(
                    "POST", f"{self.url}/v1/chat/completions", json={**body, "stream": True}
                ) as r:
                    for _ in r.iter_bytes():
                        pass
                httpx.post(f"{self.url}/v1/telemetry", json=telemetry)
            except httpx.HTTPError:
                self.stop.wait(0.05)  # the server is down: retry at a modest pace

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def legend_value(page, chart: str, series: str) -> float | None:  # type: ignore[no-untyped-def]
    value = page.evaluate(f"{LEGEND.format(chart=chart, series=series)}?.dataset.value")
    return float(value) if value else None


def test_dashboard_draws_updates_and_survives_a_restart(browser) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server, stop = _start(SyntheticEngine(itl_ms=5), ServerConfig(), port)
    load = Load(port)
    page = browser.new_page(bypass_csp=True)
    try:
        page.goto(f"{server.url}/dashboard")
        tokens = LEGEND.format(chart="throughput", series="tokens/s")
        page.wait_for_function(f"Number({tokens}?.dataset.value) > 0", timeout=15_000)
        page.wait_for_function(
            f"Number({LEGEND.format(chart='latency', series='browser TTFT p50')}"
            "?.dataset.value) > 0",
            timeout=15_000,
        )
        samples = int(page.evaluate("document.body.dataset.samples"))
        page.wait_for_function(f"Number(document.body.dataset.samples) > {samples + 1}")
        assert page.evaluate(LINE_PIXELS, "throughput") > 0, "the tokens/s line is drawn"
        assert page.evaluate(LINE_PIXELS, "latency") > 0, "the TTFT line is drawn"
        assert legend_value(page, "latency", "server TTFT p50") is not None
        assert legend_value(page, "itl", "p50") is not None
        assert legend_value(page, "requests", "running") is not None
        assert legend_value(page, "streams", "open streams") is not None
        assert legend_value(page, "aborts", "cancelled") is not None
        # The server goes away, the page says so and keeps trying.
        stop()
        page.wait_for_selector('#status[data-state="down"]', timeout=15_000)
        # A new server on the same port: counters start over, the page picks it up.
        server, stop = _start(SyntheticEngine(itl_ms=5), ServerConfig(), port)
        page.wait_for_selector('#status[data-state="live"]', timeout=15_000)
        assert page.evaluate("document.body.dataset.restarts") == "1"
        samples = int(page.evaluate("document.body.dataset.samples"))
        page.wait_for_function(
            f"Number(document.body.dataset.samples) > {samples + 1} "
            f"&& Number({tokens}?.dataset.value) > 0",
            timeout=15_000,
        )
    finally:
        page.close()
        load.close()
        stop()
