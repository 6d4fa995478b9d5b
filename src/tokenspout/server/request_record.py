"""What one request did, recorded as metrics and as one JSON log line when it ends.

Every transport (SSE/NDJSON, ``stream: false``, WebSocket) keeps one ``RequestRecord``. It
times the text events as they are sent (time to first text, then the gap before each next
event: the inter-token latency a client sees after coalescing) and, at the end, counts the
request, observes its duration and logs it on the ``tokenspout.requests`` logger. The prompt
is logged only when the server was started with ``--log-prompts``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from tokenspout.protocols.json_text import dumps
from tokenspout.server.metrics import Metrics
from tokenspout.server.request_trace import start_trace
from tokenspout.streaming.stream import Stream

request_log = logging.getLogger("tokenspout.requests")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class RequestRecord:
    """Timing and outcome of one request reading ``stream`` (``transport``: sse, ndjson,
    ws or json). A resumed reader's first text is not the stream's TTFT: ``resumed=True``
    keeps it out of the TTFT histogram."""

    __slots__ = (
        "_first_text_at",
        "_last_text_at",
        "endpoint",
        "events",
        "metrics",
        "prompt",
        "resumed",
        "started_at",
        "stream",
        "trace",
        "transport",
    )

    def __init__(
        self,
        metrics: Metrics,
        stream: Stream,
        *,
        endpoint: str,
        transport: str,
        started_at: float,
        prompt: str | None = None,
        resumed: bool = False,
    ):
        self.metrics = metrics
        self.stream = stream
        self.endpoint = endpoint
        self.transport = transport
        self.started_at = started_at
        self.prompt = prompt
        self.resumed = resumed
        self.events = 0
        self._first_text_at: float | None = None
        self._last_text_at: float | None = None
        #: The request's OpenTelemetry trace; None unless the server exports traces.
        self.trace = start_trace(self)

    def text_sent(self, num_tokens: int) -> None:
        """An event carrying ``num_tokens`` tokens of text was handed to the connection."""
        now = time.monotonic()
        m = self.metrics
        if self._last_text_at is None:
            self._first_text_at = now
            if not self.resumed:
                m.ttft.observe(now - self.started_at)
        else:
            m.itl.observe(now - self._last_text_at)
        self._last_text_at = now
        self.events += 1
        m.stream_events.inc()
        m.tokens_per_event.observe(num_tokens)
        if self.trace is not None:
            self.trace.text_sent(now, num_tokens)

    def finish(self, status: str) -> None:
        """The request is over with ``status`` (ok, error, client_disconnect, ...)."""
        now = time.monotonic()
        self.metrics.requests.labels(self.endpoint, self.transport, status).inc()
        self.metrics.e2e.observe(now - self.started_at)
        if self.trace is not None:
            self.trace.finish(status, now)
        if request_log.isEnabledFor(logging.INFO):
            request_log.info(dumps(self.log_fields(status, now)))

    def log_fields(self, status: str, now: float) -> dict[str, Any]:
        stream, end = self.stream, self.stream.end
        first = self._first_text_at
        queued = stream.first_output_at
        fields: dict[str, Any] = {
            "id": stream.id,
            "endpoint": self.endpoint,
            "transport": self.transport,
            "status": status,
            "finish_reason": end.finish_reason if end else None,
            "prompt_tokens": stream.prompt_tokens,
            "completion_tokens": end.completion_tokens if end else None,
            "ttft_ms": _ms(None if first is None else first - self.started_at),
            "queue_ms": _ms(None if queued is None else queued - stream.opened_at),
            "duration_ms": _ms(now - self.started_at),
            "events": self.events,
        }
        if stream.owner is not None:
            fields["key"] = stream.owner  # the key's name, never its secret
        if self.resumed:
            fields["resumed"] = True
        if end is not None and end.error is not None:
            fields["error"] = end.error.message
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        return fields
