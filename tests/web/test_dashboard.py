"""The dashboard at ``/dashboard`` in headless Chromium: it draws, it updates while load
runs, it carries on across a server restart on the same port, and behind a load balancer it
adds up the replicas its polls reach in turn."""

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
        # Marked as a server that started meanwhile; the one that went away no longer counts.
        assert page.evaluate("document.body.dataset.newInstances") == "1"
        assert page.evaluate("document.body.dataset.instances") == "1"
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


# Records the "server TTFT p50" legend value at every sample the page draws.
SEEN_TTFT = """
window.__seen = [];
new MutationObserver(() => {
  const item = document.querySelector('[data-chart="latency"] [data-series="server TTFT p50"]');
  window.__seen.push(item ? item.dataset.value : null);
}).observe(document, { attributes: true, subtree: true, attributeFilter: ["data-samples"] });
"""


def test_percentiles_cover_only_the_window(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    """Snapshots 5 s apart (served to the page in place of the server's): the first has no
    baseline, so no percentile; one with TTFT observations in the last 10 s has one; once
    they are older, the legend says "–" again instead of keeping the last value."""
    server = start_server(SyntheticEngine(itl_ms=1))
    body = {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2, "stream": True}
    httpx.post(f"{server.url}/v1/chat/completions", json=body)  # all-time data, long ago
    base = httpx.get(f"{server.url}/dashboard/data").json()
    ttft = base["histograms"]["ttft"]
    grown = {**ttft, "cumulative": [2 * c for c in ttft["cumulative"]], "count": 2 * ttft["count"]}
    # TTFT observations arrive between the third and fourth snapshots only.
    snapshots = [
        {**base, "time": base["time"] + 5 * i,
         "histograms": {**base["histograms"], "ttft": ttft if i < 3 else grown}}
        for i in range(6)
    ]  # fmt: skip
    served = iter(snapshots)

    def answer(route) -> None:  # type: ignore[no-untyped-def]
        snapshot = next(served, None)
        if snapshot is None:
            route.abort()  # the page shows a gap: no more samples are counted
        else:
            route.fulfill(json=snapshot)

    page = browser.new_page(bypass_csp=True)
    try:
        page.add_init_script(SEEN_TTFT)
        page.route("**/dashboard/data*", answer)
        page.goto(f"{server.url}/dashboard")
        page.wait_for_function("Number(document.body.dataset.samples) === 6", timeout=20_000)
        seen = page.evaluate("window.__seen.slice(0, 6)")
    finally:
        page.close()
    assert seen[:3] == ["", "", ""], seen
    assert all(seen[3:5]), seen
    assert seen[5] == "", seen


def _snapshot(base: dict, instance: str, time: float, tokens: float, running: float,
              cancelled: float) -> dict:  # fmt: skip
    return {
        **base,
        "instance": instance,
        "time": time,
        "gauges": {"running": running, "waiting": 0, "streams": running},
        "counters": {**base["counters"], "generation_tokens": tokens},
        "aborts": {**base["aborts"], "cancelled": cancelled},
    }


def test_replicas_polled_in_turn_are_added_up(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    """Behind a load balancer the polls alternate between two replicas (served to the page in
    place of the server's snapshots): A makes 100 tokens/s, runs 2 requests and cancels one
    every 2 s; B makes 50 tokens/s and runs 3. Each rate comes from the same replica's
    previous snapshot, the page adds the two up, says it sees 2 instances, and calls none of
    the switches a restart."""
    server = start_server(SyntheticEngine(itl_ms=1))
    base = httpx.get(f"{server.url}/dashboard/data").json()
    t0 = base["time"]
    snapshots = []
    for k in range(4):
        snapshots.append(_snapshot(base, "a", t0 + 2 * k, 200 * k, running=2, cancelled=k))
        snapshots.append(_snapshot(base, "b", t0 + 2 * k + 1, 100 * k, running=3, cancelled=0))
    served = iter(snapshots)

    def answer(route) -> None:  # type: ignore[no-untyped-def]
        snapshot = next(served, None)
        if snapshot is None:
            route.abort()
        else:
            route.fulfill(json=snapshot)

    page = browser.new_page(bypass_csp=True)
    try:
        page.route("**/dashboard/data*", answer)
        page.goto(f"{server.url}/dashboard")
        page.wait_for_function(f"Number(document.body.dataset.samples) === {len(snapshots)}",
                               timeout=20_000)  # fmt: skip
        assert legend_value(page, "throughput", "tokens/s") == 150
        assert legend_value(page, "requests", "running") == 5
        assert legend_value(page, "streams", "open streams") == 5
        assert legend_value(page, "aborts", "cancelled") == 0.5
        assert page.evaluate("document.body.dataset.instances") == "2"
        assert page.evaluate("document.body.dataset.newInstances") == "0"
        assert "2 instances" in page.text_content("#status")
    finally:
        page.close()


def test_two_real_servers_polled_in_turn(start_server, browser) -> None:  # type: ignore[no-untyped-def]
    """Two servers under load, the page's polls sent to each in turn (as round-robin
    balancing does): tokens/s and abort rates are measured, and neither counts as a
    restart."""
    servers = [start_server(SyntheticEngine(itl_ms=5)) for _ in range(2)]
    loads = [Load(s.port) for s in servers]
    turn = iter(range(1_000_000))

    def balance(route) -> None:  # type: ignore[no-untyped-def]
        server = servers[next(turn) % 2]
        route.fulfill(response=route.fetch(url=f"{server.url}/dashboard/data"))

    page = browser.new_page(bypass_csp=True)
    try:
        page.route("**/dashboard/data*", balance)
        page.goto(f"{servers[0].url}/dashboard")
        tokens = LEGEND.format(chart="throughput", series="tokens/s")
        cancelled = LEGEND.format(chart="aborts", series="cancelled")
        page.wait_for_function(
            f"Number({tokens}?.dataset.value) > 0 && {cancelled}?.dataset.value !== ''"
            " && document.body.dataset.instances === '2'",
            timeout=15_000,
        )
        assert page.evaluate("document.body.dataset.newInstances") == "0"
    finally:
        page.close()
        for load in loads:
            load.close()
