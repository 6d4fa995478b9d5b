"""Plain HTTP through the shipped nginx config (``deploy/nginx.conf``) in front of one
server: what a client sends reaches the server as it would directly."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

import httpx

from tests.cluster.conftest import needs_nginx
from tests.conftest import RunningServer


@needs_nginx
def test_an_h2c_upgrade_offer_through_nginx_is_served_as_http_1_1(
    synthetic_server: RunningServer, start_nginx: Callable[[list[int]], str]
) -> None:
    # nginx passed any Upgrade on with `Connection: upgrade`: a `curl --http2` POST got the
    # server's 400 "an Upgrade request has no body". Only a WebSocket's is passed on now.
    url = start_nginx([synthetic_server.port])
    h2c = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMA"}
    completion = {"prompt": "a b", "max_tokens": 2}
    r = httpx.post(f"{url}/v1/completions", json=completion, headers=h2c)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


@needs_nginx
def test_nginx_passes_only_a_websocket_upgrade_on(
    start_nginx: Callable[[list[int]], str],
) -> None:
    # What nginx sends the server, seen by a listener that answers as a server would.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = start_nginx([listener.getsockname()[1]])
        heads: list[bytes] = []

        def serve_one() -> None:
            conn, _ = listener.accept()
            with conn:
                got = b""
                while b"\r\n\r\n" not in got and (chunk := conn.recv(65536)):
                    got += chunk
                heads.append(got.partition(b"\r\n\r\n")[0].lower())
                conn.sendall(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")

        for upgrade in ("h2c", "websocket"):
            server = threading.Thread(target=serve_one)
            server.start()
            headers = {"Connection": "Upgrade", "Upgrade": upgrade}
            assert httpx.get(f"{url}/x", headers=headers).status_code == 204
            server.join(30)
    assert b"upgrade" not in heads[0], heads[0]
    assert b"upgrade: websocket" in heads[1] and b"connection: upgrade" in heads[1], heads[1]


@needs_nginx
def test_nginx_takes_what_the_server_takes_and_refuses_in_json(
    synthetic_server: RunningServer, start_nginx: Callable[[list[int]], str]
) -> None:
    # nginx's 8 KB head buffers refused a page's 12 KB EventSource GET (an HTML 414) and a
    # 10 KB header (an HTML 400) that the server takes; its 413 was an HTML page too.
    url = start_nginx([synthetic_server.port])
    r = httpx.get(f"{url}/v1/completions/stream", params={"prompt": "w " * 6000, "max_tokens": 2})
    assert r.status_code == 200 and "[DONE]" in r.text, r.text[:300]
    assert httpx.get(f"{url}/health", headers={"x-big": "a" * 10_000}).status_code == 200
    too_large = b"x" * (2 << 20)
    r = httpx.post(f"{url}/v1/completions", content=too_large, headers={"content-type": "a/b"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as s:
        # Exactly one 64 KiB buffer of request line: nginx reads all of it before its 414.
        # Bytes it had not read when it closed (a longer line) made the close a reset, which
        # could come before the 414 was read.
        line = b"GET /health?" + b"a" * 70_000
        s.sendall(line[: 64 * 1024])
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 414"), got[:200]
    assert json.loads(got.partition(b"\r\n\r\n")[2])["error"]["code"] == "uri_too_long"


@needs_nginx
def test_nginx_refuses_a_method_coding_or_version_in_json(
    synthetic_server: RunningServer, start_nginx: Callable[[list[int]], str]
) -> None:
    # TRACE (405), `Transfer-Encoding: gzip, chunked` (501) and an `HTTP/2.0` request line
    # (505) got nginx's HTML pages, which an SDK cannot parse.
    port = int(start_nginx([synthetic_server.port]).rsplit(":", 1)[1])
    for raw, status, code in [
        (b"TRACE /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "http_405"),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json"
            b"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "unsupported_transfer_encoding",
        ),
        (b"GET /health HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505, "http_version_not_supported"),
    ]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(raw)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d" % status), got
        assert b"\r\ncontent-type: application/json" in head.lower(), head
        assert json.loads(body)["error"]["code"] == code, body
    # The server's own 405 (a method its route does not take) passes as it is.
    r = httpx.post(f"http://127.0.0.1:{port}/health")
    assert r.status_code == 405 and r.json()["error"]["code"] == "http_405", r.text
