"""The ASGI response that streams a ``Stream`` to one HTTP client (SSE or NDJSON).

One task group races two tasks: sending the body, and listening for ``http.disconnect``;
whichever ends first cancels the other. The reader is detached in ``finally`` with the
reason, which aborts a non-resumable stream at once. A send that does not complete within
the send timeout (a client that stopped reading) ends the connection the same way: the
server's ``SendWatchdog`` cancels the scope.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenspout.protocols.chunk_format import ChunkFormat, Usage, delta_encoder
from tokenspout.protocols.event_id import format_event_id
from tokenspout.protocols.framing import Framing
from tokenspout.protocols.ndjson import dumps
from tokenspout.server.disconnect import DisconnectWatch
from tokenspout.server.metrics import Metrics
from tokenspout.server.request_record import RequestRecord
from tokenspout.server.send_watchdog import SendGuard, SendWatchdog
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream, StreamEnd
from tokenspout.streaming.stream_reader import Delta, Finished, Heartbeat, read_stream


@dataclass
class StreamSettings:
    """Per-response knobs resolved from the server config and the request."""

    flush_tokens: int
    flush_ms: float
    heartbeat_s: float
    send_timeout_s: float


def stream_headers(stream: Stream, media_type: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", media_type.encode()),
        (b"cache-control", b"no-cache"),
        # nginx-style proxies buffer responses unless told not to.
        (b"x-accel-buffering", b"no"),
        (b"x-stream-id", stream.id.encode()),
    ]


class EventStreamResponse(Response):
    """Streams ``stream`` from ``start`` as ``chunks`` payloads in ``framing``."""

    def __init__(
        self,
        stream: Stream,
        chunks: ChunkFormat,
        framing: Framing,
        settings: StreamSettings,
        metrics: Metrics,
        watchdog: SendWatchdog,
        *,
        endpoint: str,
        started_at: float,
        start: int = 0,
        opening: bool = True,
        prompt: str | None = None,
    ):
        # A Response subclass only so that FastAPI hands it over unchanged: the body is
        # produced in __call__, so Response.__init__ (which renders content) is not called.
        self.stream = stream
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.chunks = chunks
        self.framing = framing
        self.settings = settings
        self.metrics = metrics
        self.watchdog = watchdog
        self.start = start
        self.opening = opening
        self.record = RequestRecord(
            metrics,
            stream,
            endpoint=endpoint,
            transport=framing.name,
            started_at=started_at,
            prompt=prompt,
            resumed=not opening,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = DisconnectWatch(receive)
        await watch.run(self._serve(send, watch))

    async def _serve(self, send: Send, watch: DisconnectWatch) -> None:
        """The body task: the stream, then the bookkeeping, in the same task as the last
        send (so a client that got the end also finds the request counted)."""
        guard = self.watchdog.guard(lambda: watch.interrupt("send_timeout"))
        reason: str | None = None
        self.stream.attach()
        self.metrics.streams_active.inc()
        try:
            await self._send_body(send, guard)
        except OSError:
            reason = "client_disconnect"
        finally:
            # Set when the race stopped us (disconnect, send timeout).
            reason = reason or watch.reason
            self.watchdog.release(guard)
            self.stream.detach(
                reason or ("client_disconnect" if not self.stream.finished else None)
            )
            self.metrics.streams_active.dec()
            self.record.finish(reason or self._status())

    def _status(self) -> str:
        end = self.stream.end
        if end is None:
            return "incomplete"
        return "error" if end.error is not None else "ok"

    async def _send(self, send: Send, guard: SendGuard, body: bytes) -> None:
        if not body:
            return
        guard.sending()
        await send({"type": "http.response.body", "body": body, "more_body": True})
        guard.sent()
        self.metrics.stream_bytes.inc(len(body))

    def _event(self, payload: dict, position: int) -> bytes:
        return self.framing.event(dumps(payload), id=format_event_id(self.stream.id, position))

    async def _send_body(self, send: Send, guard: SendGuard) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": stream_headers(self.stream, self.framing.media_type),
            }
        )
        if self.opening:
            for payload in self.chunks.opening():
                await self._send(send, guard, self._event(payload, self.start))
        policy = FlushPolicy(self.settings.flush_tokens, self.settings.flush_ms)
        delta_json = delta_encoder(self.chunks)
        items = read_stream(
            self.stream, policy, heartbeat_s=self.settings.heartbeat_s, start=self.start
        )
        try:
            async for item in items:
                if isinstance(item, Delta):
                    event_id = format_event_id(self.stream.id, item.position)
                    payload = (
                        dumps(self.chunks.delta_with(item.text, item.extras))
                        if item.extras
                        else delta_json(item.text)
                    )
                    body = self.framing.event(payload, id=event_id)
                    await self._send(send, guard, body)
                    self.record.text_sent(item.num_tokens)
                elif isinstance(item, Heartbeat):
                    await self._send(send, guard, self.framing.heartbeat())
                elif isinstance(item, Finished):
                    await self._send(send, guard, self._closing(item.end))
        finally:
            await items.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _closing(self, end: StreamEnd) -> bytes:
        position = self.stream.length
        if end.error is not None:
            body = self._event(self.chunks.error(end.error), position)
        else:
            usage = Usage(end.prompt_tokens, end.completion_tokens)
            assert end.finish_reason is not None
            body = b"".join(
                self._event(p, position) for p in self.chunks.closing(end.finish_reason, usage)
            )
        return body + self.framing.done()
