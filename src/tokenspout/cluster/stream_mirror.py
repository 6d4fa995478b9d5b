"""A stream generated on another replica, read here: a local ``Stream`` fed from Redis.

A resume that reaches a replica which does not generate the stream opens a mirror: the
stream's chunks so far from Redis, then a task that follows the Redis Stream (``XREAD
BLOCK``) and hands each new chunk to the local ``Stream`` as an engine would. Every reader
on this replica then reads it as it reads any stream (formats, coalescing, heartbeats,
event ids). When the owner dies and another replica takes over, the entries simply go on
at the next positions. The mirror ends at the end entry, or when its last reader leaves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.chunk_codec import decode_chunks
from tokenspout.cluster.mirror_feed import MirrorFeed
from tokenspout.cluster.stream_record import StreamRecord
from tokenspout.engine.request import EngineOutput
from tokenspout.errors import EngineError
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_store import InMemoryStreamStore

logger = logging.getLogger("tokenspout.cluster")

Entry = tuple[bytes, dict[bytes, bytes]]


class StreamMirror:
    """Create, then ``start`` with the entries read so far; ``stream`` is what readers
    subscribe to. Followed by the replica's ``MirrorFeed``."""

    def __init__(
        self,
        feed: MirrorFeed,
        record: StreamRecord,
        store: InMemoryStreamStore,
        on_end: Callable[[Stream], None],
    ):
        self._feed = feed
        self._record = record
        self.key = rk.stream(record.stream_id)
        #: The last entry taken, and whether the feed reads on (its readers keep up).
        self.last = b"0-0"
        self.running = True
        self._buffer = store.create(record.stream_id, resumable=True)
        self.stream = Stream(
            record.stream_id,
            self._buffer,
            prompt_tokens=record.prompt_tokens,
            abort=self._abort,
            pause=self._pause,
            resume=self._resume,
            resumable=True,
            # Its last reader gone, a mirror stops at once (the owner goes on).
            resume_grace_s=0.0,
            on_end=on_end,
            owner=record.key or None,
            meta=record.wire,
        )
        self.stream.created = record.created
        self.stream.positions_ahead = True

    def start(self, entries: list[Entry]) -> None:
        """Take the entries read so far, then follow the rest."""
        if entries and b"c" in entries[0][1]:
            # Redis keeps a bounded length: the oldest entries may be gone.
            end, _ = rk.entry_end(entries[0][0])
            self._buffer.begin_at(end - len(decode_chunks(entries[0][1][b"c"])))
        for entry_id, fields in entries:
            self.take(entry_id, fields)
            self.last = entry_id
        if not self.stream.finished:
            self._feed.add(self)

    def take(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """One entry of the Redis stream: chunks (those not held yet), or the end."""
        stream = self.stream
        if stream.finished:
            return
        record = self._record
        end, final = rk.entry_end(entry_id)
        if b"c" in fields:
            chunks = decode_chunks(fields[b"c"])
            first = end - len(chunks)
            if first > stream.length:
                self._fail(f"text at positions {stream.length} to {first} is no longer in Redis")
                return
            for text, tokens, extras, token_id in chunks[stream.length - first :]:
                stream.receive(
                    EngineOutput(text, tokens, record.prompt_tokens, 0, None, extras, token_id)
                )
        elif b"e" in fields:
            data: dict[str, Any] = json.loads(fields[b"e"])
            if data["e"] is not None:
                code, message = data["e"]
                stream.receive(EngineError(message, code=code))
            else:
                stream.receive(EngineOutput("", 0, data["p"], data["c"], data["f"]))
        elif b"g" in fields:
            self._fail(fields[b"g"].decode())
        elif final:
            logger.warning("stream %s: unknown end entry %r", stream.id, entry_id)
        if stream.finished:
            self._feed.remove(self)

    def _fail(self, why: str) -> None:
        message = f"stream {self.stream.id} cannot be resumed: {why}"
        self.stream.receive(EngineError(message, code="stream_gone"))

    def _pause(self, _stream_id: str) -> None:
        self.running = False

    def _resume(self, _stream_id: str) -> None:
        self.running = True
        self._feed.wake()

    def _abort(self, _stream_id: str) -> bool:
        """The last reader left: stop following, and end the local copy only."""
        self._feed.remove(self)
        stream = self.stream
        stream.loop.call_soon(
            stream.receive, EngineOutput("", 0, stream.prompt_tokens, 0, "cancelled")
        )
        return True
