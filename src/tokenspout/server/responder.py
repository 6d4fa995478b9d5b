"""Pick the response that carries a stream: SSE or NDJSON events, or one JSON body."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.protocols.chunk_format import ChunkFormat, Usage
from tokenspout.protocols.framing import Framing
from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.protocols.openai_chunks import ChatChunks, CompletionChunks
from tokenspout.protocols.seed_events import SeedEvents
from tokenspout.protocols.sse import SSEFraming
from tokenspout.server.auth import key_of
from tokenspout.server.completion_response import CompletionResponse
from tokenspout.server.event_stream_response import EventStreamResponse, StreamSettings
from tokenspout.server.generation_request import GenerationRequest, open_stream
from tokenspout.server.request_parsing import flush_settings
from tokenspout.server.schemas import StreamOptions
from tokenspout.server.server_state import ServerState
from tokenspout.streaming.stream import Stream, StreamEnd


def negotiate_framing(request: Request) -> Framing:
    """``Accept: application/x-ndjson`` selects NDJSON; anything else gets SSE."""
    accept = request.headers.get("accept", "")
    if "application/x-ndjson" in accept and "text/event-stream" not in accept:
        return NDJSONFraming()
    return SSEFraming()


def stream_settings(state: ServerState, options: StreamOptions | None) -> StreamSettings:
    flush_tokens, flush_ms = flush_settings(state, options)
    cfg = state.config
    return StreamSettings(flush_tokens, flush_ms, cfg.heartbeat_interval_s, cfg.send_timeout_s)


def chunk_format(state: ServerState, stream: Stream) -> ChunkFormat:
    """The payload shapes of a stream, by the endpoint that opened it."""
    created = int(stream.created)
    model = state.engine.model_id
    if stream.kind == "chat":
        return ChatChunks(f"chatcmpl-{stream.id}", created, model, stream.include_usage)
    if stream.kind == "completion":
        return CompletionChunks(f"cmpl-{stream.id}", created, model, stream.include_usage)
    return SeedEvents()


def respond(
    state: ServerState,
    request: Request,
    generation: GenerationRequest,
    streaming: bool,
    started_at: float,
) -> Response:
    """Admit, start generating, and return the streaming or whole response."""
    stream = open_stream(state, generation, key_of(request))
    prompt = generation.prompt.text if state.config.log_prompts else None
    if streaming:
        return follow(
            state, request, stream, generation.options, started_at=started_at, prompt=prompt
        )
    chunks = chunk_format(state, stream)
    assert isinstance(chunks, ChatChunks | CompletionChunks)

    def build(text: str, end: StreamEnd) -> dict[str, Any]:
        assert end.finish_reason is not None
        return chunks.response(
            text, end.finish_reason, Usage(end.prompt_tokens, end.completion_tokens)
        )

    return CompletionResponse(
        stream, build, state.metrics, endpoint=stream.kind, started_at=started_at, prompt=prompt
    )


def follow(
    state: ServerState,
    request: Request,
    stream: Stream,
    options: StreamOptions | None,
    *,
    start: int = 0,
    opening: bool = True,
    started_at: float | None = None,
    prompt: str | None = None,
) -> EventStreamResponse:
    """Stream ``stream`` from ``start`` in its own format (a new stream or a resumed one)."""
    return EventStreamResponse(
        stream,
        chunk_format(state, stream),
        negotiate_framing(request),
        stream_settings(state, options),
        state.metrics,
        state.send_watchdog,
        endpoint=stream.kind,
        started_at=time.monotonic() if started_at is None else started_at,
        start=start,
        opening=opening,
        prompt=prompt,
    )
