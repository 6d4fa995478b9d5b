"""Continue a stream whose replica died, from its request and its text in Redis.

The request is prepared again from the body the client sent (the same validation, chat
template and limits as the first time), and the engine's ``continuation`` turns it and the
text so far into the request for the rest (``max_tokens`` less what was generated). The new
stream keeps the id, the chunks so far and the counts, so its next chunk goes at the next
position of the same Redis stream: readers that have a position skip nothing and repeat
nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.chunk_codec import decode_chunks
from tokenspout.cluster.stream_record import StreamRecord
from tokenspout.engine.continuation import Continuation
from tokenspout.engine.request import EngineOutput
from tokenspout.errors import InvalidRequestError, NothingLeftError, StreamGoneError
from tokenspout.server.generation_request import (
    GenerationRequest,
    prepare_chat,
    prepare_completion,
    prepare_seed,
)
from tokenspout.server.key_admission import charged_ahead, reserved
from tokenspout.server.request_parsing import validate
from tokenspout.server.schemas import SeedStreamRequest, chat_schema, completion_schema
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_registry import Continued

if TYPE_CHECKING:
    from tokenspout.server.server_state import ServerState


class Takeover:
    def __init__(self, state: ServerState, record: StreamRecord, entries: list[Any]):
        self._state = state
        self._record = record
        self._entries = entries
        self.persisted = 0

    async def start(self) -> Stream:
        """Open the continued stream in this replica's registry and start generating."""
        state, record = self._state, self._record
        history, start = self._history()
        if start > 0:
            # The continuation needs the whole answer so far.
            raise StreamGoneError(f"Redis no longer holds its text before position {start}")
        #: Where Redis's entries end: the continued stream writes after it.
        self.persisted = start + len(history)
        # Trailing outputs without text are tokens the detokenizer was holding back (part
        # of a character): their text is not in the answer so far, so they are generated
        # again (the same ones under greedy decoding) rather than counted as done.
        while history and not history[-1][0] and history[-1][2] is None:
            history.pop()
        text = "".join(text for text, _, _, _ in history)
        tokens = sum(n for _, n, _, _ in history)
        # The generated ids when every token has one (the embedded engine's): the engine
        # continues from them, exactly where the owner was.
        ids = tuple(token_id for _, n, _, token_id in history if n and token_id is not None)
        generation = await self._prepare()
        if generation.params.echo and history:
            text = _after_echo(text, generation.prompt.text)
        sofar = Continuation(text, ids if len(ids) == tokens else None, tokens)
        try:
            prompt, params = state.engine.continuation(generation.prompt, generation.params, sofar)
        except NothingLeftError:
            # The answer was whole: the owner died before it wrote the end. Any other refusal
            # (an answer this engine cannot continue) goes up: the stream is given up, and
            # its readers get the reason rather than a shortened answer.
            prompt, params = None, generation.params
        continued = Continued(
            record.stream_id, history, start, record.prompt_tokens, tokens, record.created
        )
        stream = state.streams.open(
            prompt, params, resumable=True, owner=record.key or None, meta=record.wire,
            continued=continued,
        )  # fmt: skip
        key = state.keys.named(record.key) if record.key else None
        if key is not None:
            # The dead replica charged the key ahead: given back at the end, as it would have.
            reserved(state, [stream], charged_ahead(key, generation.params.max_tokens))
        if prompt is None:
            stream.receive(EngineOutput("", 0, record.prompt_tokens, tokens, "length"))
        return stream

    def _history(self) -> tuple[list[tuple[str, int, Any, int | None]], int]:
        """The chunks Redis has, and the position of the first."""
        history: list[tuple[str, int, Any, int | None]] = []
        start = 0
        for index, (entry_id, fields) in enumerate(self._entries):
            if b"c" not in fields:
                continue
            chunks = decode_chunks(fields[b"c"])
            if index == 0:
                start = rk.entry_end(entry_id)[0] - len(chunks)
            history += chunks
        return history, start

    async def _prepare(self) -> GenerationRequest:
        state, record = self._state, self._record
        body = record.request_body()
        kind = record.wire.kind
        # The schema the route validated it with: an engine that forwards fields keeps the
        # ones tokenspout does not know (the strict schema refused them).
        forwards = state.engine.forwards_fields
        if kind == "chat":
            return await prepare_chat(state, validate(chat_schema(forwards), body))
        if kind == "completion":
            return await prepare_completion(state, validate(completion_schema(forwards), body))
        return await prepare_seed(state, validate(SeedStreamRequest, body))


def _after_echo(text: str, echo: str) -> str:
    """The answer so far of an echoed completion, whose first chunk begins with its prompt
    (``echo``): the echo is no part of the answer, which a continuation goes on from. One
    whose text does not begin with the prompt as sent (an upstream that echoed it otherwise:
    its relay took that first chunk as echo alone) cannot be split here."""
    if not text.startswith(echo):
        raise InvalidRequestError(
            "an echoed answer whose echo is not its prompt as sent cannot be continued",
            param="echo",
        )
    return text[len(echo) :]
