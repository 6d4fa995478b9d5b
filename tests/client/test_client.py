"""The Python client (sync and async) and the `tokenspout complete` command."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import RunningServer
from tokenspout.client import AsyncClient, Client, StreamError
from tokenspout.client import client as client_module
from tokenspout.engine.synthetic_engine import SyntheticEngine


def test_sync_client_streams_and_times(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client:
        stream = client.stream_chat("alpha beta", max_tokens=9)
        deltas = list(stream)
    assert len(deltas) > 1
    assert "".join(deltas) == stream.result.text == "alpha beta " * 4 + "alpha "
    result = stream.result
    assert result.finish_reason == "length"
    assert result.stream_id
    assert result.ttft_s is not None and result.total_s is not None
    assert 0 < result.ttft_s <= result.total_s


async def test_async_client(synthetic_server: RunningServer) -> None:
    async with AsyncClient(synthetic_server.url) as client:
        result = await client.chat([{"role": "user", "content": "x"}], max_tokens=3)
        deltas = [d async for d in client.stream_completion("p q", max_tokens=4)]
    assert result.text == "x x x "
    assert "".join(deltas) == "p q p q "


def test_client_raises_on_http_errors(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client, pytest.raises(StreamError) as info:
        list(client.stream_chat("x", max_tokens=0))
    assert info.value.status_code == 400
    assert "max_tokens" in str(info.value)


def test_complete_command_prints_the_answer(synthetic_server: RunningServer) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "live words",
         "--url", synthetic_server.url, "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "live words live words"
    assert "TTFT" in out.stderr


@contextmanager
def answering(body: bytes) -> Iterator[str]:
    """A fault injector: a server (its URL) that answers one request with ``body`` as an SSE
    stream, then closes cleanly, as a proxy that ended the stream would leave it."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(head + b"content-length: %d\r\n\r\n" % len(body) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(10)
        listener.close()


def test_a_stream_cut_before_done_raises() -> None:
    chunk = b'data: {"choices":[{"index":0,"delta":{"content":"half"}}]}\n\n'
    with answering(chunk) as url, Client(url) as client:
        stream = client.stream_chat("x")
        with pytest.raises(StreamError, match="before \\[DONE\\]"):
            list(stream)
    assert stream.result.text == "half"


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (b"{not json", "not JSON"),
        (b"42", "not an object"),
        (b'{"error": "boom"}', "boom"),  # TGI's errors are strings
        (b'{"error": {"message": "bad [/x] thing [model]"}}', "bad [/x] thing [model]"),
    ],
)
def test_a_bad_event_is_a_stream_error_and_one_line_in_the_cli(event: bytes, message: str) -> None:
    with answering(b"data: " + event + b"\n\n") as url, Client(url) as client:
        with pytest.raises(StreamError) as info:
            client.chat("x")
    assert message in str(info.value)
    with answering(b"data: " + event + b"\n\n") as url:
        out = subprocess.run(
            [sys.executable, "-m", "tokenspout.cli", "complete", "x", "--url", url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert message in out.stderr  # the server's words as sent, not read as Rich markup


def test_a_base_url_may_end_in_v1_and_must_be_a_url(synthetic_server: RunningServer) -> None:
    # The OpenAI SDK's base URL (".../v1") went to /v1/v1/chat/completions: a 404.
    for url in (synthetic_server.url + "/v1", synthetic_server.url + "/v1/"):
        with Client(url) as client:
            assert client.chat("a b", max_tokens=2).text == "a b "
    for bad in ("http://127.0.0.1:8000x", "127.0.0.1:8000", "ftp://h"):
        with pytest.raises(ValueError):
            Client(bad)
    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "x", "--url", "http://h:80x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr


def test_the_client_streams_one_choice(synthetic_server: RunningServer) -> None:
    # With n = 2 the choices' deltas went into one interleaved text.
    with Client(synthetic_server.url) as client:
        for params in ({"n": 2}, {"stream": False}):
            with pytest.raises(ValueError, match="one choice"):
                client.chat("x", **params)


async def test_cancel_errors_are_stream_errors(synthetic_server: RunningServer) -> None:
    with Client(synthetic_server.url) as client, pytest.raises(StreamError) as info:
        client.cancel("no-such-stream")
    assert info.value.status_code == 404 and "no-such-stream" in str(info.value)
    async with AsyncClient(synthetic_server.url) as aclient:
        with pytest.raises(StreamError) as info:
            await aclient.cancel("no-such-stream")
    assert info.value.status_code == 404
    from tests.conftest import free_port

    with Client(f"http://127.0.0.1:{free_port()}") as down, pytest.raises(StreamError):
        down.cancel("x")


def test_complete_command_reports_a_refused_connection_in_one_line() -> None:
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, "-m", "tokenspout.cli", "complete", "x",
         "--url", url, "--max-tokens", "4"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"the connection to {url}/v1/chat/completions failed" in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("temperature", ["nan", "inf", "1e400"])
def test_complete_refuses_a_temperature_json_cannot_carry(temperature: str) -> None:
    # It was a Rich traceback ("Out of range float values are not JSON compliant"), exit 1.
    from typer.testing import CliRunner

    from tokenspout.cli import app

    url = "http://127.0.0.1:9"  # nothing listens: no request may be tried
    result = CliRunner().invoke(app, ["complete", "x", "--url", url, "--temperature", temperature])
    assert result.exit_code == 2, result.output
    assert "--temperature" in result.output and "Traceback" not in result.output


@contextmanager
def cutting_proxy(port: int, events: int) -> Iterator[str]:
    """A fault injector in front of the server at ``port`` (its URL): the first connection is
    closed in the middle of its response, right after ``events`` SSE events (0: right after
    the response's head); later ones pass whole."""
    listener = socket.create_server(("127.0.0.1", 0))
    threads: list[threading.Thread] = []

    def pipe(src: socket.socket, dst: socket.socket, cut_after: int | None) -> None:
        # The other direction's thread closes these sockets when its side ends: this one's
        # recv() or send() then fails, and the connection is over for it too.
        with src, dst, contextlib.suppress(OSError):
            relay(src, dst, cut_after)

    def relay(src: socket.socket, dst: socket.socket, cut_after: int | None) -> None:
        seen = 0
        while data := src.recv(65536):
            if cut_after == 0 and (head := data.find(b"\r\n\r\n")) >= 0:
                dst.sendall(data[: head + 4])  # the response's head alone
                for sock in (src, dst):
                    sock.shutdown(socket.SHUT_RDWR)
                return
            if cut_after:
                # Each event ends in one blank line ("\n\n"; chunked framing and the head's
                # "\r\n\r\n" hold none): forward up to the last allowed one.
                at = -1
                while seen < cut_after and (at := data.find(b"\n\n", at + 1)) >= 0:
                    seen += 1
                if seen >= cut_after:
                    dst.sendall(data[: at + 2])
                    # shutdown, not just close: the other direction's thread is in recv()
                    # on these sockets, and a close would wait for it.
                    for sock in (src, dst):
                        sock.shutdown(socket.SHUT_RDWR)
                    return
            dst.sendall(data)

    def serve() -> None:
        first = True
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", port))
            for src, dst, cut in (
                (conn, upstream, None),
                (upstream, conn, events if first else None),
            ):
                t = threading.Thread(target=pipe, args=(src, dst, cut), daemon=True)
                t.start()
                threads.append(t)
            first = False

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
        listener.close()
        acceptor.join(10)


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def test_a_cut_resumable_stream_is_resumed_where_it_was(
    synthetic_server: RunningServer,
) -> None:
    params = {"max_tokens": 40, "stream_options": {"resumable": True, "flush_tokens": 1}}
    with Client(synthetic_server.url) as client:
        whole = client.chat("one two three", **params).text
    with cutting_proxy(_port(synthetic_server), events=7) as url, Client(url) as client:
        stream = client.stream_chat("one two three", **params)
        deltas = list(stream)
    assert stream.result.resumes == 1
    assert "".join(deltas) == stream.result.text == whole  # nothing lost, nothing twice
    assert stream.result.finish_reason == "length"
    with cutting_proxy(_port(synthetic_server), events=3) as url:
        async with AsyncClient(url) as aclient:
            astream = aclient.stream_chat("one two three", **params)
            adeltas = [d async for d in astream]
    assert astream.result.resumes == 1 and "".join(adeltas) == whole


def test_a_cut_stream_is_a_stream_error_when_it_cannot_be_resumed(
    synthetic_server: RunningServer,
) -> None:
    # Not resumable: the server refuses the resume, and the cut is reported with why (not
    # as a 404 of the request, and not counted as a resume), with the resume's status: a
    # stream not resumable ends with its reader.
    with cutting_proxy(_port(synthetic_server), events=4) as url, Client(url) as client:
        stream = client.stream_chat("one two", max_tokens=40, stream_options={"flush_tokens": 1})
        with pytest.raises(
            StreamError,
            match=r"the stream was cut: the connection to .* failed.*could not be "
            r"resumed: no stream with id",
        ) as info:
            list(stream)
    assert info.value.status_code == 404
    assert stream.result.text and stream.result.finish_reason is None
    assert stream.result.resumes == 0
    resumable = {"max_tokens": 40, "stream_options": {"resumable": True, "flush_tokens": 1}}
    with cutting_proxy(_port(synthetic_server), events=4) as url:
        with Client(url, resumes=0) as client, pytest.raises(StreamError, match="resumes=0"):
            client.chat("one two", **resumable)


def test_a_stream_cut_before_its_first_event_is_resumed_from_the_start(
    start_server: Callable[..., RunningServer],
) -> None:
    # Cut while the request waits for its first token: no event id yet, but the stream's
    # id came with the headers and nothing was read, so it is read again from the start.
    server = start_server(SyntheticEngine(ttft_ms=200, itl_ms=2))
    params = {"max_tokens": 6, "stream_options": {"resumable": True, "flush_tokens": 1}}
    with cutting_proxy(_port(server), events=0) as url, Client(url) as client:
        stream = client.stream_completion("x y", **params)
        text = "".join(stream)
    assert text == "x y x y x y " and stream.result.resumes == 1


async def test_a_result_taken_before_iterating_fills_in(synthetic_server: RunningServer) -> None:
    # Iterating replaced stream.result with a new object: this one stayed empty.
    with Client(synthetic_server.url) as client:
        stream = client.stream_chat("a b", max_tokens=4)
        result = stream.result
        assert "".join(stream) == result.text == "a b a b "
    assert result.finish_reason == "length" and result.total_s is not None
    async with AsyncClient(synthetic_server.url) as aclient:
        astream = aclient.stream_chat("a b", max_tokens=4)
        aresult = astream.result
        assert "".join([d async for d in astream]) == aresult.text == "a b a b "
    assert aresult is astream.result


async def test_a_client_closed_mid_stream_ends_it_with_a_stream_error(
    synthetic_server: RunningServer,
) -> None:
    # The closed client was used for a resume: httpx's RuntimeError ("Cannot send a
    # request, as the client has been closed") instead of a StreamError.
    client = Client(synthetic_server.url)
    deltas = iter(client.stream_chat("a b", max_tokens=4096))
    next(deltas)
    client.close()
    with pytest.raises(StreamError, match="the client was closed during the stream"):
        for _ in deltas:
            pass
    async with AsyncClient(synthetic_server.url) as aclient:
        adeltas = aiter(aclient.stream_chat("a b", max_tokens=4096))
        await anext(adeltas)
    with pytest.raises(StreamError, match="the client was closed during the stream"):
        async for _ in adeltas:
            pass


def test_text_utf8_cannot_carry_is_a_value_error_naming_its_field() -> None:
    # A lone surrogate raised UnicodeEncodeError from inside httpx, naming no field.
    with Client("http://127.0.0.1:9") as client:  # nothing listens: nothing may be sent
        with pytest.raises(ValueError, match=r"^messages\[0\]\.content cannot be sent as UTF-8"):
            client.stream_chat("a\udc80b")
        with pytest.raises(ValueError, match=r"^prompt cannot be sent as UTF-8"):
            client.stream_completion("\ud800")
        with pytest.raises(ValueError, match=r"^stop\[1\] cannot be sent as UTF-8"):
            client.stream_completion("x", stop=["ok", "\udfff"])
    # A command line argument that is not UTF-8 arrives with such surrogates.
    from typer.testing import CliRunner

    from tokenspout.cli import app

    result = CliRunner().invoke(app, ["complete", "a\udcffb", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "cannot be sent as UTF-8" in result.output


def test_errors_name_their_cause_and_a_stream_is_iterated_once(
    synthetic_server: RunningServer,
) -> None:
    assert str(client_module._cut(httpx.ReadTimeout(""))) == "the connection failed: ReadTimeout"
    with Client(synthetic_server.url) as client:
        stream = client.stream_chat("a", max_tokens=2)
        assert "".join(stream) == "a a "
        with pytest.raises(RuntimeError, match="iterated once"):
            list(stream)


def test_a_resume_a_balancer_turns_away_for_now_is_tried_again() -> None:
    # 503 while a replica dies behind the balancer: tried again, like a dropped connection.
    first = b'id: s:1\ndata: {"choices":[{"index":0,"delta":{"content":"half "}}]}\n\n'
    rest = (
        b'id: s:2\ndata: {"choices":[{"index":0,"delta":{"content":"whole"},'
        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-stream-id: s\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(first) + first,
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b'connection: close\r\ncontent-length: 26\r\n\r\n{"error":{"message":"no"}}',
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(rest) + rest,
    ]
    with answering_each(answers) as (url, requests), Client(url) as client:
        stream = client.stream_chat("x")
        assert "".join(stream) == "half whole"
    assert stream.result.resumes == 1
    assert [r.split(b" ", 2)[:2] for r in requests] == [
        [b"POST", b"/v1/chat/completions"], [b"GET", b"/v1/streams/s"], [b"GET", b"/v1/streams/s"]
    ]  # fmt: skip
    assert b"last-event-id: s:1" in requests[2].lower()


def _half_then(*resumes: bytes) -> list[bytes]:
    """A stream's first answer, cut after its first event, then the answers to resumes."""
    first = b'id: s:1\ndata: {"choices":[{"index":0,"delta":{"content":"half "}}]}\n\n'
    return [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-stream-id: s\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(first) + first,
        *resumes,
    ]


def test_failed_resumes_report_the_cut_first_and_the_last_answers_status() -> None:
    # It said only "the connection to .../v1/streams/s failed ... (after 2 tries to resume
    # it)", a URL the caller never asked for, and its status_code was None after 503s.
    busy = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b'connection: close\r\ncontent-length: 28\r\n\r\n{"error":{"message":"busy"}}'
    )
    with answering_each(_half_then(busy, busy)) as (url, requests):
        with Client(url, resumes=2) as client, pytest.raises(StreamError) as info:
            list(client.stream_chat("x"))
    assert str(info.value) == (
        "the stream was cut: the stream ended before [DONE] after 5 characters; resuming it "
        "failed (2 tries), the last: HTTP 503: busy"
    )
    assert info.value.status_code == 503 and len(requests) == 3


def test_a_stream_asked_not_resumable_is_not_resumed() -> None:
    # The request itself said so: a resume could only be refused. (The timeout: a resume
    # would wait for an answer that never comes; then fail, not hang.)
    with answering_each(_half_then()) as (url, requests), Client(url, timeout=10) as client:
        stream = client.stream_chat("x", stream_options={"resumable": False})
        with pytest.raises(StreamError, match=r"^the stream ended before"):
            list(stream)
    assert len(requests) == 1


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/html", "HTTP 200, content type text/html"),
        (b"HTTP/1.1 200 OK\r\ncontent-type: application/json",
         "HTTP 200, content type application/json"),
        (b"HTTP/1.1 307 Temporary Redirect\r\nlocation: https://elsewhere/v1/chat/completions",
         "HTTP 307, a redirect to https://elsewhere/v1/chat/completions (not followed)"),
    ],
)  # fmt: skip
def test_an_answer_that_is_no_event_stream_is_reported_as_it_is(head: bytes, message: str) -> None:
    # It was "the connection failed: Expected response header Content-Type to contain
    # 'text/event-stream'..." (httpx-sse's SSEError is a TransportError), then resumed.
    answer = head + b"\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
    with answering_each([answer]) as (url, requests), Client(url, timeout=10) as client:
        with pytest.raises(StreamError) as info:
            list(client.stream_chat("x"))
    assert str(info.value) == f"unexpected answer, not an event stream: {message}"
    assert info.value.status_code == int(head.split()[1]) and info.value.body == b"{}"
    assert len(requests) == 1


@contextmanager
def answering_each(answers: list[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """A fault injector: a server (its URL) that answers its n-th connection with
    ``answers[n]`` as given (head and body), then closes; the requests' heads it read."""
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                heads.append(conn.recv(65536))
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", heads
    finally:
        thread.join(10)
        listener.close()
