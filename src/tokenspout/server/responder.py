"""Admit, open the stream, respond: the last steps of every generation request, and the
response that follows an existing stream (resume)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

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
from tokenspout.server.generation_request import GenerationRequest
from tokenspout.server.key_admission import (
    admit_key,
    admit_shared,
    charged_ahead,
    release_key,
    reserved,
)
from tokenspout.server.request_trace import start_root
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import StreamGroup

_NDJSON_TYPES = ("application/x-ndjson", "application/ndjson", "application/jsonl")


def negotiate_framing(request: Request) -> Framing:
    """NDJSON when ``Accept`` prefers it to SSE by its q-values (RFC 9110 12.5.1); SSE on a
    tie, and when it names neither."""
    sse = ndjson = 0.0
    for part in request.headers.get("accept", "").lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media == "text/event-stream":
            sse = max(sse, q)
        elif media in _NDJSON_TYPES:
            ndjson = max(ndjson, q)
    return NDJSONFraming() if ndjson > sse else SSEFraming()


async def open_stream(
    state: ServerState,
    generation: GenerationRequest,
    key: ApiKey | None = None,
    *,
    started_at: float | None = None,
) -> Stream | StreamGroup:
    """Admit the request (and the key's limits) and start generating; the stream is owned
    by ``key``. With ``n > 1``, a group of ``n`` streams, each counted as a stream (the
    prompt's tokens once). With ``--redis-url`` the limits count across replicas, and a
    resumable stream is written to Redis. ``started_at``: when the request was received
    (monotonic; now when not given), where its trace starts."""
    root = start_root(time.monotonic() if started_at is None else started_at)
    if root is not None:
        generation = replace(
            generation, prompt=replace(generation.prompt, traceparent=root.traceparent)
        )
    try:
        admit(state, generation.n)
        stream = await _open_admitted(state, generation, key)
    except BaseException as exc:
        if root is not None:
            root.refused(exc)
        raise
    if root is not None:
        root.opened(stream.id)
    return stream


async def _open_admitted(
    state: ServerState, generation: GenerationRequest, key: ApiKey | None
) -> Stream | StreamGroup:
    if state.cluster is not None:
        return await _open_shared(state, generation, key)
    if key is None:
        return _open(state, generation, None)
    tokens, ahead = _charges(generation, key)
    admit_key(state, key, generation.wire.model, tokens, generation.n)
    return _open_keyed(state, generation, key.name, ahead)


def _charges(generation: GenerationRequest, key: ApiKey | None) -> tuple[int, int]:
    """What the request's key is charged as it is admitted, and each stream's share of
    that beyond the prompt (``charged_ahead``)."""
    ahead = 0 if key is None else charged_ahead(key, generation.params.max_tokens)
    return generation.prompt.num_tokens + generation.n * ahead, ahead


def _open_keyed(
    state: ServerState, generation: GenerationRequest, key: str, ahead: int
) -> Stream | StreamGroup:
    """``_open`` for an admitted key: what each of its streams was charged ahead is
    recorded, and given back with their slots if they cannot open."""
    try:
        stream = _open(state, generation, key)
    except BaseException:
        for _ in range(generation.n):
            release_key(state, key, ahead)
        raise
    reserved(state, stream.streams if isinstance(stream, StreamGroup) else [stream], ahead)
    return stream


async def _open_shared(
    state: ServerState, generation: GenerationRequest, key: ApiKey | None
) -> Stream | StreamGroup:
    assert state.cluster is not None
    tokens, ahead = _charges(generation, key)
    await admit_shared(state, key, generation.wire.model, tokens, generation.n)
    if key is None:
        stream = _open(state, generation, None)
    else:
        stream = _open_keyed(state, generation, key.name, ahead)
    if isinstance(stream, Stream):
        try:
            await state.cluster.opened(stream, generation)
        except asyncio.CancelledError:
            stream.abort("client_disconnect")
            raise
    return stream


def _open(
    state: ServerState, generation: GenerationRequest, owner: str | None
) -> Stream | StreamGroup:
    if generation.n > 1:
        return state.streams.open_group(
            generation.prompt, generation.choice_params(), owner=owner, meta=generation.wire
        )
    return state.streams.open(
        generation.prompt, generation.params, resumable=generation.resumable,
        meta=generation.wire, owner=owner,
    )  # fmt: skip


async def respond(
    state: ServerState,
    request: Request,
    generation: GenerationRequest,
    streaming: bool,
    started_at: float,
    *,
    announce: str | None = None,
) -> Response:
    """Admit, start generating, and return the streaming or whole response (``announce``:
    as ``EventStreamResponse`` takes it)."""
    stream = await open_stream(state, generation, key_of(request), started_at=started_at)
    prompt = generation.prompt_to_log(state.config.log_prompts)
    try:
        if streaming:
            return EventStreamResponse(
                state,
                stream,
                negotiate_framing(request),
                started_at=started_at,
                prompt=prompt,
                announce=announce,
            )
        return CompletionResponse(state, stream, started_at=started_at, prompt=prompt)
    except BaseException:
        stream.abort("error")
        raise


def follow(
    state: ServerState,
    request: Request,
    stream: Stream | StreamGroup,
    *,
    start: int,
    after: int = 0,
    opening: bool,
) -> Response:
    """A new reader of an existing stream from ``start`` (and ``after`` of the end's events,
    when the stream ends there), in the stream's own format; ``opening``: with the opening
    chunks."""
    return EventStreamResponse(
        state,
        stream,
        negotiate_framing(request),
        started_at=time.monotonic(),
        start=start,
        after=after,
        resumed=True,
        opening=opening,
    )
