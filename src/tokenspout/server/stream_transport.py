"""The life every transport gives one reader of a stream, written once.

SSE/NDJSON (``EventStreamResponse``), the whole JSON body (``CompletionResponse``) and each
stream of a WebSocket (``WebSocketStream``) are a ``StreamTransport``: a short loop "for each
event of the cursor: encode, send", and nothing else. Here, for all of them:

* the cursor (``Stream.subscribe``) with the request's ``RequestRecord`` as its observer;
* ``tokenspout_streams_active``;
* how the reading ended, which is both the request's status and the reason the cursor
  detaches with (a reason aborts a stream left without readers):

  ====================================  ==================  ===========================
  what happened                         status              detach reason
  ====================================  ==================  ===========================
  the stream's end was sent             ok / error /        none (it is over)
                                        shutdown
  the connection was stopped (race)     its reason          the same
  the peer went away while sending      client_disconnect   client_disconnect
  anything else (a bug)                 error               error, after an error event
                                                            and ``[DONE]`` if the
                                                            connection still takes them
  ====================================  ==================  ===========================
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import Receive
from starlette.websockets import WebSocketDisconnect

from tokenspout.errors import InternalError, TokenspoutError
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.server.disconnect import DisconnectWatch
from tokenspout.server.request_record import RequestRecord
from tokenspout.server.responses_chat import responses_error
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import StreamGroup
from tokenspout.streaming.subscription import StreamEvent

logger = logging.getLogger("tokenspout")


class PeerGone(Exception):
    """A transport found its peer gone while sending (or its connection ending)."""


#: What a write to a peer that has gone raises, by transport.
PEER_GONE = (OSError, ClientDisconnect, WebSocketDisconnect, PeerGone)


class StreamTransport(ABC):
    """One reader of ``stream`` over one connection; see the module docstring."""

    #: Metrics label: sse, ndjson, json or ws.
    transport: str
    #: Whether the client sees each event (time to first text, gaps between events).
    streams_events = True
    #: The disconnect race of an HTTP transport (``race_disconnect``); None otherwise.
    _watch: DisconnectWatch | None = None

    def __init__(
        self,
        state: ServerState,
        stream: Stream | StreamGroup,
        *,
        started_at: float,
        start: int = 0,
        resumed: bool = False,
        prompt: str | None = None,
    ):
        self.state = state
        self.stream = stream
        wire = stream.meta
        assert isinstance(wire, StreamWire)
        self.wire = wire
        self.record = RequestRecord(
            state.metrics,
            stream,
            endpoint=wire.kind,
            transport=self.transport,
            started_at=started_at,
            prompt=prompt,
            resumed=resumed,
        )
        # Coalesced as the request that opened the stream asked, the server's way otherwise
        # (a resumed reader too: the wire is the stream's, on whichever replica reads).
        config = state.config
        flush = FlushPolicy(
            config.flush_tokens if wire.flush_tokens is None else wire.flush_tokens,
            config.flush_ms if wire.flush_ms is None else wire.flush_ms,
        )
        # Subscribed now, so that a stream that cannot be read from ``start`` is refused
        # before any response starts.
        self.cursor = stream.subscribe(
            flush,
            heartbeat_s=self.heartbeat_s(),
            start=start,
            observer=self.record if self.streams_events else None,
        )

    def heartbeat_s(self) -> float:
        """Seconds of silence after which the reader gets a heartbeat."""
        return self.state.config.heartbeat_interval_s

    def told(self, err: TokenspoutError) -> TokenspoutError:
        """``err`` as this reader's client is told it: a Responses request's names its own
        fields, not those of the chat request it became (which an upstream refuses)."""
        return responses_error(err) if self.wire.kind == "responses" else err

    async def run(self) -> None:
        """Read the stream to its end, or until the connection ends."""
        metrics = self.state.metrics
        metrics.streams_active.inc()
        reason: str | None = None
        try:
            await self.opened()
            async for event in self.cursor:
                await self.send(event)
        except asyncio.CancelledError:
            reason = self.stopped_reason()
            if reason is None:
                reason = "client_disconnect"
            raise
        except PEER_GONE:
            reason = "client_disconnect"
        except Exception as exc:
            logger.exception("stream %s: %s reader failed", self.stream.id, self.transport)
            reason = "error"
            await self._try_send_failure(InternalError(f"the server failed: {exc}"))
        finally:
            self.cursor.close(reason)
            metrics.streams_active.dec()
            self.record.finish(reason or self._status())

    def abandon(self, reason: str) -> None:
        """Detach a reader whose ``run`` never started (its task was cancelled first), so
        that no cursor is left holding the stream's text. No effect after ``run``."""
        self.cursor.close(reason)

    async def _try_send_failure(self, err: TokenspoutError) -> None:
        try:
            await self.send_failure(err)
        except Exception:
            logger.debug("stream %s: the error event could not be sent", self.stream.id)

    def _status(self) -> str:
        end = self.stream.end
        if end is None:
            return "incomplete"
        if end.error is not None:
            # Ended by the server (shutdown) rather than by a failure: said as the trace's
            # abort_reason says it.
            return "shutdown" if self.stream.abort_reason == "shutdown" else "error"
        # Cancelled by id: not "ok", as requests_aborted{reason="cancelled"} counts it too.
        return "cancelled" if end.finish_reason == "cancelled" else "ok"

    async def race_disconnect(self, receive: Receive, body: Coroutine[Any, Any, None]) -> None:
        """For an HTTP transport: run ``body`` (which calls ``run``) raced against the
        client leaving (``DisconnectWatch``); a reader whose ``run`` never started is
        detached all the same."""
        watch = self._watch = DisconnectWatch(receive)
        self.cursor.interrupt = watch.interrupt
        try:
            await watch.run(body)
        finally:
            self.abandon(watch.reason or "client_disconnect")

    def stopped_reason(self) -> str | None:
        """Why the connection was stopped from outside (disconnect race, send timeout), if
        it was; a cancel with no reason is the server's own (shutdown)."""
        return None if self._watch is None else self._watch.reason

    async def opened(self) -> None:  # noqa: B027 - optional hook
        """Send what precedes the events (headers, opening chunks)."""

    @abstractmethod
    async def send(self, event: StreamEvent) -> None:
        """Encode and send one event."""

    @abstractmethod
    async def send_failure(self, err: TokenspoutError) -> None:
        """Tell the client the stream failed (error event and end), if it can still hear."""
