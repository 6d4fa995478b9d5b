"""The ASGI response that streams a ``Stream`` to one HTTP client (SSE or NDJSON).

The body runs as its own task, raced against ``http.disconnect`` (``DisconnectWatch``); a
send that does not complete within the send timeout ends it the same way (the server's
``SendWatchdog``). Everything else about the reader's life is ``StreamTransport``'s.
"""

from __future__ import annotations

from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage, delta_encoder, delta_usage_encoder
from tokenspout.protocols.event_id import format_event_id
from tokenspout.protocols.framing import Framing
from tokenspout.protocols.json_text import dumps
from tokenspout.protocols.openai_chunks import CompletionChunks
from tokenspout.protocols.sse import SSEFraming, encode_event, encode_id
from tokenspout.server.json_reply import send_error
from tokenspout.server.send_watchdog import SendGuard
from tokenspout.server.server_state import ServerState
from tokenspout.server.stream_transport import StreamTransport
from tokenspout.streaming.stream import Stream, StreamEnd
from tokenspout.streaming.stream_group import ChoiceFinished, StreamGroup
from tokenspout.streaming.subscription import Delta, Finished, StreamEvent


def stream_headers(stream: Stream | StreamGroup, media_type: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", media_type.encode()),
        (b"cache-control", b"no-cache"),
        # nginx-style proxies buffer responses unless told not to.
        (b"x-accel-buffering", b"no"),
        (b"x-stream-id", stream.id.encode()),
    ]


class EventStreamResponse(Response, StreamTransport):
    """Streams ``stream`` from ``start`` in ``framing``; opening chunks unless resumed
    (``opening`` overrides: a reader that replays from the start gets them too). A
    ``StreamGroup`` (``n > 1``) is streamed with each choice's ``index``: its opening
    chunks, deltas and end, then the usage of all of them.

    ``announce`` (SSE only): the stream's id at position 0 goes first, before any token, as
    an event of that type with the stream id as its data, or as an id alone for ``""``.
    An ``EventSource`` then knows the id before the first token: a reconnect resumes the
    stream (``Last-Event-ID``) instead of starting another generation, and a named event
    tells a page which stream to cancel."""

    def __init__(
        self,
        state: ServerState,
        stream: Stream | StreamGroup,
        framing: Framing,
        *,
        started_at: float,
        start: int = 0,
        after: int = 0,
        resumed: bool = False,
        opening: bool | None = None,
        prompt: str | None = None,
        announce: str | None = None,
    ):
        # A Response subclass only so that FastAPI hands it over unchanged: the body is
        # produced in __call__, so Response.__init__ (which renders content) is not called.
        self.status_code = 200
        self.background: BackgroundTask | None = None
        self.transport = framing.name
        self.framing = framing
        StreamTransport.__init__(
            self,
            state,
            stream,
            started_at=started_at,
            start=start,
            resumed=resumed,
            prompt=prompt,
        )
        self.chunks = self.wire.chunks(stream.id, stream.created)
        asked = getattr(self.chunks, "continuous_usage", False)
        offsets = isinstance(self.chunks, CompletionChunks) and self.chunks.logprobs
        # What a reader that starts later (a resumed one) skips, read from the log only for
        # what counts it: a group (n > 1) is never resumed.
        counted = start and (asked or offsets) and isinstance(stream, Stream)
        skipped = stream.read_before(start) if counted else []
        if offsets and skipped:
            # text_offset counts the answer's characters from its start.
            self.chunks.skip([c.extras for c in skipped if c.extras])
        #: A typed format's delta may be several events (``ChunkFormat.typed_events``).
        self._typed = self.chunks.typed_events
        self._delta_json = None if self._typed else delta_encoder(self.chunks)
        #: Tokens sent so far, for continuous usage, the skipped ones counted; None without
        #: it, and for a reader that starts where the log no longer holds all that came
        #: before (evicted, or a copy continued from later): null usage then.
        continuous = asked and len(skipped) == start
        self._usage_sent: int | None = sum(c.num_tokens for c in skipped) if continuous else None
        self._delta_usage_json = delta_usage_encoder(self.chunks) if continuous else None
        #: The opening chunks (chat's role chunk) go to a reader from the start.
        self._opening = (not resumed) if opening is None else opening
        #: NDJSON has no ids: nothing to announce.
        self._announce = announce if isinstance(framing, SSEFraming) else None
        #: The reader has this many of the end's events, if the stream ends at ``start``.
        self._from, self._after = start, after
        #: A group's events carry no id: each choice has positions of its own, so no id could
        #: name one event of the group (they were shared by the choices), and a group is
        #: not resumable anyway (an id would only be a Last-Event-ID a 409 answers).
        self._ids = not isinstance(stream, StreamGroup)
        self._send_asgi: Send | None = None
        self._guard: SendGuard | None = None
        self._started = False
        #: A new stream of an engine that may refuse it after submit (``refuses_late``)
        #: waits this long at most for the engine's first word before the 200 goes out.
        late = state.engine.refuses_late and not resumed
        self._wait_begun_s = self.heartbeat_s() if late else 0.0
        #: It was refused before it began: the whole response was the error.
        self._refused = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send_asgi = send
        watchdog = self.state.send_watchdog
        self._guard = watchdog.guard(self._send_timed_out)
        try:
            await self.race_disconnect(receive, self._body())
        finally:
            watchdog.release(self._guard)

    def _send_timed_out(self) -> None:
        if self._watch is not None:
            self._watch.interrupt("send_timeout")

    async def _body(self) -> None:
        await self.run()
        if self._started:
            await self._write_raw(b"", more_body=False)

    async def opened(self) -> None:
        if self._wait_begun_s:
            await self.stream.wait_begun(self._wait_begun_s)
            refusal = self.stream.refused()
            if refusal is not None:
                # Refused before any of it: the error's own status (an upstream's 400,
                # 429 with Retry-After, 503), not a 200 with an error event. The other
                # choices of a group stop too: nobody reads them.
                assert self._send_asgi is not None
                self._refused = True
                self.stream.abort("error")
                await send_error(self._send_asgi, self.told(refusal), self.stream.id)
                return
        await self._start()
        if self._announce is not None:
            await self._write(self._announcement(self._announce))
        if self._opening:
            for payload in self._opening_chunks():
                if self._usage_sent is not None:
                    payload = self._with_usage(payload, 0)
                await self._write(self._event(payload, self.cursor.position))

    def _announcement(self, event: str) -> bytes:
        event_id = format_event_id(self.stream.id, self._from)
        if not event:
            return encode_id(event_id)
        return encode_event(self.stream.id, event=event, id=event_id)

    def _opening_chunks(self) -> list[dict[str, Any]]:
        if not isinstance(self.stream, StreamGroup):
            return self.chunks.opening()
        # Only the OpenAI formats (``openai_chunks``) open groups: they take an index.
        chunks: Any = self.chunks
        return [p for i in range(self.stream.n) for p in chunks.opening(i)]

    async def send(self, event: StreamEvent | ChoiceFinished) -> None:
        if self._refused:
            return
        if isinstance(event, Delta):
            if self._typed:
                typed: Any = self.chunks
                payloads = typed.delta_events(event.text, event.extras)
                body = b"".join(self._event(p, event.position) for p in payloads)
                if body:
                    await self._write(body)
                return
            event_id = self._id(event.position)
            if event.index:  # a choice of a group (OpenAI formats only)
                chunks: Any = self.chunks
                payload = dumps(chunks.delta_with(event.text, event.extras, event.index))
            elif self._delta_usage_json is not None:
                assert self._usage_sent is not None  # set together
                self._usage_sent += event.num_tokens
                if event.extras:
                    chunk = self.chunks.delta_with(event.text, event.extras)
                    payload = dumps(self._with_usage(chunk, self._usage_sent))
                else:  # the usual delta: text only, from the template
                    usage = Usage(self.stream.prompt_tokens, self._usage_sent)
                    payload = self._delta_usage_json(event.text, usage)
            elif event.extras:
                payload = dumps(self.chunks.delta_with(event.text, event.extras))
            else:
                assert self._delta_json is not None  # built for every untyped format
                payload = self._delta_json(event.text)
            await self._write(self.framing.event(payload, id=event_id))
        elif isinstance(event, ChoiceFinished):
            if event.end.finish_reason is not None:
                chunks = self.chunks
                payload = chunks.choice_end(event.end.finish_reason, event.index)  # type: ignore[attr-defined]
                await self._write(self._event(payload, self.stream.length))
        elif isinstance(event, Finished):
            await self._write(self._closing(event.end))
        else:
            await self._write(self.framing.heartbeat())

    async def send_failure(self, err: TokenspoutError) -> None:
        if self._refused:
            return
        await self._start()
        body = self._event(self.chunks.error(self.told(err)), self.cursor.position, 1)
        await self._write(body + self._done())

    async def _start(self) -> None:
        if self._started:
            return
        assert self._send_asgi is not None
        self._started = True
        headers = stream_headers(self.stream, self.framing.media_type)
        await self._send_asgi({"type": "http.response.start", "status": 200, "headers": headers})

    async def _write(self, body: bytes) -> None:
        await self._write_raw(body, more_body=True)
        self.state.metrics.stream_bytes.inc(len(body))

    async def _write_raw(self, body: bytes, *, more_body: bool) -> None:
        assert self._send_asgi is not None and self._guard is not None
        guard = self._guard
        guard.sending()
        await self._send_asgi({"type": "http.response.body", "body": body, "more_body": more_body})
        guard.sent()

    def _with_usage(self, chunk: dict[str, Any], completion_tokens: int) -> dict[str, Any]:
        usage = Usage(self.stream.prompt_tokens, completion_tokens)
        return self.chunks.usage_so_far(chunk, usage)  # type: ignore[attr-defined]

    def _event(self, payload: dict[str, Any], position: int, after: int = 0) -> bytes:
        if self._typed:
            # Named by its type, and without an id: its sequence number is this reader's
            # count, so such a stream is never resumable (``prepare_response``).
            return self.framing.event(dumps(payload), name=payload["type"])
        return self.framing.event(dumps(payload), id=self._id(position, after))

    def _id(self, position: int, after: int = 0) -> str | None:
        return format_event_id(self.stream.id, position, after) if self._ids else None

    def _done(self) -> bytes:
        """The end marker, for a format that ends with one (not the Responses API's)."""
        return self.framing.done() if self.chunks.ends_with_done else b""

    def _closing(self, end: StreamEnd) -> bytes:
        position = self.stream.length
        if end.error is not None:
            payloads = [self.chunks.error(self.told(end.error))]
        else:
            usage = Usage(end.prompt_tokens, end.completion_tokens)
            assert end.finish_reason is not None
            if isinstance(self.stream, StreamGroup):
                # Each choice's end went before.
                payloads = self.chunks.usage_end(usage)  # type: ignore[attr-defined]
            else:
                payloads = self.chunks.closing(end.finish_reason, usage)
                if self._usage_sent is not None:
                    payloads[0] = self._with_usage(payloads[0], end.completion_tokens)
        # Each after the last token has an id of its own; a resumed reader has the first
        # ``after`` of them.
        sent = self._after if position == self._from else 0
        body = b"".join(
            self._event(p, position, k) for k, p in enumerate(payloads, start=1) if k > sent
        )
        if payloads:
            return body + self._done()
        # The seed format has no closing event: its [DONE] carries the end's position, the
        # only count of the tokens a reader gets (a last token held back as part of a
        # character has no event of its own). A reader resumed from its id (or one past it,
        # as a chat reader's past its last end event) has it: nothing followed it.
        if sent:
            return b""
        return self.framing.done(format_event_id(self.stream.id, position, 1))
