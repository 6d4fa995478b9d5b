"""A batch of a stream's chunks as the bytes of one Redis Stream entry, and back.

JSON: ``[[text, num_tokens], ...]``, with a third item for a chunk that has extras (a
token's logprob ``l``, tool-call pieces ``t``, an upstream's reasoning ``r`` and refusal
``f``; each only when there is one): their own JSON as a string (bytes as hex), so that the
writer's script can pass batches through Redis's Lua JSON codec unchanged; and a fourth,
the token id, when the engine gave one (the third is then ``""`` if there are no extras).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tokenspout.engine.request import OutputExtras, TokenLogprob, ToolCallDelta
from tokenspout.streaming.stream_store import Chunk


def chunk_items(chunks: Iterable[Chunk]) -> list[list[Any]]:
    """The chunks as JSON-ready lists (what ``encode_chunks`` encodes)."""
    return [_item(c) for c in chunks]


def _item(c: Chunk) -> list[Any]:
    extras = "" if c.extras is None else json.dumps(_extras(c.extras))
    if c.token_id is not None:
        return [c.text, c.num_tokens, extras, c.token_id]
    return [c.text, c.num_tokens, extras] if extras else [c.text, c.num_tokens]


def encode_chunks(chunks: Iterable[Chunk]) -> bytes:
    return json.dumps(chunk_items(chunks), ensure_ascii=False, separators=(",", ":")).encode()


def decode_chunks(data: bytes) -> list[tuple[str, int, OutputExtras | None, int | None]]:
    """(text, num_tokens, extras, token id) of each chunk."""
    return [
        (
            item[0],
            int(item[1]),
            _from_extras(json.loads(item[2])) if len(item) > 2 and item[2] else None,
            int(item[3]) if len(item) > 3 else None,
        )
        for item in json.loads(data)
    ]


def _extras(extras: OutputExtras) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lp = extras.logprob
    if lp is not None:
        out["l"] = [lp.token, lp.bytes.hex(), lp.logprob, [[t, b.hex(), p] for t, b, p in lp.top]]
    if extras.tool_calls:
        out["t"] = [list(call) for call in extras.tool_calls]
    if extras.reasoning:
        out["r"] = extras.reasoning
    if extras.refusal:
        out["f"] = extras.refusal
    return out


def _from_extras(data: dict[str, Any]) -> OutputExtras:
    logprob = None
    if "l" in data:
        token, raw, value, top = data["l"]
        alternatives = tuple((t, bytes.fromhex(b), p) for t, b, p in top)
        logprob = TokenLogprob(token, bytes.fromhex(raw), value, alternatives)
    calls = tuple(ToolCallDelta(*call) for call in data.get("t", ()))
    return OutputExtras(logprob, calls, reasoning=data.get("r", ""), refusal=data.get("f", ""))
