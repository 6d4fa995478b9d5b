"""``otlp_traces_endpoint``: one OpenTelemetry trace per request, received over OTLP/HTTP
(protobuf) by a collector stand-in started here, checked span by span."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import RunningServer
from tests.upstream_processes import faulty, front, processes
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.errors import ConfigError
from tokenspout.server.config import ServerConfig

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP traces receiver: keeps every span POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.paths: list[str] = []
        self.changed = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                with collector.changed:
                    collector.paths.append(self.path)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            collector.spans.extend(scope.spans)
                    collector.changed.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_traces(self, n: int, timeout: float = 20.0) -> dict[str, list[Span]]:
        """Spans by trace id (hex), once ``n`` traces each have their root span."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                roots = [s for s in self.spans if s.kind == Span.SPAN_KIND_SERVER]
                if len(roots) >= n:
                    traces: dict[str, list[Span]] = {}
                    for span in self.spans:
                        traces.setdefault(span.trace_id.hex(), []).append(span)
                    return traces
                left = deadline - time.monotonic()
                assert left > 0, f"{len(roots)} of {n} traces arrived"
                self.changed.wait(left)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    # The SDK's standard setting: export batches every 100 ms instead of every 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    c = Collector()
    yield c
    c.close()


def attributes(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        value = getattr(kv.value, kind)
        if kind == "array_value":  # OTLP's string[]: a tuple of its strings
            value = tuple(v.string_value for v in value.values)
        out[kv.key] = value
    return out


def by_name(spans: list[Span]) -> dict[str, Span]:
    return {s.name: s for s in spans}


def test_a_streamed_request_is_one_trace_under_the_incoming_traceparent(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(
        SyntheticEngine(ttft_ms=20, itl_ms=2), otlp_traces_endpoint=collector.url
    )
    body = {
        "messages": [{"role": "user", "content": "trace me"}],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"flush_tokens": 1},
    }
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as r:
        stream_id = r.headers["x-stream-id"]
        r.read()
    traces = collector.wait_traces(1)
    assert collector.paths[0] == "/v1/traces"
    assert list(traces) == [TRACE_ID], "the incoming trace id is kept"
    spans = by_name(traces[TRACE_ID])
    assert set(spans) == {"POST /v1/chat/completions", "admission", "queue_and_prefill", "stream"}
    root = spans["POST /v1/chat/completions"]
    assert root.parent_span_id.hex() == PARENT_ID, "the caller's span is the parent"
    for name in ("admission", "queue_and_prefill", "stream"):
        assert spans[name].parent_span_id == root.span_id, name
    a = attributes(root)
    assert a["tokenspout.stream_id"] == stream_id
    assert a["tokenspout.transport"] == "sse" and a["tokenspout.endpoint"] == "chat"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.output_tokens"] == 12
    assert a["gen_ai.usage.input_tokens"] == 2
    assert a["tokenspout.status"] == "ok"
    # The timings line up: admission, then queue and prefill (at least the engine's 20 ms
    # synthetic prefill), then the first token, then the stream to the end.
    admission, queue = spans["admission"], spans["queue_and_prefill"]
    assert root.start_time_unix_nano == admission.start_time_unix_nano
    assert admission.end_time_unix_nano == queue.start_time_unix_nano
    assert queue.end_time_unix_nano - queue.start_time_unix_nano >= 20_000_000
    first = [e for e in root.events if e.name == "first_token"]
    assert len(first) == 1 and first[0].time_unix_nano >= queue.end_time_unix_nano
    stream = spans["stream"]
    assert stream.start_time_unix_nano == first[0].time_unix_nano
    assert stream.end_time_unix_nano == root.end_time_unix_nano
    timeline = str(attributes(stream)["tokenspout.events_timeline"]).split()
    assert len(timeline) == a["tokenspout.events"]
    offsets = [float(e.split(":")[0]) for e in timeline]
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert sum(int(e.split(":")[1]) for e in timeline) == 12
    assert not [e for e in root.events if e.name == "abort"]


def test_each_request_gets_its_own_trace_and_aborts_carry_their_reason(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=10), otlp_traces_endpoint=collector.url
    )
    whole = httpx.post(f"{server.url}/v1/completions", json={"prompt": "one two", "max_tokens": 4})
    assert whole.status_code == 200
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"]:
                break
        httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel")
        assert list(lines)[-2:] == ["data: [DONE]", ""]
    traces = collector.wait_traces(2)
    assert len(traces) == 2, "one trace per request, none shared"
    roots = {}
    for spans in traces.values():
        root = next(s for s in spans if s.kind == Span.SPAN_KIND_SERVER)
        assert root.parent_span_id == b"", "no traceparent: a new trace"
        roots[root.name] = root
    json_root = roots["POST /v1/completions"]
    assert attributes(json_root)["tokenspout.transport"] == "json"
    assert attributes(json_root)["gen_ai.usage.output_tokens"] == 4
    cancelled = roots["POST /v1/chat/completions"]
    assert attributes(cancelled)["gen_ai.response.finish_reasons"] == ("cancelled",)
    aborts = [e for e in cancelled.events if e.name == "abort"]
    assert len(aborts) == 1 and attributes(aborts[0]) == {"tokenspout.abort_reason": "cancelled"}


def test_a_refused_request_is_a_root_span_with_its_error(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    # Its span was started before admission and never ended: a 429 left no trace at all.
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=10), otlp_traces_endpoint=collector.url, max_streams=1
    )
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        traces = collector.wait_traces(1)
        (spans,) = traces.values()
        (root,) = spans
        assert root.name == "POST /v1/completions"
        assert attributes(root) == {
            "tokenspout.status": "refused",
            "http.response.status_code": 429,
        }
        assert root.status.code == root.status.STATUS_CODE_ERROR
        assert "streams are open" in root.status.message
        httpx.post(f"{server.url}/v1/streams/{r.headers['x-stream-id']}/cancel")


def test_span_names_carry_route_templates_not_stream_ids(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    # A resume's span was named by its raw path, one name per stream id.
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=1), otlp_traces_endpoint=collector.url, resumable=True
    )
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        list(r.iter_lines())
    resumed = httpx.get(f"{server.url}/v1/streams/{stream_id}")
    assert resumed.status_code == 200, resumed.text
    traces = collector.wait_traces(2)
    names = {s.name for spans in traces.values() for s in spans if s.kind == Span.SPAN_KIND_SERVER}
    assert names == {"POST /v1/chat/completions", "GET /v1/streams/{stream_id}"}, names


def test_the_endpoint_must_be_an_http_url() -> None:
    with pytest.raises(ConfigError, match="http"):
        ServerConfig(otlp_traces_endpoint="grpc://collector:4317")


async def test_websocket_streams_are_traced_under_the_handshake_traceparent(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    from websockets.asyncio.client import connect

    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=2), otlp_traces_endpoint=collector.url
    )
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ws", additional_headers=headers) as ws:
        for stream_id in ("a", "b"):
            message = {"type": "generate", "id": stream_id, "max_tokens": 3,
                       "messages": [{"role": "user", "content": "ws"}]}  # fmt: skip
            await ws.send(json.dumps(message))
            while json.loads(await ws.recv())["type"] != "done":
                pass
    traces = await asyncio.to_thread(collector.wait_traces, 2)
    roots = [s for s in traces[TRACE_ID] if s.kind == Span.SPAN_KIND_SERVER]
    assert [r.name for r in roots] == ["WEBSOCKET /v1/ws"] * 2
    assert all(r.parent_span_id.hex() == PARENT_ID for r in roots)
    assert {attributes(r)["tokenspout.transport"] for r in roots} == {"ws"}


def test_the_upstream_request_is_a_child_of_the_request_span(
    collector: Collector, start_server
) -> None:  # type: ignore[no-untyped-def]
    body = {"messages": [{"role": "user", "content": "one two"}], "max_tokens": 3, "stream": True}
    incoming = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    with processes(faulty) as (upstream,):
        untraced = front(start_server, upstream)
        r = httpx.post(f"{untraced.url}/v1/chat/completions", json=body, headers=incoming)
        assert r.status_code == 200
        assert "traceparent" not in upstream.stats()["headers"], "tracing off: nothing sent"

        traced = front(start_server, upstream, config={"otlp_traces_endpoint": collector.url})
        sent = []
        for headers in (incoming, {}):
            r = httpx.post(f"{traced.url}/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200
            sent.append(upstream.stats()["headers"]["traceparent"])
    traces = collector.wait_traces(2)
    assert len(traces) == 2
    for traceparent, caller in zip(sent, (PARENT_ID, ""), strict=True):
        version, trace_id, parent_id, flags = traceparent.split("-")
        assert version == "00" and int(flags, 16) & 1, "version 00, sampled"
        assert trace_id in traces, "the upstream request is in the exported trace"
        root = next(s for s in traces[trace_id] if s.kind == Span.SPAN_KIND_SERVER)
        assert root.parent_span_id.hex() == caller
        assert parent_id == root.span_id.hex(), "its parent is the request's span"
        assert len(by_name(traces[trace_id])) == 4
    assert sent[0].split("-")[1] == TRACE_ID, "the client's trace id is kept"
