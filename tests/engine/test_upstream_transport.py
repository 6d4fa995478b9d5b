"""The relay's HTTP/1.1 transport against a real socket server that writes exactly the bytes
each test gives: bodies by length, chunked and to the close; keep-alive and its limits;
every way an answer can break, as the httpx errors the relay handles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from tokenspout.engine.upstream_options import UpstreamOptions
from tokenspout.engine.upstream_server import UpstreamServer
from tokenspout.engine.upstream_transport import UpstreamTransport, relay_transport

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


class Upstream:
    """A socket server answering each request with ``answer``; counts connections and
    keeps the requests' bytes, and notes when a client closed its connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.client_closed.set()
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(answer: Answer) -> Upstream:
        upstream = Upstream(answer)
        upstream.server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        assert upstream.server is not None
        upstream.server.close()


def client(upstream: Upstream, **limits: object) -> httpx.AsyncClient:
    settings = {"max_connections": 4, "max_keepalive_connections": 4, "keepalive_expiry": 30.0}
    transport = UpstreamTransport(httpx.Limits(**{**settings, **limits}))  # type: ignore[arg-type]
    return httpx.AsyncClient(base_url=upstream.url, transport=transport, timeout=5)


def writes(*parts: bytes, close: bool = False) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for part in parts:
            writer.write(part)
            await writer.drain()
        if close:
            writer.close()

    return answer


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def body(response: httpx.Response) -> bytes:
    return b"".join([data async for data in response.aiter_raw()])


async def test_a_chunked_stream_arrives_whole_and_the_connection_is_kept(serve) -> None:
    events = [b"data: %d\n\n" % i for i in range(50)]
    # Two writes, the chunks of each in one (so one read may bring many).
    upstream = await serve(writes(SSE_HEAD, chunked(*events[:25])[:-5], chunked(*events[25:])))
    async with client(upstream) as c:
        for _ in range(3):
            async with c.stream("POST", "/v1/chat/completions", content=b'{"a":1}') as r:
                assert r.status_code == 200
                assert r.headers["content-type"] == "text/event-stream"
                assert await body(r) == b"".join(events)
    assert upstream.connections == 1
    assert len(upstream.requests) == 3
    request = upstream.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\ncontent-length: 7\r\n" in request.lower() and request.endswith(b'\r\n\r\n{"a":1}')
    assert b"\r\nhost: 127.0.0.1:" in request.lower()


async def test_a_body_by_length_and_a_non_streamed_read(serve) -> None:
    data = b'{"data": [{"id": "m"}]}'
    upstream = await serve(
        writes(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data), data)
    )
    async with client(upstream) as c:
        assert (await c.get("/v1/models")).json() == {"data": [{"id": "m"}]}
        assert (await c.get("/v1/models?x=1")).json() == {"data": [{"id": "m"}]}
    assert upstream.connections == 1
    assert upstream.requests[1].startswith(b"GET /v1/models?x=1 HTTP/1.1\r\n")


async def test_a_body_that_ends_with_the_connection(serve) -> None:
    upstream = await serve(writes(b"HTTP/1.1 200 OK\r\n\r\n", b"data: a\n\n", b"rest", close=True))
    async with client(upstream) as c:
        async with c.stream("GET", "/") as r:
            assert await body(r) == b"data: a\n\nrest"
        async with c.stream("GET", "/") as r:  # a new connection: that one is gone
            assert await body(r) == b"data: a\n\nrest"
    assert upstream.connections == 2


async def test_connection_close_is_not_reused(serve) -> None:
    upstream = await serve(
        writes(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
    )
    async with client(upstream) as c:
        assert (await c.get("/")).text == "ok"
        assert (await c.get("/")).text == "ok"
    assert upstream.connections == 2


async def test_an_interim_answer_is_skipped(serve) -> None:
    upstream = await serve(
        writes(
            b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
        )
    )
    async with client(upstream) as c:
        r = await c.get("/")
    assert (r.status_code, r.text) == (201, "ok")


async def test_a_cut_mid_body_gives_what_came_then_an_error(serve) -> None:
    upstream = await serve(writes(SSE_HEAD, b"9\r\ndata: a\n\n\r\n", b"9\r\ndata:", close=True))
    async with client(upstream) as c:
        async with c.stream("POST", "/") as r:
            got = b""
            with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
                async for data in r.aiter_raw():
                    got += data
    assert got.startswith(b"data: a\n\n")


async def test_no_answer_at_all(serve) -> None:
    upstream = await serve(writes(close=True))
    async with client(upstream) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await c.post("/", content=b"{}")


async def test_malformed_http(serve) -> None:
    upstream = await serve(writes(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"))
    async with client(upstream) as c:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed HTTP"):
            await c.get("/")


async def test_closing_an_answer_early_closes_its_connection(serve) -> None:
    """How a cancelled relay tells the upstream to stop: the connection closes."""
    upstream = await serve(writes(SSE_HEAD, chunked(b"data: a\n\n")[:-5]))  # never ends
    async with client(upstream) as c:
        async with c.stream("POST", "/") as r:
            async for _ in r.aiter_raw():
                break
        await asyncio.wait_for(upstream.client_closed.wait(), 10)
        upstream.answer = writes(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        assert (await c.get("/")).text == "ok"
    assert upstream.connections == 2


async def test_a_timeout_waiting_for_the_head(serve) -> None:
    upstream = await serve(writes())  # reads the request, never answers
    async with client(upstream) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get("/", timeout=0.05)


async def test_nothing_listening_is_a_connect_error(serve) -> None:
    upstream = await serve(writes())
    url = upstream.url
    assert upstream.server is not None
    upstream.server.close()
    await upstream.server.wait_closed()
    transport = UpstreamTransport(httpx.Limits(max_connections=2))
    async with httpx.AsyncClient(base_url=url, transport=transport) as c:
        with pytest.raises(httpx.ConnectError):
            await c.get("/")


async def test_at_most_max_connections_at_once(serve) -> None:
    gate, arrived = asyncio.Event(), asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.set()
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    upstream = await serve(answer)
    async with client(upstream, max_connections=1) as c:
        first = asyncio.create_task(c.get("/"))
        second = asyncio.create_task(c.get("/"))
        await arrived.wait()
        with pytest.raises(httpx.PoolTimeout):
            await c.get("/", timeout=httpx.Timeout(5, pool=0.01))
        gate.set()
        assert [r.text for r in await asyncio.gather(first, second)] == ["ok", "ok"]
    assert upstream.connections == 1


def test_only_plain_http_without_a_proxy_gets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = httpx.Limits(max_connections=2)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert isinstance(relay_transport("http://127.0.0.1:8000/v1", limits), UpstreamTransport)
    assert relay_transport("https://api.example.com/v1", limits) is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert relay_transport("http://gpu-box:8000/v1", limits) is None
    monkeypatch.setenv("NO_PROXY", "gpu-box")
    assert isinstance(relay_transport("http://gpu-box:8000/v1", limits), UpstreamTransport)


async def test_a_relayed_post_sends_what_httpx_would(serve) -> None:
    """``UpstreamServer.post`` writes the request itself (no ``httpx.Request``): the same
    bytes as httpx's client sends for it, API key and base path included."""
    upstream = await serve(writes(SSE_HEAD + chunked(b"data: [DONE]\n\n")))
    options = UpstreamOptions(urls=(upstream.url + "/v1",), api_key="k3y")
    server = UpstreamServer(upstream.url + "/v1", options)
    headers = {"Content-Type": "application/json", "traceparent": "00-ab-cd-01"}
    try:
        response = await server.post("/chat/completions", b'{"a":1}', headers)
        assert await body(response) == b"data: [DONE]\n\n"
        await response.aclose()
        request = server.client.build_request(
            "POST", "/chat/completions", content=b'{"a":1}', headers=headers
        )
        sent = await server.client.send(request)
        assert sent.status_code == 200
        assert upstream.requests[0] == upstream.requests[1]
        assert upstream.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer k3y\r\n" in upstream.requests[0]
        assert upstream.connections == 1  # the first answer's connection served the second
        with pytest.raises(ValueError, match="line break"):
            await server.post("/completions", b"{}", {"traceparent": "x\r\nHost: evil"})
    finally:
        await server.close()
