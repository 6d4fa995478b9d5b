"""One WebSocket connection carrying several streams (RFC 6455; messages in
``protocols.websocket_messages``).

A receive loop handles ``generate`` and ``cancel``; each stream has a task that follows it
with its own flush policy and sends ``delta``/``done``/``error``. Sends go through one lock
(one frame at a time) with the send timeout. Closing the socket, or a send that times out,
ends every stream of the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import anyio
from pydantic import BaseModel
from starlette.websockets import WebSocket, WebSocketDisconnect

from tokenspout.errors import InvalidRequestError, TokenspoutError
from tokenspout.protocols import websocket_messages as wsm
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.ndjson import dumps
from tokenspout.server.api_keys import ApiKey
from tokenspout.server.generation_request import open_stream, prepare_chat, prepare_completion
from tokenspout.server.request_parsing import validate
from tokenspout.server.request_record import RequestRecord
from tokenspout.server.responder import stream_settings
from tokenspout.server.schemas import ChatCompletionRequest, CompletionRequest, StreamOptions
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_reader import Delta, Finished, read_stream

# WebSocket keep-alive is the server's protocol-level ping (uvicorn's ws_ping_interval), so
# streams send no heartbeat messages of their own.
_NO_HEARTBEAT_S = 365 * 24 * 3600.0


class _SendTimeout(Exception):
    pass


@dataclass
class _Opened:
    stream: Stream
    options: StreamOptions
    #: For the request log, only with ``--log-prompts``.
    prompt: str | None


class WebSocketSession:
    """Serves one accepted WebSocket until it closes."""

    def __init__(self, websocket: WebSocket, state: ServerState, key: ApiKey | None = None):
        self.ws = websocket
        self.state = state
        #: The key of the handshake: owner of every stream this socket opens.
        self.key = key
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: dict[str, Stream] = {}
        self._cancelled: set[str] = set()
        self._send_lock = asyncio.Lock()
        self._closing_reason: str | None = None
        self._main: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._main = asyncio.current_task()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                text = message.get("text")
                if text is None:
                    err = InvalidRequestError("binary messages are not supported: send JSON text")
                    await self._send(wsm.error(None, err))
                    continue
                await self._handle(text)
        except WebSocketDisconnect:
            pass
        except _SendTimeout:
            self._closing_reason = "send_timeout"
        except asyncio.CancelledError:
            # A stream task hit the send timeout and stopped the receive loop.
            if self._closing_reason is None:
                raise
            assert self._main is not None
            self._main.uncancel()
        finally:
            await self._end_all()

    async def _end_all(self) -> None:
        """Stop every stream of this connection (their tasks detach with the reason)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._closing_reason == "send_timeout":
            # The client is not reading: do not wait long for the close handshake either.
            with anyio.move_on_after(1), contextlib.suppress(Exception):
                await self.ws.close(code=1008, reason="send timeout")

    async def _handle(self, text: str) -> None:
        try:
            message = wsm.parse_client_message(text, self.state.config.max_json_depth)
        except InvalidRequestError as err:
            await self._send(wsm.error(err.param, err))
            return
        if isinstance(message, wsm.Cancel):
            await self._cancel(message.id)
            return
        if message.id in self._tasks:
            err = InvalidRequestError(f"a stream with id {message.id!r} is already running")
            await self._send(wsm.error(message.id, err))
            return
        if len(self._tasks) >= self.state.config.ws_max_streams:
            err = InvalidRequestError(
                f"{len(self._tasks)} streams are running on this WebSocket, the most it "
                "may carry; open another socket or wait for one to end"
            )
            await self._send(wsm.error(message.id, err))
            return
        started = time.monotonic()
        try:
            opened = self._open(message)
        except TokenspoutError as err:
            await self._send(wsm.error(message.id, err))
            return
        self._streams[message.id] = opened.stream
        self._tasks[message.id] = asyncio.create_task(self._follow(message.id, opened, started))

    def _open(self, message: wsm.Generate) -> _Opened:
        body: BaseModel
        if message.is_chat:
            body = validate(ChatCompletionRequest, message.body)
            generation = prepare_chat(self.state, body)
        else:
            body = validate(CompletionRequest, message.body)
            generation = prepare_completion(self.state, body)
        prompt = generation.prompt.text if self.state.config.log_prompts else None
        stream = open_stream(self.state, generation, self.key)
        return _Opened(stream, generation.options, prompt)

    async def _cancel(self, client_id: str) -> None:
        stream = self._streams.get(client_id)
        if stream is None:
            err = InvalidRequestError(f"no running stream with id {client_id!r}")
            await self._send(wsm.error(client_id, err))
            return
        # From now on nothing but its `done` is sent for this stream.
        self._cancelled.add(client_id)
        stream.cancel()

    async def _follow(self, client_id: str, opened: _Opened, started: float) -> None:
        stream = opened.stream
        settings = stream_settings(self.state, opened.options)
        metrics = self.state.metrics
        policy = FlushPolicy(settings.flush_tokens, settings.flush_ms)
        record = RequestRecord(
            metrics, stream, endpoint=stream.kind, transport="ws", started_at=started,
            prompt=opened.prompt,
        )  # fmt: skip
        status = "incomplete"
        stream.attach()
        metrics.streams_active.inc()
        try:
            async for item in read_stream(stream, policy, heartbeat_s=_NO_HEARTBEAT_S):
                if isinstance(item, Delta) and client_id not in self._cancelled:
                    await self._send(wsm.delta(client_id, item.text))
                    record.text_sent(item.num_tokens)
                elif isinstance(item, Finished):
                    end = item.end
                    if end.error is not None:
                        await self._send(wsm.error(client_id, end.error))
                        status = "error"
                    else:
                        assert end.finish_reason is not None
                        usage = Usage(end.prompt_tokens, end.completion_tokens)
                        await self._send(wsm.done(client_id, end.finish_reason, usage))
                        status = "ok"
        except _SendTimeout:
            self._closing_reason = "send_timeout"
            status = "send_timeout"
            if self._main is not None:
                self._main.cancel()
        finally:
            detach_reason = (
                None if stream.finished else (self._closing_reason or "client_disconnect")
            )
            stream.detach(detach_reason)
            metrics.streams_active.dec()
            record.finish(status)
            self._tasks.pop(client_id, None)
            self._streams.pop(client_id, None)
            self._cancelled.discard(client_id)

    async def _send(self, message: dict) -> None:
        data = dumps(message)
        async with self._send_lock:
            try:
                with anyio.fail_after(self.state.config.send_timeout_s):
                    await self.ws.send_text(data)
            except TimeoutError:
                raise _SendTimeout from None
        self.state.metrics.stream_bytes.inc(len(data))
