"""All streams by id: open, find, cancel, and forget when they are over.

A non-resumable stream is forgotten as soon as it ends. A resumable one stays replayable
for ``resume_ttl_s`` after its end; after that its id is remembered (boundedly) as expired,
with its owner, so that a late resume with the same key gets 410 with a clear message
rather than 404 (and another key the 404 of an unknown id).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenspout.engine.interface import Engine, OutputSink
from tokenspout.engine.request import EngineOutput, Prompt, SamplingParams
from tokenspout.errors import (
    EngineError,
    StreamGoneError,
    StreamMovedError,
    StreamNotFoundError,
)
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_group import StreamGroup
from tokenspout.streaming.stream_store import InMemoryStreamStore, StreamStore
from tokenspout.streaming.wake_timers import WakeTimers

_EXPIRED_IDS_KEPT = 10_000


def new_stream_id() -> str:
    """Short, unguessable: knowing an id is what lets a client cancel or resume a stream."""
    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class Continued:
    """A stream begun elsewhere: its id, its chunks so far (from ``start``), and the counts
    its outputs carry on from."""

    stream_id: str
    history: list[tuple[str, int, Any, int | None]]
    start: int
    #: The request's prompt tokens; 0 when they were not known where it began (an engine
    #: that does not tokenize learns them from its server's usage, after the stream's record
    #: was written): then learned from the continuation's outputs.
    prompt_tokens: int
    completion_tokens: int
    created: float

    def prepare(self, stream: Stream) -> OutputSink:
        """Fill ``stream`` with the history; the sink for the engine's outputs, whose
        counts continue the history's."""
        stream.created = self.created
        stream.positions_ahead = True
        stream.load(self.start, self.history)
        prompt_tokens, before = self.prompt_tokens, self.completion_tokens
        receive = stream.receive

        def sink(item: EngineOutput | EngineError) -> None:
            if isinstance(item, EngineOutput):
                item = item._replace(
                    # The continuation's prompt holds the answer's tokens so far, which come
                    # off (as the upstream relay's own failover counts them).
                    prompt_tokens=prompt_tokens or max(0, item.prompt_tokens - before),
                    completion_tokens=before + item.completion_tokens,
                )
            receive(item)

        return sink


@dataclass(frozen=True)
class ResumePolicy:
    """How long streams wait for a reader and stay replayable."""

    grace_s: float = 30.0
    ttl_s: float = 300.0


class StreamRegistry:
    """Owns ``Stream`` objects. ``on_end`` is told about every stream that ends."""

    def __init__(
        self,
        engine: Engine,
        *,
        store: StreamStore | None = None,
        resume: ResumePolicy | None = None,
        on_end: Callable[[Stream], None] | None = None,
        read_elsewhere: Callable[[str], Awaitable[bool]] | None = None,
    ):
        self._engine = engine
        self._read_elsewhere = read_elsewhere
        self._store = store or InMemoryStreamStore()
        self._resume = resume or ResumePolicy()
        self._streams: dict[str, Stream] = {}
        #: The groups of streams of requests with ``n > 1``, while their reader reads them.
        self._groups: dict[str, StreamGroup] = {}
        self._timers = WakeTimers()
        #: Expired ids and the owner of each (see ``find``).
        self._expired: OrderedDict[str, str | None] = OrderedDict()
        self._on_end = on_end
        #: Set whenever a reader detaches from any stream.
        self._reader_left = asyncio.Event()
        # Counted, not scanned: admission asks on every request, with thousands open.
        self._generating = 0

    def __len__(self) -> int:
        """Streams still generating (finished ones kept for replay do not count)."""
        return self._generating

    def open(
        self,
        prompt: Prompt | None,
        params: SamplingParams,
        *,
        resumable: bool = False,
        owner: str | None = None,
        meta: Any = None,
        continued: Continued | None = None,
    ) -> Stream:
        """Start generating now; the stream is findable by id until it is over. ``meta`` is
        kept with the stream for its readers (see ``Stream.meta``). ``continued``: the stream
        is one begun elsewhere (another replica's), continued here under its own id with its
        text so far (None ``prompt``: nothing is left to generate). Raises what the engine's
        ``submit`` raises, leaving nothing behind."""
        stream_id = new_stream_id() if continued is None else continued.stream_id
        engine = self._engine
        if continued is not None:
            prompt_tokens = continued.prompt_tokens
        else:
            assert prompt is not None
            prompt_tokens = prompt.num_tokens
        stream = Stream(
            stream_id,
            self._store.create(stream_id, resumable=resumable),
            prompt_tokens=prompt_tokens,
            abort=engine.abort,
            pause=engine.pause,
            resume=engine.resume,
            resumable=resumable,
            resume_grace_s=self._resume.grace_s,
            on_end=self._ended,
            on_reader_left=self._reader_left_stream,
            timers=self._timers,
            owner=owner,
            meta=meta,
            read_elsewhere=self._read_elsewhere,
        )
        sink = stream.receive if continued is None else continued.prepare(stream)
        try:
            if prompt is not None:
                engine.submit(stream_id, prompt, params, sink)
        except BaseException:
            self._store.discard(stream_id)
            raise
        self._streams[stream_id] = stream
        self._generating += 1
        return stream

    def open_group(
        self,
        prompt: Prompt,
        params: Sequence[SamplingParams],
        *,
        owner: str | None = None,
        meta: Any = None,
    ) -> StreamGroup:
        """One stream per ``params`` (a request's choices), not resumable, read as one
        ``StreamGroup`` that is findable by its own id while it is read. Raises what
        ``open`` raises, leaving nothing behind."""
        streams: list[Stream] = []
        try:
            for choice in params:
                streams.append(self.open(prompt, choice, owner=owner, meta=meta))
        except BaseException:
            for stream in streams:
                stream.abort("error")
            raise
        group = StreamGroup(new_stream_id(), streams, on_closed=self._group_closed)
        self._groups[group.id] = group
        return group

    def get(self, stream_id: str) -> Stream | StreamGroup:
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        group = self._groups.get(stream_id)
        if group is not None:
            return group
        if stream_id in self._expired:
            raise StreamGoneError.expired(stream_id, self._resume.ttl_s)
        raise StreamNotFoundError(f"no stream with id {stream_id!r}")

    def find(self, stream_id: str, owner: str | None) -> Stream | StreamGroup:
        """``get`` for the holder of ``owner``'s key: a stream of another owner, live or
        expired, is not found, exactly like an id that was never issued."""
        stream = self._streams.get(stream_id) or self._groups.get(stream_id)
        if stream is not None and stream.owner == owner:
            return stream
        if stream is None and stream_id in self._expired and self._expired[stream_id] == owner:
            return self.get(stream_id)  # raises StreamGoneError
        raise StreamNotFoundError(f"no stream with id {stream_id!r}")

    def cancel(self, stream_id: str) -> Stream | StreamGroup:
        """Cancel a running stream by id (a finished one is left as it is)."""
        stream = self.get(stream_id)
        stream.cancel()
        return stream

    def abort_all(self, reason: str) -> None:
        for stream in list(self._streams.values()):
            stream.abort(reason)

    def running(self) -> list[Stream]:
        return [s for s in self._streams.values() if not s.finished]

    async def wait_readers_gone(self, timeout_s: float) -> None:
        """Until no stream has a reader, or ``timeout_s`` (a drain's last step: readers of
        ended streams send their end, then detach). Polled: it runs once per process."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while any(s.readers for s in self._streams.values()):
                    self._reader_left.clear()
                    await self._reader_left.wait()

    def _ended(self, stream: Stream) -> None:
        self._generating -= 1
        if self._on_end is not None:
            self._on_end(stream)
        loop = asyncio.get_running_loop()
        if stream.end is not None and isinstance(stream.end.error, StreamMovedError):
            # Generated on another replica now: a resume here reads that one's copy (Redis).
            self._streams.pop(stream.id, None)
            loop.call_later(self._resume.ttl_s, self._store.discard, stream.id)
        elif stream.resumable:
            loop.call_later(self._resume.ttl_s, self._expire, stream)
        elif not stream.readers:
            self._forget(stream.id)
        # Otherwise forgotten when its last reader has read the end (_reader_left_stream):
        # until then the log still holds that reader's text.

    def _group_closed(self, group: StreamGroup) -> None:
        self._groups.pop(group.id, None)

    def _reader_left_stream(self, stream: Stream) -> None:
        self._reader_left.set()
        if stream.finished and not stream.resumable and not stream.readers:
            self._forget(stream.id)

    def _forget(self, stream_id: str) -> None:
        self._streams.pop(stream_id, None)
        self._store.discard(stream_id)

    def _expire(self, stream: Stream) -> None:
        self._forget(stream.id)
        self._expired[stream.id] = stream.owner
        if len(self._expired) > _EXPIRED_IDS_KEPT:
            self._expired.popitem(last=False)
