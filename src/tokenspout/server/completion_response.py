"""The ASGI response for ``stream: false``: read the stream to its end, then send one JSON
body, or stop reading (and abort) when the client leaves first. The same cursor and life
as streaming; its "send" only gathers the text, so the log releases it as it comes."""

from __future__ import annotations

import math

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_chunks import ChatChunks, ChoiceOutput, CompletionChunks
from tokenspout.protocols.responses_events import ResponsesEvents
from tokenspout.server.json_reply import send_error, send_json
from tokenspout.server.server_state import ServerState
from tokenspout.server.stream_transport import StreamTransport
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import ChoiceFinished, StreamGroup
from tokenspout.streaming.subscription import Delta, Finished, StreamEvent


class CompletionResponse(Response, StreamTransport):
    """The whole ``chat.completion`` / ``text_completion`` / ``response`` once ``stream`` ends (a
    ``StreamGroup``: once every choice has, with ``n`` choices)."""

    transport = "json"
    # The client sees nothing before the whole body: no time to first text, no gaps.
    streams_events = False

    def __init__(
        self,
        state: ServerState,
        stream: Stream | StreamGroup,
        *,
        started_at: float,
        prompt: str | None = None,
    ):
        # A Response subclass only so that FastAPI hands it over unchanged: the body is
        # produced in __call__, so Response.__init__ (which renders content) is not called.
        self.status_code = 200
        self.background: BackgroundTask | None = None
        StreamTransport.__init__(self, state, stream, started_at=started_at, prompt=prompt)
        chunks = self.wire.chunks(stream.id, stream.created)
        assert isinstance(chunks, ChatChunks | CompletionChunks | ResponsesEvents)
        self.chunks = chunks
        choices = stream.n if isinstance(stream, StreamGroup) else 1
        #: Per choice: its text pieces, its extras, and how it finished.
        self._parts: list[list[str]] = [[] for _ in range(choices)]
        self._extras: list[list] = [[] for _ in range(choices)]
        self._finish: list[str | None] = [None] * choices
        self._send_asgi: Send | None = None

    def heartbeat_s(self) -> float:
        return math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send_asgi = send
        await self.race_disconnect(receive, self.run())

    async def send(self, event: StreamEvent | ChoiceFinished) -> None:
        if isinstance(event, Delta):
            self._parts[event.index].append(event.text)
            self._extras[event.index] += event.extras
        elif isinstance(event, ChoiceFinished):
            self._finish[event.index] = event.end.finish_reason
        elif isinstance(event, Finished):
            end = event.end
            if end.error is not None:
                await self._respond_error(end.error)
                return
            assert end.finish_reason is not None
            if len(self._finish) == 1:
                self._finish[0] = end.finish_reason
            choices = [
                ChoiceOutput("".join(parts), finish or end.finish_reason, extras)
                for parts, extras, finish in zip(
                    self._parts, self._extras, self._finish, strict=True
                )
            ]
            usage = Usage(end.prompt_tokens, end.completion_tokens)
            assert self._send_asgi is not None
            body = self.chunks.response_choices(choices, usage)
            await send_json(self._send_asgi, 200, body, self.stream.id)

    async def send_failure(self, err: TokenspoutError) -> None:
        await self._respond_error(err)

    async def _respond_error(self, err: TokenspoutError) -> None:
        assert self._send_asgi is not None
        await send_error(self._send_asgi, self.told(err), self.stream.id)
