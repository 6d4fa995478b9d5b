"""Metrics of the upstream engine, per upstream and labelled by its address (never its
key). The objects are created without a registry: the server registers them with its own
(``Engine.collectors``), so several servers in one process keep theirs apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tokenspout.engine.upstream_server import UpstreamServer

#: Why an answer moved to another upstream mid-stream (``tokenspout_upstream_failovers``);
#: anything else (the continuation's own request failed: connect error, 5xx) is
#: ``upstream_error``.
FAILOVER_REASONS = ("cut", "stall", "malformed")

_TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class UpstreamMetrics:
    """Counters and histograms the relays record, and gauges read at scrape time."""

    def __init__(self, servers: Callable[[], Sequence[UpstreamServer]]):
        self.requests = Counter(
            "tokenspout_upstream_requests",
            "Requests sent to an upstream, by outcome: its HTTP status, or connect_error, "
            "timeout, cut, stall, malformed, cancelled.",
            ["upstream", "status"],
            registry=None,
        )
        self.ttft = Histogram(
            "tokenspout_upstream_time_to_first_token_seconds",
            "Request sent to an upstream to its first chunk with output (a chat's opening "
            "chunk, with only the role, is none).",
            ["upstream"],
            buckets=_TTFT_BUCKETS,
            registry=None,
        )
        self.retries = Counter(
            "tokenspout_upstream_retries",
            "Requests tried again elsewhere after a failure before their first token, by "
            "the upstream that failed.",
            ["upstream"],
            registry=None,
        )
        self.failovers = Counter(
            "tokenspout_upstream_failovers",
            "Answers continued on another upstream after a failure mid-stream, by reason "
            "and the upstream that failed.",
            ["reason", "upstream"],
            registry=None,
        )
        self._gauges = _UpstreamGauges(servers)

    def collectors(self) -> tuple[Collector, ...]:
        return (self.requests, self.ttft, self.retries, self.failovers, self._gauges)


class _UpstreamGauges(Collector):
    """In flight and health of each upstream, read when Prometheus scrapes."""

    def __init__(self, servers: Callable[[], Sequence[UpstreamServer]]):
        self._servers = servers

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "tokenspout_upstream_in_flight",
            "Requests an upstream is answering now.",
            labels=["upstream"],
        )
        healthy = GaugeMetricFamily(
            "tokenspout_upstream_healthy",
            "1 while an upstream takes requests, 0 while it is ejected.",
            labels=["upstream"],
        )
        for server in self._servers():
            in_flight.add_metric([server.address], server.outstanding)
            healthy.add_metric([server.address], 1 if server.healthy else 0)
        yield in_flight
        yield healthy
