"""DNS rebinding: a server bound to loopback answers only to names that mean this machine."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.errors import ConfigError
from tokenspout.server.trusted_hosts import host_allowed, is_loopback, trusted_names

NAMES = trusted_names(
    ("proxy.example", "Other.Example:8080", "http://web.example", "*.wild.example"),
    ("https://page.example:8443",),
)


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:8000", True),
        ("[::1]:8000", True),
        ("10.1.2.3", True),  # any address: rebinding cannot forge one
        ("localhost:8000", True),
        ("LocalHost", True),
        ("app.localhost:8000", True),
        ("proxy.example", True),  # --allowed-host
        ("page.example:8443", True),  # an --allowed-origin's host
        (None, True),  # no Host: not a browser
        ("other.example", True),  # given with a port
        ("web.example:80", True),  # given as a URL
        ("a.wild.example", True),  # *.wild.example
        ("localhost.:8000", True),  # a final dot: the same name
        ("proxy.example.", True),
        ("attacker.example:8000", False),
        ("localhost.attacker.example", False),
        ("wild.example", False),  # *.wild.example is its subdomains
        ("", False),
        ("[::1", False),  # malformed: refused, not a 500
        ("]", False),
        ("[evil.example]", False),
    ],
)
def test_names_that_mean_this_machine(host: str | None, allowed: bool) -> None:
    assert host_allowed(host, NAMES) is allowed


def test_a_star_allows_any_name() -> None:
    assert host_allowed("attacker.example", trusted_names(("*",), ()))


@pytest.mark.parametrize("bad", ["[::1", "http://", ":8080"])
def test_an_allowed_host_that_is_no_name_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="is not a host name"):
        trusted_names((bad,), ())


def test_a_name_that_resolves_to_loopback_only_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("")


def test_a_rebound_name_is_refused_on_http_and_websocket(start_server) -> None:  # type: ignore[no-untyped-def]
    server: RunningServer = start_server()
    rebound = {"Host": f"attacker.example:{server.port}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=rebound)
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{server.url}/", headers=rebound).status_code == 403

    # A raw handshake: WebSocket clients write Host from the URL.
    host = rebound["Host"].encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"GET /v1/ws HTTP/1.1\r\nHost: " + host + b"\r\nOrigin: http://" + host + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 403")
    refused = 'code="host_not_allowed",status="403"'
    assert server.metric("tokenspout_requests_refused_total", refused) == 3
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200


def test_allowed_hosts_and_a_public_bind_take_other_names(start_server) -> None:  # type: ignore[no-untyped-def]
    proxied: RunningServer = start_server(allowed_hosts=("tokenspout.internal.example",))
    named = {"Host": "tokenspout.internal.example"}
    assert httpx.get(f"{proxied.url}/health", headers=named).status_code == 200
    # Bound to every address, it is reachable under any name that points at it anyway.
    public: RunningServer = start_server(host="0.0.0.0")
    assert httpx.get(f"{public.url}/health", headers={"Host": "any.example"}).status_code == 200


def test_a_refused_handshake_is_no_error_in_the_servers_log() -> None:
    # uvicorn logged "ASGI callable returned without completing handshake" at ERROR after
    # sending every refusal: an attacker's handshakes filled the log with errors.
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenspout.cli", "serve", "--engine", "synthetic",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        for host, origin in ((f"127.0.0.1:{port}", "http://evil.example"), ("evil.example",) * 2):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(
                    f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
                )
                assert sock.recv(1024).startswith(b"HTTP/1.1 403")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert err.count("connection rejected (403 Forbidden)") == 2, err
    assert "ERROR" not in err, err
