"""The writer against a real Redis: a stream's record is there when ``open`` returns (before
its response starts), and a lost Redis leaves the stream to be written when it is back."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
import redis.asyncio
from prometheus_client import CollectorRegistry

from tests.cluster.conftest import RedisServer
from tests.streaming.stream_fakes import PARAMS, PROMPT, FakeEngine
from tokenspout.cluster import redis_keys as rk
from tokenspout.cluster.chunk_codec import decode_chunks
from tokenspout.cluster.persisted_store import PersistedStreamStore
from tokenspout.cluster.redis_link import RedisLink
from tokenspout.cluster.stream_record import StreamRecord
from tokenspout.cluster.stream_writer import StreamWriter
from tokenspout.engine.request import Prompt, SamplingParams
from tokenspout.engine.synthetic_engine import SyntheticEngine
from tokenspout.errors import ShuttingDownError
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_registry import StreamRegistry


async def _open(link: RedisLink, continuable: bool = True) -> tuple[StreamWriter, Stream]:
    """A resumable stream of the synthetic engine, opened through a writer whose task is
    not running: whatever is in Redis after ``open`` was written by ``open`` itself."""
    writer = StreamWriter(link, "r1", CollectorRegistry(), ended_ttl_s=60)
    streams = StreamRegistry(
        SyntheticEngine(itl_ms=1000), store=PersistedStreamStore(writer.touched)
    )
    stream = streams.open(
        Prompt(token_ids=(1, 2), text="a b"), SamplingParams(max_tokens=5), resumable=True
    )
    record = StreamRecord(
        stream.id, StreamWire("chat", "synthetic"), key="team", replica="r1",
        created=stream.created, prompt_tokens=2, body="{}",
    )  # fmt: skip
    await writer.open(stream, record, continuable=continuable)
    return writer, stream


def test_the_record_is_in_redis_when_open_returns(redis_server: RedisServer) -> None:
    async def main() -> str:
        link = RedisLink(redis_server.url)
        try:
            _, stream = await _open(link)
            stream.abort("test_over")
            return stream.id
        finally:
            await link.close()

    stream_id = asyncio.run(main())
    shared = redis.Redis.from_url(redis_server.url)
    meta = {k.decode(): v.decode() for k, v in shared.hgetall(rk.meta(stream_id)).items()}
    assert meta["replica"] == "r1" and meta["key"] == "team" and meta["state"] == "running"
    assert shared.sismember(rk.owned("r1"), stream_id)
    assert shared.pttl(rk.meta(stream_id)) > 0


def test_a_record_that_found_redis_down_is_written_when_it_is_back(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        writer: StreamWriter | None = None

        async def back() -> None:
            assert writer is not None
            await writer.resync()

        link = RedisLink(redis_server.url, on_up=back)
        redis_server.stop()
        try:
            writer, stream = await _open(link)
            assert not link.up  # open() found it gone, and returned
            writer.start()
            redis_server.start()
            shared = redis.asyncio.Redis.from_url(redis_server.url)
            # Polled: the link's probe and the writer have no other signal to wait on.
            async with asyncio.timeout(30):
                while not await shared.exists(rk.meta(stream.id)):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await shared.aclose()
            stream.abort("test_over")
            await writer.stop()
        finally:
            await link.close()

    asyncio.run(main())


def _shut_down(stream: Stream) -> None:
    stream.fail(ShuttingDownError("the server is shutting down"), "shutdown")


def test_release_ends_a_stream_no_other_replica_could_continue_before_it_returns(
    redis_server: RedisServer,
) -> None:
    """One the engine could not continue (a constrained answer) is not handed over: ended
    here, and Redis has its end when ``release`` returns, before the others are told to
    claim this replica's streams. It was still running there: the others claimed it, could
    not continue it, and gave it up (410), and its reader's error event was the last word."""

    async def main() -> None:
        link = RedisLink(redis_server.url)
        shared = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            writer, stream = await _open(link, continuable=False)
            ended: list[Stream] = []

            def end(s: Stream) -> None:
                ended.append(s)
                _shut_down(s)

            assert await writer.release([stream], end, timeout_s=30) == []
            assert ended == [stream] and stream.finished
            assert await shared.hget(rk.meta(stream.id), "state") == b"ended"
            assert not writer.writes(stream.id)
        finally:
            await shared.aclose()
            await link.close()

    asyncio.run(main())


@pytest.mark.parametrize("last", ["cancelled", "length"])
def test_release_stops_a_stream_then_writes_it_to_its_last_chunk(
    redis_server: RedisServer, last: str
) -> None:
    """A stopping replica's hand-over: the stream is stopped here first (the engine told to
    let it go), then Redis gets every token it produced, those of a step that was in flight
    at the stop too, and no end: another replica claims it running. Unless it ended by
    itself before the stop reached the engine (``length``): then its end is written, as it
    ended, without the hand-over's error."""

    async def main() -> None:
        link = RedisLink(redis_server.url)
        shared = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            engine = FakeEngine()
            # The engine takes the abort (or finds the request done) with a step in flight:
            # that step's output, then the last one, come after it.
            engine.abort = lambda request_id: last == "cancelled"  # type: ignore[method-assign]
            writer = StreamWriter(link, "r1", CollectorRegistry(), ended_ttl_s=60)
            streams = StreamRegistry(engine, store=PersistedStreamStore(writer.touched))  # type: ignore[arg-type]
            stream = streams.open(PROMPT, PARAMS, resumable=True)
            record = StreamRecord(
                stream.id, StreamWire("chat", "synthetic"), key="", replica="r1",
                created=stream.created, prompt_tokens=3, body="{}",
            )  # fmt: skip
            await writer.open(stream, record, continuable=True)
            for word in ("one ", "two ", "three "):
                engine.push(stream.id, word)
            loop = asyncio.get_running_loop()
            write = writer._write

            async def write_then_the_last_step(ids: set[str]) -> bool:
                done = await write(ids)
                writer._write = write  # type: ignore[method-assign]
                # After this write has caught up with the stream, before it has ended.
                loop.call_soon(engine.push, stream.id, "late ")
                loop.call_soon(engine.push, stream.id, "", last, 0)
                return done

            writer._write = write_then_the_last_step  # type: ignore[method-assign]
            stopped = await writer.release([stream], _shut_down, timeout_s=30)
            assert stopped == [stream] and stream.finished
            assert stream.abort_reason == "moved"
            assert not writer.writes(stream.id)
            entries = await shared.xrange(rk.stream(stream.id))
            text = "".join(c[0] for _, f in entries if b"c" in f for c in decode_chunks(f[b"c"]))
            assert text == "one two three late "
            ends = [json.loads(f[b"e"]) for _, f in entries if b"e" in f]
            state = await shared.hget(rk.meta(stream.id), "state")
            if last == "cancelled":
                assert ends == [] and state == b"running"
            else:
                assert ends == [{"f": "length", "p": 3, "c": 4, "e": None}] and state == b"ended"
        finally:
            await shared.aclose()
            await link.close()

    asyncio.run(main())
