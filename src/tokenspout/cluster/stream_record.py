"""What Redis keeps about a stream beside its chunks: how to read it on any replica, and
how to continue it on another one (the request as the client sent it and the key that
owns it). A hash, one field per attribute."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from tokenspout.protocols.stream_wire import StreamWire

RUNNING = "running"
ENDED = "ended"
#: Its text in Redis has a hole (the writer could not catch up): resumes get 410.
GONE = "gone"


@dataclass(frozen=True)
class StreamRecord:
    stream_id: str
    wire: StreamWire
    #: The API key name that opened it ("" without keys).
    key: str
    #: The replica generating it (its lease says whether it lives).
    replica: str
    created: float
    prompt_tokens: int
    #: The validated request body, as JSON: a takeover prepares it again.
    body: str
    state: str = RUNNING
    #: Why it is gone, for the 410.
    why: str = ""
    cancelled: bool = False

    def fields(self) -> dict[str, str]:
        return {
            "kind": self.wire.kind,
            "model": self.wire.model,
            "usage": "1" if self.wire.include_usage else "",
            "continuous_usage": "1" if self.wire.continuous_usage else "",
            "logprobs": "1" if self.wire.logprobs else "",
            # "": the server's own (and what a record written before these fields reads as).
            "flush_tokens": _text(self.wire.flush_tokens),
            "flush_ms": _text(self.wire.flush_ms),
            "key": self.key,
            "replica": self.replica,
            "created": repr(self.created),
            "prompt_tokens": str(self.prompt_tokens),
            "body": self.body,
            "state": self.state,
            "why": self.why,
            "cancelled": "1" if self.cancelled else "",
        }

    @classmethod
    def from_fields(cls, stream_id: str, raw: dict[bytes, bytes]) -> StreamRecord:
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            stream_id,
            StreamWire(
                f["kind"],
                f["model"],
                bool(f.get("usage")),
                continuous_usage=bool(f.get("continuous_usage")),
                logprobs=bool(f.get("logprobs")),
                flush_tokens=int(f["flush_tokens"]) if f.get("flush_tokens") else None,
                flush_ms=float(f["flush_ms"]) if f.get("flush_ms") else None,
            ),
            key=f.get("key", ""),
            replica=f.get("replica", ""),
            created=float(f.get("created", time.time())),
            prompt_tokens=int(f.get("prompt_tokens", "0")),
            body=f.get("body", "{}"),
            state=f.get("state", RUNNING),
            why=f.get("why", ""),
            cancelled=bool(f.get("cancelled")),
        )

    def request_body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.body)
        return body

    def owned_by(self, replica: str) -> StreamRecord:
        return replace(self, replica=replica)


def _text(value: float | None) -> str:
    return "" if value is None else repr(value)
