"""TLS for the HTTP protocol, with the handshake bounded and counted as an open connection.

Given a certificate, uvicorn passes its context to ``loop.create_server``, which wraps each
accepted connection in asyncio's ``SSLProtocol`` with the loop's default handshake timeout
(60 s) and tells the HTTP protocol of the connection only once the handshake is over. Until
then neither the head timeout nor the connection limit saw it: a TCP connection that never
finished its ClientHello was held 60 s whatever ``--header-timeout-s`` said, and 3,000 of
them held 3,000 descriptors and 234 MB with ``--max-connections 5``. So the server is
created without TLS, and ``TlsHandshake``, the protocol of each accepted connection, builds
the ``SSLProtocol`` that ``create_server`` would build, with the head timeout as its
handshake timeout, after counting the connection among the open ones. (asyncio's
``SSLProtocol``, also under uvloop; ``loop.start_tls`` builds it too, but hands the bytes
that follow the handshake to the protocol before the protocol can be given its transport.)
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uvicorn.config import Config
    from uvicorn.server import ServerState as UvicornState

    from tokenspout.server.connection_limits import GuardedHttpProtocol


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server's TLS context (no passphrase: an encrypted key is refused, not prompted
    for)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile, password=lambda: b"")
    return context


class TlsHandshake(asyncio.Protocol):
    """An accepted connection while its TLS handshake runs.

    It sits in uvicorn's set of open connections (what ``limit_concurrency`` counts, what a
    shutdown closes) from the accept until the handshake ends; the HTTP protocol takes its
    place there when the handshake is over. A connection accepted while ``max_connections``
    are open is closed at once: no HTTP answer can be sent before its handshake.
    """

    def __init__(
        self,
        http: Callable[[], GuardedHttpProtocol],
        context: ssl.SSLContext,
        connections: set[Any],
        *,
        max_connections: int,
        handshake_timeout_s: float,
    ) -> None:
        self._http = http
        self._context = context
        self._connections = connections
        self._max_connections = max_connections
        self._handshake_timeout_s = handshake_timeout_s
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self._connections) >= self._max_connections:
            transport.abort()
            return
        self._transport = transport
        self._connections.add(self)
        loop = asyncio.get_running_loop()
        handshake = loop.create_future()
        handshake.add_done_callback(self._handshake_over)
        http = self._http()
        # Its place goes to the HTTP protocol when the handshake is over, at once: this
        # future's callback comes later, after the first request may have been read.
        http.stand_in = self
        tls = SSLProtocol(
            loop, http, self._context, handshake, server_side=True,
            ssl_handshake_timeout=self._handshake_timeout_s,
        )  # fmt: skip
        # From here the socket's events go to the TLS layer (this object is not called again).
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def _handshake_over(self, handshake: asyncio.Future[None]) -> None:
        # Done (the HTTP protocol has taken this one's place), failed, timed out or cut.
        self._connections.discard(self)
        self._transport = None
        if not handshake.cancelled():
            handshake.exception()  # retrieved: SSLProtocol has reported it (debug log)

    def shutdown(self) -> None:
        """Close the connection (uvicorn's shutdown calls this on each open connection)."""
        if self._transport is not None:
            self._transport.abort()


def tls_protocol(
    http: type[GuardedHttpProtocol], context: ssl.SSLContext, max_connections: int
) -> Callable[..., TlsHandshake]:
    """What uvicorn's ``http=`` gets with TLS: called as it calls a protocol class, it gives
    each accepted connection a ``TlsHandshake`` in front of an ``http`` protocol."""

    def create(
        config: Config,
        server_state: UvicornState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> TlsHandshake:
        return TlsHandshake(
            lambda: http(
                config=config, server_state=server_state, app_state=app_state, _loop=_loop
            ),
            context,
            server_state.connections,
            max_connections=max_connections,
            handshake_timeout_s=http.header_timeout_s,
        )

    return create
