"""Heartbeats while the first token is delayed, and coalescing as seen by a client."""

from __future__ import annotations

import json

import httpx

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


def test_heartbeats_arrive_while_the_first_token_is_pending(start_server) -> None:  # type: ignore[no-untyped-def]
    """Order, not timing: the first token is a minute away, and pings keep coming."""
    server: RunningServer = start_server(SyntheticEngine(ttft_ms=60_000), heartbeat_interval_s=0.05)
    lines: list[str] = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions/stream", json={"prompt": "late", "max_tokens": 2}
    ) as r:
        for line in r.iter_lines():
            if line:
                lines.append(line)
            if len(lines) == 3:
                break
    assert lines == [": ping"] * 3
    server.wait_metric("tokenspout_requests_running", 0)


def count_events(server: RunningServer, options: dict | None) -> tuple[int, str]:
    body: dict = {"prompt": "tok", "max_tokens": 200}
    if options is not None:
        body["stream_options"] = options
    r = httpx.post(f"{server.url}/v1/completions/stream", json=body)
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
    return len(data), "".join(json.loads(d)["token"] for d in data)


def test_coalescing_defaults_and_per_token(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=0))
    events, text = count_events(server, None)
    assert text == "tok " * 200
    assert events < 100
    events, text = count_events(server, {"flush_tokens": 1, "flush_ms": 0})
    assert text == "tok " * 200
    assert events == 200


def test_coalescing_by_time(start_server) -> None:  # type: ignore[no-untyped-def]
    # 10 ms tokens with flush_ms=35 and a flush_tokens above the answer's length: by count
    # alone there would be two events (the first token, then the rest at the end); the
    # deadline makes more, and never one per token.
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    events, text = count_events(server, {"flush_tokens": 1000, "flush_ms": 35})
    assert text == "tok " * 200
    assert 2 < events < 200


def test_server_flags_set_the_default(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=0), flush_tokens=1, flush_ms=0)
    events, _ = count_events(server, None)
    assert events == 200
