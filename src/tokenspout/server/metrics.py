"""Prometheus metrics of one server (its own registry, so several apps can share a process).

Engine gauges and token counters are read from ``Engine.stats()`` at scrape time; stream
and request metrics are recorded by the responses. Labels stay low-cardinality: never a
prompt or an id.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenspout.engine.interface import Engine

# The *_created series double every counter's output and no dashboard here uses them.
disable_created_metrics()

ABORT_REASONS = ("client_disconnect", "cancelled", "send_timeout", "shutdown", "error")
#: The ``transport`` label of client telemetry (a fixed set: it comes from browsers).
CLIENT_TRANSPORTS = ("sse", "eventsource", "websocket", "buffered")

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# Gaps between events are short: finer at the low end, like vLLM's inter-token buckets.
_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
)  # fmt: skip


class _EngineCollector(Collector):
    """Reads the engine's identity and its own counters when Prometheus scrapes."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        # Read at each scrape, as /health does: an upstream engine learns its model and
        # whether it fronts a synthetic engine only once it has read its upstreams' models.
        info = GaugeMetricFamily(
            "tokenspout_engine_info",
            'The served engine (as /health gives it); synthetic="true" marks the synthetic '
            "load-test engine, served here or by the upstreams.",
            labels=["engine", "model", "synthetic"],
        )
        info.add_metric([engine.kind, engine.model_id, str(engine.synthetic).lower()], 1)
        yield info
        s = engine.stats()
        yield GaugeMetricFamily(
            "tokenspout_requests_running", "Requests the engine is generating for.", s.running
        )
        yield GaugeMetricFamily(
            "tokenspout_requests_waiting", "Requests queued for an engine slot.", s.waiting
        )
        counters = {
            "tokenspout_prompt_tokens": (
                "Prompt tokens computed (prefilled).",
                s.prompt_tokens_total,
            ),
            "tokenspout_generation_tokens": ("Tokens generated.", s.generation_tokens_total),
            "tokenspout_prefix_cache_queries": (
                "Admitted requests looked up in the prefix cache.",
                s.prefix_cache_queries_total,
            ),
            "tokenspout_prefix_cache_hits": (
                "Admitted requests that reused cached prompt KV.",
                s.prefix_cache_hits_total,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    """Every metric of one server; ``render()`` gives the Prometheus text format."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(_EngineCollector(engine))
        # process_* (CPU, RSS, open fds) and python_info, as every Prometheus exporter has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        for collector in engine.collectors():
            r.register(collector)
        self.streams_active = Gauge("tokenspout_streams_active", "Open client streams.", registry=r)
        self.requests_aborted = Counter(
            "tokenspout_requests_aborted",
            "Requests stopped before their natural end, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in ABORT_REASONS:
            self.requests_aborted.labels(reason)
        self.requests = Counter(
            "tokenspout_requests",
            "Finished requests by endpoint, transport and outcome.",
            ["endpoint", "transport", "status"],
            registry=r,
        )
        self.requests_refused = Counter(
            "tokenspout_requests_refused",
            "HTTP requests answered with an error status before any stream, by status and "
            "error code (a client's mistakes, keys refused, overload).",
            ["status", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            "tokenspout_time_to_first_token_seconds",
            "Request start to the first text sent to the client.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tokenspout_inter_token_latency_seconds",
            "Gap between consecutive text events of a stream as sent to the client.",
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "tokenspout_request_queue_time_seconds",
            "Stream opened to the engine's first output (queue wait plus prefill: the engine "
            "interface reports no earlier point).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.event_loop_lag = Gauge(
            "tokenspout_event_loop_lag_seconds",
            "How late the last periodic event-loop probe woke up.",
            registry=r,
        )
        self.e2e = Histogram(
            "tokenspout_e2e_request_latency_seconds",
            "Request start to the end of the response.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_event = Histogram(
            "tokenspout_tokens_per_event",
            "Tokens carried by one stream event (how coalescing behaves).",
            buckets=(1, 2, 3, 5, 8, 10, 15, 20, 30, 50, 100),
            registry=r,
        )
        self.stream_events = Counter(
            "tokenspout_stream_events", "Events with text sent on streams.", registry=r
        )
        self.stream_bytes = Counter(
            "tokenspout_stream_bytes", "Bytes sent on streams (framing included).", registry=r
        )

        self.resumes = Counter(
            "tokenspout_stream_resumes",
            "Streams resumed by a reconnecting client (Last-Event-ID or GET /v1/streams/{id}).",
            registry=r,
        )

        self._add_client_metrics()

    def _add_client_metrics(self) -> None:
        """What pages measured and reported to ``POST /v1/telemetry``, by transport."""
        r = self.registry
        self.client_ttft = Histogram(
            "tokenspout_client_ttft_seconds",
            "Browser: request sent to the first text received (network TTFT).",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.client_first_paint = Histogram(
            "tokenspout_client_first_paint_seconds",
            "Browser: request sent to the first text painted on screen.",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.client_complete = Histogram(
            "tokenspout_client_complete_seconds",
            "Browser: request sent to the whole answer received (stopped or failed answers: none).",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.client_long_frames = Counter(
            "tokenspout_client_long_frames",
            "Browser: animation frames longer than 50 ms while an answer was arriving.",
            ["transport"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
