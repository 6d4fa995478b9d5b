"""A batch of a stream's chunks as the bytes of one Redis Stream entry, and back.

JSON: ``[[text, num_tokens], ...]``, with a third item for a chunk that has extras (a
token's logprob, tool-call pieces), whose bytes travel as hex.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tokenspout.engine.request import OutputExtras, TokenLogprob, ToolCallDelta
from tokenspout.streaming.stream_store import Chunk


def encode_chunks(chunks: Iterable[Chunk]) -> bytes:
    items = [
        [c.text, c.num_tokens] if c.extras is None else [c.text, c.num_tokens, _extras(c.extras)]
        for c in chunks
    ]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode()


def decode_chunks(data: bytes) -> list[tuple[str, int, OutputExtras | None]]:
    return [
        (item[0], item[1], _from_extras(item[2]) if len(item) > 2 else None)
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
