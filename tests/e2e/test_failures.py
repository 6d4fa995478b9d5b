"""Whatever goes wrong with one request ends that request only, visibly: an error event and
``[DONE]`` (or an error status), counted as ``error``; the server and the engine go on.
An engine whose loop has died fails ``/health`` and refuses new requests with 503 at once.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.event_stream_response import EventStreamResponse
from tokenspout.streaming.subscription import StreamEvent


def sse_data(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


@pytest.mark.usefixtures("unencodable_output")
def test_output_that_cannot_be_sent_ends_that_stream_only(start_server) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 10, defect 7): a lone surrogate echoed by the synthetic engine
    raised inside the engine's step timer; the step loop never ran again and every later
    request on every endpoint hung while /health said ok. (Requests with a lone surrogate
    are refused at parse time now, issue 13: ``unencodable_output`` lets this one through.)"""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    body = '{"prompt": "hi \\ud800 there", "max_tokens": 5, "stream": true}'
    headers = {"content-type": "application/json"}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", content=body, headers=headers, timeout=10
    ) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == "internal_error"
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="error"')
    # Everything else still works.
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 3})
    assert r.json()["choices"][0]["text"] == "ok ok ok "
    assert server.metric("tokenspout_requests_running") == 0


def test_a_bug_in_a_response_body_is_an_error_event_not_a_disconnect(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 10, defect 4): any failure inside a response body was counted as a
    client disconnect, and the client got no error."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    real_send = EventStreamResponse.send
    sent = 0

    async def send_then_break(self: EventStreamResponse, event: StreamEvent) -> None:
        nonlocal sent
        sent += 1
        if sent == 3:
            raise ValueError("injected encoder bug")
        await real_send(self, event)

    monkeypatch.setattr(EventStreamResponse, "send", send_then_break)
    body = {"prompt": "one two", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=10) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "internal_error"
    labels = 'endpoint="completion",status="error",transport="sse"'
    server.wait_metric("tokenspout_requests_total", 1, labels=labels)
    server.wait_metric("tokenspout_requests_aborted_total", 1, labels='reason="error"')
    server.wait_metric("tokenspout_requests_running", 0)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 0


class _DyingEngine(SyntheticEngine):
    """Fault injector: its decode step fails once a request asks for 13 tokens."""

    def _decode(self) -> None:
        if any(req.max_tokens == 13 for req in self._decoding.values()):
            raise RuntimeError("injected step failure")
        super()._decode()


def test_an_engine_whose_loop_died_fails_health_and_refuses_requests(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(_DyingEngine(itl_ms=1))
    body = {"prompt": "doomed", "max_tokens": 13, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=10) as r:
        data = sse_data(r)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "engine_error"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    assert health.json()["status"] == "engine_failed"
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "engine_unavailable"
