"""What a stream's JSON payloads look like, independent of framing (SSE, NDJSON, WebSocket).

A ``ChunkFormat`` turns the stream's life (open, text deltas, finish, error) into JSON
objects; ``protocols.sse`` / ``protocols.ndjson`` frame them. Implementations live in
``openai_chunks`` (chat and completions), ``responses_events`` (the Responses API) and
``seed_events`` (the seed's ``{"token": ...}``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any, Protocol

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.json_text import dumps


@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ChunkFormat(Protocol):
    """The payloads of one stream, in order: opening, deltas, closing (or error)."""

    #: Whether the SSE framing ends the stream with ``data: [DONE]``.
    ends_with_done: bool
    #: Each payload is an event named by its ``type`` (SSE's ``event:`` line) and counted by
    #: its ``sequence_number`` (the Responses API's ``responses_events``): a delta is then
    #: ``delta_events(text, extras)``, a list, and has no template.
    typed_events: bool

    def opening(self) -> list[dict[str, Any]]: ...

    def delta(self, text: str) -> dict[str, Any]: ...

    def delta_with(self, text: str, extras: list[Any]) -> dict[str, Any]:
        """A delta whose tokens carry extras (``OutputExtras``: logprobs, tool calls)."""
        ...

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]: ...

    def error(self, err: TokenspoutError) -> dict[str, Any]: ...


def delta_encoder(chunks: ChunkFormat) -> Callable[[str], str]:
    """``text -> dumps(chunks.delta(text))``, built once per stream from a template: the
    delta payload's JSON split around its text. A delta is then one string escape instead
    of a dict and a whole ``json.dumps`` (deltas are most of what a stream sends)."""
    prefix, suffix = _delta_template(chunks)

    def encode(text: str) -> str:
        # encode_basestring is what json.dumps(..., ensure_ascii=False) applies to a str.
        return prefix + encode_basestring(text) + suffix

    return encode


def delta_usage_encoder(chunks: ChunkFormat) -> Callable[[str, Usage], str]:
    """As ``delta_encoder``, for a delta that carries the usage so far (continuous usage:
    the delta's ``"usage": null`` filled in); ValueError for a format whose delta does not
    end with it."""
    prefix, suffix = _delta_template(chunks)
    null = '"usage":null}'
    if not suffix.endswith(null):
        raise ValueError("a delta payload must end with its usage for continuous usage")
    suffix = suffix[: -len(null)]

    def encode(text: str, usage: Usage) -> str:
        p, c = usage.prompt_tokens, usage.completion_tokens
        return (
            f'{prefix}{encode_basestring(text)}{suffix}"usage":{{"prompt_tokens":{p},'
            f'"completion_tokens":{c},"total_tokens":{p + c}}}}}'
        )

    return encode


def _delta_template(chunks: ChunkFormat) -> tuple[str, str]:
    """A delta payload's JSON before and after its text."""
    marker = "\x00tokenspout-delta-text\x00"
    prefix, found, suffix = dumps(chunks.delta(marker)).partition(encode_basestring(marker))
    if not found:
        raise ValueError("a delta payload must carry its text as a JSON string")
    return prefix, suffix
