"""Newline-delimited JSON framing: one compact JSON object per line."""

from __future__ import annotations


class NDJSONFraming:
    """Frames JSON payloads as NDJSON lines. The end is the end of the body (no sentinel);
    a heartbeat is an empty line, which NDJSON readers skip."""

    name = "ndjson"
    media_type = "application/x-ndjson"

    @staticmethod
    def event(payload_json: str, id: str | None = None, name: str | None = None) -> bytes:
        # JSON escapes newlines inside strings, so one JSON text stays one line. A typed
        # payload carries its name as its "type".
        return payload_json.encode("utf-8") + b"\n"

    @staticmethod
    def heartbeat() -> bytes:
        return b"\n"

    @staticmethod
    def done(id: str | None = None) -> bytes:
        return b""
