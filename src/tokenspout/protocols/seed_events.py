"""The seed article's own event format: ``{"token": "..."}`` per event, then ``[DONE]``.

With coalescing one event may carry several tokens' text. The finish is implied by
``[DONE]``; an error is ``{"error": {...}}`` before it.
"""

from __future__ import annotations

from typing import Any

from tokenspout.errors import TokenspoutError
from tokenspout.protocols.chunk_format import Usage
from tokenspout.protocols.openai_errors import error_body


class SeedEvents:
    """``ChunkFormat`` for ``/v1/completions/stream``."""

    ends_with_done = True
    typed_events = False

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str) -> dict[str, Any]:
        return {"token": text}

    def delta_with(self, text: str, extras: list[Any]) -> dict[str, Any]:
        """The seed endpoint takes no field that produces extras: the text alone."""
        return self.delta(text)

    def closing(self, finish_reason: str, usage: Usage) -> list[dict[str, Any]]:
        return []

    def error(self, err: TokenspoutError) -> dict[str, Any]:
        return error_body(err)
