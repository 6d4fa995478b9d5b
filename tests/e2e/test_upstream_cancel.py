"""Cancel reaches the upstream: a client that leaves, cancel by id and a WebSocket cancel
close the upstream's response, so the upstream (a real synthetic tokenspout here) frees
the slot; a request whose client left while it waited in tokenspout's queue is never sent;
the client gets heartbeats while the upstream is silent and while it waits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import RunningServer
from tests.e2e.test_disconnect import open_raw_stream, read_until
from tests.upstream_processes import UpstreamProcess, faulty, front, processes, tokenspout

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
