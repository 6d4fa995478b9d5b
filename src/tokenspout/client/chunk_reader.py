"""Turns the JSON of stream events (OpenAI chunks or the seed's format) into text deltas and
a result. Pure, so the sync and async clients share it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


class StreamError(Exception):
    """The server refused the request or ended its stream with an error event, or the
    connection failed or ended before the stream's end."""

    def __init__(self, message: str, *, status_code: int | None = None, body: Any = None):
        super().__init__(message)
        self.status_code = status_code
        self.body = body


@dataclass
class StreamResult:
    """What one streamed request produced, with the timing the client saw."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stream_id: str | None = None
    #: Request start to the first text, and to the end, in seconds (client clock).
    ttft_s: float | None = None
    total_s: float | None = None
    events: int = 0
    #: Times the stream was resumed after a cut connection.
    resumes: int = 0
    _started: float = field(default_factory=time.perf_counter, repr=False)


def read_event(result: StreamResult, data: str) -> str:
    """Apply one event's ``data`` to ``result`` and return its text delta ("" if none)."""
    if data == "[DONE]":
        result.total_s = time.perf_counter() - result._started
        return ""
    try:
        obj = json.loads(data)
    except ValueError:
        raise StreamError(f"the stream sent an event that is not JSON: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise StreamError(f"the stream sent an event that is not an object: {data[:200]!r}")
    if "error" in obj:
        err = obj["error"]  # OpenAI's {"message": ...}, or a string (TGI's)
        message = err.get("message", "stream error") if isinstance(err, dict) else str(err)
        raise StreamError(message, body=obj)
    if obj.get("usage"):
        result.usage = obj["usage"]
    text = ""
    if "token" in obj:  # the seed's format
        text = obj["token"]
    for choice in obj.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta is not None else choice.get("text") or ""
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    if text:
        if result.ttft_s is None:
            result.ttft_s = time.perf_counter() - result._started
        result.text += text
        result.events += 1
    return text
