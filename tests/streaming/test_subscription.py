"""The reader cursor on the fake clock: coalescing into events, heartbeats, positions, what
it releases once delivered, and the backpressure it exerts on the engine."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import FakeEngine, collect, until
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import StreamEnd
from tokenspout.streaming.stream_store import InMemoryStreamStore
from tokenspout.streaming.subscription import Delta, Finished, Heartbeat

# Times and flush deadlines are binary fractions, so that the fake clock hits them exactly.


def test_first_token_at_once_then_a_batch_by_count_or_by_deadline() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=3, flush_ms=500))
        engine.script(
            "s1",
            [
                (0.0, "a"),
                (0.125, "b"),
                (0.25, "c"),
                (0.375, "d"),  # third pending token: due by count
                (2.0, "e"),  # alone: due by the deadline, at 2.5
                (3.0, "f", "stop"),
            ],
        )
        return await collect(cursor)

    assert run(main()) == [
        (0.0, Delta("a", 1, 1)),
        (0.375, Delta("bcd", 3, 4)),
        (2.5, Delta("e", 1, 5)),
        (3.0, Delta("f", 1, 6)),
        (3.0, Finished(StreamEnd("stop", 3, 6))),
    ]


def test_the_flush_clock_starts_at_the_first_pending_token_not_at_the_last_event() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=10, flush_ms=500))
        engine.script("s1", [(0.0, "a"), (4.0, "b"), (4.25, "c"), (8.0, "", "length", 0)])
        return await collect(cursor)

    assert run(main()) == [
        (0.0, Delta("a", 1, 1)),
        (4.5, Delta("bc", 2, 3)),
        (8.0, Finished(StreamEnd("length", 3, 3))),
    ]


def test_the_end_flushes_what_is_pending_at_once() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=5, flush_ms=500))
        engine.script("s1", [(0.0, "a"), (0.125, "b"), (0.25, "c"), (0.375, "", "stop", 0)])
        return await collect(cursor)

    assert run(main()) == [
        (0.0, Delta("a", 1, 1)),
        (0.375, Delta("bc", 2, 3)),
        (0.375, Finished(StreamEnd("stop", 3, 3))),
    ]


def test_tokens_without_text_are_counted_but_not_sent_alone() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        # A detokenizer holding back half a character: a token with no text yet.
        engine.script("s1", [(0.0, "", None, 1), (1.0, "é", None, 1), (2.0, "!", "stop")])
        return await collect(cursor)

    assert run(main()) == [
        (1.0, Delta("é", 2, 2)),
        (2.0, Delta("!", 1, 3)),
        (2.0, Finished(StreamEnd("stop", 3, 3))),
    ]


def test_heartbeat_after_silence_postponed_by_each_event() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0), heartbeat_s=15)
        engine.script("s1", [(20.0, "a"), (40.0, "", "stop", 0)])
        return await collect(cursor)

    assert run(main()) == [
        (15.0, Heartbeat()),
        (20.0, Delta("a", 1, 1)),
        (35.0, Heartbeat()),
        (40.0, Finished(StreamEnd("stop", 3, 1))),
    ]


def test_no_heartbeat_while_events_flow() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0), heartbeat_s=10)
        engine.script("s1", [(float(t), "x") for t in range(0, 50, 8)] + [(50.0, "", "stop", 0)])
        return await collect(cursor)

    events = run(main())
    assert not any(isinstance(e, Heartbeat) for _, e in events)
    assert [t for t, e in events if isinstance(e, Delta)] == [8.0 * i for i in range(7)]


def test_resume_from_a_position_gets_the_rest_with_absolute_positions() -> None:
    async def main() -> tuple[list, list]:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True)
        first = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        engine.script(
            "s1", [(0.0, "a"), (1.0, "b"), (2.0, "c"), (3.0, "d"), (4.0, "e"), (5.0, "", "stop", 0)]
        )
        reading = asyncio.create_task(collect(first))
        await until(2.5)
        second = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0), start=1)
        replaying = asyncio.create_task(collect(second))
        return await reading, await replaying

    first, second = run(main())
    assert [e.position for _, e in first if isinstance(e, Delta)] == [1, 2, 3, 4, 5]
    assert second == [
        (2.5, Delta("bc", 2, 3)),
        (3.0, Delta("d", 1, 4)),
        (4.0, Delta("e", 1, 5)),
        (5.0, Finished(StreamEnd("stop", 3, 5))),
    ]


def test_resume_after_the_end_replays_the_rest_in_one_event() -> None:
    async def main() -> list:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True)
        for text in "abcd":
            engine.push("s1", text)
        engine.push("s1", "", "stop", 0)
        return await collect(stream.subscribe(FlushPolicy(), start=2))

    assert run(main()) == [(0.0, Delta("cd", 2, 4)), (0.0, Finished(StreamEnd("stop", 3, 4)))]


def test_a_non_resumable_stream_releases_an_event_only_when_the_next_is_asked_for() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, buffer = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        events = aiter(cursor)
        engine.push("s1", "ab")
        engine.push("s1", "cd")
        assert await anext(events) == Delta("abcd", 2, 2)
        # Handed over, but perhaps not sent: the log keeps it.
        assert (buffer.start, cursor.delivered) == (0, 0)
        assert [c.text for c in buffer.read(0)] == ["ab", "cd"]
        engine.push("s1", "ef")
        assert await anext(events) == Delta("ef", 1, 3)
        assert (buffer.start, cursor.delivered) == (2, 2)
        assert [c.text for c in buffer.read(2)] == ["ef"]
        engine.push("s1", "", "stop", 0)
        assert isinstance(await anext(events), Finished)
        assert buffer.start == 3 and buffer.read(3) == []

    run(main())


def test_a_resumable_stream_keeps_delivered_text_for_replay() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, buffer = engine.stream(resumable=True)
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        engine.push("s1", "ab")
        engine.push("s1", "", "stop", 0)
        assert [e for _, e in await collect(cursor)] == [
            Delta("ab", 1, 1),
            Finished(StreamEnd("stop", 3, 1)),
        ]
        assert buffer.start == 0 and [c.text for c in buffer.read(0)] == ["ab"]

    run(main())


class _Record:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def text_sent(self, num_tokens: int) -> None:
        self.sent.append(num_tokens)


def test_the_observer_hears_of_an_event_once_it_was_delivered() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        record = _Record()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0), observer=record)
        events = aiter(cursor)
        engine.push("s1", "a")
        engine.push("s1", "b")
        await anext(events)
        assert record.sent == []
        engine.push("s1", "c", "stop")
        assert await anext(events) == Delta("c", 1, 3)
        assert record.sent == [2]
        assert isinstance(await anext(events), Finished)
        assert record.sent == [2, 1]

    run(main())


def test_backpressure_pauses_the_engine_sends_pending_text_at_once_and_resumes() -> None:
    async def main() -> tuple[list, list]:
        engine = FakeEngine()
        store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=1000)
        stream, buffer = engine.stream(store=store)
        cursor = stream.subscribe(FlushPolicy(flush_tokens=100, flush_ms=10_000))
        # 3 + 3 + 3 bytes undelivered pass the 8-byte bound at t=3.
        engine.script("s1", [(0.0, "a"), (1.0, "bbb"), (2.0, "ccc"), (3.0, "ddd")])
        engine.script("s1", [(10.0, "e", "stop")])
        reading = asyncio.create_task(collect(cursor, send_s=0.5))
        await until(3.25)
        assert stream.paused and buffer.start == 1 and store.held_bytes == 9
        return await reading, engine.calls

    events, calls = run(main())
    assert events == [
        (0.0, Delta("a", 1, 1)),
        # Not due by count (100) nor by time (10 s): sent because the stream paused.
        (3.0, Delta("bbbcccddd", 3, 4)),
        (10.0, Delta("e", 1, 5)),
        (10.5, Finished(StreamEnd("stop", 3, 5))),
    ]
    # Resumed when the reader asked for the next event, half a second later.
    assert calls == [("pause", "s1", 3.0), ("resume", "s1", 3.5)]


def test_no_pause_while_the_reader_keeps_up() -> None:
    async def main() -> list:
        engine = FakeEngine()
        store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=1000)
        stream, _ = engine.stream(store=store)
        cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        engine.script("s1", [(float(t), "xxxx") for t in range(20)] + [(20.0, "", "stop", 0)])
        events = await collect(cursor)
        assert "".join(e.text for _, e in events if isinstance(e, Delta)) == "xxxx" * 20
        return engine.calls

    assert run(main()) == []


def test_backpressure_follows_the_slowest_reader_and_never_evicts_under_it() -> None:
    async def main() -> tuple[list, list, list]:
        engine = FakeEngine()
        store = InMemoryStreamStore(max_stream_bytes=8, max_total_bytes=1000)
        stream, buffer = engine.stream(store=store, resumable=True)
        fast = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        slow = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
        engine.script("s1", [(0.0, "aaa"), (1.0, "bbb"), (2.0, "ccc"), (25.0, "", "stop", 0)])
        reading = [asyncio.create_task(collect(fast)), asyncio.create_task(collect(slow, 10))]
        await until(2.5)
        # 9 bytes past the slow reader's position: the engine pauses; nothing is evicted.
        assert stream.paused and buffer.start == 0 and not buffer.evicted  # type: ignore[attr-defined]
        return await reading[0], await reading[1], engine.calls

    fast, slow, calls = run(main())
    assert fast == [
        (0.0, Delta("aaa", 1, 1)),
        (1.0, Delta("bbb", 1, 2)),
        (2.0, Delta("ccc", 1, 3)),
        (25.0, Finished(StreamEnd("stop", 3, 3))),
    ]
    assert slow == [
        (0.0, Delta("aaa", 1, 1)),
        (10.0, Delta("bbbccc", 2, 3)),
        (25.0, Finished(StreamEnd("stop", 3, 3))),
    ]
    assert calls == [("pause", "s1", 2.0), ("resume", "s1", 10.0)]


def test_slow_readers_get_every_byte_while_other_streams_press_on_the_store() -> None:
    """Defect 1 of issue 10, at the unit level: the store's bounds are passed by this stream
    and by others (and the engine ignores the pause hint), yet no reader loses text."""

    async def main() -> tuple[dict[str, list], list]:
        engine = FakeEngine()
        store = InMemoryStreamStore(max_stream_bytes=16, max_total_bytes=32)
        texts = {sid: [f"{sid}:{i:02d};" for i in range(40)] for sid in ("s1", "s2", "s3")}
        readers = {}
        for resumable, sid in ((True, "s1"), (False, "s2"), (True, "s3")):
            stream, _ = engine.stream(sid, store=store, resumable=resumable)
            steps = [(i * 0.25, text) for i, text in enumerate(texts[sid])]
            engine.script(sid, [*steps, (20.0, "", "stop", 0)])
            if sid != "s3":  # s3 is read by nobody: its replay text may be evicted
                cursor = stream.subscribe(FlushPolicy(flush_tokens=1, flush_ms=0))
                readers[sid] = asyncio.create_task(collect(cursor, send_s=1.5))
        got = {sid: await task for sid, task in readers.items()}
        for sid, events in got.items():
            deltas = [e for _, e in events if isinstance(e, Delta)]
            assert "".join(d.text for d in deltas) == "".join(texts[sid]), sid
            assert [d.position for d in deltas] == sorted({d.position for d in deltas})
            assert deltas[-1].position == 40
            assert events[-1][1] == Finished(StreamEnd("stop", 3, 40))
        return got, engine.calls

    _, calls = run(main())
    paused = {rid for what, rid, _ in calls if what == "pause"}
    assert paused == {"s1", "s2"}


@pytest.mark.parametrize(("oldest", "flush_ms"), [(0.3, 50.0), (2.3, 30.0), (100.7, 20.0)])
def test_pending_text_is_due_at_its_own_deadline(oldest: float, flush_ms: float) -> None:
    policy = FlushPolicy(flush_tokens=10, flush_ms=flush_ms)
    policy.add("a", 1, 0.0)
    policy.take()
    policy.add("b", 1, oldest)
    deadline = policy.deadline()
    assert deadline is not None and policy.due(deadline)
