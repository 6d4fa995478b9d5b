"""The trace of one request, gathered while it runs (see ``otel_tracing`` for the
spans it becomes and how they are exported).

Off by default, and then free: ``RequestRecord`` asks ``start_trace`` and the responder
asks ``start_root``; both read one context variable that only ``otel_tracing``'s
middleware sets, and get ``None``; nothing is done per token. This module imports nothing
from OpenTelemetry.

The root span of a request that opens a stream is started when the stream opens, before the
engine gets the prompt, so that its ids exist while the engine works: ``RootSpan.traceparent``
rides on ``Prompt.traceparent`` and an engine calling another server passes it on, which
makes the other server's work a child of this request's span. Its other spans, attributes
and events are built at the end, when the root span ends (``OtelTracing.export``).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenspout.server.otel_tracing import OtelTracing
    from tokenspout.server.request_record import RequestRecord

#: Flushed events recorded per request; later ones are only counted.
MAX_EVENTS = 128


class TraceScope:
    """One HTTP request or WebSocket connection of a server that traces: the server's
    tracing, the caller's context (an OpenTelemetry ``Context``: the incoming
    ``traceparent``'s span, or empty), the route, and the root spans of the streams opened
    here whose readers have not taken them yet (by stream id)."""

    __slots__ = ("parent", "roots", "route", "tracing")

    def __init__(self, tracing: OtelTracing, parent: Any, route: str):
        self.tracing = tracing
        self.parent = parent
        self.route = route
        self.roots: dict[str, RootSpan] = {}


#: The scope of the request being handled; set by ``TraceContextMiddleware``.
current: ContextVar[TraceScope | None] = ContextVar("tokenspout_trace", default=None)


class RootSpan:
    """The root span of a request about to open a stream, started (not yet ended) at the
    request's start; ``traceparent`` is its W3C Trace Context (``00-<trace id>-<span id>-
    <flags>``) for the engine to pass on; ``offset_ns``: wall clock less monotonic clock
    when it started, which the request's other spans use too (their times line up)."""

    __slots__ = ("offset_ns", "scope", "span", "traceparent")

    def __init__(self, scope: TraceScope, span: Any, traceparent: str, offset_ns: int):
        self.scope = scope
        self.span = span
        self.traceparent = traceparent
        self.offset_ns = offset_ns

    def refused(self, error: BaseException) -> None:
        """No stream was opened (a 429, 403, 503...): the span ends now, with the error."""
        self.scope.tracing.refused(self, error)

    def opened(self, stream_id: str) -> None:
        """The stream (or group) ``stream_id`` was opened under this span: its reader's
        ``RequestRecord`` takes the span over and ends it."""
        self.scope.roots[stream_id] = self


def start_root(started_at: float) -> RootSpan | None:
    """The root span of a request about to open a stream (``started_at``: when the request
    was received, monotonic), when the server traces requests, else ``None``."""
    scope = current.get()
    if scope is None:
        return None
    return scope.tracing.start_root(scope, started_at)


def start_trace(record: RequestRecord) -> RequestTrace | None:
    """A trace for this request when the server traces requests, else ``None``; under the
    root span started when its stream opened, if this request opened it."""
    scope = current.get()
    if scope is None:
        return None
    return RequestTrace(scope, scope.roots.pop(record.stream.id, None), record)


class RequestTrace:
    """Times of one request's flushed events; ``finish`` hands the request to the
    exporter. Monotonic times, as the request records them."""

    __slots__ = ("dropped_events", "events", "parent", "record", "root", "route", "tracing")

    def __init__(self, scope: TraceScope, root: RootSpan | None, record: RequestRecord):
        self.tracing = scope.tracing
        self.parent = scope.parent
        self.route = scope.route
        #: The request's root span when it was started with its stream, else None: the
        #: export starts it with its real start time.
        self.root = root
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
