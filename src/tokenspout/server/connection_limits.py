"""Connection-level abuse limits, applied in uvicorn's HTTP protocol before any request
reaches the app: how long a request head may take, and how large it may be.

uvicorn's httptools protocol has neither (its ``h11_max_incomplete_event_size`` applies to
the h11 protocol only, and its keep-alive timer stops at the first byte of a request). A
never-ending header held a connection and its buffered bytes forever (four 50 MB headers:
RSS from 128 to 291 MiB); a thousand idle sockets were held indefinitely. Here the head
must arrive within ``header_timeout_s`` of the connection opening (or of the previous
response), and a head larger than ``max_head_bytes`` gets 431 and a close. The bytes are
counted as they arrive, before the parser sees them, up to the blank line that ends the head:
httptools keeps a header's value until its end, so counting in the parser's callbacks would
count too late, and counting only what is left of a head after the parser took a read missed
every head that arrived whole in one read (a 120 KB head passed a 64 KB limit).

A request answered before its body has all come (a 404, a 401, ``/health`` with a
``Content-Length``) has ``body_timeout_s`` from its answer's end for the rest, which uvicorn
reads and drops: its keep-alive timer stops at the first byte of that rest and nothing timed
the connection after, so one body byte and silence held it forever (``--max-connections`` of
them locked every client out).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokenspout.errors import InvalidRequestError, TokenspoutError
from tokenspout.protocols.openai_errors import error_body
from tokenspout.server.ignored_upgrade import head_without_upgrade
from tokenspout.server.server_state import ServerState
from tokenspout.server.tls_handshake import tls_context, tls_protocol


def _status(
    code: int,
    reason: str,
    message: str,
    error_code: str,
    default_headers: list[tuple[bytes, bytes]],
    extra: str = "",
) -> bytes:
    """A whole response with the error body the app's errors have (``error_body``, as compact
    as Starlette's JSON), with uvicorn's ``default_headers`` (``date``, ``server``) as its
    other answers: a 503 (too many connections) is a ``server_error`` as the app's 503s are
    (draining, engine down), not the client's ``invalid_request_error``."""
    kind = TokenspoutError if code == 503 else InvalidRequestError
    body = json.dumps(error_body(kind(message, code=error_code)), separators=(",", ":")).encode()
    defaults = "".join(f"{name.decode()}: {value.decode()}\r\n" for name, value in default_headers)
    head = (
        f"HTTP/1.1 {code} {reason}\r\n{defaults}content-type: application/json\r\n{extra}"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head timeout and a head size limit (set by
    ``guarded_protocol``).

    A connection is in a head from its start, and again from the end of each request's body
    (the next request's head may follow at once: pipelining) until that head's end. Head
    bytes count against ``max_head_bytes`` whenever they come, even while an earlier
    response still streams. The head timer runs only while nothing is being answered: from
    the connection's start, and from each response's end when the next head has not come
    whole, so it never cuts a pipelined request in flight. A request answered before its body
    has all come is given ``body_timeout_s`` from the answer's end for the rest (the app no
    longer reads it: uvicorn drops it), then the connection is closed; once the rest has
    come, the head timer runs for the next request.
    """

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_head_bytes: int = 64 << 10
    #: Told of each refusal (status, error code): they are counted as the app's are.
    refused: Callable[[int, str], None] = staticmethod(lambda status, code: None)

    #: The head timer, or the unread body's (never both: a connection is in one or the other).
    _timer: asyncio.TimerHandle | None = None
    _head_bytes: int = 0
    #: The last bytes of the head so far: its blank line may come split across two reads.
    _head_tail: bytes = b""
    _in_head: bool = True
    #: The request's head asks for an Upgrade not taken: it is parsed again without it.
    _ignoring_upgrade: bool = False
    #: What stood for this connection among the open ones until it was made (its TLS
    #: handshake); it gives its place up here, before the first request can be counted.
    stand_in: object | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.connections.discard(self.stand_in)
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head and not self.transport.is_closing():
            # This read's head bytes: up to the blank line that ends the head, if it is here.
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
            self._head_tail = seen[-3:]
            if self._head_bytes > self.max_head_bytes:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"request head larger than {self.max_head_bytes} bytes",
                    "request_head_too_large",
                )
                return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received``, but an Upgrade it does not take is ignored
        (``ignored_upgrade``)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            # llhttp's refusal (a bad header line, Content-Length beside chunked, a bad chunk
            # size), which uvicorn answered in plain text: here the JSON error of the rest.
            if self.transport.is_closing():  # refused already: what follows is not read
                return
            self.logger.warning("Invalid HTTP request received: %s", err)
            # In a body, the refusal is the answer of the request being read (no earlier
            # answer is on the wire), unless the app has begun that answer already.
            own = not self._in_head and self.cycle is not None and not self.cycle.response_started
            self._refuse(
                400, "Bad Request", f"invalid HTTP request: {err}", "invalid_http_request",
                own_answer=own,
            )  # fmt: skip
        except httptools.HttpParserUpgrade as upgrade:
            if self._ignoring_upgrade:
                self._serve_without_upgrade(data[upgrade.args[0] :])
            elif self._should_upgrade():
                self.handle_websocket_upgrade()

    def _serve_without_upgrade(self, rest: bytes) -> None:
        """The request again, less its ``Upgrade``, then ``rest`` (its body, and what follows)
        to a fresh parser, which stays for the requests after."""
        self._ignoring_upgrade = False
        method, version = self.parser.get_method(), self.parser.get_http_version()
        head = head_without_upgrade(method, self.url, version, self.headers)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's
        self._feed(head + rest)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_timer()
        if self._over_connection_limit():
            # Before uvicorn's own check, which answers in plain text and misses a
            # WebSocket handshake.
            self._refuse(
                503, "Service Unavailable", "too many open connections", "too_many_connections",
                "retry-after: 1\r\n",
            )  # fmt: skip
            return
        hosts = sum(1 for name, _ in self.headers if name == b"host")
        if hosts > 1 or (hosts == 0 and self.parser.get_http_version() != "1.0"):
            # RFC 9112 3.2: exactly one Host in an HTTP/1.1 request. Two would let a request
            # show the DNS-rebinding check (trusted_hosts) one name and the app another.
            self._refuse(
                400, "Bad Request", "an HTTP/1.1 request has exactly one Host header",
                "invalid_host_header",
            )  # fmt: skip
            return
        if self._unknown_transfer_coding():
            # llhttp reads the chunks and hands on the coded bytes (a gzipped body was
            # parsed as JSON): RFC 9112 6.1's 501, as nginx answers.
            self._refuse(
                501, "Not Implemented", "only the chunked transfer coding is supported",
                "unsupported_transfer_encoding",
            )  # fmt: skip
            return
        if self.parser.should_upgrade() and not self._should_upgrade():
            self._ignoring_upgrade = True  # served once the parser stops (``_feed``)
            return
        if self.parser.should_upgrade() and self._has_body():
            # Neither upgraded nor answered, such a request held its connection forever.
            self._refuse(
                400, "Bad Request", "a WebSocket upgrade request has no body", "invalid_request"
            )
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.transport.is_closing():  # else refused at its head: no cycle reads it
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._ignoring_upgrade:  # llhttp ends it at its head: the replay's end is its end
            return
        if self.transport.is_closing():
            return
        was_unread = self._body_unread()
        super().on_message_complete()
        self._in_head = True  # the next request's head, whenever it comes
        self._head_bytes = 0
        self._head_tail = b""
        if was_unread:  # its answer has gone: the next head's time starts now
            self._arm_head_timer()

    def handle_websocket_upgrade(self) -> None:
        if not self.transport.is_closing():
            super().handle_websocket_upgrade()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    def _unknown_transfer_coding(self) -> bool:
        codings = b",".join(v for name, v in self.headers if name == b"transfer-encoding")
        return any(c.strip().lower() not in (b"chunked", b"") for c in codings.split(b","))

    def _over_connection_limit(self) -> bool:
        limit = self.limit_concurrency
        return limit is not None and len(self.connections) >= limit

    def _answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _body_unread(self) -> bool:
        """The latest request was answered while its body was still coming."""
        return not self._in_head and self.cycle is not None and self.cycle.response_complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._body_unread():
            self._arm(self.body_timeout_s, self._unread_body_timed_out)
        elif self._in_head and not self._answering():
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._arm(self.header_timeout_s, self._head_timed_out)

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm_timer()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unread_body_timed_out(self) -> None:
        self._timer = None
        if self._body_unread() and not self.transport.is_closing():
            # Its answer is out: a 408 now would be read as the next request's.
            self.transport.close()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._in_head and not self._answering() and not self.transport.is_closing():
            if self._head_bytes:
                self._refuse(
                    408,
                    "Request Timeout",
                    f"request head not received within {self.header_timeout_s:g} s",
                    "request_timeout",
                )
            else:
                # Nothing was sent: closed quietly, as an expired keep-alive is.
                self.transport.close()

    def _refuse(
        self,
        code: int,
        reason: str,
        message: str,
        error_code: str,
        extra: str = "",
        *,
        own_answer: bool = False,
    ) -> None:
        """Answer ``code`` with the JSON error and close. ``own_answer``: the refusal is the
        answer of the request being read (in its body, not yet answered), which is written
        although that request's cycle is still running."""
        self._disarm_timer()
        self.refused(code, error_code)
        if own_answer or not self._answering():
            defaults = self.server_state.default_headers
            self.transport.write(_status(code, reason, message, error_code, defaults, extra))
        # else an earlier response is on the wire: a status line now would land inside it.
        self.transport.close()


def guarded_protocol(state: ServerState) -> type[GuardedHttpProtocol]:
    """The protocol class for uvicorn's ``http=`` with this server's limits."""
    config, refusals = state.config, state.metrics.requests_refused

    def refused(status: int, code: str) -> None:
        refusals.labels(str(status), code).inc()

    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": config.header_timeout_s,
            "body_timeout_s": config.body_timeout_s,
            "max_head_bytes": config.max_head_bytes,
            "refused": staticmethod(refused),
        },
    )


def uvicorn_options(state: ServerState) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments that carry this server's connection limits and
    TLS; the CLI and the test servers both use them."""
    config = state.config
    http: Any = guarded_protocol(state)
    if config.ssl_certfile is not None and config.ssl_keyfile is not None:
        # Our TLS, not uvicorn's: its handshake has a timeout and counts as a connection.
        context = tls_context(config.ssl_certfile, config.ssl_keyfile)
        http = tls_protocol(http, context, config.max_connections)
    return {
        "http": http,
        # Beyond this many open connections (HTTP and WebSocket), a fast 503. uvicorn
        # counts the connection asking too, and answers 503 when the count reaches its limit.
        "limit_concurrency": config.max_connections + 1,
        "ws_max_size": config.ws_max_message_bytes,
    }
