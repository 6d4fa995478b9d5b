"""``GET /dashboard/data``: the metrics the dashboard page plots, as one small JSON object.

Values are cumulative, as in ``/metrics`` (the page turns two snapshots into rates and
windowed percentiles, as Prometheus does with ``rate`` and ``histogram_quantile``); this only
spares the page a parser for the text format. ``instance`` names this server process (it
changes when the server restarts, and replicas behind a balancer each have their own), so the
page takes differences only between snapshots of one instance and adds up the instances.
"""

from __future__ import annotations

import time
import uuid
from typing import Any
from weakref import WeakKeyDictionary

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenspout.server.metrics import Metrics
from tokenspout.server.server_state import state_of

router = APIRouter()

_GAUGES = {
    "running": "tokenspout_requests_running",
    "waiting": "tokenspout_requests_waiting",
    "streams": "tokenspout_streams_active",
}
_COUNTERS = {
    "generation_tokens": "tokenspout_generation_tokens",
    "requests": "tokenspout_requests",
}
_HISTOGRAMS = {
    "ttft": "tokenspout_time_to_first_token_seconds",
    "itl": "tokenspout_inter_token_latency_seconds",
    "client_ttft": "tokenspout_client_ttft_seconds",
    "client_first_paint": "tokenspout_client_first_paint_seconds",
}
_ABORTS = "tokenspout_requests_aborted"

#: One id per server (per registry): a different one means the server restarted.
_INSTANCES: WeakKeyDictionary[Metrics, str] = WeakKeyDictionary()


def snapshot(metrics: Metrics) -> dict[str, Any]:
    """The dashboard's numbers from the server's registry (client histograms summed over
    transports)."""
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    aborts: dict[str, float] = {}
    histograms: dict[str, dict[str, Any]] = {}
    gauge_keys = {v: k for k, v in _GAUGES.items()}
    counter_keys = {v: k for k, v in _COUNTERS.items()}
    histogram_keys = {v: k for k, v in _HISTOGRAMS.items()}
    for family in metrics.registry.collect():
        name = family.name
        if name in gauge_keys:
            gauges[gauge_keys[name]] = sum(s.value for s in family.samples)
        elif name in counter_keys:
            counters[counter_keys[name]] = sum(
                s.value for s in family.samples if s.name.endswith("_total")
            )
        elif name == _ABORTS:
            for s in family.samples:
                if s.name.endswith("_total"):
                    aborts[s.labels["reason"]] = s.value
        elif name in histogram_keys:
            histograms[histogram_keys[name]] = _histogram(family.samples)
    return {
        "time": time.time(),
        "instance": _INSTANCES.setdefault(metrics, uuid.uuid4().hex),
        "gauges": gauges,
        "counters": counters,
        "aborts": aborts,
        "histograms": histograms,
    }


def _histogram(samples: list[Any]) -> dict[str, Any]:
    buckets: dict[float, float] = {}
    count = total = 0.0
    for s in samples:
        if s.name.endswith("_bucket"):
            le = float(s.labels["le"])
            buckets[le] = buckets.get(le, 0.0) + s.value
        elif s.name.endswith("_count"):
            count += s.value
        elif s.name.endswith("_sum"):
            total += s.value
    les = sorted(buckets)
    # JSON has no infinity: the +Inf bucket's count is `count`.
    return {
        "le": [le for le in les if le != float("inf")],
        "cumulative": [buckets[le] for le in les if le != float("inf")],
        "count": count,
        "sum": total,
    }


@router.get("/dashboard/data", include_in_schema=False)
async def dashboard_data(request: Request) -> Response:
    return JSONResponse(snapshot(state_of(request).metrics), headers={"Cache-Control": "no-store"})
