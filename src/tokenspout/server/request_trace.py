"""The trace of one request, gathered while it runs (see ``request_tracing`` for the
spans it becomes and how they are exported).

Off by default, and then free: ``RequestRecord`` asks ``start_trace``, which reads one
context variable that only ``request_tracing``'s middleware sets, and holds ``None``;
nothing is done per token. This module imports nothing from OpenTelemetry.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenspout.server.request_record import RequestRecord
    from tokenspout.server.request_tracing import RequestTracing

#: Flushed events recorded per request; later ones are only counted.
MAX_EVENTS = 128

#: The tracing of the server handling this request, the request's parent context (an
#: OpenTelemetry ``Context``) and its route; set by ``TraceContextMiddleware``.
current: ContextVar[tuple[RequestTracing, Any, str] | None] = ContextVar(
    "tokenspout_trace", default=None
)


def start_trace(record: RequestRecord) -> RequestTrace | None:
    """A trace for this request when the server traces requests, else ``None``."""
    traced = current.get()
    if traced is None:
        return None
    tracing, parent, route = traced
    return RequestTrace(tracing, parent, route, record)


class RequestTrace:
    """Times of one request's flushed events; ``finish`` hands the request to the
    exporter. Monotonic times, as the request records them."""

    __slots__ = ("dropped_events", "events", "parent", "record", "route", "tracing")

    def __init__(self, tracing: RequestTracing, parent: Any, route: str, record: RequestRecord):
        self.tracing = tracing
        self.parent = parent
        self.route = route
        self.record = record
        #: (monotonic time, tokens) of each flushed event, up to MAX_EVENTS.
        self.events: list[tuple[float, int]] = []
        self.dropped_events = 0

    def text_sent(self, now: float, num_tokens: int) -> None:
        if len(self.events) < MAX_EVENTS:
            self.events.append((now, num_tokens))
        else:
            self.dropped_events += 1

    def finish(self, status: str, now: float) -> None:
        self.tracing.export(self, status, now)
