"""The in-memory store, with resumable streams' buffers noting each append for the writer
(``StreamWriter.touched``: no I/O on the per-token path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenspout.streaming.stream_store import InMemoryStreamStore, _MemoryBuffer


class _PersistedBuffer(_MemoryBuffer):
    __slots__ = ("touched",)

    touched: Callable[[str], None]

    def append(
        self, text: str, num_tokens: int, extras: Any = None, token_id: int | None = None
    ) -> None:
        super().append(text, num_tokens, extras, token_id)
        self.touched(self.stream_id)


class PersistedStreamStore(InMemoryStreamStore):
    def __init__(self, touched: Callable[[str], None], **bounds: int):
        super().__init__(**bounds)
        self._touched = touched

    def _new_buffer(self, stream_id: str, resumable: bool) -> _MemoryBuffer:
        if not resumable:
            return super()._new_buffer(stream_id, resumable)
        buffer = _PersistedBuffer(stream_id, self, resumable)
        buffer.touched = self._touched
        return buffer
