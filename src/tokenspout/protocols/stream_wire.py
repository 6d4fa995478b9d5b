"""A stream's wire format, chosen once by the request that opened it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenspout.protocols.chunk_format import ChunkFormat
from tokenspout.protocols.openai_chunks import ChatChunks, CompletionChunks
from tokenspout.protocols.responses_events import RESPONSE_ID_PREFIX, ResponsesEvents
from tokenspout.protocols.seed_events import SeedEvents


@dataclass(frozen=True, slots=True)
class StreamWire:
    """How a stream's events look on the wire: which endpoint opened it (chat, completion,
    responses, seed), for which model name, with a usage chunk or not, coalesced as the
    request asked. Kept with the stream (``Stream.meta``) so that a resumed reader encodes
    it the same way."""

    kind: str
    model: str
    include_usage: bool = False
    #: Every chunk carries the usage so far (vLLM's ``continuous_usage_stats``).
    continuous_usage: bool = False
    #: Logprobs were asked for: a whole answer without tokens has empty ones, not null.
    logprobs: bool = False
    #: The request's own ``stream_options.flush_tokens`` and ``flush_ms``; None: the
    #: server's, on whichever replica reads.
    flush_tokens: int | None = None
    flush_ms: float | None = None
    #: What a Responses API response object echoes of its request (``responses`` only).
    settings: Mapping[str, Any] | None = None

    def chunks(self, stream_id: str, created: float) -> ChunkFormat:
        """The encoder of this stream's chunks."""
        usage = self.include_usage, self.continuous_usage, self.logprobs
        if self.kind == "chat":
            return ChatChunks(f"chatcmpl-{stream_id}", int(created), self.model, *usage)
        if self.kind == "completion":
            return CompletionChunks(f"cmpl-{stream_id}", int(created), self.model, *usage)
        if self.kind == "responses":
            settings = self.settings or {}
            created_at = int(created)
            return ResponsesEvents(
                f"{RESPONSE_ID_PREFIX}{stream_id}", stream_id, created_at, self.model, settings
            )
        return SeedEvents()
