"""The httpx transport of an upstream reached over plain HTTP: a pool of
``UpstreamConnection``s (keep-alive, a bound on connections, an expiry for idle ones).

httpx stays the client (requests, headers, timeouts, errors, ``Response``); only the
transport under it is ours, for the CPU per relayed token (``upstream_connection``). An
upstream reached over HTTPS or through a proxy from the environment keeps httpx's own
transport (``relay_transport`` returns None): a hosted API's pace is set by the network,
and TLS and proxies are what httpcore is for.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import httpx

from tokenspout.engine.upstream_connection import UpstreamConnection


def relay_transport(url: str, limits: httpx.Limits) -> UpstreamTransport | None:
    """Our transport for an upstream at ``url``, or None where httpx's own serves it."""
    parsed = httpx.URL(url)
    if parsed.scheme != "http":
        return None
    proxies = urllib.request.getproxies()
    if (proxies.get("http") or proxies.get("all")) and not urllib.request.proxy_bypass(parsed.host):
        return None
    return UpstreamTransport(limits)


class UpstreamTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 to one upstream: at most ``limits.max_connections`` at once, idle ones
    kept for ``limits.keepalive_expiry`` seconds (and up to ``max_keepalive_connections``
    of them)."""

    def __init__(self, limits: httpx.Limits):
        self._max_idle = limits.max_keepalive_connections
        self._expiry = limits.keepalive_expiry
        self._slots = asyncio.Semaphore(limits.max_connections or 1 << 30)
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.exchange(
            request.url, await _request_bytes(request), request.extensions.get("timeout", {})
        )

    async def exchange(
        self, url: httpx.URL, wire: bytes, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        """Send ``wire`` (a whole HTTP/1.1 request) to ``url``'s host and return the answer,
        its body still to be read; ``timeouts`` as httpx's (connect, write, read, pool).

        The relay's requests come here straight, not through ``httpx.AsyncClient.send``:
        building an ``httpx.Request`` and sending it through the client's auth, redirect
        and cookie layers was a quarter of the relay's CPU per request."""
        if self._slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no connection to the upstream was free in time") from None
        else:  # a free slot is taken at once: no timer to arm and cancel
            await self._slots.acquire()
        connection: UpstreamConnection | None = None
        try:
            connection = self._reuse() or await self._connect(url, timeouts.get("connect"))
            await connection.send(wire, timeouts.get("write"))
            await connection.head(timeouts.get("read"))
        except BaseException:
            if connection is not None:
                self._forget(connection)
            self._slots.release()
            raise
        return httpx.Response(
            connection.status,
            headers=connection.headers,
            stream=_Body(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._open.clear()
        self._idle.clear()

    def _reuse(self) -> UpstreamConnection | None:
        """The most recently used idle connection that is still open and not expired."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            expired = (
                self._expiry is not None
                and asyncio.get_running_loop().time() - connection.idle_since > self._expiry
            )
            if connection.reusable and not expired:
                return connection
            self._forget(connection)
        return None

    async def _connect(self, url: httpx.URL, timeout_s: float | None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(
                    UpstreamConnection, url.host, url.port or 80
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {url.host}:{url.port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self._open.add(connection)
        return connection

    def _release(self, connection: UpstreamConnection) -> None:
        """Its answer is over: keep it for the next request, or close it."""
        room = self._max_idle is None or len(self._idle) < self._max_idle
        if connection.done() and room:
            self._idle.append(connection)
        else:
            self._forget(connection)
        self._slots.release()

    def _forget(self, connection: UpstreamConnection) -> None:
        connection.close()
        self._open.discard(connection)


class _Body(httpx.AsyncByteStream):
    """An answer's body: each item is what one network read brought."""

    def __init__(
        self, transport: UpstreamTransport, connection: UpstreamConnection, timeout_s: float | None
    ):
        self._transport = transport
        self._connection: UpstreamConnection | None = connection
        self._timeout_s = timeout_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while data := await connection.read(self._timeout_s):
            yield data

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._transport._release(connection)


async def _request_bytes(request: httpx.Request) -> bytes:
    """The request on the wire: its head and its body (one chunk if it is chunked)."""
    body = await request.aread()
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines.extend(name + b": " + value for name, value in request.headers.raw)
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if request.headers.get("transfer-encoding", "").lower() == "chunked":
        return head + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n")
    return head + body
