"""``deploy/grafana-dashboard.json`` queries only what a live server's ``/metrics`` exports:
every metric name in every query, and every label a query groups by."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.conftest import RunningServer

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
# In our queries a metric name is always followed by its label matcher: name{instance=~...}.
METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
GROUPING = re.compile(r"by \(([^)]*)\)\s*\((?:rate\()?([a-zA-Z_:][a-zA-Z0-9_:]*)")


def exported(server: RunningServer) -> dict[str, set[str]]:
    """Sample names on /metrics, with the label names each carries."""
    series: dict[str, set[str]] = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        name = name.split(" ")[0]
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', rest)) if rest else set()
        series.setdefault(name, set()).update(labels)
    return series


def queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in board["templating"]["list"] if "definition" in v]
    return exprs


def test_every_query_names_metrics_the_server_exports(synthetic_server: RunningServer) -> None:
    url = synthetic_server.url
    # Exercise the paths whose labelled series only appear once used.
    body = {"messages": [{"role": "user", "content": "grafana"}], "max_tokens": 5, "stream": True}
    httpx.post(f"{url}/v1/chat/completions", json=body).raise_for_status()
    telemetry = {"transport": "sse", "ttft_ms": 20, "first_paint_ms": 30,
                 "complete_ms": 90, "long_frames": 0}  # fmt: skip
    httpx.post(f"{url}/v1/telemetry", json=telemetry).raise_for_status()
    series = exported(synthetic_server)
    checked = 0
    for expr in queries():
        names = METRIC.findall(expr) or re.findall(r"label_values\((\w+)", expr)
        assert names, f"no metric found in {expr!r}"
        for name in names:
            assert name in series, f"{name} (in {expr!r}) is not on /metrics"
            checked += 1
        for labels, name in GROUPING.findall(expr):
            for label in {x.strip() for x in labels.split(",")} - {"le"}:
                assert label in series[name], f"{name} has no label {label!r} ({expr!r})"
    assert checked >= 30
