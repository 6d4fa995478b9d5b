"""Cancel a stream by id (``POST /v1/streams/{id}/cancel``), and NDJSON for chat."""

from __future__ import annotations

import json

import httpx

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine


def test_cancel_by_id_ends_the_stream_with_cancelled(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 3000, "stream": True}
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        stream_id = r.headers["x-stream-id"]
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
            if len(chunks) == 3:
                c = httpx.post(f"{server.url}/v1/streams/{stream_id}/cancel")
                assert c.status_code == 200 and c.json()["id"] == stream_id
                break
        rest = list(lines)
    data = [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    assert data[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    # Stopped, not run to its 3000 tokens (30 s).
    assert server.metric("tokenspout_generation_tokens_total") < 3000
    assert server.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 1
    assert server.metric("tokenspout_requests_running") == 0


def test_chat_ndjson_by_accept(synthetic_server: RunningServer) -> None:
    body = {"messages": [{"role": "user", "content": "n d"}], "max_tokens": 6, "stream": True}
    r = httpx.post(
        f"{synthetic_server.url}/v1/chat/completions",
        json=body,
        headers={"Accept": "application/x-ndjson"},
    )
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.headers["x-stream-id"]
    objects = [json.loads(line) for line in r.text.splitlines() if line]
    text = "".join(o["choices"][0]["delta"].get("content") or "" for o in objects if o["choices"])
    assert text == "n d n d n d "
    assert objects[-1]["choices"][0]["finish_reason"] == "length"
