"""The registry on the fake clock: open, find, cancel, forget at the end or after the replay
TTL (410 then), a failed submit that leaves nothing behind, and waiting for readers."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import PARAMS, PROMPT, FakeEngine, collect, now, until
from tokenspout.errors import EngineError, StreamGoneError, StreamNotFoundError
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import Stream, StreamEnd
from tokenspout.streaming.stream_registry import ResumePolicy, StreamRegistry
from tokenspout.streaming.stream_store import InMemoryStreamStore, ReplayBuffer
from tokenspout.streaming.subscription import Delta, Finished


class _Store(InMemoryStreamStore):
    """Remembers the id of every buffer it handed out."""

    def __init__(self, **bounds: int):
        super().__init__(**bounds)
        self.created: list[str] = []

    def create(self, stream_id: str, *, resumable: bool) -> ReplayBuffer:
        self.created.append(stream_id)
        return super().create(stream_id, resumable=resumable)


def registry(
    engine: FakeEngine, store: InMemoryStreamStore | None = None, **resume: float
) -> tuple[StreamRegistry, list[Stream]]:
    ended: list[Stream] = []
    reg = StreamRegistry(
        engine,  # type: ignore[arg-type]
        store=store,
        resume=ResumePolicy(**resume),
        on_end=ended.append,
    )
    return reg, ended


def per_token() -> FlushPolicy:
    return FlushPolicy(flush_tokens=1, flush_ms=0)


def test_open_submits_and_the_stream_is_found_by_id_until_it_ends() -> None:
    async def main() -> None:
        engine = FakeEngine()
        store = _Store()
        reg, ended = registry(engine, store)
        stream = reg.open(PROMPT, PARAMS, meta={"wire": "seed"})
        assert stream.meta == {"wire": "seed"} and not stream.resumable
        assert list(engine.sinks) == [stream.id] == store.created and stream.id in store
        assert reg.get(stream.id) is stream and len(reg) == 1 and reg.running() == [stream]
        other = reg.open(PROMPT, PARAMS)
        assert other.id != stream.id and len(reg) == 2
        engine.push(stream.id, "a", "stop")
        assert ended == [stream] and len(reg) == 1 and reg.running() == [other]
        # No reader holds it: forgotten at its end (a reader keeps it until it leaves).
        with pytest.raises(StreamNotFoundError) as missing:
            reg.get(stream.id)
        assert missing.value.status_code == 404
        assert stream.id not in store and other.id in store

    run(main())


def test_a_resumable_stream_stays_replayable_for_the_ttl_then_is_gone() -> None:
    async def main() -> None:
        engine = FakeEngine()
        store = _Store()
        reg, _ = registry(engine, store, grace_s=30, ttl_s=300)
        stream = reg.open(PROMPT, PARAMS, resumable=True)
        engine.script(stream.id, [(0.0, "a"), (10.0, "b", "stop")])
        await stream.wait_end()
        assert len(reg) == 0 and reg.running() == []
        await until(309.5)
        replay = reg.get(stream.id).subscribe(per_token())
        replayed = [e for _, e in await collect(replay)]
        assert replayed == [Delta("ab", 2, 2), Finished(StreamEnd("stop", 3, 2))]
        await until(310.5)
        with pytest.raises(StreamGoneError) as gone:
            reg.get(stream.id)
        assert gone.value.status_code == 410 and "expired" in gone.value.message
        assert stream.id not in store and store.total_bytes == 0
        with pytest.raises(StreamNotFoundError):
            reg.get("never-opened")

    run(main())


def test_find_hides_another_owners_stream_live_and_expired() -> None:
    async def main() -> None:
        engine = FakeEngine()
        reg, _ = registry(engine, grace_s=30, ttl_s=300)
        stream = reg.open(PROMPT, PARAMS, resumable=True, owner="alice")
        assert reg.find(stream.id, owner="alice") is stream
        for owner in ("bob", None):
            with pytest.raises(StreamNotFoundError):
                reg.find(stream.id, owner=owner)
        engine.script(stream.id, [(0.0, "a", "stop")])
        await stream.wait_end()
        await until(300.5)
        # Expired: its owner learns why (410); anyone else gets the 404 of an unknown id.
        with pytest.raises(StreamGoneError):
            reg.find(stream.id, owner="alice")
        with pytest.raises(StreamNotFoundError) as missing:
            reg.find(stream.id, owner="bob")
        assert missing.value.message == f"no stream with id {stream.id!r}"

    run(main())


def test_a_failed_submit_leaves_no_buffer_and_no_stream() -> None:
    async def main() -> None:
        err = EngineError("no slot for you")
        engine = FakeEngine(submit_error=err)
        store = _Store()
        reg, ended = registry(engine, store)
        for resumable in (False, True):
            with pytest.raises(EngineError) as raised:
                reg.open(PROMPT, PARAMS, resumable=resumable)
            assert raised.value is err
        assert len(store.created) == 2
        assert all(sid not in store for sid in store.created)
        assert len(reg) == 0 and reg.running() == [] and ended == []
        for sid in store.created:
            with pytest.raises(StreamNotFoundError):
                reg.get(sid)

    run(main())


def test_cancel_by_id() -> None:
    async def main() -> None:
        engine = FakeEngine()
        reg, ended = registry(engine)
        stream = reg.open(PROMPT, PARAMS)
        cursor = stream.subscribe(per_token())
        engine.push(stream.id, "a")
        assert reg.cancel(stream.id) is stream
        assert engine.calls_of("abort") == [(stream.id, 0.0)]
        assert stream.abort_reason == "cancelled" and ended == [stream]
        events = [e for _, e in await collect(cursor)]
        assert events[0] == Delta("a", 1, 1)
        assert isinstance(events[1], Finished) and events[1].end.finish_reason == "cancelled"
        with pytest.raises(StreamNotFoundError):
            reg.cancel("nope")

    run(main())


def test_cancelling_a_finished_resumable_stream_changes_nothing() -> None:
    async def main() -> None:
        engine = FakeEngine()
        reg, _ = registry(engine)
        stream = reg.open(PROMPT, PARAMS, resumable=True)
        engine.push(stream.id, "a", "stop")
        assert reg.cancel(stream.id) is stream
        assert engine.calls == [] and stream.end is not None
        assert stream.end.finish_reason == "stop" and stream.abort_reason is None

    run(main())


def test_abort_all_aborts_every_running_stream_with_the_reason() -> None:
    async def main() -> None:
        engine = FakeEngine()
        reg, ended = registry(engine)
        streams = [reg.open(PROMPT, PARAMS) for _ in range(3)]
        engine.push(streams[0].id, "a", "stop")
        reg.abort_all("shutdown")
        assert [s.abort_reason for s in streams] == [None, "shutdown", "shutdown"]
        assert sorted(rid for rid, _ in engine.calls_of("abort")) == sorted(
            s.id for s in streams[1:]
        )
        assert ended == streams and len(reg) == 0

    run(main())


def test_wait_readers_gone_returns_when_the_last_reader_detaches() -> None:
    async def main() -> float:
        engine = FakeEngine()
        reg, _ = registry(engine)
        loop = asyncio.get_running_loop()
        a = reg.open(PROMPT, PARAMS).subscribe(per_token())
        b = reg.open(PROMPT, PARAMS, resumable=True).subscribe(per_token())
        loop.call_at(3.0, a.close, None)
        loop.call_at(7.0, b.close, None)
        await reg.wait_readers_gone(timeout_s=60)
        return now()

    assert run(main()) == 7.0


def test_wait_readers_gone_gives_up_at_the_timeout_without_raising() -> None:
    async def main() -> tuple[float, int]:
        engine = FakeEngine()
        reg, _ = registry(engine)
        stream = reg.open(PROMPT, PARAMS)
        stream.subscribe(per_token())
        await reg.wait_readers_gone(timeout_s=5)
        return now(), stream.readers

    assert run(main()) == (5.0, 1)


def test_wait_readers_gone_with_no_readers_returns_at_once() -> None:
    async def main() -> float:
        engine = FakeEngine()
        reg, _ = registry(engine)
        reg.open(PROMPT, PARAMS)  # generating, but nobody reads it
        await reg.wait_readers_gone(timeout_s=5)
        return now()

    assert run(main()) == 0.0


def test_a_reader_finishing_after_the_stream_was_forgotten_keeps_the_store_exact() -> None:
    async def main() -> None:
        engine = FakeEngine()
        store = InMemoryStreamStore()
        reg, _ = registry(engine, store)
        stream = reg.open(PROMPT, PARAMS)
        cursor = stream.subscribe(per_token())
        engine.script(stream.id, [(0.0, "hello", "stop")])
        # The way every transport reads: the send of an event takes a while.
        events = await collect(cursor, send_s=0.5)
        assert [type(e) for _, e in events] == [Delta, Finished]
        with pytest.raises(StreamNotFoundError):
            reg.get(stream.id)
        assert (store.total_bytes, store.held_bytes) == (0, 0)

    run(main())


def test_wait_readers_gone_waits_for_the_readers_of_streams_that_just_ended() -> None:
    async def main() -> float:
        engine = FakeEngine()
        reg, _ = registry(engine)
        loop = asyncio.get_running_loop()
        streams = [reg.open(PROMPT, PARAMS) for _ in range(2)]
        readers = [stream.subscribe(per_token()) for stream in streams]
        # A drain's last step: the streams are ended, their readers send the end and leave.
        for stream in streams:
            stream.fail(EngineError("the server is shutting down"), "shutdown")
        loop.call_at(1.0, readers[0].close, None)
        loop.call_at(3.0, readers[1].close, None)
        await reg.wait_readers_gone(timeout_s=10)
        return now()

    assert run(main()) == 3.0
