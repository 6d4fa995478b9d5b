"""Server-Sent Events framing (WHATWG HTML, "9.2 Server-sent events").

Pure functions from values to bytes. A ``data`` value containing newlines is split across
several ``data:`` lines, which the spec rejoins with ``\\n``; ids must not contain newlines
or NUL (the spec ignores such ids), so they are rejected here.
"""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"


def _check_field(name: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"SSE {name} must not contain CR, LF or NUL")


def encode_event(
    data: str, *, event: str | None = None, id: str | None = None, retry_ms: int | None = None
) -> bytes:
    """One event: optional ``event:``/``id:``/``retry:`` lines, ``data:`` lines, blank line."""
    if event is None and retry_ms is None and "\n" not in data and "\r" not in data:
        # The common case (one line of JSON, maybe an id), sent for every event.
        if id is None:
            return f"data: {data}\n\n".encode()
        _check_field("id", id)
        return f"id: {id}\ndata: {data}\n\n".encode()
    lines: list[str] = []
    if event is not None:
        _check_field("event", event)
        lines.append(f"event: {event}")
    if id is not None:
        _check_field("id", id)
        lines.append(f"id: {id}")
    if retry_ms is not None:
        lines.append(f"retry: {int(retry_ms)}")
    # splitlines() would also split on \v, \f, \x1c..., which SSE does not treat as breaks.
    normalized = data.replace("\r\n", "\n").replace("\r", "\n")
    lines.extend(f"data: {part}" for part in normalized.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def encode_id(id: str) -> bytes:
    """An id alone: it dispatches no event (WHATWG HTML 9.2.6: an event without data is not
    dispatched), but an ``EventSource`` keeps it and reconnects with it as
    ``Last-Event-ID``. Clients that read only ``data:`` lines see nothing."""
    _check_field("id", id)
    return f"id: {id}\n\n".encode()


def encode_comment(text: str = "ping") -> bytes:
    """A comment line: clients ignore it; it keeps proxies and idle timers from closing.

    No blank line after it: a blank line ends an event, and the openai SDK's decoder
    dispatches an event with empty data (and fails to parse it) for a blank line once it has
    seen an ``id:``, even though no ``data:`` came."""
    _check_field("comment", text)
    return f": {text}\n".encode()


class SSEFraming:
    """Frames JSON payloads as SSE events for an HTTP response body."""

    name = "sse"
    media_type = "text/event-stream"

    @staticmethod
    def event(payload_json: str, id: str | None = None, name: str | None = None) -> bytes:
        return encode_event(payload_json, event=name, id=id)

    @staticmethod
    def heartbeat() -> bytes:
        return encode_comment("ping")

    @staticmethod
    def done(id: str | None = None) -> bytes:
        return DONE if id is None else encode_event("[DONE]", id=id)
