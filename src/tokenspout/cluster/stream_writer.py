"""Write-behind of this replica's resumable streams to Redis.

A stream's record (``open``) is written before its response starts, one round trip on
the request's path, so that every replica knows the id its client was just given. After
that, the per-token path never waits on Redis: an append to a persisted buffer only notes
the stream as dirty (``touched``: a set insertion) and wakes the writer task. The writer
takes every dirty stream's chunks after what it has persisted, one entry per stream, and
writes them all in one round trip (one pipeline: the records that could not be written at
open, then one script that checks ownership and appends), at most every ``FLUSH_EVERY_S``
(20 ms); while a round trip is in flight, new tokens accumulate for the next one: batches
grow with the load, as a group commit does.

What can be lost: if this process dies, the text produced since the last completed flush
(the ``tokenspout_redis_write_lag_seconds`` histogram: how old the oldest unwritten token
was when its flush completed; the writer's whole window). A takeover continues from what
Redis has, so a client never sees a hole: it may see text again only where that window's
text was sampled (a greedy or synthetic continuation is the same text).

While Redis is unreachable, nothing is queued: the text stays in the streams' own buffers.
When Redis answers again the writer asks it where each stream stands (it may have
restarted empty) and writes what is missing from memory; a stream whose missing text was
evicted meanwhile is marked gone (resumes get 410 with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline

from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.chunk_codec import chunk_items
from tokenspout.cluster.redis_link import LOST, RedisLink, execute
from tokenspout.cluster.stream_record import StreamRecord
from tokenspout.errors import StreamGoneError
from tokenspout.streaming.stream import Stream, StreamEnd

logger = logging.getLogger("tokenspout.cluster")

#: A running stream's keys expire after this long without an end (an owner that died with
#: no replica left to take over must not leave them forever).
RUNNING_TTL_S = 3600.0
#: The writer writes at most this often: what a replica's death can lose is about this
#: plus one round trip to Redis.
FLUSH_EVERY_S = 0.02
#: How long a stopping replica keeps writing its streams' last outputs.
_STOP_FLUSH_S = 2.0

# ARGV[5] is a JSON list of [stream id, op, end position, data]: for each stream, check
# that this replica owns it and append its entry ("a": data is the chunks, encoded again
# for the entry), or at its end ("e", or "g" when its text is lost: data is the payload)
# add the end entry, mark the record, set the keys' lifetime and leave the id's tombstone
# (ARGV[6]: how long it outlives them). One argument for the
# whole batch: packing thousands of arguments was most of the writer's CPU. Returns, per
# stream, 1 written, 0 not ours (taken over), x refused (an entry at that position
# exists), as one string of "1", "0" and "x" (parsed at once, not as a reply per stream).
# Key names are built here, so this needs one Redis (not Redis Cluster).
_APPEND = """
local me, maxlen = ARGV[1], ARGV[2]
local running_ms, ended_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local ops = cjson.decode(ARGV[5])
local expired_ms = tonumber(ARGV[6])
local owned = KEYS[1]
local out = {}
for i, o in ipairs(ops) do
  local id, op, entry_end, data = o[1], o[2], o[3], o[4]
  local skey, mkey = PREFIX .. 's:' .. id, PREFIX .. 'm:' .. id
  if redis.call('HGET', mkey, 'replica') ~= me then
    out[i] = '0'
  else
    local field, entry, payload = op, string.format('%d-1', entry_end), data
    if op == 'a' then
      field, entry, payload = 'c', string.format('%d-0', entry_end), cjson.encode(data)
    end
    local added = redis.pcall('XADD', skey, 'MAXLEN', '~', maxlen, entry, field, payload)
    if type(added) == 'table' and added.err then
      out[i] = 'x'
    else
      out[i] = '1'
      if op == 'a' then
        if redis.call('PTTL', skey) < 0 then redis.call('PEXPIRE', skey, running_ms) end
      else
        if op == 'g' then
          redis.call('HSET', mkey, 'state', 'gone', 'why', payload)
        else
          redis.call('HSET', mkey, 'state', 'ended')
        end
        redis.call('SREM', owned, id)
        redis.call('PEXPIRE', skey, ended_ms)
        redis.call('PEXPIRE', mkey, ended_ms)
        local key = redis.call('HGET', mkey, 'key') or ''
        redis.call('SET', PREFIX .. 'x:' .. id, key, 'PX', ended_ms + expired_ms)
      end
    end
  end
end
return table.concat(out)
""".replace("PREFIX", repr(rk.PREFIX))


def end_payload(end: StreamEnd) -> str:
    err = end.error
    error = None if err is None else [err.code, err.message]
    data = {"f": end.finish_reason, "p": end.prompt_tokens, "c": end.completion_tokens}
    return json.dumps({**data, "e": error})


@dataclass(eq=False, slots=True)
class _Tracked:
    stream: Stream
    record: StreamRecord
    #: Position up to which Redis has the chunks.
    persisted: int = 0
    #: Its record is in Redis.
    opened: bool = False
    #: Handed over (``release``): its chunks are written, its end (``stream_moved``) never.
    leaving: bool = False
    #: Another replica's engine can go on with it (``continuation_refusal``): it is handed
    #: over; one that cannot be ends here, with the drain's error.
    continuable: bool = True


class WriterMetrics:
    def __init__(self, registry: CollectorRegistry, link: RedisLink, writer: StreamWriter):
        up = Gauge("tokenspout_redis_up", "1 while this replica reaches Redis.", registry=registry)
        up.set_function(lambda: 1.0 if link.up else 0.0)
        self.lag = Histogram(
            "tokenspout_redis_write_lag_seconds",
            "Age of the oldest unwritten token when its write to Redis completed (what a "
            "replica's death can lose).",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=registry,
        )
        pending = Gauge(
            "tokenspout_redis_write_pending_seconds",
            "Age of the oldest token not yet written to Redis (0 when all are).",
            registry=registry,
        )
        pending.set_function(writer.pending_s)
        self.gone = Counter(
            "tokenspout_redis_streams_gone",
            "Streams marked not resumable: text missing in Redis was no longer in memory.",
            registry=registry,
        )


class StreamWriter:
    """See the module docstring. ``start`` runs it; ``touched`` is the per-append hook."""

    def __init__(
        self,
        link: RedisLink,
        replica: str,
        registry: CollectorRegistry,
        *,
        ended_ttl_s: float,
        max_entries: int = 20_000,
    ):
        self._link = link
        self._replica = replica
        self._ended_ms = max(1, math.ceil(ended_ttl_s * 1000))
        self._max_entries = max_entries
        self._tracked: dict[str, _Tracked] = {}
        self._dirty: set[str] = set()
        self._dirty_since: float | None = None
        self._wake = asyncio.Event()
        #: One flush at a time: two would read a stream from the same persisted position and
        #: write overlapping entries (the later one refused). The writer task flushes, and a
        #: stopping replica's ``stop`` and ``release``.
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.metrics = WriterMetrics(registry, link, self)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write what is pending (if Redis answers: the ends of the streams the shutdown
        just cancelled come within a few loop turns), then stop."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        deadline = time.monotonic() + _STOP_FLUSH_S
        while self._tracked and self._link.up and time.monotonic() < deadline:
            with contextlib.suppress(*LOST):
                await self._flush()
            await asyncio.sleep(0.01)

    # -- what the streams tell it --------------------------------------------------------

    async def open(self, stream: Stream, record: StreamRecord, *, continuable: bool) -> None:
        """A stream opened here: its record goes to Redis now, before its response starts,
        so that any replica knows its id as soon as its client does (a resume or cancel
        sent elsewhere right after the first event is not a 404). Its chunks follow behind.
        With Redis lost, the record is written with the chunks when it is back.
        ``continuable``: ``release`` hands it over."""
        opened = False
        if self._link.up:
            pipe = self._link.client.pipeline(transaction=False)
            self._open_record(pipe, record)
            try:
                await execute(pipe)
                opened = True
            except LOST as exc:
                self._link.lost(exc)
            except Exception:
                logger.exception("stream %s: writing its record failed; the writer retries",
                                 stream.id)  # fmt: skip
        self.track(stream, record, opened=opened, continuable=continuable)

    def _open_record(self, pipe: Pipeline, record: StreamRecord) -> None:
        meta = rk.meta(record.stream_id)
        pipe.hset(meta, mapping=record.fields())
        pipe.pexpire(meta, int(RUNNING_TTL_S * 1000))
        pipe.sadd(rk.owned(self._replica), record.stream_id)

    def track(
        self,
        stream: Stream,
        record: StreamRecord,
        *,
        persisted: int = 0,
        opened: bool = False,
        continuable: bool = True,
    ) -> None:
        """Persist ``stream`` from now on; ``persisted``: Redis has its chunks up to there
        (and with ``opened`` its record: a stream taken over)."""
        self._tracked[stream.id] = _Tracked(
            stream, record, persisted, opened, continuable=continuable
        )
        self.touched(stream.id)

    def touched(self, stream_id: str) -> None:
        """A chunk was appended, or the stream ended (the per-token path: no I/O)."""
        dirty = self._dirty
        if stream_id not in dirty:
            if not dirty:
                self._dirty_since = time.monotonic()
                self._wake.set()
            dirty.add(stream_id)

    def writes(self, stream_id: str) -> bool:
        """Whether this writer persists ``stream_id`` (a shared stream of this replica)."""
        return stream_id in self._tracked

    def movable(self, stream: Stream) -> bool:
        """Whether ``release`` would hand ``stream`` over: written here, running, and one
        another replica can go on with."""
        tracked = self._tracked.get(stream.id)
        return tracked is not None and tracked.continuable and not stream.finished

    def untrack(self, stream_id: str) -> None:
        self._tracked.pop(stream_id, None)

    async def release(
        self, streams: list[Stream], end: Callable[[Stream], None], timeout_s: float
    ) -> list[Stream]:
        """A stopping replica gives ``streams`` (its running ones) to the others. Each that
        it writes and that ``movable`` takes is stopped here first (``moved_away``: the
        engine lets it go, and its HTTP readers' connections are cut, for their clients to
        resume where it goes on), then written to its last chunk, without its end, and no
        longer written here; the others it writes (no other replica could go on with them)
        are ended here by ``end``, and written with their end. Both before the others are
        told to claim this replica's streams: one still running in Redis would be claimed,
        and given up. Returns the streams it handed over. One whose chunks Redis did not
        take within ``timeout_s`` goes on elsewhere from what Redis has, as after a death."""
        mine = [self._tracked[s.id] for s in streams if self.writes(s.id) and not s.finished]
        for tracked in mine:
            if tracked.continuable:
                tracked.leaving = True
                tracked.stream.moved_away("this one stopped and handed it over")
            else:
                end(tracked.stream)
        stopped = [tracked.stream for tracked in mine if tracked.leaving]
        deadline = time.monotonic() + timeout_s
        while mine and self._link.up and time.monotonic() < deadline:
            try:
                await self._flush()
            except LOST as exc:
                self._link.lost(exc)
                break
            behind = []
            for tracked in mine:
                stream = tracked.stream
                if self._tracked.get(stream.id) is not tracked:
                    continue  # its end is written, or another replica has it already
                if tracked.leaving and stream.finished and tracked.persisted == stream.length:
                    self.untrack(stream.id)  # all of it is there: the others go on from it
                else:
                    behind.append(tracked)
            mine = behind
            if mine:
                # An engine's last outputs come after its next step; Redis may be slow.
                await asyncio.sleep(FLUSH_EVERY_S)
        for tracked in mine:
            if tracked.leaving:
                logger.warning("stream %s: handed over with chunks not written", tracked.stream.id)
                self.untrack(tracked.stream.id)
        return stopped

    def pending_s(self) -> float:
        since = self._dirty_since
        return 0.0 if since is None else time.monotonic() - since

    # -- the writer task -----------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            await self._wake.wait()
            # A group commit: at most one write every FLUSH_EVERY_S, so that a batch holds
            # a few tokens per stream (each stream's entry costs more than its tokens).
            wait = last + FLUSH_EVERY_S - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            last = loop.time()
            self._wake.clear()
            if not self._link.up:
                continue  # resync() runs when it is back
            try:
                await self._flush()
            except LOST as exc:
                self._link.lost(exc)
            except Exception:
                logger.exception("the Redis writer failed; it goes on with the next batch")

    async def _flush(self) -> None:
        async with self._flushing:
            await self._flush_dirty()

    async def _flush_dirty(self) -> None:
        ids, self._dirty = self._dirty, set()
        since, self._dirty_since = self._dirty_since, None
        try:
            done = await self._write(ids)
        except BaseException:
            # Nothing was acknowledged: all of it is still to write.
            self._dirty |= ids
            self._dirty_since = since if self._dirty_since is None else self._dirty_since
            raise
        if since is not None and done:
            self.metrics.lag.observe(time.monotonic() - since)

    async def _write(self, ids: set[str]) -> bool:
        pipe = self._link.client.pipeline(transaction=False)
        batch: list[list[Any]] = []
        ops: list[tuple[_Tracked, int, str]] = []
        opening: list[_Tracked] = []
        tracked_streams = self._tracked
        for stream_id in ids:
            tracked = tracked_streams.get(stream_id)
            if tracked is None:
                continue
            if not tracked.opened:
                self._open_record(pipe, tracked.record)
                opening.append(tracked)
            stream = tracked.stream
            try:
                chunks = stream.read(tracked.persisted)
            except StreamGoneError as err:
                batch.append([stream_id, "g", stream.length, err.message])
                ops.append((tracked, stream.length, "g"))
                continue
            end = tracked.persisted + len(chunks)
            if chunks:
                batch.append([stream_id, "a", end, chunk_items(chunks)])
                ops.append((tracked, end, "a"))
            if stream.end is not None and end >= stream.length:
                ended = stream.end
                if tracked.leaving:
                    if ended.finish_reason in (None, "cancelled"):
                        continue  # stopped by the hand-over: another replica ends it
                    # It ended by itself before the hand-over stopped it: all of it is here.
                    ended = dataclasses.replace(ended, error=None)
                batch.append([stream_id, "e", end, end_payload(ended)])
                ops.append((tracked, end, "e"))
        if not ops and not len(pipe):
            return False
        if ops:
            args = [self._replica, str(self._max_entries), str(int(RUNNING_TTL_S * 1000))]
            args += [str(self._ended_ms), json.dumps(batch, ensure_ascii=False)]
            args.append(str(rk.EXPIRED_KEPT_S * 1000))
            # EVAL, not EVALSHA: redis-py's pipeline asks SCRIPT EXISTS before each
            # EVALSHA (a round trip per flush); Redis caches the compiled script anyway.
            pipe.eval(_APPEND, 1, rk.owned(self._replica), *args)
        results = await execute(pipe)
        for tracked in opening:
            tracked.opened = True
        self._settle(ops, results[-1].decode() if ops else "")
        return True

    def _settle(self, ops: list[tuple[_Tracked, int, str]], results: str) -> None:
        for (tracked, end, op), result in zip(ops, results, strict=True):
            stream_id = tracked.stream.id
            if result == "1":
                tracked.persisted = end
                if op != "a":
                    self.untrack(stream_id)
                if op == "g":
                    self.metrics.gone.inc()
                    logger.warning("stream %s: not resumable any more (text lost)", stream_id)
            elif result == "0":
                self._taken_over(tracked.stream)
            else:
                logger.warning("stream %s: not written to Redis (position taken)", stream_id)
                self.untrack(stream_id)

    def _taken_over(self, stream: Stream) -> None:
        """Another replica took the stream over (this one was cut off from Redis, or
        stopped, longer than its lease): it goes on there, and only there."""
        logger.warning("stream %s: taken over by another replica; stopped here", stream.id)
        self.untrack(stream.id)
        stream.moved_away()

    async def resync(self) -> None:
        """Redis answers again: find where each stream stands there, and write the rest."""
        tracked = list(self._tracked.values())
        if not tracked:
            return
        pipe = self._link.client.pipeline(transaction=False)
        for t in tracked:
            pipe.hget(rk.meta(t.stream.id), "replica")
            pipe.xrevrange(rk.stream(t.stream.id), count=1)
        try:
            answers = await execute(pipe)
        except LOST as exc:
            self._link.lost(exc)
            return
        for i, t in enumerate(tracked):
            owner, last = answers[2 * i], answers[2 * i + 1]
            if owner is None:
                # Redis lost it (restarted empty): write it again from the start.
                t.opened, t.persisted = False, 0
            elif owner.decode() != self._replica:
                self._taken_over(t.stream)
                continue
            else:
                t.persisted = rk.entry_end(last[0][0])[0] if last else 0
            self.touched(t.stream.id)
        self._wake.set()
