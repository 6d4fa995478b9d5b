"""Where streams keep their text: a log per stream, and retention decided by its readers.

``StreamStore`` hands out one ``ReplayBuffer`` per stream: an append-only log of chunks
addressed by absolute position (chunk ``i`` is the stream's i-th output with text). The
stream tells its buffer where its slowest live reader is (``hold_from``), and retention is a
policy over that position, as in Kafka or Redis Streams:

* text a live reader has not read yet is **never dropped**. When holding it would pass a
  bound, the buffer says so (``must_pause``) and the stream pauses its producer instead;
* a non-resumable stream releases text as soon as every reader has delivered it;
* a resumable stream keeps delivered text for replay; past a bound the oldest text that no
  live reader needs is evicted (a resume into it gets ``StreamGoneError``: HTTP 410).

``InMemoryStreamStore`` bounds one stream's text and all streams' text together. The
interface is synchronous because appends sit on the per-token hot path; a store shared by
several replicas would write behind and keep this shape.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

from tokenspout.errors import StreamGoneError


class Chunk(NamedTuple):
    """The text of one engine output, the tokens it accounts for, its UTF-8 size, its
    extras (logprobs, tool-call pieces; ``EngineOutput.extras``) if any, and its token id
    when the engine gives one (a named tuple: one is built per token)."""

    text: str
    num_tokens: int
    nbytes: int
    extras: Any = None
    token_id: int | None = None


#: Builds a Chunk from a tuple in C: the generated ``Chunk(...)`` constructor is a Python
#: function, and one chunk is built per token.
_new_chunk = functools.partial(tuple.__new__, Chunk)


def utf8_size(text: str) -> int:
    """Bytes of ``text`` in UTF-8; ``UnicodeEncodeError`` for text that has none (a lone
    surrogate), which no client could be sent."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


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
    def begin_at(self, pos: int) -> None:
        """Make an empty buffer start at ``pos``."""

    @abstractmethod
    def append(
        self, text: str, num_tokens: int, extras: Any = None, token_id: int | None = None
    ) -> None:
        """Add a chunk at ``end``; ``UnicodeEncodeError`` for text that is not valid UTF-8."""

    @abstractmethod
    def read(self, pos: int) -> list[Chunk]:
        """Chunks from ``pos`` on; ``StreamGoneError`` if some were evicted or released."""

    @abstractmethod
    def hold_from(self, pos: int | None) -> None:
        """The slowest live reader has delivered everything before ``pos`` (None: no live
        reader). Text from ``pos`` on is kept whatever the bounds; text before it may go."""

    @property
    @abstractmethod
    def must_pause(self) -> bool:
        """The text held for live readers is past a bound: stop producing until they read."""


class StreamStore(ABC):
    @abstractmethod
    def create(self, stream_id: str, *, resumable: bool) -> ReplayBuffer:
        """A new, empty buffer. A non-resumable one releases what its readers delivered."""

    @abstractmethod
    def discard(self, stream_id: str) -> None:
        """Forget a stream's buffer (ended, expired, or never started)."""

    @abstractmethod
    def __contains__(self, stream_id: object) -> bool: ...


class _MemoryBuffer(ReplayBuffer):
    # A list, not a deque: a deque allocates a 64-slot block up front, the biggest single
    # object of a stream that holds a few unread chunks. Released chunks are cut off the
    # front in one slice per event.
    __slots__ = (
        "_chunks",
        "_floor",
        "_start",
        "_store",
        "evicted",
        "held_bytes",
        "nbytes",
        "resumable",
        "stream_id",
    )

    def __init__(self, stream_id: str, store: InMemoryStreamStore, resumable: bool):
        self.stream_id = stream_id
        self.resumable = resumable
        self._store = store
        self._chunks: list[Chunk] = []
        self._start = 0
        #: The slowest live reader's position; None while no reader is attached.
        self._floor: int | None = None
        #: All bytes held, and those at or after the floor (unread by some live reader).
        self.nbytes = 0
        self.held_bytes = 0
        self.evicted = False

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._start + len(self._chunks)

    def begin_at(self, pos: int) -> None:
        """An empty buffer whose first chunk will be at ``pos`` (a stream continued from a
        copy whose earlier text is no longer held)."""
        assert not self._chunks
        self._start = pos

    def append(
        self, text: str, num_tokens: int, extras: Any = None, token_id: int | None = None
    ) -> None:
        size = utf8_size(text)
        self._chunks.append(_new_chunk((text, num_tokens, size, extras, token_id)))
        self.nbytes += size
        store = self._store
        store.total_bytes += size
        if self._floor is not None:
            self.held_bytes += size
            store.held_bytes += size
        # Replay text makes room before any live stream is paused for memory.
        if store.total_bytes > store.max_total_bytes or (
            self.resumable and self.nbytes > store.max_stream_bytes
        ):
            store._evict(self)

    def read(self, pos: int) -> list[Chunk]:
        if pos < self._start:
            why = "evicted to bound memory" if self.evicted else "already delivered"
            raise StreamGoneError(
                f"stream {self.stream_id}: text before position {self._start} is no longer "
                f"buffered ({why}); start a new request"
            )
        return self._chunks[pos - self._start :]

    def hold_from(self, pos: int | None) -> None:
        old, before = self._floor, self.held_bytes
        self._floor = pos
        if pos is None:
            self.held_bytes = 0
        elif old is None or pos < old:
            self.held_bytes = sum(c.nbytes for c in self._chunks[max(0, pos - self._start) :])
        elif pos > old:
            start = self._start
            moved = sum(c.nbytes for c in self._chunks[old - start : pos - start])
            self.held_bytes -= moved
            if not self.resumable and old == start:
                # The usual step of a live stream: its reader delivered the next event, and
                # what it delivered is exactly what goes (summed once: once per event).
                self._store.held_bytes -= moved
                self._drop_before(pos, moved)
                return
        self._store.held_bytes += self.held_bytes - before
        if pos is not None and not self.resumable:
            self._drop_before(pos)

    @property
    def must_pause(self) -> bool:
        held = self.held_bytes
        store = self._store
        return held > store.max_stream_bytes or (
            held > 0 and store.total_bytes > store.max_total_bytes
        )

    def evict_front(self, target_bytes: int) -> None:
        """Drop the oldest text no live reader needs until at most ``target_bytes`` remain."""
        limit = len(self._chunks) if self._floor is None else self._floor - self._start
        excess = self.nbytes - target_bytes
        count = 0
        while excess > 0 and count < limit:
            excess -= self._chunks[count].nbytes
            count += 1
        if count:
            self.evicted = True
            self._drop_before(self._start + count)

    def _drop_before(self, pos: int, freed: int | None = None) -> None:
        count = min(pos - self._start, len(self._chunks))
        if count <= 0:
            return
        if freed is None:
            freed = sum(chunk.nbytes for chunk in self._chunks[:count])
        del self._chunks[:count]
        self._start += count
        self.nbytes -= freed
        self._store.total_bytes -= freed


class InMemoryStreamStore(StreamStore):
    """Process-local store. ``max_stream_bytes`` bounds one stream, ``max_total_bytes`` all."""

    def __init__(self, *, max_stream_bytes: int = 4 << 20, max_total_bytes: int = 256 << 20):
        if max_stream_bytes < 1 or max_total_bytes < max_stream_bytes:
            raise ValueError("need 0 < max_stream_bytes <= max_total_bytes")
        self.max_stream_bytes = max_stream_bytes
        self.max_total_bytes = max_total_bytes
        self.total_bytes = 0
        #: Of those, the bytes some live reader has not delivered yet (never evicted).
        self.held_bytes = 0
        # Insertion order = age: the oldest resumable streams lose their replay text first.
        self._buffers: dict[str, _MemoryBuffer] = {}
        self._resumable: dict[str, _MemoryBuffer] = {}

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._buffers

    def create(self, stream_id: str, *, resumable: bool) -> ReplayBuffer:
        buffer = self._new_buffer(stream_id, resumable)
        self._buffers[stream_id] = buffer
        if resumable:
            self._resumable[stream_id] = buffer
        return buffer

    def _new_buffer(self, stream_id: str, resumable: bool) -> _MemoryBuffer:
        """The buffer ``create`` registers (a store that persists streams makes its own)."""
        return _MemoryBuffer(stream_id, self, resumable)

    def discard(self, stream_id: str) -> None:
        buffer = self._buffers.pop(stream_id, None)
        self._resumable.pop(stream_id, None)
        if buffer is not None:
            self.total_bytes -= buffer.nbytes
            self.held_bytes -= buffer.held_bytes

    def _evict(self, buffer: _MemoryBuffer) -> None:
        """A resumable ``buffer`` grew past its bound, or all buffers past theirs (whichever
        appended): drop the oldest replay text that no live reader needs (only resumable
        streams keep any)."""
        if buffer.resumable and buffer.nbytes > self.max_stream_bytes:
            buffer.evict_front(self.max_stream_bytes // 2)
        # Scanned only while some text is evictable: under pressure from unread text alone,
        # every append would otherwise walk all resumable streams for nothing.
        if self.total_bytes > self.max_total_bytes and self.total_bytes > self.held_bytes:
            for oldest in list(self._resumable.values()):
                oldest.evict_front(0)
                if self.total_bytes <= self.max_total_bytes * 3 // 4:
                    break
