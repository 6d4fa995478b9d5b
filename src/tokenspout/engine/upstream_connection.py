"""One HTTP/1.1 connection to an upstream, read with httptools (llhttp, the C parser
uvicorn serves with), one request at a time.

Written by hand, under ``UpstreamTransport``, because the generic client's reading cost
most of the relay's CPU: httpcore hands each HTTP chunk through h11's pure-Python parser
and four async generators, and an upstream sends a chunk per token. At 400 relayed
streams that was about 45 % of the front's CPU (py-spy). Here one network read is parsed
in C and its whole body (every chunk it held) is handed to the reader at once.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools
import httpx

#: Past this many body bytes not yet taken by the reader, the socket is not read (TCP's
#: flow control then holds the upstream back, as it would with a slow reader of httpx).
_HIGH_WATER = 256 * 1024


class UpstreamConnection(asyncio.Protocol):
    """The protocol of one connection: ``send`` a request, await ``head``, ``read`` the
    body until it returns ``b""``. ``reusable`` tells whether it may carry another."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        #: When it went back to its pool (for the keep-alive expiry).
        self.idle_since = 0.0
        self._in_request = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._close_delimited = False
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False
        self._error: httpx.TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if not self._in_request or self._complete:
            # Bytes nobody asked for (an idle connection, or past the answer's end).
            self._fail(httpx.RemoteProtocolError("the upstream sent data out of turn"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed HTTP from the upstream: {exc}"))
            return
        if self._buffered > _HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._in_request and not self._complete and self._error is None:
            if self._head_done and self._close_delimited and exc is None:
                self._complete = True  # a body that ends with the connection
            elif not self._head_done:
                self._error = httpx.RemoteProtocolError(
                    "Server disconnected without sending a response."
                )
            else:
                self._error = httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:
            raise httpx.RemoteProtocolError("a second response to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = []
            return
        self.status = status
        self._head_done = True
        names = {name.lower() for name, _ in self.headers}
        self._close_delimited = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
        )

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return  # the end of an interim answer
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True

    # -- the request ---------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Idle, open, and its last answer was read to the end with keep-alive."""
        return not self.closed and not self._in_request

    async def send(self, data: bytes, timeout_s: float | None) -> None:
        """Write a request (head and body) and start reading its answer."""
        assert self._transport is not None and not self._in_request
        self._in_request = True
        self.status, self.headers, self._head_done = 0, [], False
        self._complete, self._keep_alive, self._error = False, False, None
        self._parser = httptools.HttpResponseParser(self)
        self._transport.write(data)
        if self._drained is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(self._drained)
            except TimeoutError:
                raise httpx.WriteTimeout("writing the request timed out") from None

    async def head(self, timeout_s: float | None) -> None:
        """Wait for the answer's status and headers."""
        while not self._head_done:
            if self._error is not None:
                raise self._error
            await self._wait(timeout_s)

    async def read(self, timeout_s: float | None) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); ``b""`` at
        the end of the body."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait(timeout_s)
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._reading_paused and self._transport is not None and not self.closed:
            self._reading_paused = False
            self._transport.resume_reading()
        return data

    def done(self) -> bool:
        """The answer is over. True (kept for another request) when it was read whole
        with keep-alive; False when the connection is closed instead, which is how the
        upstream learns that its answer is no longer wanted."""
        self._in_request = False
        if self._complete and self._keep_alive and not self.closed and not self._pieces:
            self.idle_since = self._loop.time()
            return True
        self.close()
        return False

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True

    async def _wait(self, timeout_s: float | None) -> None:
        self._waiter = self._loop.create_future()
        try:
            if timeout_s is None:  # the relay's reads: its own stall clock bounds them
                await self._waiter
                return
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            raise httpx.ReadTimeout("the upstream did not answer in time") from None
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: httpx.TransportError) -> None:
        self._error = error
        self.close()
        self._wake()
