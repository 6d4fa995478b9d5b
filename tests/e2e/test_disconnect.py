"""A client that leaves mid-stream (or while queued) stops generation and frees the slot."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


def open_raw_stream(
    server: RunningServer,
    body: dict,
    path: str = "/v1/chat/completions",
    rcvbuf: int | None = None,
) -> socket.socket:
    """Send a streaming request over a plain socket and return it unread. ``rcvbuf`` sets
    the receive buffer before connecting, so the window it offers is small from the start."""
    payload = json.dumps(body).encode()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def most_tokens_unread(stream_buffer: int, token_bytes: int, rcvbuf: int) -> int:
    """How many tokens at most leave the engine for a client that reads nothing, once
    backpressure holds: the stream's buffer, the server's send buffer (the kernel autotunes
    it up to tcp_wmem's max), the client's receive buffer (the kernel doubles what was set)
    and 1 MiB for asyncio's write buffer and the event in flight."""
    send_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return (stream_buffer + send_max + 2 * rcvbuf + (1 << 20)) // token_bytes


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed early"
        data += chunk
    return data


CHAT = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000, "stream": True}


def test_disconnect_mid_stream_frees_the_engine(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5))
    for _ in range(5):
        sock = open_raw_stream(server, CHAT)
        read_until(sock, b'"content":"go ')
        assert server.metric("tokenspout_requests_running") == 1
        sock.close()
        server.wait_metric("tokenspout_requests_running", 0, timeout=2.0)
    aborted = server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"')
    assert aborted == 5
    assert server.metric("tokenspout_streams_active") == 0
    # The server keeps serving.
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "ok ok "


def test_non_streaming_request_is_aborted_too(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5))
    sock = open_raw_stream(server, {**CHAT, "stream": False})
    server.wait_metric("tokenspout_requests_running", 1)
    sock.close()
    server.wait_metric("tokenspout_requests_running", 0, timeout=2.0)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 1


def test_queued_request_whose_client_left_is_never_started(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5, max_num_seqs=1))
    busy = open_raw_stream(server, CHAT)
    read_until(busy, b"go ")
    prompt_tokens = server.metric("tokenspout_prompt_tokens_total")
    queued = open_raw_stream(server, {**CHAT, "messages": [{"role": "user", "content": "a b c d"}]})
    server.wait_metric("tokenspout_requests_waiting", 1)
    queued.close()
    server.wait_metric("tokenspout_requests_waiting", 0, timeout=2.0)
    busy.close()
    server.wait_metric("tokenspout_requests_running", 0)
    # The engine serves in order: had the queued request been kept, it would start first.
    after = httpx.post(f"{server.url}/v1/completions", json={"prompt": "z", "max_tokens": 1})
    assert server.metric("tokenspout_prompt_tokens_total") == prompt_tokens + 1
    assert after.json()["usage"]["prompt_tokens"] == 1
