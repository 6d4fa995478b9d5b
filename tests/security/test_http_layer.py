"""Regression tests for the defects an outside probe of the HTTP layer (uvicorn's httptools
under ``GuardedHttpProtocol``) found, over raw sockets: each failed before its fix."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.conftest import RunningServer


def read_response(s: socket.socket) -> bytes:
    """One whole response with a ``content-length`` (head and body) from ``s``."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(65536)
        assert chunk, got
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, got
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closes ``s`` (its EOF); the socket's timeout bounds the wait."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


UNREAD = b"Host: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n"


def test_an_unread_body_cannot_hold_its_connection(start_server) -> None:  # type: ignore[no-untyped-def]
    # Answered before its body was read, a request whose client then sent one more body byte
    # and went silent was held forever: that byte stopped uvicorn's keep-alive timer and no
    # other timer ran; --max-connections of them locked every client out with 503s.
    server: RunningServer = start_server(body_timeout_s=0.5, api_key="k")
    requests = (b"GET /health", b"POST /nope", b"POST /v1/completions")  # 200, 404, 401
    for request in requests:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(request + b" HTTP/1.1\r\n" + UNREAD)
            assert read_response(s).startswith(b"HTTP/1.1 "), request
            s.sendall(b" ")
            assert closed_by_server(s)  # before the fix: a timeout, 30 s on
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_after_an_unread_body_has_come_the_head_timer_runs(start_server) -> None:  # type: ignore[no-untyped-def]
    # Its rest having come after the answer, the connection had no timer at all.
    server: RunningServer = start_server(header_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 10\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"0123456789")
        # Still a keep-alive connection: the next request is served...
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: 3\r\n\r\n")
        second = read_response(s)
        assert second.startswith(b"HTTP/1.1 200"), second
        assert json.loads(second.partition(b"\r\n\r\n")[2])
        s.sendall(b"abc")
        assert closed_by_server(s)  # ...and the idle one after is closed


H2C = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABk"}


def test_an_h2c_upgrade_offer_is_served_as_http_1_1(synthetic_server: RunningServer) -> None:
    # `curl --http2` offers h2c on every request: a POST got 400 "an Upgrade request has no
    # body", and plain uvicorn dropped its body (httptools ends an Upgrade request at its head).
    completion = {"prompt": "a b", "max_tokens": 2}
    r = httpx.post(f"{synthetic_server.url}/v1/completions", json=completion, headers=H2C)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    body = json.dumps(completion).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABk\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", synthetic_server.port), timeout=30) as s:
        # A chunked body in two writes, then a second request on the same connection.
        s.sendall(head + b"%x\r\n" % len(body) + body[:5])
        s.sendall(body[5:] + b"\r\n0\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_head_on_a_resume_does_not_subscribe(synthetic_server: RunningServer) -> None:
    # HEAD ran the resume and dropped its body: a reader subscribed, a resume counted, a
    # request logged as left, an abandoned stream kept generating past its grace.
    completion = {"prompt": "a b", "max_tokens": 500, "stream": True}
    completion["stream_options"] = {"resumable": True}
    with httpx.stream("POST", f"{synthetic_server.url}/v1/completions", json=completion) as r:
        stream_id = r.headers["x-stream-id"]
        head = httpx.head(f"{synthetic_server.url}/v1/streams/{stream_id}")
        assert head.status_code == 405 and head.headers["allow"] == "GET", head.headers
    assert httpx.head(f"{synthetic_server.url}/v1/streams/nope").status_code == 405
    assert synthetic_server.metric("tokenspout_stream_resumes_total") == 0


def test_a_transfer_coding_other_than_chunked_is_501(synthetic_server: RunningServer) -> None:
    # `Transfer-Encoding: gzip, chunked` was taken and its gzip ignored: the coded bytes
    # were parsed as JSON (RFC 9112 6.1: 501 for a transfer coding not understood).
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    with socket.create_connection(("127.0.0.1", synthetic_server.port), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json"
            b"\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 501"), got
    assert got.count(b"HTTP/1.1") == 1, got  # nothing after it
    error = json.loads(got.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "unsupported_transfer_encoding", error
    assert synthetic_server.metric("tokenspout_requests_running") == 0


def test_a_405_on_fastapis_own_routes_names_their_methods(
    synthetic_server: RunningServer,
) -> None:
    # Only our routers were looked at: FastAPI's /openapi.json, /docs and /redoc had `allow:`.
    for path in ("/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"):
        r = httpx.post(synthetic_server.url + path)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", (path, r.headers)


def test_the_protocols_refusals_have_a_date_and_compact_json(start_server) -> None:  # type: ignore[no-untyped-def]
    # The 408/431/501/503 written by the protocol had no Date (RFC 9110 6.6.1) and spaced
    # JSON, unlike uvicorn's and the app's answers.
    server: RunningServer = start_server(max_head_bytes=1000)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        got = read_response(s)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and b"\r\ndate: " in head.lower(), head
    assert b"\r\nserver: uvicorn" in head.lower(), head
    assert body == json.dumps(json.loads(body), separators=(",", ":")).encode(), body


@pytest.mark.parametrize(
    "host_lines",
    [b"", b"Host: 127.0.0.1\r\nHost: evil.example\r\n"],
    ids=["no-host", "two-hosts"],
)
def test_an_http_1_1_request_needs_exactly_one_host(
    synthetic_server: RunningServer, host_lines: bytes
) -> None:
    # Both were served; with two, the DNS-rebinding check read the first Host only (RFC 9112
    # 3.2: 400, as nginx answers).
    with socket.create_connection(("127.0.0.1", synthetic_server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n" + host_lines + b"\r\n")
        got = read_response(s)
    assert got.startswith(b"HTTP/1.1 400"), got
    error = json.loads(got.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "invalid_host_header", error
    with socket.create_connection(("127.0.0.1", synthetic_server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")  # HTTP/1.0 has no Host to require
        assert read_response(s).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    ],
    ids=["bad-header-line", "content-length-and-chunked", "bad-chunk-size"],
)
def test_a_request_the_parser_refuses_is_a_json_400(
    synthetic_server: RunningServer, raw: bytes
) -> None:
    # uvicorn's own answer, "Invalid HTTP request received." in text/plain, was the one
    # refusal of the protocol without the JSON error shape.
    with socket.create_connection(("127.0.0.1", synthetic_server.port), timeout=30) as s:
        s.sendall(raw)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and got.count(b"HTTP/1.1") == 1, got
    lower = head.lower()
    assert b"\r\ncontent-type: application/json" in lower and b"\r\ndate: " in lower, head
    assert b"\r\nserver: uvicorn" in lower, head
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("invalid HTTP request: "), error
