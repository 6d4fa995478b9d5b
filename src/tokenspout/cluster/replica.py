"""This process as one replica among several sharing streams through Redis.

It owns the Redis link and everything that uses it: the write-behind of this replica's
resumable streams (``StreamWriter``), mirrors of streams generated elsewhere
(``StreamMirror``), cancels by pub/sub, shared admission, and the lease. The lease is a
score in ``replicas`` (its expiry on Redis's clock), refreshed every second; every replica
looks, at each refresh, for replicas whose lease lapsed, and claims their unfinished
streams one by one in a script (``_CLAIM``: the stream leaves the dead replica's set and
joins the claimer's atomically, so exactly one replica takes each) and continues them
(``Takeover``). A replica that stops (SIGTERM) hands the streams its drain did not see
end over to the others the same way: it stops them, writes them to their last chunk, and
ends its lease at once (``hand_over``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.mirror_feed import MirrorFeed
from tokenspout.cluster.persisted_store import PersistedStreamStore
from tokenspout.cluster.redis_link import LOST, RedisLink, execute
from tokenspout.cluster.shared_admission import SharedAdmission
from tokenspout.cluster.stream_mirror import StreamMirror
from tokenspout.cluster.stream_record import GONE, StreamRecord
from tokenspout.cluster.stream_writer import StreamWriter
from tokenspout.cluster.takeover import Takeover
from tokenspout.errors import StreamGoneError, StreamNotFoundError, TokenspoutError
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_store import InMemoryStreamStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tokenspout.server.config import ServerConfig
    from tokenspout.server.generation_request import GenerationRequest
    from tokenspout.server.server_state import ServerState

logger = logging.getLogger("tokenspout.cluster")

#: The lease is refreshed this often and lapses after LEASE_TTL_S without a refresh.
LEASE_EVERY_S = 1.0
LEASE_TTL_S = 3.0
#: How long a stopping replica waits for Redis to take its handed-over streams' last chunks.
_RELEASE_S = 2.0
#: How long a stopping replica waits for its lease and cancel tasks to end: a cancel that
#: comes during a Redis call may be lost in it, and the task then ends at its next turn.
_STOP_TASKS_S = 2.0
#: The least time between a replica's drain mark and its look for others to hand over to:
#: replicas stopped together (a whole deployment) mark theirs within it, so none hands its
#: streams to another that is stopping too (which then took them nowhere).
_SETTLE_S = 0.5

_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

# KEYS: replicas, owned(dead), owned(me), meta(id); ARGV: dead, me, id. 1 if claimed.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if lease and tonumber(lease) > now then return 0 end
if redis.call('SREM', KEYS[2], ARGV[3]) == 0 then return 0 end
if redis.call('HGET', KEYS[4], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[4], 'replica', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

# KEYS: replicas; ARGV: me. The other replicas whose lease has not lapsed and that are not
# draining themselves.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local others = {}
for _, replica in ipairs(live) do
  if replica ~= ARGV[1] and redis.call('EXISTS', PREFIX .. 'd:' .. replica) == 0 then
    others[#others + 1] = replica
  end
end
return others
""".replace("PREFIX", repr(rk.PREFIX))

# KEYS: replicas, admission, owned(dead); ARGV: dead. A lapsed replica with nothing left
# to take over is forgotten.
_FORGET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (lease and tonumber(lease) > now) or redis.call('SCARD', KEYS[3]) > 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], 's:' .. ARGV[1], 'q:' .. ARGV[1])
return 1
"""


class Replica:
    """Built with the server's state (``ServerState``); ``start``/``stop`` in its lifespan."""

    def __init__(self, config: ServerConfig, registry: CollectorRegistry):
        assert config.redis_url is not None
        self.id = secrets.token_hex(6)
        self.link = RedisLink(config.redis_url, on_up=self._redis_back)
        self.writer = StreamWriter(self.link, self.id, registry, ended_ttl_s=config.resume_ttl_s)
        self._config = config
        self._mirror_store = InMemoryStreamStore(
            max_stream_bytes=config.max_stream_buffer_bytes,
            max_total_bytes=config.max_buffer_bytes,
        )
        self._mirrors: dict[str, StreamMirror] = {}
        self._feed = MirrorFeed(self.link)
        self._tasks: list[asyncio.Task[None]] = []
        #: Cancels heard for this replica's streams, while it checks it still owns them.
        self._cancelling: set[asyncio.Task[None]] = set()
        client = self.link.client
        self._lease = client.register_script(_LEASE)
        self._claim = client.register_script(_CLAIM)
        self._forget = client.register_script(_FORGET)
        self._live = client.register_script(_LIVE)
        self.takeovers = Counter(
            "tokenspout_stream_takeovers",
            "Streams of a replica whose lease lapsed, or that a stopping replica handed "
            "over, that this replica continued.",
            registry=registry,
        )
        self._takeovers_after = 0.0
        #: It handed its streams over and ended its lease (``hand_over``): never renewed.
        self._leaving = False
        #: When it marked itself draining (``drain_begins``).
        self._drain_marked_at = 0.0
        #: Another replica said it handed its streams over: the lease loop looks now.
        self._handed_over = asyncio.Event()
        self._state: ServerState | None = None
        self.admission: SharedAdmission | None = None

    def stream_store(self, **bounds: int) -> PersistedStreamStore:
        return PersistedStreamStore(self.writer.touched, **bounds)

    # -- life ----------------------------------------------------------------------------

    async def start(self, state: ServerState) -> None:
        self._state = state
        self.admission = SharedAdmission(
            self.link,
            self.id,
            max_streams=self._config.max_streams,
            max_queued=self._config.max_queued,
            generating=lambda: len(state.streams),
            queued=lambda: state.engine.stats().waiting,
        )
        await self._refresh_lease()
        self.writer.start()
        self._tasks = [
            asyncio.create_task(self._keep_lease()),
            asyncio.create_task(self._listen()),
        ]
        logger.info("replica %s: sharing streams through Redis at %s", self.id, self.link.address)

    async def stop(self) -> None:
        await self._stop_tasks()
        await self._feed.close()
        await self.writer.stop()
        if self.admission is not None:
            # Its counts (zero after the drain) count until it is forgotten.
            await self.admission.publish()
        # The lease is left to lapse (or ended by hand_over): a stream whose end could not
        # be written is then taken over, and a replica with nothing left is forgotten.
        await self.link.close()

    async def drain_begins(self, drain_s: float) -> None:
        """Tell the other replicas that this one drains: none hands its streams over to it
        (it would take them over no more)."""
        ttl_ms = int((drain_s + LEASE_TTL_S * 10) * 1000)
        self._drain_marked_at = time.monotonic()
        with contextlib.suppress(*LOST):
            await self.link.client.set(rk.draining(self.id), "1", px=ttl_ms)

    def cut_mirror_readers(self) -> None:
        """A drain's end: the readers here of streams generated elsewhere are cut without an
        end, for their clients to resume on another replica (they waited for uvicorn's
        last timeout, then were cancelled with a traceback)."""
        for mirror in list(self._mirrors.values()):
            mirror.stream.cut_readers("moved")

    async def hand_over(self, end: Callable[[Stream], None]) -> list[Stream]:
        """A drain's end: give this replica's running shared streams to the other replicas,
        and return them. Their readers here are cut, for their clients to resume elsewhere
        (``StreamWriter.release``); those the others could not go on with (constrained or
        echoed answers of the embedded engine) are ended here by ``end``, and written so,
        first. This replica then refreshes its lease no more and ends it, and says so on
        ``HANDED``, so that the others take the streams over at once, not a lease's time
        later. None without another live replica (one that is not draining too), or
        without Redis: the caller ends them as a lone server does."""
        if not self._movable() or not self.link.up:
            return []
        # A drain shorter than the settle (0 s, say) waits out the rest of it: the others
        # stopped at the same moment have marked themselves draining by then.
        settled = self._drain_marked_at + _SETTLE_S - time.monotonic()
        if settled > 0:
            await asyncio.sleep(settled)
        try:
            others = await self._live(keys=[rk.REPLICAS], args=[self.id])
        except LOST as exc:
            self.link.lost(exc)
            return []
        if not others:
            return []
        # The lease first: refreshed once more, it would outlive its end below.
        self._leaving = True
        await self._stop_tasks()
        # With any stream a takeover begun before the drain opened here meanwhile.
        assert self._state is not None
        running = self._state.streams.running()
        released = await self.writer.release(running, end, timeout_s=_RELEASE_S)
        if released:
            logger.info(
                "replica %s: handed %d stream(s) over to %d other replica(s)", self.id,
                len(released), len(others),
            )  # fmt: skip
            with contextlib.suppress(*LOST):
                # A score of 0 has lapsed: the others' next refresh lists this replica, and
                # the message makes them refresh now.
                pipe = self.link.client.pipeline(transaction=False)
                pipe.zadd(rk.REPLICAS, {self.id: 0})
                pipe.publish(rk.HANDED, self.id)
                await execute(pipe)
        return released

    def _movable(self) -> list[Stream]:
        """This replica's running streams that it could hand over (``StreamWriter.movable``)."""
        assert self._state is not None
        return [s for s in self._state.streams.running() if self.writer.movable(s)]

    async def _stop_tasks(self) -> None:
        """The lease's and the cancel channel's (see ``_STOP_TASKS_S``)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_STOP_TASKS_S)

    async def _redis_back(self) -> None:
        # The other replicas could not refresh their leases either, and may not have
        # noticed yet that Redis is back: none of them is taken for dead before they could.
        self._takeovers_after = time.monotonic() + LEASE_TTL_S
        if not self._leaving:
            await self._refresh_lease()
        await self.writer.resync()
        if self.admission is not None:
            await self.admission.publish()

    # -- this replica's streams ----------------------------------------------------------

    async def opened(self, stream: Stream, generation: GenerationRequest) -> None:
        """A stream opened here: a resumable one is in Redis before its response starts,
        and written there from now on."""
        if not stream.resumable or generation.body is None:
            return
        record = StreamRecord(
            stream.id,
            generation.wire,
            key=stream.owner or "",
            replica=self.id,
            created=stream.created,
            prompt_tokens=stream.prompt_tokens,
            body=generation.body.model_dump_json(exclude_unset=True),
        )
        assert self._state is not None
        refusal = self._state.engine.continuation_refusal(generation.params)
        await self.writer.open(stream, record, continuable=refusal is None)

    def ended(self, stream: Stream) -> None:
        if stream.resumable:
            self.writer.touched(stream.id)
        if self.admission is not None:
            # The other replicas count this one's streams from Redis: not a second late.
            self.admission.publish_soon()

    # -- streams of any replica ----------------------------------------------------------

    async def find(self, stream_id: str, owner: str | None) -> Stream:
        """A stream generated on another replica for ``owner``'s key, read from Redis (404,
        410; 503 without Redis)."""
        mirror = self._mirrors.get(stream_id)
        if mirror is not None:
            if mirror.stream.owner != owner:
                raise _unknown(stream_id)
            await self._mark_read([stream_id])
            return mirror.stream
        record, entries = await self._read(stream_id, owner)
        if record.state == GONE:
            raise StreamGoneError(f"stream {stream_id!r} cannot be resumed: {record.why}")
        mirror = StreamMirror(self._feed, record, self._mirror_store, self._mirror_ended)
        mirror.start(entries)
        if not mirror.stream.finished:
            self._mirrors[stream_id] = mirror
            await self._mark_read([stream_id])
        return mirror.stream

    async def read_elsewhere(self, stream_id: str) -> bool:
        """Whether readers on another replica follow ``stream_id`` (generated here)."""
        return bool(await self.link.client.exists(rk.readers(stream_id)))

    async def _mark_read(self, stream_ids: list[str]) -> None:
        """Tell the streams' owners that readers follow them here, for a lease's time."""
        if not stream_ids:
            return
        pipe = self.link.client.pipeline(transaction=False)
        for stream_id in stream_ids:
            pipe.set(rk.readers(stream_id), self.id, px=int(LEASE_TTL_S * 1000))
        await self.link.call(lambda: execute(pipe))

    async def record(self, stream_id: str, owner: str | None) -> StreamRecord:
        """The stream's record, if ``owner``'s key opened it (404 otherwise; 410 if it
        has expired)."""
        client = self.link.client
        raw = await self.link.call(lambda: client.hgetall(rk.meta(stream_id)))
        if not raw:
            opener = await self.link.call(lambda: client.get(rk.expired(stream_id)))
            if opener is not None and opener.decode() == (owner or ""):
                raise StreamGoneError.expired(stream_id, self._config.resume_ttl_s)
        record = None if not raw else StreamRecord.from_fields(stream_id, raw)
        if record is None or record.key != (owner or ""):
            raise _unknown(stream_id)
        return record

    async def _read(self, stream_id: str, owner: str | None) -> tuple[StreamRecord, list[Any]]:
        record = await self.record(stream_id, owner)
        entries = await self.link.call(lambda: self.link.client.xrange(rk.stream(stream_id)))
        return record, entries

    def _mirror_ended(self, stream: Stream) -> None:
        self._mirrors.pop(stream.id, None)
        self._mirror_store.discard(stream.id)

    async def cancel(self, stream_id: str, owner: str | None) -> None:
        """Cancel a stream generated on another replica: its owner hears it on the cancel
        channel (and a replica that takes it over later finds the flag)."""
        record = await self.record(stream_id, owner)
        client = self.link.client

        async def send() -> None:
            pipe = client.pipeline(transaction=False)
            pipe.hset(rk.meta(record.stream_id), "cancelled", "1")
            pipe.publish(rk.CANCEL, record.stream_id)
            await execute(pipe)

        await self.link.call(send)

    async def _listen(self) -> None:
        """Cancels, and other replicas' hand-overs (which wake the lease loop)."""
        while True:
            try:
                async with self.link.client.pubsub() as pubsub:
                    await pubsub.subscribe(rk.CANCEL, rk.HANDED)
                    async for message in pubsub.listen():
                        if message["type"] != "message":
                            continue
                        data = message["data"].decode()
                        if message["channel"].decode() == rk.CANCEL:
                            self._cancel_here(data)
                        elif data != self.id:
                            self._handed_over.set()
            except LOST as exc:
                self.link.lost(exc)
                await asyncio.sleep(LEASE_EVERY_S / 2)

    def _cancel_here(self, stream_id: str) -> None:
        assert self._state is not None
        with contextlib.suppress(StreamNotFoundError, StreamGoneError):
            stream = self._state.streams.get(stream_id)
            if isinstance(stream, Stream) and not stream.finished:
                task = asyncio.create_task(self._cancel_if_mine(stream))
                self._cancelling.add(task)
                task.add_done_callback(self._cancelling.discard)
            else:
                stream.cancel()

    async def _cancel_if_mine(self, stream: Stream) -> None:
        """A cancel heard for a stream generated here: unless another replica took it over
        meanwhile (this one was stopped, with the cancel waiting), whose end it then is."""
        try:
            owner = await self.link.client.hget(rk.meta(stream.id), "replica")
        except LOST:
            owner = None  # Redis is gone: the cancel is for this replica's stream, then
        if owner is not None and owner.decode() != self.id:
            stream.moved_away()
        else:
            stream.cancel()

    # -- the lease and takeovers ---------------------------------------------------------

    async def _keep_lease(self) -> None:
        while True:
            # Every LEASE_EVERY_S, or at once when another replica handed its streams over.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._handed_over.wait(), LEASE_EVERY_S)
            self._handed_over.clear()
            if self._leaving:
                return  # handed over: its lease has ended
            if not self.link.up:
                continue
            try:
                lapsed = await self._refresh_lease()
                assert self.admission is not None
                await self.admission.publish()
                await self._mark_read([k for k, m in self._mirrors.items() if m.stream.readers])
                assert self._state is not None
                if time.monotonic() < self._takeovers_after or self._state.draining:
                    continue  # a draining replica would have to hand the streams on
                for replica in lapsed:
                    await self._take_over_from(replica)
            except LOST as exc:
                self.link.lost(exc)
            except Exception:
                logger.exception("replica %s: lease or takeover failed", self.id)

    async def _refresh_lease(self) -> list[str]:
        ttl_ms = str(int(LEASE_TTL_S * 1000))
        lapsed = await self._lease(keys=[rk.REPLICAS], args=[self.id, ttl_ms])
        return [r.decode() for r in lapsed if r.decode() != self.id]

    async def _take_over_from(self, dead: str) -> None:
        client = self.link.client
        orphans = await client.smembers(rk.owned(dead))
        continued = False
        for raw in orphans:
            assert self._state is not None
            if self._state.draining:
                break  # began to drain meanwhile: it would have to hand them on
            stream_id = raw.decode()
            keys = [rk.REPLICAS, rk.owned(dead), rk.owned(self.id), rk.meta(stream_id)]
            if await self._claim(keys=keys, args=[dead, self.id, stream_id]):
                await self._continue(stream_id, dead)
                continued = True
        if continued:
            # Counted here before the dead replica's counts go: admission never sees the
            # streams counted by nobody (and lets in more than the limit).
            assert self.admission is not None
            await self.admission.publish()
        await self._forget(keys=[rk.REPLICAS, rk.ADMISSION, rk.owned(dead)], args=[dead])

    async def _give_up(self, stream_id: str, why: str) -> None:
        """A claimed stream that cannot go on: its readers get the reason (410 on resume)."""
        last = await self.link.client.xrevrange(rk.stream(stream_id), count=1)
        end = rk.entry_end(last[0][0])[0] if last else 0
        pipe = self.link.client.pipeline(transaction=False)
        pipe.hset(rk.meta(stream_id), mapping={"state": GONE, "why": why})
        pipe.xadd(rk.stream(stream_id), {"g": why}, id=rk.entry_id(end, True))
        pipe.srem(rk.owned(self.id), stream_id)
        await execute(pipe)

    async def _continue(self, stream_id: str, dead: str) -> None:
        assert self._state is not None and self.admission is not None
        raw = await self.link.client.hgetall(rk.meta(stream_id))
        record = StreamRecord.from_fields(stream_id, raw)
        entries = await self.link.client.xrange(rk.stream(stream_id))
        logger.warning(
            "replica %s: taking over stream %s of replica %s (its lease lapsed, or it "
            "stopped and handed it over)", self.id,
            stream_id, dead,
        )  # fmt: skip
        takeover = Takeover(self._state, record, entries)
        try:
            stream = await takeover.start()
        except Exception as exc:
            if isinstance(exc, TokenspoutError):  # a refusal (cannot be continued): no bug
                logger.warning("stream %s: cannot be taken over: %s", stream_id, exc)
            else:
                logger.exception("stream %s: the takeover failed", stream_id)
            await self._give_up(
                stream_id, f"the takeover after its replica died or stopped failed: {exc}"
            )
            return
        self.takeovers.inc()
        if record.key:
            self.admission.adopt(record.key)
            self._state.key_metrics.adopted(record.key)
        mine = record.owned_by(self.id)
        self.writer.track(stream, mine, persisted=takeover.persisted, opened=True)
        if record.cancelled:
            stream.cancel()
        else:
            # Its reader was on the dead replica: it has the grace period to come back.
            stream.wait_for_reader("client_disconnect")


def _unknown(stream_id: str) -> StreamNotFoundError:
    """The 404 of an id that neither this replica nor Redis knows (for this key). It may be
    a live stream that is not resumable, which is never shared: the message says where
    such a stream can be reached, without saying whether one exists."""
    return StreamNotFoundError(
        f"no stream with id {stream_id!r} here or in Redis: a stream that is not resumable "
        "(a Responses API stream, a WebSocket's, one of n > 1 choices, or one opened without "
        "resumable) lives on the replica that serves it only, and only that replica can "
        "cancel it"
    )
