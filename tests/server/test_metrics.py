"""``/metrics`` and the request log against a real server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge
from websockets.asyncio.client import connect

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.loop_lag import watch_loop_lag

PER_TOKEN = {"flush_tokens": 1, "flush_ms": 0}


def chat(server: RunningServer, text: str, max_tokens: int, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def test_stream_histograms_and_counters(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(ttft_ms=30, itl_ms=5), **PER_TOKEN)
    r = chat(server, "one two", 10, stream=True)
    assert r.status_code == 200
    # The request is counted just after its last byte went out.
    labels = 'endpoint="chat",status="ok",transport="sse"'
    server.wait_metric("tokenspout_requests_total", 1, labels=labels)
    assert server.metric("tokenspout_time_to_first_token_seconds_count") == 1
    assert server.metric("tokenspout_time_to_first_token_seconds_sum") >= 0.03
    # Ten tokens, one event each: nine gaps, together within the request's own time.
    assert server.metric("tokenspout_inter_token_latency_seconds_count") == 9
    itl_sum = server.metric("tokenspout_inter_token_latency_seconds_sum")
    e2e = server.metric("tokenspout_e2e_request_latency_seconds_sum")
    assert 0 < itl_sum < e2e
    assert server.metric("tokenspout_stream_events_total") == 10
    assert server.metric("tokenspout_request_queue_time_seconds_count") == 1
    assert server.metric("tokenspout_e2e_request_latency_seconds_count") == 1
    assert server.metric("tokenspout_stream_resumes_total") == 0


def test_queue_time_counts_the_wait_for_a_slot(start_server) -> None:  # type: ignore[no-untyped-def]
    """Order, not timing: the second request is seen waiting before the first one leaves."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10, max_num_seqs=1))
    body = {"messages": [{"role": "user", "content": "w"}], "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as first:
        lines = first.iter_lines()  # kept: a dropped line iterator closes the response
        next(lines)
        second = threading.Thread(target=chat, args=(server, "w", 3))
        second.start()
        server.wait_metric("tokenspout_requests_waiting", 1)
    second.join(timeout=30)
    server.wait_metric("tokenspout_request_queue_time_seconds_count", 2)
    assert server.metric("tokenspout_request_queue_time_seconds_sum") > 0
    ok = server.metric("tokenspout_requests_total", 'endpoint="chat",status="ok",transport="json"')
    assert ok == 1


async def test_websocket_streams_are_measured_alike(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5), **PER_TOKEN)
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws:
        await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 6}))
        while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "done":
            pass
    labels = 'endpoint="completion",status="ok",transport="ws"'
    await asyncio.to_thread(server.wait_metric, "tokenspout_requests_total", 1, 5.0, labels)
    assert server.metric("tokenspout_inter_token_latency_seconds_count") == 5
    assert server.metric("tokenspout_time_to_first_token_seconds_count") == 1


def test_process_and_loop_metrics_are_exported(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server()
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert name in text
    assert server.metric("tokenspout_event_loop_lag_seconds") >= 0


async def test_loop_lag_sees_a_blocked_loop() -> None:
    gauge = Gauge("lag", "test", registry=CollectorRegistry())
    probe = asyncio.create_task(watch_loop_lag(gauge, interval_s=0.05))
    await asyncio.sleep(0.01)
    time.sleep(0.2)  # noqa: ASYNC251 - blocks the loop, as a CPU-bound handler would
    await asyncio.sleep(0.01)  # the probe wakes ~0.15 s late and reports it
    probe.cancel()
    assert gauge._value.get() >= 0.1


CHAT_OK = 'endpoint="chat",status="ok",transport="{}"'


def request_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "tokenspout.requests"]


def test_one_log_line_per_request_without_the_prompt(start_server, caplog) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    with caplog.at_level(logging.INFO, logger="tokenspout.requests"):
        chat(server, "secret words", 4, stream=True)
        chat(server, "secret words", 3)
        server.wait_metric("tokenspout_requests_total", 1, labels=CHAT_OK.format("json"))
    streamed, whole = request_lines(caplog)
    assert streamed["transport"] == "sse" and whole["transport"] == "json"
    assert streamed["endpoint"] == "chat" and streamed["status"] == "ok"
    assert streamed["finish_reason"] == "length"
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (2, 4)
    assert streamed["ttft_ms"] > 0 and streamed["duration_ms"] >= streamed["ttft_ms"]
    assert whole["ttft_ms"] is None and whole["completion_tokens"] == 3
    assert all("secret" not in json.dumps(line) for line in (streamed, whole))


def test_log_prompts_puts_the_prompt_in_the_line(start_server, caplog) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(), log_prompts=True)
    with caplog.at_level(logging.INFO, logger="tokenspout.requests"):
        chat(server, "visible words", 2, stream=True)
        server.wait_metric("tokenspout_requests_total", 1, labels=CHAT_OK.format("sse"))
    (line,) = request_lines(caplog)
    assert "visible words" in line["prompt"]


def test_a_stream_ended_by_the_shutdown_is_logged_as_such(start_server, caplog) -> None:  # type: ignore[no-untyped-def]
    # As the drain ends it: an error event, but the server's doing, not a failure ("error").
    from tokenspout.errors import ShuttingDownError

    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    body = {"messages": [{"role": "user", "content": "w"}], "max_tokens": 1000, "stream": True}
    with (
        caplog.at_level(logging.INFO, logger="tokenspout.requests"),
        httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        next(lines)
        stream = server.state.streams.get(r.headers["x-stream-id"])
        stream.loop.call_soon_threadsafe(stream.fail, ShuttingDownError("bye"), "shutdown")  # type: ignore[union-attr]
        for _ in lines:  # to the stream's end: [DONE]
            pass
        labels = 'endpoint="chat",status="shutdown",transport="sse"'
        server.wait_metric("tokenspout_requests_total", 1, labels=labels)
    (line,) = request_lines(caplog)
    assert line["status"] == "shutdown"


def test_a_stream_cancelled_by_id_is_counted_cancelled_not_ok(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    body = {"messages": [{"role": "user", "content": "w"}], "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        httpx.post(f"{server.url}/v1/streams/{r.headers['x-stream-id']}/cancel")
        for _ in lines:  # to the stream's end: [DONE]
            pass
    labels = 'endpoint="chat",status="cancelled",transport="sse"'
    server.wait_metric("tokenspout_requests_total", 1, labels=labels)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 1


def test_refused_requests_are_counted_by_status_and_code(start_server) -> None:  # type: ignore[no-untyped-def]
    # 4xx answers never reached a metric: an error rate was invisible in /metrics.
    server: RunningServer = start_server(SyntheticEngine(), api_key="sk-1")
    auth = {"Authorization": "Bearer sk-1"}
    chat_url = f"{server.url}/v1/chat/completions"
    assert httpx.post(chat_url, json={"messages": []}, headers=auth).status_code == 400
    assert httpx.post(chat_url, json={"messages": []}).status_code == 401
    assert httpx.get(f"{server.url}/v1/models/nope", headers=auth).status_code == 404
    assert httpx.put(chat_url, headers=auth).status_code == 405
    counts = {
        (labels["status"], labels["code"]): value
        for labels, value in samples(server, "tokenspout_requests_refused_total")
    }
    assert counts[("400", "invalid_request")] == 1
    assert counts[("401", "invalid_api_key")] == 1
    assert counts[("405", "http_405")] == 1
    assert sum(v for (status, _), v in counts.items() if status == "404") == 1


def samples(server: RunningServer, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of the metric ``name`` in /metrics, with its labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics").text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_a_client_that_leaves_is_logged_as_such(start_server, caplog) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    body = {"messages": [{"role": "user", "content": "w"}], "max_tokens": 1000, "stream": True}
    with caplog.at_level(logging.INFO, logger="tokenspout.requests"):
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            next(r.iter_lines())
        server.wait_metric(
            "tokenspout_requests_total",
            1,
            labels='endpoint="chat",status="client_disconnect",transport="sse"',
        )
    (line,) = request_lines(caplog)
    assert line["status"] == "client_disconnect"
    # The disconnect aborts the engine request on the spot, so the line records it.
    assert line["finish_reason"] == "cancelled" and line["events"] >= 1
