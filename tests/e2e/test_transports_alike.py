"""The same stream reads the same over every transport: SSE, NDJSON, one JSON body and a
WebSocket give the same text, finish reason and usage, and each request is counted once
with its own transport label."""

from __future__ import annotations

import asyncio
import json

import httpx
from websockets.asyncio.client import connect

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine

PROMPT = 'Ünïcödé "quotes" \\ back-slash 日本語 😀 data: [DONE] line\nbreak'
BODY = {"prompt": PROMPT, "max_tokens": 37, "stream_options": {"include_usage": True}}


def via_sse(server: RunningServer) -> tuple[str, str, dict]:
    r = httpx.post(f"{server.url}/v1/completions", json={**BODY, "stream": True}, timeout=30)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return parts(chunks)


def via_ndjson(server: RunningServer) -> tuple[str, str, dict]:
    headers = {"accept": "application/x-ndjson"}
    r = httpx.post(
        f"{server.url}/v1/completions", json={**BODY, "stream": True}, headers=headers, timeout=30
    )
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return parts([json.loads(line) for line in r.text.splitlines() if line])


def parts(chunks: list[dict]) -> tuple[str, str, dict]:
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    (finish,) = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and
                 c["choices"][0]["finish_reason"]]  # fmt: skip
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    return text, finish, usage


def via_json(server: RunningServer) -> tuple[str, str, dict]:
    # A whole answer always has its usage; stream_options are a stream's.
    whole = {k: v for k, v in BODY.items() if k != "stream_options"}
    body = httpx.post(f"{server.url}/v1/completions", json=whole, timeout=30).json()
    choice = body["choices"][0]
    return choice["text"], choice["finish_reason"], body["usage"]


async def via_websocket(server: RunningServer) -> tuple[str, str, dict]:
    text = ""
    async with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws:
        await ws.send(json.dumps({"type": "generate", "id": "s", **BODY}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] == "delta":
                text += message["text"]
            else:
                assert message["type"] == "done", message
                return text, message["finish_reason"], message["usage"]


def test_every_transport_carries_the_same_answer(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    answers = {
        "sse": via_sse(server),
        "ndjson": via_ndjson(server),
        "json": via_json(server),
        "ws": asyncio.run(via_websocket(server)),
    }
    words = PROMPT.split()
    expected = "".join(words[i % len(words)] + " " for i in range(37))
    for transport, (text, finish, usage) in answers.items():
        assert text == expected, transport
        assert finish == "length", transport
        assert usage["completion_tokens"] == 37, transport
        labels = f'endpoint="completion",status="ok",transport="{transport}"'
        server.wait_metric("tokenspout_requests_total", 1, labels=labels)
