"""Where streams keep their text so that a reader can replay from any position.

``StreamStore`` hands out one ``ReplayBuffer`` per stream. ``InMemoryStreamStore`` bounds
memory per stream and in total: past a bound the oldest text is evicted, and a reader that
asks for evicted positions gets ``StreamGoneError`` (HTTP 410). The interface is
synchronous because appends sit on the per-token hot path; a store shared by several
replicas (Redis) would write behind and keep this shape.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

from tokenspout.errors import StreamGoneError


class Chunk(NamedTuple):
    """The text of one engine output, the tokens it accounts for, its UTF-8 size, and its
    extras (logprobs, tool-call pieces; ``EngineOutput.extras``) if any (a named tuple: one
    is built per token)."""

    text: str
    num_tokens: int
    nbytes: int
    extras: Any = None


#: Builds a Chunk from a tuple in C: the generated ``Chunk(...)`` constructor is a Python
#: function, and one chunk is built per token.
_new_chunk = functools.partial(tuple.__new__, Chunk)


class ReplayBuffer(ABC):
    """The chunks of one stream, addressed by absolute position (0 = first chunk)."""

    __slots__ = ()

    @property
    @abstractmethod
    def start(self) -> int:
        """First position still held."""

    @property
    @abstractmethod
    def end(self) -> int:
        """Position after the last chunk."""

    @abstractmethod
    def append(self, text: str, num_tokens: int, extras: Any = None) -> None: ...

    @abstractmethod
    def read(self, pos: int) -> list[Chunk]:
        """Chunks from ``pos`` on; ``StreamGoneError`` if some were evicted or released."""

    @abstractmethod
    def release(self, pos: int) -> None:
        """Drop chunks before ``pos`` (nobody will replay them)."""


class StreamStore(ABC):
    @abstractmethod
    def create(self, stream_id: str) -> ReplayBuffer: ...

    @abstractmethod
    def discard(self, stream_id: str) -> None:
        """Forget a stream's buffer (expired)."""


class _MemoryBuffer(ReplayBuffer):
    # A list, not a deque: a deque allocates a 64-slot block up front, the biggest single
    # object of a stream that holds a few unread chunks. Released chunks are cut off the
    # front in one slice per event.
    __slots__ = ("_chunks", "_start", "_store", "evicted", "nbytes", "stream_id")

    def __init__(self, stream_id: str, store: InMemoryStreamStore):
        self.stream_id = stream_id
        self._store = store
        self._chunks: list[Chunk] = []
        self._start = 0
        self.nbytes = 0
        self.evicted = False

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + len(self._chunks)

    def append(self, text: str, num_tokens: int, extras: Any = None) -> None:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        self._chunks.append(_new_chunk((text, num_tokens, size, extras)))
        self.nbytes += size
        store = self._store
        store.total_bytes += size
        if self.nbytes > store.max_stream_bytes or store.total_bytes > store.max_total_bytes:
            store._evict(self)

    def read(self, pos: int) -> list[Chunk]:
        if pos < self._start:
            why = "evicted to bound memory" if self.evicted else "already delivered"
            raise StreamGoneError(
                f"stream {self.stream_id}: text before position {self._start} is no longer "
                f"buffered ({why}); start a new request"
            )
        return self._chunks[pos - self._start :]

    def release(self, pos: int) -> None:
        count = min(pos - self._start, len(self._chunks))
        if count <= 0:
            return
        freed = sum(chunk.nbytes for chunk in self._chunks[:count])
        del self._chunks[:count]
        self._start += count
        self.nbytes -= freed
        self._store._shrank(freed)

    def evict_front(self, target_bytes: int) -> None:
        """Drop the oldest chunks until at most ``target_bytes`` remain (keeps the newest)."""
        excess = self.nbytes - target_bytes
        count = 0
        while excess > 0 and count < len(self._chunks) - 1:
            excess -= self._chunks[count].nbytes
            count += 1
        if count:
            self.evicted = True
            self.release(self._start + count)


class InMemoryStreamStore(StreamStore):
    """Process-local store. ``max_stream_bytes`` bounds one stream, ``max_total_bytes`` all."""

    def __init__(self, *, max_stream_bytes: int = 4 << 20, max_total_bytes: int = 256 << 20):
        if max_stream_bytes < 1 or max_total_bytes < max_stream_bytes:
            raise ValueError("need 0 < max_stream_bytes <= max_total_bytes")
        self.max_stream_bytes = max_stream_bytes
        self.max_total_bytes = max_total_bytes
        self.total_bytes = 0
        # Insertion order = age: the oldest streams lose their text first.
        self._buffers: dict[str, _MemoryBuffer] = {}

    def create(self, stream_id: str) -> ReplayBuffer:
        buffer = _MemoryBuffer(stream_id, self)
        self._buffers[stream_id] = buffer
        return buffer

    def discard(self, stream_id: str) -> None:
        buffer = self._buffers.pop(stream_id, None)
        if buffer is not None:
            self.total_bytes -= buffer.nbytes

    def _evict(self, buffer: _MemoryBuffer) -> None:
        """``buffer`` grew past its bound, or all buffers past theirs."""
        if buffer.nbytes > self.max_stream_bytes:
            buffer.evict_front(self.max_stream_bytes // 2)
        if self.total_bytes > self.max_total_bytes:
            for oldest in list(self._buffers.values()):
                oldest.evict_front(0)
                if self.total_bytes <= self.max_total_bytes * 3 // 4:
                    break

    def _shrank(self, size: int) -> None:
        self.total_bytes -= size
