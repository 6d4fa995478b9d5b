"""A batch of a stream's chunks as the bytes of one Redis Stream entry, and back.

JSON: ``[[text, num_tokens], ...]``, with a third item for a chunk that has extras (a
token's logprob, tool-call pieces): their own JSON as a string (bytes as hex), so that the
writer's script can pass batches through Redis's Lua JSON codec unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tokenspout.engine.request import OutputExtras, TokenLogprob, ToolCallDelta
from tokenspout.streaming.stream_store import Chunk


def chunk_items(chunks: Iterable[Chunk]) -> list[list[Any]]:
    """The chunks as JSON-ready lists (what ``encode_chunks`` encodes)."""
    return [
        [c.text, c.num_tokens]
        if c.extras is None
        else [c.text, c.num_tokens, json.dumps(_extras(c.extras))]
        for c in chunks
    ]


def encode_chunks(chunks: Iterable[Chunk]) -> bytes:
    return json.dumps(chunk_items(chunks), ensure_ascii=False, separators=(",", ":")).encode()


def decode_chunks(data: bytes) -> list[tuple[str, int, OutputExtras | None]]:
    return [
        (item[0], int(item[1]), _from_extras(json.loads(item[2])) if len(item) > 2 else None)
        for item in json.loads(data)
    ]


def _extras(extras: OutputExtras) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lp = extras.logprob
    if lp is not None:
        out["l"] = [lp.token, lp.bytes.hex(), lp.logprob, [[t, b.hex(), p] for t, b, p in lp.top]]
    if extras.tool_calls:
        out["t"] = [list(call) for call in extras.tool_calls]
    return out


def _from_extras(data: dict[str, Any]) -> OutputExtras:
    logprob = None
    if "l" in data:
        token, raw, value, top = data["l"]
        alternatives = tuple((t, bytes.fromhex(b), p) for t, b, p in top)
        logprob = TokenLogprob(token, bytes.fromhex(raw), value, alternatives)
    calls = tuple(ToolCallDelta(*call) for call in data.get("t", ()))
    return OutputExtras(logprob, calls)
