"""Admission limits answer 429 with Retry-After; API keys guard the /v1 routes."""

from __future__ import annotations

import httpx

from tests.conftest import RunningServer
from tests.e2e.test_disconnect import CHAT, open_raw_stream, read_until
from tokenspout.engine.synthetic_engine import SyntheticEngine


def test_max_streams_gives_429(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5), max_streams=1)
    busy = open_raw_stream(server, CHAT)
    read_until(busy, b"go ")
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    busy.close()
    server.wait_metric("tokenspout_requests_running", 0)
    # The slot is back: a new request is admitted (the registry forgets the stream a loop
    # turn after it ends).
    for _ in range(50):
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "a", "max_tokens": 1})
        if r.status_code == 200:
            break
    assert r.status_code == 200


def test_max_queued_gives_429(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=5, max_num_seqs=1), max_queued=1)
    running = open_raw_stream(server, CHAT)
    read_until(running, b"go ")
    queued = open_raw_stream(server, CHAT)
    server.wait_metric("tokenspout_requests_waiting", 1)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and "queued" in r.json()["error"]["message"]
    running.close()
    queued.close()
    server.wait_metric("tokenspout_requests_running", 0)


def test_api_key(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(), api_key="s3cret")
    body = {"prompt": "a", "max_tokens": 1}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=wrong).status_code == 401
    right = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{server.url}/v1/completions", json=body, headers=right).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_cors_only_when_allowed(start_server) -> None:  # type: ignore[no-untyped-def]
    closed: RunningServer = start_server(SyntheticEngine())
    opened: RunningServer = start_server(
        SyntheticEngine(), allowed_origins=("https://app.example",)
    )
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert (
        "access-control-allow-origin"
        not in httpx.options(f"{closed.url}/v1/chat/completions", headers=headers).headers
    )
    r = httpx.options(f"{opened.url}/v1/chat/completions", headers=headers)
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(
        f"{opened.url}/v1/completions",
        json={"prompt": "a", "max_tokens": 1},
        headers={"Origin": "https://app.example"},
    )
    assert "x-stream-id" in r.headers["access-control-expose-headers"].lower()
