"""``/v1/ws`` with a real WebSocket client (the ``websockets`` library)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import RunningServer
from tests.e2e.test_disconnect import most_tokens_unread
from tokenspout.engine.synthetic_engine import SyntheticEngine


def ws_url(server: RunningServer) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ws"


def generate(stream_id: str, text: str, max_tokens: int, **extra: object) -> str:
    return json.dumps(
        {
            "type": "generate",
            "id": stream_id,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            **extra,
        }
    )


async def test_two_streams_one_cancelled(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    async with connect(ws_url(server)) as ws:
        await ws.send(generate("a", "alpha", 300))
        await ws.send(generate("b", "beta", 60))
        texts: dict[str, str] = {"a": "", "b": ""}
        done: dict[str, dict] = {}
        cancelled_at = None
        after_cancel: list[dict] = []
        while len(done) < 2:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if cancelled_at is not None and msg["id"] == "a":
                after_cancel.append(msg)
            if msg["type"] == "delta":
                texts[msg["id"]] += msg["text"]
                if msg["id"] == "a" and cancelled_at is None and len(texts["a"]) > 30:
                    cancelled_at = len(texts["a"])
                    await ws.send(json.dumps({"type": "cancel", "id": "a"}))
            elif msg["type"] == "done":
                done[msg["id"]] = msg
        assert done["a"]["finish_reason"] == "cancelled"
        # Deltas the server sent before it read the cancel may still arrive; then the end.
        assert after_cancel[-1]["type"] == "done"
        assert all(m["type"] == "delta" for m in after_cancel[:-1])
        assert done["b"]["finish_reason"] == "length"
        assert texts["b"] == "beta " * 60
        assert done["b"]["usage"]["completion_tokens"] == 60
        # The socket is still usable after that.
        await ws.send(json.dumps({"type": "generate", "id": "c", "prompt": "p", "max_tokens": 3}))
        msgs = [json.loads(await ws.recv()) for _ in range(2)]
        while msgs[-1]["type"] != "done":
            msgs.append(json.loads(await ws.recv()))
        assert "".join(m.get("text", "") for m in msgs) == "p p p "
    assert server.metric("tokenspout_requests_aborted_total", 'reason="cancelled"') == 1


@pytest.mark.parametrize("resumable", [False, True])
async def test_closing_the_socket_stops_everything(start_server, resumable: bool) -> None:  # type: ignore[no-untyped-def]
    # With --resumable too: no WebSocket client could resume a stream, and one left
    # generating for --resume-grace-s would hold its slot for nobody.
    engine = SyntheticEngine(itl_ms=10, max_num_seqs=2)
    server: RunningServer = start_server(engine, resumable=resumable)
    async with connect(ws_url(server)) as ws:
        for i in range(3):  # two run, one waits
            await ws.send(generate(str(i), "x", 4000))
        for _ in range(4):
            await ws.recv()
        assert server.metric("tokenspout_requests_running") == 2
    await asyncio.to_thread(server.wait_metric, "tokenspout_requests_running", 0, 2.0)
    await asyncio.to_thread(server.wait_metric, "tokenspout_requests_waiting", 0, 2.0)
    assert server.metric("tokenspout_requests_aborted_total", 'reason="client_disconnect"') == 3
    assert server.metric("tokenspout_streams_active") == 0


USAGE_EVERY_CHUNK = {"include_usage": True, "continuous_usage_stats": True}


async def test_malformed_messages_get_errors_and_the_socket_stays(
    synthetic_server: RunningServer,
) -> None:
    async with connect(ws_url(synthetic_server)) as ws:
        # The message, its id in the error, words of the error's message, and its param
        # (the field at fault, named as over HTTP).
        bad = [
            ("not json", None, "JSON", None),
            ("[1]", None, "object", None),
            (json.dumps({"type": "generate"}), None, "id", "id"),
            (json.dumps({"type": "dance", "id": "q"}), "q", "type", "type"),
            (json.dumps({"type": "generate", "id": "q"}), "q", "messages or prompt", "messages"),
            (generate("q", "hi", 0), "q", "max_tokens", "max_tokens"),
            (generate("q", "hi", "x"), "q", "max_tokens", "max_tokens"),
            (generate("r", "hi", 2, stream_options={"resumable": True}), "r", "not resumable",
             "stream_options.resumable"),
            # Fields no socket message could honour are refused by name, not ignored.
            (generate("s", "hi", 2, stream=False), "s", "always streams", "stream"),
            (generate("u", "hi", 2, stream_options=USAGE_EVERY_CHUNK), "u", "continuous_usage",
             "stream_options.continuous_usage_stats"),
            ('{"type": "cancel", "id": "\\ud800"}', None, "lone surrogate", "id"),
            ('{"type": "generate", "id": "n", "max_tokens": ' + "9" * 5000 + "}", None, "long",
             None),
        ]  # fmt: skip
        params = []
        for text, msg_id, words, _ in bad:
            await ws.send(text)
            msg = json.loads(await ws.recv())
            assert msg["type"] == "error" and msg["id"] == msg_id, msg
            assert words in msg["error"]["message"]
            params.append(msg["error"]["param"])
        assert params == [param for *_, param in bad]
        await ws.send(generate("ok", "fine", 2))
        received = [json.loads(await ws.recv()) for _ in range(3)]
        assert received[-1]["type"] == "done"
        # What a socket honours still is: stream true, include_usage (the done's usage),
        # and the coalescing knobs (one delta per token).
        options = {"include_usage": True, "flush_tokens": 1, "flush_ms": 0}
        await ws.send(generate("fine", "a b", 3, stream=True, stream_options=options))
        received = [json.loads(await ws.recv()) for _ in range(4)]
        assert [m["type"] for m in received] == ["delta", "delta", "delta", "done"]
        assert received[-1]["usage"]["completion_tokens"] == 3


async def test_a_cancel_after_the_end_is_ignored(synthetic_server: RunningServer) -> None:
    """The stream's ``done`` is its last message: a cancel that crossed it (or names no
    stream at all) gets no answer, least of all an ``error`` naming the stream."""
    async with connect(ws_url(synthetic_server)) as ws:
        await ws.send(generate("x", "hi", 1))
        received = [json.loads(await ws.recv())]
        while received[-1]["type"] != "done":
            received.append(json.loads(await ws.recv()))
        await ws.send(json.dumps({"type": "cancel", "id": "x"}))
        await ws.send(json.dumps({"type": "cancel", "id": "ghost"}))
        # Messages are handled in order: whatever the cancels caused comes before y's end.
        await ws.send(generate("y", "hi", 1))
        after = [json.loads(await ws.recv())]
        while after[-1]["type"] != "done":
            after.append(json.loads(await ws.recv()))
    assert {m["id"] for m in after} == {"y"}, after


async def test_a_cancel_that_crosses_the_end_leaves_the_whole_text(
    synthetic_server: RunningServer,
) -> None:
    """A cancel sent at the first delta of a short answer may come after the engine's end:
    then the answer ends as it would have ("length"), with all its text. 54 of 300 such
    answers ended "length" with text missing when every cancel hid the deltas after it."""

    async def one(max_tokens: int) -> tuple[str, str]:
        async with connect(ws_url(synthetic_server)) as ws:
            await ws.send(generate("s", "pi mu", max_tokens))
            text, cancelled = "", False
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "delta":
                    text += message["text"]
                    if not cancelled:
                        await ws.send(json.dumps({"type": "cancel", "id": "s"}))
                        cancelled = True
                else:
                    assert message["type"] == "done", message
                    return message["finish_reason"], text

    sizes = [1 + i % 6 for i in range(120)]
    ends = await asyncio.gather(*(one(n) for n in sizes))
    for n, (finish_reason, text) in zip(sizes, ends, strict=True):
        if finish_reason != "cancelled":
            assert (finish_reason, text) == ("length", "pi mu " * (n // 2) + "pi " * (n % 2))


@pytest.mark.parametrize(
    ("second", "said", "param"),
    [
        (generate("a", "again", 4), "'a' is already running", "id"),
        (json.dumps({"type": "bogus", "id": "a"}), "type must be", "type"),
        (
            json.dumps({"type": "generate", "id": "a"}),
            "exactly one of messages or prompt",
            "messages",
        ),
    ],
    ids=["generate", "unknown type", "no prompt"],
)
async def test_a_message_with_a_running_id_leaves_that_stream_alone(
    start_server,  # type: ignore[no-untyped-def]
    second: str,
    said: str,
    param: str,
) -> None:
    """The refusal is not sent as the running stream's ``error``: ``a`` still ends once."""
    server = start_server(SyntheticEngine(itl_ms=5))
    async with connect(ws_url(server)) as ws:
        await ws.send(generate("a", "go on", 4000))
        first = json.loads(await ws.recv())
        assert first["type"] == "delta"
        await ws.send(second)
        refusal = None
        while refusal is None:
            msg = json.loads(await ws.recv())
            if msg["type"] == "error":
                refusal = msg
        await ws.send(json.dumps({"type": "cancel", "id": "a"}))
        ends = []
        while not ends:
            msg = json.loads(await ws.recv())
            if msg["type"] != "delta":
                ends.append(msg)
    assert refusal["id"] is None and said in refusal["error"]["message"]
    assert refusal["error"]["param"] == param
    assert ends[0]["id"] == "a" and ends[0]["finish_reason"] == "cancelled", ends


def masked_text_frame(text: str) -> bytes:
    """One client→server text frame (RFC 6455 5.2: clients must mask)."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 1 << 16:
        length = bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack("!Q", n)
    return b"\x81" + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_stuck_websocket_reader_hits_send_timeout(start_server) -> None:  # type: ignore[no-untyped-def]
    # A raw socket that never reads: the websockets client library keeps reading into
    # memory on its own, which would hide the server's behaviour.
    server: RunningServer = start_server(
        SyntheticEngine(itl_ms=0), send_timeout_s=1.0, max_stream_buffer_bytes=1 << 20
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Set before connecting, so the window it offers is small from the start.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 101")
        sock.sendall(masked_text_frame(generate("big", "y" * 8192, 4000)))
        server.wait_metric(
            "tokenspout_requests_aborted_total", 1, timeout=20, labels='reason="send_timeout"'
        )
        server.wait_metric("tokenspout_requests_running", 0, timeout=2)
        generated = server.metric("tokenspout_generation_tokens_total")
        assert generated <= most_tokens_unread(1 << 20, 8192, 4096), generated
    finally:
        sock.close()


async def test_api_key_by_header_or_query(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(), api_key="k3y")
    for url, headers in (
        (ws_url(server) + "?api_key=k3y", None),
        (ws_url(server), {"Authorization": "Bearer k3y"}),
    ):
        async with connect(url, additional_headers=headers) as ws:
            await ws.send(generate("a", "ok", 1))
            assert json.loads(await ws.recv())["text"] == "ok "
    # Refused at the handshake, before any message is read.
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(server) + "?api_key=wrong"):
            pass
    assert info.value.response.status_code == 401
    assert info.value.response.headers["www-authenticate"] == "Bearer"


def test_peer_gone_mid_send_ends_every_stream_of_the_socket(start_server) -> None:  # type: ignore[no-untyped-def]
    """Regression (issue 10, defect 5): a send to a peer that had gone raised out of the
    stream's task and the socket's other stream tasks were never awaited. Now every stream
    of the socket is aborted as a client disconnect, and nothing is left running."""
    server: RunningServer = start_server(SyntheticEngine(itl_ms=1))
    sock = socket.create_connection(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert sock.recv(1024).startswith(b"HTTP/1.1 101")
    for sid in ("a", "b", "c"):
        sock.sendall(masked_text_frame(generate(sid, "long " * 50, 4000)))
    server.wait_metric("tokenspout_requests_running", 3, timeout=10)
    # Gone without a close frame: a reset, as when a client's machine drops off.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    server.wait_metric("tokenspout_requests_running", 0, timeout=10)
    server.wait_metric("tokenspout_streams_active", 0, timeout=10)
    server.wait_metric(
        "tokenspout_requests_aborted_total", 3, timeout=10, labels='reason="client_disconnect"'
    )
    server.wait_metric(
        "tokenspout_requests_total",
        3,
        timeout=10,
        labels='endpoint="chat",status="client_disconnect",transport="ws"',
    )


async def test_a_stream_whose_reader_cannot_be_made_stops_generating(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # A fault injector: the session's reader fails as it is built, after the stream opened.
    # The stream was left generating with nobody to read it, holding its slot to the end.
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr("tokenspout.server.websocket_session.WebSocketStream.__init__", broken)
    server: RunningServer = start_server(SyntheticEngine(itl_ms=10))
    async with connect(ws_url(server)) as ws:
        await ws.send(generate("a", "alpha", 3000))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert len(server.state.streams) == 0
