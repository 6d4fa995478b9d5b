"""The framing a streaming HTTP response uses: SSE or NDJSON."""

from __future__ import annotations

from typing import Protocol


class Framing(Protocol):
    #: Short transport name for metrics labels.
    name: str
    media_type: str

    def event(self, payload_json: str, id: str | None = None, name: str | None = None) -> bytes:
        """One payload; ``name``: its event type, where the framing names events (SSE)."""
        ...

    def heartbeat(self) -> bytes: ...

    def done(self, id: str | None = None) -> bytes:
        """The stream's end marker; ``id``: its event id, where the framing has ids."""
        ...
