"""One OpenTelemetry trace per request, exported over OTLP/HTTP (``--otlp-traces-endpoint``).

Imported only when the server traces (off by default: see ``request_trace``). Then:

* ``TraceContextMiddleware`` reads an incoming W3C ``traceparent`` (and ``tracestate``)
  and makes it the parent of the request's trace, for every route and the WebSocket;
* a request that opens a stream starts its root span then (``start_root``), so that the
  engine can pass its context on (the upstream engine sends it as ``traceparent``);
* ``RequestRecord`` keeps a ``RequestTrace``, which notes times while the request runs (a
  tuple per flushed event); at the end ``OtelTracing.export`` builds the other spans at
  once, with their real times, and ends the root span:

  ``POST /v1/chat/completions`` (the request's method and path; a SERVER span over the
  whole request; event ``first_token``; event ``abort`` with its reason; finish reason,
  token counts and events sent as attributes)
    ├─ ``admission``       request received → stream opened (validation, tokenizing, admission)
    ├─ ``queue_and_prefill`` stream opened → the engine's first output (the engine
    │                        interface reports no point between queueing and prefill)
    └─ ``stream``          first text sent → end; ``tokenspout.events_timeline`` lists each
                           flushed event as "<ms after the first token>:<tokens>" (up to
                           ``MAX_EVENTS``; the rest counted)

A request refused as its stream was to open (429, 403, 503: admission, the key's limits,
the engine) is its root span alone, ended at the refusal: ``tokenspout.status`` "refused",
the HTTP status, and the error as the span's status.

Spans go through the SDK's ``BatchSpanProcessor``: exporting never blocks a request, and an
unreachable collector costs dropped spans and a log line, not an error to the client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenspout import __version__
from tokenspout.errors import TokenspoutError
from tokenspout.server import request_trace
from tokenspout.server.request_trace import RequestTrace, RootSpan, TraceScope

#: Statuses that mean the request was stopped before its natural end.
_ABORTS = ("client_disconnect", "cancelled", "send_timeout", "shutdown")

_PROPAGATOR = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: ``endpoint`` as given when it has a path, else the
    collector's standard ``/v1/traces`` on it. ``ValueError`` for anything but http(s)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--otlp-traces-endpoint must be an http(s) URL, not {endpoint!r}")
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


class OtelTracing:
    """The OpenTelemetry tracer of one server: its own provider (not the global one, so that several
    servers in one process keep their exports apart) with a batching OTLP/HTTP exporter."""

    def __init__(self, endpoint: str, *, service_name: str = "tokenspout"):
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
        )
        self.tracer = self.provider.get_tracer("tokenspout", __version__)

    def start_root(self, scope: TraceScope, started_at: float) -> RootSpan:
        """Start the root span of a request of ``scope`` received at ``started_at``
        (monotonic), under the caller's context; its ids are fixed from now on."""
        ns = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span(
            scope.route,
            context=scope.parent,
            kind=SpanKind.SERVER,
            start_time=_wall_ns(started_at, ns),
        )
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return RootSpan(scope, span, carrier["traceparent"], ns)

    def refused(self, root: RootSpan, error: BaseException) -> None:
        """End the root span of a request refused before its stream opened."""
        span = root.span
        if isinstance(error, TokenspoutError):
            span.set_attributes(
                {"tokenspout.status": "refused", "http.response.status_code": error.status_code}
            )
        else:  # the client left while a shared admission waited on Redis, or a bug
            span.set_attribute("tokenspout.status", "error")
        span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        span.end()

    def export(self, traced: RequestTrace, status: str, now: float) -> None:
        """Build one request's spans and hand them to the exporter (it batches them)."""
        _export(self.tracer, traced, status, now)

    def shutdown(self) -> None:
        """Export what is pending and stop the exporter's thread."""
        self.provider.shutdown()


class TraceContextMiddleware:
    """Makes the incoming ``traceparent`` the parent of the request's trace (ASGI, for
    HTTP and WebSocket scopes). ``routes``: the app's routes, whose templates name the
    spans."""

    def __init__(self, app: ASGIApp, tracing: OtelTracing, routes: Sequence[BaseRoute]):
        self.app = app
        self.tracing = tracing
        self.routes = routes

    def _route(self, path: str) -> str | None:
        """The template of the route ``path`` matches (``/v1/streams/{stream_id}``), or None."""
        for route in self.routes:
            pattern = getattr(route, "path_regex", None)
            if pattern is not None and pattern.match(path):
                return str(getattr(route, "path", path))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        carrier = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"tracestate"):
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = _PROPAGATOR.extract(carrier) if carrier else Context()
        method = scope.get("method", "WEBSOCKET")
        # OpenTelemetry's HTTP span name: "{method} {route template}", or the method alone
        # for a path no route takes. A raw path named one span kind per stream id (resume,
        # cancel) and per 404.
        template = self._route(scope["path"])
        route = method if template is None else f"{method} {template}"
        token = request_trace.current.set(request_trace.TraceScope(self.tracing, parent, route))
        try:
            await self.app(scope, receive, send)
        finally:
            request_trace.current.reset(token)


def _wall_ns(monotonic: float, offset_ns: int) -> int:
    return int(monotonic * 1e9) + offset_ns


def _export(tracer: trace.Tracer, traced: RequestTrace, status: str, now: float) -> None:
    # Monotonic times (what the request records) to the wall clock spans carry.
    early = traced.root
    ns = time.time_ns() - time.monotonic_ns() if early is None else early.offset_ns
    record, stream = traced.record, traced.record.stream
    end, started = stream.end, record.started_at
    attributes: dict[str, str | int | bool] = {
        "tokenspout.stream_id": stream.id,
        "tokenspout.endpoint": record.endpoint,
        "tokenspout.transport": record.transport,
        "tokenspout.status": status,
        "tokenspout.events": record.events,
        "gen_ai.usage.input_tokens": stream.prompt_tokens,
    }
    if end is not None:
        attributes["gen_ai.usage.output_tokens"] = end.completion_tokens
        if end.finish_reason is not None:
            # A string array in the GenAI semantic conventions (one per choice).
            attributes["gen_ai.response.finish_reasons"] = [end.finish_reason]
    if record.resumed:
        attributes["tokenspout.resumed"] = True
    if early is None:
        root = tracer.start_span(
            traced.route,
            context=traced.parent,
            kind=SpanKind.SERVER,
            start_time=_wall_ns(started, ns),
            attributes=attributes,
        )
    else:
        root = early.span
        root.set_attributes(attributes)
    inside = trace.set_span_in_context(root)
    if not record.resumed:
        _span(tracer, inside, ns, "admission", started, stream.opened_at)
        if stream.first_output_at is not None:
            _span(tracer, inside, ns, "queue_and_prefill", stream.opened_at, stream.first_output_at)
    if traced.events:
        first_at = traced.events[0][0]
        root.add_event(
            "first_token",
            {"tokenspout.ttft_ms": round((first_at - started) * 1000.0, 3)},
            timestamp=_wall_ns(first_at, ns),
        )
        # The flushed events as one string, "<ms after the first token>:<tokens>" each,
        # space-separated: one span event each (or two arrays of OTLP values) cost several
        # times more to build and encode than all of the request's spans together.
        timeline = " ".join(f"{(at - first_at) * 1000.0:.1f}:{n}" for at, n in traced.events)
        events = {
            "tokenspout.events_timeline": timeline,
            "tokenspout.events_not_recorded": traced.dropped_events,
        }
        streaming = tracer.start_span(
            "stream", context=inside, start_time=_wall_ns(first_at, ns), attributes=events
        )
        streaming.end(end_time=_wall_ns(now, ns))
    reason = stream.abort_reason or (status if status in _ABORTS else None)
    if reason is not None:
        root.add_event("abort", {"tokenspout.abort_reason": reason}, timestamp=_wall_ns(now, ns))
    if end is not None and end.error is not None:
        root.set_status(Status(StatusCode.ERROR, end.error.message))
    root.end(end_time=_wall_ns(now, ns))


def _span(
    tracer: trace.Tracer, parent: Context, ns: int, name: str, start: float, end: float
) -> None:
    span = tracer.start_span(name, context=parent, start_time=_wall_ns(start, ns))
    span.end(end_time=_wall_ns(end, ns))
