"""The writer against a real Redis: a stream's record is there when ``open`` returns (before
its response starts), and a lost Redis leaves the stream to be written when it is back."""

from __future__ import annotations

import asyncio

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
from tokenspout.protocols.stream_wire import StreamWire
from tokenspout.streaming.stream import Stream
from tokenspout.streaming.stream_registry import StreamRegistry


async def _open(link: RedisLink) -> tuple[StreamWriter, Stream]:
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
    await writer.open(stream, record)
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


def test_release_writes_a_stream_to_its_last_chunk_then_stops_it_here(
    redis_server: RedisServer,
) -> None:
    """A stopping replica's hand-over: Redis has every token the stream produced, one that
    came while the release's first write was in flight too, and still has it running (for
    another replica to claim); here it is stopped and no longer written."""

    async def main() -> None:
        link = RedisLink(redis_server.url)
        shared = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            engine = FakeEngine()
            writer = StreamWriter(link, "r1", CollectorRegistry(), ended_ttl_s=60)
            streams = StreamRegistry(engine, store=PersistedStreamStore(writer.touched))  # type: ignore[arg-type]
            stream = streams.open(PROMPT, PARAMS, resumable=True)
            record = StreamRecord(
                stream.id, StreamWire("chat", "synthetic"), key="", replica="r1",
                created=stream.created, prompt_tokens=3, body="{}",
            )  # fmt: skip
            await writer.open(stream, record)
            for word in ("one ", "two ", "three "):
                engine.push(stream.id, word)
            write = writer._write

            async def write_then_a_token(ids: set[str]) -> bool:
                done = await write(ids)
                writer._write = write  # type: ignore[method-assign]
                engine.push(stream.id, "late ")  # after this write read the stream
                return done

            writer._write = write_then_a_token  # type: ignore[method-assign]
            released = await writer.release([stream], timeout_s=30)
            assert released == [stream]
            entries = await shared.xrange(rk.stream(stream.id))
            text = "".join(c[0] for _, f in entries for c in decode_chunks(f[b"c"]))
            assert text.startswith("one two three late ")
            assert await shared.hget(rk.meta(stream.id), "state") == b"running"
            assert not writer.writes(stream.id)
            assert stream.abort_reason == "moved"
            assert [rid for rid, _ in engine.calls_of("abort")] == [stream.id]
        finally:
            await shared.aclose()
            await link.close()

    asyncio.run(main())
