"""All live streams by id: open, find, cancel, and forget when they are over."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

from tokenspout.engine.interface import Engine
from tokenspout.engine.request import Prompt, SamplingParams
from tokenspout.errors import StreamNotFoundError
from tokenspout.streaming.stream import Stream


def new_stream_id() -> str:
    """Short, unguessable: knowing an id is what lets a client cancel or resume a stream."""
    return secrets.token_urlsafe(12)


class StreamRegistry:
    """Owns ``Stream`` objects. ``on_end`` is told about every stream that ends."""

    def __init__(self, engine: Engine, *, on_end: Callable[[Stream], None] | None = None):
        self._engine = engine
        self._streams: dict[str, Stream] = {}
        self._on_end = on_end

    def __len__(self) -> int:
        return len(self._streams)

    def open(
        self, prompt: Prompt, params: SamplingParams, *, kind: str, resumable: bool = False
    ) -> Stream:
        """Start generating now; the stream is findable by id until it is over."""
        stream_id = new_stream_id()
        stream = Stream(
            stream_id,
            self._engine,
            prompt,
            params,
            kind=kind,
            resumable=resumable,
            on_end=self._ended,
        )
        self._streams[stream_id] = stream
        return stream

    def get(self, stream_id: str) -> Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise StreamNotFoundError(f"no stream with id {stream_id!r}") from None

    def cancel(self, stream_id: str) -> Stream:
        """Cancel a running stream by id (a finished one is left as it is)."""
        stream = self.get(stream_id)
        stream.cancel()
        return stream

    def abort_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream.abort(reason)

    def running(self) -> list[Stream]:
        return [s for s in self._streams.values() if not s.finished]

    def _ended(self, stream: Stream) -> None:
        if self._on_end is not None:
            self._on_end(stream)
        # Give readers a loop turn to collect the end before the id is forgotten.
        asyncio.get_running_loop().call_soon(self._streams.pop, stream.id, None)
