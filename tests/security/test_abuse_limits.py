"""The abuse limits, each a flag with a safe default: connections, WebSocket messages and
streams, stop lists, JSON depth; and TLS."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import RunningServer
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.server.config import ServerConfig


def ws_url(server: RunningServer) -> str:
    return server.url.replace("http://", "ws://") + "/v1/ws"


def test_safe_defaults() -> None:
    cfg = ServerConfig()
    assert cfg.header_timeout_s <= 30 and cfg.max_head_bytes <= 1 << 20
    assert cfg.max_connections <= 10_000 and cfg.ws_max_message_bytes <= 1 << 20
    assert cfg.ws_max_streams <= 256 and cfg.max_json_depth <= 64
    assert cfg.max_stop_strings <= 16 and cfg.max_stop_chars <= 1024


def _health_on(sock: socket.socket) -> bytes:
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock.recv(65536)


def test_max_connections_gives_a_fast_503(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(max_connections=4)
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(4)]
    try:
        for sock in held:
            assert _health_on(sock).startswith(b"HTTP/1.1 200")
        assert httpx.get(f"{server.url}/health").status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").status_code != 200:
        assert time.monotonic() < deadline
    refused = 'code="too_many_connections",status="503"'
    assert server.metric("tokenspout_requests_refused_total", refused) == 1


async def test_max_connections_counts_websockets(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(max_connections=3)
    async with connect(ws_url(server)), connect(ws_url(server)), connect(ws_url(server)):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(server)):
                pass
        assert info.value.response.status_code == 503
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{server.url}/health")).status_code == 503


async def test_websocket_message_size_limit(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(ws_max_message_bytes=1024)
    async with connect(ws_url(server)) as ws:
        await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_websocket_streams_per_socket(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(SyntheticEngine(itl_ms=20), ws_max_streams=2)
    async with connect(ws_url(server)) as ws:
        for i in range(3):
            msg = {"type": "generate", "id": f"s{i}", "prompt": "a b", "max_tokens": 1000}
            await ws.send(json.dumps(msg))
        while True:
            message = json.loads(await ws.recv())
            if message["type"] == "error":
                break
        assert message["id"] == "s2" and "2 streams are running" in message["error"]["message"]


def test_stop_list_limits(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(max_stop_strings=3, max_stop_chars=10)
    url = f"{server.url}/v1/completions"
    ok = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "stop": ["a", "b", "c"]})
    assert ok.status_code == 200
    for stop in (["a", "b", "c", "d"], ["a" * 11]):
        r = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_json_depth_flag(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server(max_json_depth=4)
    url = f"{server.url}/v1/completions"
    # Three levels, in fields the request knows (an unknown field is a 400 of its own).
    shallow = {"prompt": ["x"], "max_tokens": 1, "stop": ["\n"]}
    assert httpx.post(url, json=shallow).status_code == 200
    r = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "x": [[[[1]]]]})
    assert r.status_code == 400 and "deeper than 4" in r.json()["error"]["message"]


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls(start_server, tls_files: tuple[Path, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cert, key = tls_files
    server: RunningServer = start_server(ssl_certfile=str(cert), ssl_keyfile=str(key))
    assert server.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    body = {"prompt": "hello tls", "max_tokens": 3}
    r = httpx.post(f"{server.url}/v1/completions", json=body, verify=context)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    with pytest.raises(httpx.ConnectError):  # not trusted without the certificate
        httpx.get(f"{server.url}/health")
    with pytest.raises(httpx.RemoteProtocolError):  # and no plain HTTP on the port
        httpx.get(f"http://127.0.0.1:{server.port}/health")
    # A file missing, or a key that is not the certificate's: one line naming them, exit 2.
    for certfile, keyfile in ((tmp_path / "none.pem", key), (key, cert)):
        out = subprocess.run(
            [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic",
             "--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        lines = [line for line in out.stderr.splitlines() if "SYNTHETIC" not in line]
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert str(certfile) in lines[0] and "cannot be loaded" in lines[0]


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` within 30 s (a TLS handshake could wait 60 s)."""
    sock.settimeout(30)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_tls_handshake_has_the_head_timeout(start_server, tls_files) -> None:  # type: ignore[no-untyped-def]
    # The handshake ran under asyncio's 60 s, whatever --header-timeout-s said.
    cert, key = tls_files
    server: RunningServer = start_server(
        ssl_certfile=str(cert), ssl_keyfile=str(key), header_timeout_s=1
    )
    silent = socket.create_connection(("127.0.0.1", server.port))
    partial = socket.create_connection(("127.0.0.1", server.port))
    partial.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    with silent, partial:
        assert _closed_by_server(silent) and _closed_by_server(partial)


def test_tls_handshakes_count_against_max_connections(start_server, tls_files) -> None:  # type: ignore[no-untyped-def]
    # Connections in their handshake were not counted: 3,000 were held with a limit of 5.
    cert, key = tls_files
    server: RunningServer = start_server(
        ssl_certfile=str(cert), ssl_keyfile=str(key), max_connections=2, header_timeout_s=120
    )
    context = ssl.create_default_context(cafile=str(cert))
    address = ("127.0.0.1", server.port)
    first, second = socket.create_connection(address), socket.create_connection(address)
    with second:
        with first, socket.create_connection(address) as beyond:
            # Accepted in order: the two in their handshake fill the limit, the third is closed.
            assert _closed_by_server(beyond)
        # Once the server has seen the first close, a client gets in; it and the handshake
        # left fill the limit again.
        with httpx.Client(verify=context) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert client.get(f"{server.url}/health").status_code == 200
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline
            with socket.create_connection(address) as beyond:
                assert _closed_by_server(beyond)
