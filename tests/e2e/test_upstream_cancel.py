"""Cancel reaches the upstream: a client that leaves, cancel by id and a WebSocket cancel
close the upstream's response, so the upstream (a real synthetic tokenspout here) frees
the slot; so do the send timeout and a SIGTERM drain (the fault-injecting upstream records
that its client went away mid-answer); a request whose client left while it waited in
tokenspout's queue is never sent; the client gets heartbeats while the upstream is silent
and while it waits."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import RunningServer
from tests.e2e.test_disconnect import open_raw_stream, read_until
from tests.upstream_processes import (
    UpstreamProcess,
    faulty,
    front,
    processes,
    spawn,
    tokenspout,
)

LONG = {
    "model": "synthetic",
    "messages": [{"role": "user", "content": "go on"}],
    "max_tokens": 4000,
    "stream": True,
}


@pytest.fixture(scope="module")
def upstreams() -> Iterator[list[UpstreamProcess]]:
    slow = ("--engine", "synthetic", "--synthetic-itl-ms", "20")
    with processes(lambda: tokenspout(*slow), faulty) as started:
        yield started


@pytest.fixture
def synthetic(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    return upstreams[0]


@pytest.fixture
def fault(upstreams: list[UpstreamProcess]) -> UpstreamProcess:
    upstreams[1].fault("none")
    return upstreams[1]


def wait_upstream_idle(upstream: UpstreamProcess, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while upstream.metric("tokenspout_requests_running") != 0:
        assert time.monotonic() < deadline, "the upstream still generates for a client who left"
        time.sleep(0.005)


def test_client_disconnect_frees_the_upstream_slot(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    server = front(start_server, synthetic)
    sock = open_raw_stream(server, LONG)
    read_until(sock, b'"content":"go ')
    assert synthetic.metric("tokenspout_requests_running") == 1
    sock.close()
    wait_upstream_idle(synthetic)
    server.wait_metric("tokenspout_requests_running", 0)
    labels = f'status="cancelled",upstream="{synthetic.base}"'
    assert server.metric("tokenspout_upstream_requests_total", labels) == 1


def test_cancel_by_id_frees_the_upstream_slot(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    server = front(start_server, synthetic)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=LONG) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content":"go ' in line)
        cancel = httpx.post(f"{server.url}/v1/streams/{r.headers['x-stream-id']}/cancel")
        assert cancel.status_code == 200
        rest = list(lines)
    data = [line for line in rest if line.startswith("data: ")]
    assert '"finish_reason":"cancelled"' in "".join(data) and data[-1] == "data: [DONE]"
    wait_upstream_idle(synthetic)


def test_a_cancelled_answer_keeps_the_prompt_tokens_the_upstream_said(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    """The upstream (a tokenspout: usage in every chunk) said the prompt's tokens before
    the cancel; its final usage never comes, the count stays."""
    server = front(start_server, synthetic)
    body = {**LONG, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if '"content":"go ' in line)
        httpx.post(f"{server.url}/v1/streams/{r.headers['x-stream-id']}/cancel")
        data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    usage = data[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    wait_upstream_idle(synthetic)


def test_websocket_cancel_frees_the_upstream_slot(
    start_server: Callable[..., RunningServer], synthetic: UpstreamProcess
) -> None:
    server = front(start_server, synthetic)
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws:
        body = {k: v for k, v in LONG.items() if k != "stream"}
        ws.send(json.dumps({"type": "generate", "id": "a", **body}))
        assert json.loads(ws.recv())["type"] == "delta"
        ws.send(json.dumps({"type": "cancel", "id": "a"}))
        wait_upstream_idle(synthetic)


def test_queued_request_whose_client_left_is_never_sent(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("slow", delay_s=30)
    server = front(start_server, fault, max_concurrency=1, config={"heartbeat_interval_s": 0.05})
    busy = open_raw_stream(server, LONG)
    deadline = time.monotonic() + 5
    while fault.stats()["received"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    received = fault.stats()["received"]
    queued = open_raw_stream(server, LONG)
    server.wait_metric("tokenspout_requests_waiting", 1)
    read_until(queued, b": ping")  # heartbeats while it waits in tokenspout's queue
    queued.close()
    server.wait_metric("tokenspout_requests_waiting", 0)
    busy.close()
    server.wait_metric("tokenspout_upstream_in_flight", 0, labels=f'upstream="{fault.base}"')
    assert fault.stats()["received"] == received, "the queued request was sent upstream"


def test_heartbeats_while_the_upstream_is_silent(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    fault.fault("slow", delay_s=1.0)
    server = front(start_server, fault, config={"heartbeat_interval_s": 0.05})
    sock = open_raw_stream(server, {**LONG, "max_tokens": 3})
    before_text = read_until(sock, b'"content":"go ', timeout=10).split(b'"content":"go ')[0]
    assert b": ping" in before_text
    sock.close()


def test_send_timeout_closes_the_upstream_response(
    start_server: Callable[..., RunningServer], fault: UpstreamProcess
) -> None:
    """A client that stops reading is cut off after --send-timeout-s, and the upstream's
    response is closed with it, mid-answer."""
    server = front(start_server, fault, config={"send_timeout_s": 1.0})
    # 8 KB words (the upstream echoes them): the unread answer fills every buffer quickly.
    body = {"model": "synthetic", "prompt": "x" * 8192, "max_tokens": 4000, "stream": True,
            "user": "send-timeout"}  # fmt: skip
    sock = open_raw_stream(server, body, path="/v1/completions", rcvbuf=4096)
    try:
        server.wait_metric(
            "tokenspout_requests_aborted_total", 1, timeout=20, labels='reason="send_timeout"'
        )
        fault.wait_abandoned("send-timeout")
        server.wait_metric("tokenspout_upstream_in_flight", 0, labels=f'upstream="{fault.base}"')
        labels = f'status="cancelled",upstream="{fault.base}"'
        assert server.metric("tokenspout_upstream_requests_total", labels) == 1
    finally:
        sock.close()


def test_drain_ends_the_stream_and_closes_the_upstream_response(fault: UpstreamProcess) -> None:
    """SIGTERM with a stream in flight (its upstream silent after three chunks): at the
    drain timeout the client gets an error event and [DONE], the upstream's response is
    closed, and the process exits with 0."""
    fault.fault("stall", after=3)
    spout = spawn(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "upstream",
         "--upstream", fault.base, "--drain-timeout-s", "0.2", "--log-level", "warning"],
        ready="/health",
    )  # fmt: skip
    # A request still uploading its body holds the process open after the drain (uvicorn
    # waits for it), so that a closed upstream response is the drain's doing, not the
    # process's exit.
    upload = socket.create_connection(("127.0.0.1", int(spout.url.rsplit(":", 1)[1])))
    try:
        upload.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{"
        )
        body = {**LONG, "user": "drain"}
        with httpx.stream("POST", f"{spout.url}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(line for line in lines if '"content":"go ' in line)
            spout.proc.send_signal(signal.SIGTERM)
            data = [line for line in lines if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        assert json.loads(data[-2][6:])["error"]["code"] == "shutting_down"
        fault.wait_abandoned("drain")
        assert spout.proc.poll() is None, "the process exited before the upload ended"
        upload.sendall(b"}")
        assert spout.proc.wait(timeout=30) == 0
    finally:
        upload.close()
        spout.stop()
