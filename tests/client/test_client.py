"""The Python client (sync and async) and the `tokenspout complete` command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import RunningServer
from tokenspout.client import AsyncClient, Client, StreamError


def test_sync_client_streams_and_times(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client:
        stream = client.stream_chat("alpha beta", max_tokens=9)
        deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.text == "alpha beta " * 4 + "alpha "
    result = stream.result
    assert result.finish_reason == "length"
    assert result.stream_id
    assert result.ttft_s is not None and result.total_s is not None
    assert 0 < result.ttft_s <= result.total_s


async def test_async_client(synthetic_server: RunningServer) -> None:
    async with AsyncClient(synthetic_server.url) as client:
        result = await client.chat([{"role": "user", "content": "x"}], max_tokens=3)
        deltas = [d async for d in client.stream_completion("p q", max_tokens=4)]
    assert result.text == "x x x "
    assert "".join(deltas) == "p q p q "


def test_client_raises_on_http_errors(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client, pytest.raises(StreamError) as info:
        list(client.stream_chat("x", max_tokens=0))
    assert info.value.status_code == 400
    assert "max_tokens" in str(info.value)


def test_complete_command_prints_the_answer(synthetic_server: RunningServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "live words",
         "--url", synthetic_server.url, "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "live words live words"
    assert "TTFT" in out.stderr


def test_a_stream_cut_before_done_raises() -> None:
    # A fault injector: a server whose answer ends cleanly after one chunk, as a proxy that
    # closed the stream would leave it. The text so far is not an answer.
    import socket
    import threading

    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"half"}}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(head + b"content-length: %d\r\n\r\n" % len(chunk) + chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with Client(url) as client, pytest.raises(StreamError, match="before \\[DONE\\]"):
        stream = client.stream_chat("x")
        list(stream)
    assert stream.result.text == "half"
    thread.join(10)
    listener.close()


def test_complete_command_reports_a_refused_connection_in_one_line() -> None:
    from tests.conftest import free_port

    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "x",
         "--url", f"http://127.0.0.1:{free_port()}", "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "connection failed" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
