"""A reader that stops reading for a while gets the whole answer afterwards: text it has not
read is never dropped to bound memory; the engine waits for it instead.

Regression for issue 10, defect 1: with small replay bounds, a seed stream of 2000 tokens of
5,000-character words whose client read nothing for a while received 166 of 400 events, no
error and no ``[DONE]`` (the store evicted text the live reader had not read yet).
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

WORDS = [letter * 5000 for letter in "abcde"]
PROMPT = " ".join(WORDS)
BOUNDS = {"max_stream_buffer_bytes": 100_000, "max_buffer_bytes": 200_000}


def expected_text(tokens: int) -> str:
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(tokens))


def wait_until(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def paused_streams(server: RunningServer) -> int:
    return sum(1 for s in server.state.streams.running() if s.paused)


def read_seed_stream(response: httpx.Response) -> tuple[str, list[dict], list[str]]:
    """All text, the error payloads, and the raw data lines of a seed-format SSE stream."""
    text, errors, data = [], [], []
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data.append(line[6:])
        if line == "data: [DONE]":
            continue
        payload = json.loads(line[6:])
        if "error" in payload:
            errors.append(payload["error"])
        else:
            text.append(payload["token"])
    return "".join(text), errors, data


def slow_read(server: RunningServer, tokens: int, resumable: bool, started: threading.Event,
              go: threading.Event, out: dict) -> None:  # fmt: skip
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "stream_options": {"resumable": resumable},
    }
    # A fixed receive buffer: autotuning would otherwise let the kernel absorb tens of
    # megabytes. Not below the loopback MSS (64 KB), or the window never reopens.
    rcvbuf = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)]
    transport = httpx.HTTPTransport(socket_options=rcvbuf)
    with httpx.Client(timeout=120, transport=transport) as client:
        with client.stream("POST", f"{server.url}/v1/completions/stream", json=body) as r:
            assert r.status_code == 200
            started.set()
            go.wait(120)
            out["text"], out["errors"], out["data"] = read_seed_stream(r)


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
def test_a_reader_that_pauses_gets_every_event_and_done(start_server, resumable: bool) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2), **BOUNDS)
    started, go, out = threading.Event(), threading.Event(), {}
    reader = threading.Thread(target=slow_read, args=(server, 2000, resumable, started, go, out))
    reader.start()
    assert started.wait(30)
    # The reader reads nothing: the socket fills, then the engine is held for it.
    wait_until(lambda: paused_streams(server) == 1)
    go.set()
    reader.join(120)
    assert out["errors"] == []
    assert out["data"][-1] == "[DONE]"
    assert out["text"] == expected_text(2000)
    server.wait_metric("tokenspout_requests_total", 1,
                       labels='endpoint="seed",status="ok",transport="sse"')  # fmt: skip


def test_several_slow_readers_past_the_global_bound(start_server) -> None:  # type: ignore[no-untyped-def]
    """Three readers hold 3 x 100 KB unread against a 200 KB total: none loses text, and a
    fourth, fast stream still completes (its engine request waits its turn too)."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=2), **BOUNDS)
    readers = []
    go = threading.Event()
    outs: list[dict] = []
    for i in range(3):
        started, out = threading.Event(), {}
        outs.append(out)
        t = threading.Thread(target=slow_read, args=(server, 2000, i == 0, started, go, out))
        t.start()
        assert started.wait(30)
        readers.append(t)
    wait_until(lambda: paused_streams(server) == 3)
    fast = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": "quick brown fox", "max_tokens": 30},
        timeout=60,
    )
    assert fast.json()["choices"][0]["text"] == "quick brown fox " * 10
    go.set()
    for t in readers:
        t.join(120)
    for out in outs:
        assert out["errors"] == []
        assert out["data"][-1] == "[DONE]"
        assert out["text"] == expected_text(2000)
