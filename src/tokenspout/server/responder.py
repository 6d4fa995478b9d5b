"""Open a stream for a validated request and pick the response that carries it."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenspout.engine.request import Prompt, SamplingParams
from tokenspout.protocols.chunk_format import ChunkFormat, Usage
from tokenspout.protocols.framing import Framing
from tokenspout.protocols.ndjson import NDJSONFraming
from tokenspout.protocols.openai_chunks import ChatChunks, CompletionChunks
from tokenspout.protocols.seed_events import SeedEvents
from tokenspout.protocols.sse import SSEFraming
from tokenspout.server.completion_response import CompletionResponse
from tokenspout.server.event_stream_response import EventStreamResponse, StreamSettings
from tokenspout.server.request_parsing import admit, flush_settings
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


def respond(
    state: ServerState,
    request: Request,
    *,
    prompt: Prompt,
    params: SamplingParams,
    kind: str,
    streaming: bool,
    options: StreamOptions | None,
    started_at: float,
) -> Response:
    """Admit, start generating, and return the streaming or whole response."""
    admit(state)
    resumable = bool(options and options.resumable)
    stream = state.streams.open(prompt, params, kind=kind, resumable=resumable)
    chunks = chunk_format(
        state, stream, kind, include_usage=bool(options and options.include_usage)
    )
    if not streaming:
        assert isinstance(chunks, ChatChunks | CompletionChunks)
        whole = chunks

        def build(text: str, end: StreamEnd) -> dict[str, Any]:
            assert end.finish_reason is not None
            usage = Usage(end.prompt_tokens, end.completion_tokens)
            return whole.response(text, end.finish_reason, usage)

        return CompletionResponse(
            stream, build, state.metrics, endpoint=kind, started_at=started_at
        )
    return EventStreamResponse(
        stream,
        chunks,
        negotiate_framing(request),
        stream_settings(state, options),
        state.metrics,
        endpoint=kind,
        started_at=started_at,
    )


def chunk_format(
    state: ServerState, stream: Stream, kind: str, *, include_usage: bool
) -> ChunkFormat:
    """The payload shapes of a stream, by the endpoint that opened it."""
    created = int(stream.created)
    model = state.engine.model_id
    if kind == "chat":
        return ChatChunks(f"chatcmpl-{stream.id}", created, model, include_usage)
    if kind == "completion":
        return CompletionChunks(f"cmpl-{stream.id}", created, model, include_usage)
    return SeedEvents()
