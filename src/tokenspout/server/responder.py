"""Admit, open the stream, respond: the last steps of every generation request, and the
response that follows an existing stream (resume)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.protocols.framing import Framing
from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.protocols.sse import SSEFraming
from tokenspout.server.admission import admit
from tokenspout.server.api_keys import ApiKey
from tokenspout.server.auth import key_of
from tokenspout.server.completion_response import CompletionResponse
from tokenspout.server.event_stream_response import EventStreamResponse
from tokenspout.server.generation_request import GenerationRequest, ReadSettings
from tokenspout.server.key_admission import admit_key, admit_shared, release_key
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream


def negotiate_framing(request: Request) -> Framing:
    """``Accept: application/x-ndjson`` selects NDJSON; anything else gets SSE."""
    accept = request.headers.get("accept", "")
    if "application/x-ndjson" in accept and "text/event-stream" not in accept:
        return NDJSONFraming()
    return SSEFraming()


async def open_stream(
    state: ServerState, generation: GenerationRequest, key: ApiKey | None = None
) -> Stream:
    """Admit the request (and the key's limits) and start generating; the stream is owned
    by ``key``. With ``--redis-url`` the limits count across replicas, and a resumable
    stream is written to Redis."""
    admit(state)
    prompt_tokens = generation.prompt.num_tokens
    if state.cluster is not None:
        await admit_shared(state, key, prompt_tokens)
    elif key is not None:
        admit_key(state, key, prompt_tokens)
    try:
        stream = state.streams.open(
            generation.prompt, generation.params, resumable=generation.resumable,
            meta=generation.wire, owner=None if key is None else key.name,
        )  # fmt: skip
    except BaseException:
        if key is not None:
            release_key(state, key.name)
        raise
    if state.cluster is not None:
        state.cluster.opened(stream, generation)
    return stream


async def respond(
    state: ServerState,
    request: Request,
    generation: GenerationRequest,
    streaming: bool,
    started_at: float,
) -> Response:
    """Admit, start generating, and return the streaming or whole response."""
    stream = await open_stream(state, generation, key_of(request))
    prompt = generation.prompt.text if state.config.log_prompts else None
    try:
        if streaming:
            return EventStreamResponse(
                state,
                stream,
                negotiate_framing(request),
                generation.reading,
                started_at=started_at,
                prompt=prompt,
            )
        return CompletionResponse(
            state, stream, generation.reading, started_at=started_at, prompt=prompt
        )
    except BaseException:
        stream.abort("error")
        raise


def follow(state: ServerState, request: Request, stream: Stream, *, start: int) -> Response:
    """A new reader of an existing stream from ``start``, in the stream's own format."""
    return EventStreamResponse(
        state,
        stream,
        negotiate_framing(request),
        ReadSettings.resolve(state.config),
        started_at=time.monotonic(),
        start=start,
        resumed=True,
        opening=start == 0,
    )
