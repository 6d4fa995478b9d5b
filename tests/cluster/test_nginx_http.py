"""Plain HTTP through the shipped nginx config (``deploy/nginx.conf``) in front of one
server: what a client sends reaches the server as it would directly."""

from __future__ import annotations

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
