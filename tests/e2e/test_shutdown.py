"""SIGTERM drains: the server stops accepting, running streams may finish within the drain
timeout, and the rest end with an error — the same for every transport — before the
process exits with 0 (a real `tokenspout serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
from websockets.asyncio.client import connect

from tests.conftest import free_port


def start_cli_server(
    *args: str, log: IO[bytes] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A synthetic ``tokenspout serve``; with ``log``, its output at INFO goes there."""
    port = free_port()
    level = "warning" if log is None else "info"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic",
         "--port", str(port), "--log-level", level, *args],
        stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not start")


def collect(
    url: str,
    max_tokens: int,
    out: list[str],
    started: threading.Event,
    arrived: threading.Semaphore | None = None,
) -> None:
    body = {"prompt": "drain", "max_tokens": max_tokens}
    with httpx.stream("POST", f"{url}/v1/completions/stream", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()
                if arrived is not None:
                    arrived.release()


def reading(
    url: str, max_tokens: int, events: list[str], arrived: threading.Semaphore | None = None
) -> threading.Thread:
    """A stream read into ``events`` on a thread, once its first event is in (a cut at the
    end of a test ends it quietly); ``arrived`` is released once per event."""
    started = threading.Event()

    def read() -> None:
        with contextlib.suppress(httpx.HTTPError):
            collect(url, max_tokens, events, started, arrived)

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(15)
    return reader


def kept_alive(url: str) -> http.client.HTTPConnection:
    """A connection that has had one answer and is kept alive, as a balancer's pool holds."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200 and not response.will_close
    response.read()
    return connection


def refused_once_draining(connection: http.client.HTTPConnection) -> None:
    """Sends requests over ``connection`` until it fails (closed by the server, and then a
    new one refused): each answer until then must be a 200, never the draining 503. Each
    request keeps the connection busy, so the keep-alive timeout (5 s) never closes it."""
    while True:
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
        except ConnectionError:
            return
        assert response.status == 200, "a request over a kept-alive connection to a drain"


async def ws_collect(url: str, out: list[dict], started: threading.Event) -> None:
    """Two streams on one WebSocket: a short one and one the drain timeout cuts."""
    async with connect(url.replace("http", "ws") + "/v1/ws") as ws:
        for sid, tokens in (("short", 20), ("long", 2000)):
            await ws.send(json.dumps({"type": "generate", "id": sid, "prompt": "drain",
                                      "max_tokens": tokens}))  # fmt: skip
        ended = 0
        async for raw in ws:
            message = json.loads(raw)
            out.append(message)
            started.set()
            if message["type"] in ("done", "error"):
                ended += 1
                if ended == 2:
                    return


def test_sigterm_drains_every_transport_then_exits_0() -> None:
    """Regression (issue 10, defect 8): WebSocket clients were cut at once with close code
    1012 and no error message, and the process exited with 143 after a clean drain."""
    proc, url = start_cli_server("--synthetic-itl-ms", "20", "--drain-timeout-s", "1")
    short: list[str] = []
    long: list[str] = []
    ws_messages: list[dict] = []
    started = [threading.Event() for _ in range(3)]
    threads = [
        threading.Thread(target=collect, args=(url, 20, short, started[0])),  # ~0.4 s
        threading.Thread(target=collect, args=(url, 2000, long, started[1])),  # cut at 1 s
        threading.Thread(target=lambda: asyncio.run(ws_collect(url, ws_messages, started[2]))),
    ]
    try:
        for t in threads:
            t.start()
        for event in started:
            assert event.wait(15)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=20)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert short[-1] == "[DONE]"
    assert "".join(json.loads(d)["token"] for d in short[:-1]) == "drain " * 20
    assert long[-1] == "[DONE]"
    assert json.loads(long[-2])["error"]["code"] == "shutting_down"
    assert "".join(json.loads(d)["token"] for d in long[:-2]).startswith("drain drain ")
    ends = {m["id"]: m for m in ws_messages if m["type"] in ("done", "error")}
    assert ends["short"]["type"] == "done"
    assert ends["short"]["finish_reason"] == "length"
    assert ends["long"]["type"] == "error"
    assert ends["long"]["error"]["code"] == "shutting_down"
    short_text = "".join(
        m["text"] for m in ws_messages if m["type"] == "delta" and m["id"] == "short"
    )
    assert short_text == "drain " * 20


def test_a_second_sigint_ends_the_drain_at_once_and_still_shuts_the_app_down(
    tmp_path: Path,
) -> None:
    """Regression: a second Ctrl-C during a drain waited out the whole drain, then skipped
    the app's shutdown (engine, Redis writer, tracing) and logged a CancelledError traceback.
    Now it ends the drain as its timeout would, and the app's shutdown runs."""
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc, url = start_cli_server(
            "--synthetic-itl-ms", "50", "--drain-timeout-s", "600", log=log
        )
    events: list[str] = []
    reader = reading(url, 4000, events)
    try:
        idle = kept_alive(url)
        proc.send_signal(signal.SIGINT)
        # Signals sent back to back may be handled as one: the second waits until the first
        # has begun the drain (which closes kept-alive connections).
        refused_once_draining(idle)
        proc.send_signal(signal.SIGINT)
        # The drain would last 600 s: ending well before shows the second signal ended it.
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=20)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    output = log_path.read_text()
    assert "forced quit: ending 1 stream(s)" in output
    assert "Application shutdown complete" in output
    assert "Traceback" not in output


def test_a_drain_closes_kept_alive_connections_when_it_begins() -> None:
    """Regression: a keep-alive connection stayed open through the drain, and nginx sent
    new requests over it to the draining replica, which could only answer 503 (nginx does
    not try another replica on a 503). Closed, they go to another replica. The drain itself
    goes on: a running stream is still delivered."""
    proc, url = start_cli_server("--synthetic-itl-ms", "20", "--drain-timeout-s", "600")
    events: list[str] = []
    arrived = threading.Semaphore(0)
    reader = reading(url, 3000, events, arrived)
    try:
        busy = kept_alive(url)
        proc.send_signal(signal.SIGTERM)
        refused_once_draining(busy)
        assert proc.poll() is None
        while arrived.acquire(blocking=False):
            pass  # the events so far
        for _ in range(5):  # the stream goes on
            assert arrived.acquire(timeout=30)
        assert all("error" not in event for event in events)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        reader.join(30)


def test_a_bad_flag_combination_is_one_line_and_exit_2() -> None:
    """Regression (issue 10, defect 9): a 40-line traceback instead of a clear error."""
    result = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic",
         "--max-stream-buffer-bytes", "1000", "--max-buffer-bytes", "10"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--max-stream-buffer-bytes" in lines[0] and "--max-buffer-bytes" in lines[0]
    assert "Traceback" not in result.stderr
