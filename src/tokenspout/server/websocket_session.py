"""One WebSocket connection carrying several streams (RFC 6455; messages in
``protocols.websocket_messages``).

A receive loop handles ``generate`` and ``cancel``; each stream is a ``WebSocketStream`` (a
``StreamTransport``) run as a task of the session. Frames go out one at a time, through
one lock, watched by the server's ``SendWatchdog``. The session ends when the peer closes,
when a send finds it gone, or when a send overstays the send timeout; every stream task is
then stopped with that reason and awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import replace
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenspout.errors import InvalidRequestError, StreamNotFoundError, TokenspoutError
from tokenspout.protocols import websocket_messages as wsm
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.json_text import dumps
from tokenspout.server import advanced_params
from tokenspout.server.api_keys import ApiKey
from tokenspout.server.auth import AuthenticationError
from tokenspout.server.generation_request import (
    GenerationRequest,
    prepare_chat,
    prepare_completion,
)
from tokenspout.server.request_parsing import validate
from tokenspout.server.responder import open_stream
from tokenspout.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_schema,
    completion_schema,
)
from tokenspout.server.server_state import ServerState
from tokenspout.server.stream_ownership import cancel_owned
from tokenspout.server.stream_transport import PEER_GONE, PeerGone, StreamTransport
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.subscription import Delta, Finished, StreamEvent

logger = logging.getLogger("tokenspout")


class WebSocketSession:
    """Serves one accepted WebSocket until it closes."""

    def __init__(self, websocket: WebSocket, state: ServerState, key: ApiKey | None = None):
        self.ws = websocket
        self.state = state
        #: The key of the handshake: owner of every stream this socket opens.
        self.key = key
        self._streams: dict[str, WebSocketStream] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._send_lock = asyncio.Lock()
        #: Why the session ended, once it did: client_disconnect or send_timeout.
        self.closing_reason: str | None = None
        self._main: asyncio.Task[Any] | None = None
        self._guard = state.send_watchdog.guard(lambda: self._stop("send_timeout"))

    async def run(self) -> None:
        self._main = asyncio.current_task()
        watchdog = self.state.send_watchdog
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                text = message.get("text")
                if text is None:
                    err = InvalidRequestError("binary messages are not supported: send JSON text")
                    await self.send(wsm.error(None, err))
                    continue
                await self._handle(text)
        except (WebSocketDisconnect, PeerGone):
            self.closing_reason = self.closing_reason or "client_disconnect"
        except asyncio.CancelledError:
            # A stream's send found the peer gone, or the watchdog fired: _stop cancelled us.
            if self.closing_reason is None:
                raise
            assert self._main is not None
            self._main.uncancel()
        finally:
            watchdog.release(self._guard)
            await self._end_all()

    def _stop(self, reason: str) -> None:
        """End the session with ``reason`` (from a stream task or the watchdog)."""
        if self.closing_reason is None:
            self.closing_reason = reason
            if self._main is not None:
                self._main.cancel()

    async def _end_all(self) -> None:
        """Stop every stream of this connection and wait for each to detach."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for follower in list(self._streams.values()):
            # Its task was cancelled before it ever ran.
            follower.abandon(self.closing_reason or "client_disconnect")
        if self.closing_reason == "send_timeout":
            # The client is not reading: do not wait long for the close handshake either.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=1008, reason="send timeout"), 1.0)

    async def _handle(self, text: str) -> None:
        try:
            message = wsm.parse_client_message(text, self.state.config.max_json_depth)
        except wsm.MessageRefused as err:
            await self._refuse(err.msg_id, err)
            return
        except InvalidRequestError as err:  # before its id could be read
            await self._refuse(None, err)
            return
        if isinstance(message, wsm.Cancel):
            await self._cancel(message.id)
            return
        if message.id in self._streams:
            err = InvalidRequestError(
                f"a stream with id {message.id!r} is already running: this generate was "
                "ignored (use a new id)",
                param="id",
            )
            await self._refuse(message.id, err)
            return
        if self.key is not None:
            # A socket outlives reloads of the keys file: each generate asks for its key
            # anew, as an HTTP request does (its running streams go on, as theirs do).
            key = self.state.keys.current(self.key)
            if key is None:
                err = AuthenticationError(
                    "this WebSocket's API key was revoked: open a new one with a valid key"
                )
                await self._refuse(message.id, err)
                return
            self.key = key
        if len(self._streams) >= self.state.config.ws_max_streams:
            err = InvalidRequestError(
                f"{len(self._streams)} streams are running on this WebSocket, the most it "
                "may carry; open another socket or wait for one to end"
            )
            await self._refuse(message.id, err)
            return
        started = time.monotonic()
        try:
            generation = await self._prepare(message)
            stream = await open_stream(self.state, generation, self.key, started_at=started)
        except TokenspoutError as err:
            await self._refuse(message.id, err)
            return
        prompt = generation.prompt_to_log(self.state.config.log_prompts)
        try:
            follower = WebSocketStream(self, message.id, stream, started_at=started, prompt=prompt)
        except BaseException:
            # Nobody would read it: it would hold its engine slot to the end.
            stream.abort("error")
            raise
        self._streams[message.id] = follower
        task = asyncio.create_task(self._follow(follower))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refuse(self, msg_id: str | None, err: TokenspoutError) -> None:
        """A message's error, named by its id unless that is a running stream's: the
        client would read it as that stream's end while its deltas and done keep coming."""
        await self.send(wsm.error(None if msg_id in self._streams else msg_id, err))

    async def _prepare(self, message: wsm.Generate) -> GenerationRequest:
        body: ChatCompletionRequest | CompletionRequest
        if message.is_chat:
            body = validate(chat_schema(self.state.engine.forwards_fields), message.body)
            generation = await prepare_chat(self.state, body)
        else:
            body = validate(completion_schema(self.state.engine.forwards_fields), message.body)
            generation = await prepare_completion(self.state, body)
        advanced_params.check_text_only(generation.params)
        if generation.n > 1:
            raise InvalidRequestError(
                "n > 1 is not available over /v1/ws: open one stream per choice", param="n"
            )
        _refuse_what_a_socket_cannot_honour(body)
        # Not with --resumable either: nothing could resume it, and a resumable stream whose
        # socket closed would generate for nobody through --resume-grace-s, holding its slot.
        return replace(generation, resumable=False)

    async def _follow(self, follower: WebSocketStream) -> None:
        try:
            await follower.run()
        finally:
            self._streams.pop(follower.client_id, None)

    async def _cancel(self, client_id: str) -> None:
        follower = self._streams.get(client_id)
        if follower is None:
            await self._cancel_by_stream_id(client_id)
            return
        # From now on nothing but its `done` is sent for this stream, if the cancel stops
        # it: one too late (the stream ended, or its last output is on its way) leaves the
        # whole text to send, which its `done` (with "length", say) counts.
        follower.cancelled = follower.stream.cancel()

    async def _cancel_by_stream_id(self, stream_id: str) -> None:
        """A cancel naming no stream of this socket may name a server stream id (an
        ``X-Stream-Id``) of the socket's key: on this replica or, with Redis, on another."""
        owner = None if self.key is None else self.key.name
        try:
            await cancel_owned(self.state, owner, stream_id)
        except StreamNotFoundError:
            # Ignored: the stream most likely ended as the cancel crossed its done, and its
            # done or error must stay its one last message.
            pass
        except TokenspoutError as err:
            # Not as an error with the stream's id, which would read as the stream's end.
            failed = wsm.error(None, err)
            failed["error"]["message"] = f"cancel {stream_id!r}: {err.message}"
            await self.send(failed)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one frame; ``PeerGone`` once the socket is closed or the session ending."""
        if self.closing_reason is not None:
            raise PeerGone
        data = dumps(message)
        guard = self._guard
        async with self._send_lock:
            guard.sending()
            try:
                await self.ws.send_text(data)
            except (*PEER_GONE, RuntimeError) as exc:
                # Starlette raises RuntimeError for a send after the close handshake.
                self._stop("client_disconnect")
                raise PeerGone from exc
            finally:
                guard.sent()
        self.state.metrics.stream_bytes.inc(len(data))


def _refuse_what_a_socket_cannot_honour(body: ChatCompletionRequest | CompletionRequest) -> None:
    """A field a ``generate`` may carry but ``/v1/ws`` cannot honour is refused by name
    rather than ignored. ``include_usage`` is honoured: the ``done`` always has the usage."""
    if "stream" in body.model_fields_set and not body.stream:
        raise InvalidRequestError(
            "a stream over /v1/ws always streams (deltas, then done): leave stream out, or "
            "use POST for a whole answer",
            param="stream",
        )
    options = body.stream_options
    if options is None:
        return
    if options.resumable:
        raise InvalidRequestError(
            "a stream over /v1/ws is not resumable (no message carries a position to "
            "resume from): leave stream_options.resumable out, or use SSE",
            param="stream_options.resumable",
        )
    if options.continuous_usage_stats:
        raise InvalidRequestError(
            "a delta over /v1/ws carries no usage (its done has the whole usage): leave "
            "stream_options.continuous_usage_stats out, or use SSE",
            param="stream_options.continuous_usage_stats",
        )


class WebSocketStream(StreamTransport):
    """One stream of a WebSocket session, sent as ``delta`` / ``done`` / ``error``."""

    transport = "ws"

    def __init__(
        self,
        session: WebSocketSession,
        client_id: str,
        stream: Stream,
        *,
        started_at: float,
        prompt: str | None,
    ):
        self.session = session
        self.client_id = client_id
        self.cancelled = False
        super().__init__(session.state, stream, started_at=started_at, prompt=prompt)

    def heartbeat_s(self) -> float:
        # WebSocket keep-alive is the server's protocol-level ping (uvicorn's
        # ws_ping_interval), so streams send no heartbeat messages of their own.
        return math.inf

    def stopped_reason(self) -> str | None:
        return self.session.closing_reason

    async def send(self, event: StreamEvent) -> None:
        if isinstance(event, Delta):
            if not self.cancelled:
                await self.session.send(wsm.delta(self.client_id, event.text, event.extras))
        elif isinstance(event, Finished):
            end = event.end
            if end.error is not None:
                await self.session.send(wsm.error(self.client_id, end.error))
            else:
                assert end.finish_reason is not None
                usage = Usage(end.prompt_tokens, end.completion_tokens)
                await self.session.send(wsm.done(self.client_id, end.finish_reason, usage))

    async def send_failure(self, err: TokenspoutError) -> None:
        await self.session.send(wsm.error(self.client_id, err))
