"""``Stream``: who may read it, what happens when its readers leave, and how it ends (by the
engine, by an error in one output, by ``fail`` or ``cancel``), on the fake clock."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import FakeEngine, collect, now, until
from tokenspout.engine.request import EngineOutput
from tokenspout.errors import (
    EngineError,
    InternalError,
    InvalidRequestError,
    StreamGoneError,
    StreamNotResumableError,
)
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream import StreamEnd
from tokenspout.streaming.stream_store import InMemoryStreamStore
from tokenspout.streaming.subscription import Delta, Finished


def per_token() -> FlushPolicy:
    return FlushPolicy(flush_tokens=1, flush_ms=0)


# -- who may read it ------------------------------------------------------------------------


def test_a_second_reader_of_a_non_resumable_stream_is_refused() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, buffer = engine.stream()
        first = stream.subscribe(per_token())
        engine.push("s1", "a")
        with pytest.raises(StreamNotResumableError) as refused:
            stream.subscribe(per_token(), start=0)
        assert refused.value.status_code == 409
        assert stream.readers == 1
        # The first reader is untouched: nothing it has not delivered was released.
        assert buffer.start == 0
        assert await anext(aiter(first)) == Delta("a", 1, 1)
        # Not even once the first one left (it would read what was released).
        first.close(None)
        with pytest.raises(StreamNotResumableError):
            stream.subscribe(per_token(), start=1)

    run(main())


def test_a_resumable_stream_takes_several_readers() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True)
        stream.subscribe(per_token())
        stream.subscribe(per_token())
        assert stream.readers == 2

    run(main())


def test_a_start_past_the_end_is_refused_and_the_end_itself_is_fine() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True)
        engine.push("s1", "a")
        engine.push("s1", "b")
        with pytest.raises(InvalidRequestError) as refused:
            stream.subscribe(per_token(), start=3)
        assert refused.value.status_code == 400 and "3" in refused.value.message
        assert stream.readers == 0
        cursor = stream.subscribe(per_token(), start=2)
        engine.push("s1", "c", "stop")
        assert [e for _, e in await collect(cursor)] == [
            Delta("c", 1, 3),
            Finished(StreamEnd("stop", 3, 3)),
        ]

    run(main())


def test_a_start_in_evicted_text_is_gone() -> None:
    async def main() -> None:
        engine = FakeEngine()
        store = InMemoryStreamStore(max_stream_bytes=4, max_total_bytes=100)
        stream, buffer = engine.stream(store=store, resumable=True)
        for text in ("aa", "bb", "cc"):
            engine.push("s1", text)
        assert buffer.start > 0
        with pytest.raises(StreamGoneError) as gone:
            stream.subscribe(per_token(), start=0)
        assert gone.value.status_code == 410 and "evicted" in gone.value.message
        cursor = stream.subscribe(per_token(), start=buffer.start)
        assert (await anext(aiter(cursor))).position == 3

    run(main())


# -- readers leaving ----------------------------------------------------------------------


def test_the_last_reader_leaving_with_a_reason_aborts_a_non_resumable_stream() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(per_token())
        engine.push("s1", "a")
        await until(1.0)
        cursor.close("client_disconnect")
        assert engine.calls_of("abort") == [("s1", 1.0)]
        assert stream.abort_reason == "client_disconnect"
        assert stream.end == StreamEnd("cancelled", 3, 1)
        cursor.close("client_disconnect")  # closing twice does nothing more
        assert len(engine.calls_of("abort")) == 1

    run(main())


def test_a_reader_leaving_without_a_reason_leaves_the_stream_running() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        stream.subscribe(per_token()).close(None)
        assert stream.readers == 0 and not stream.finished and engine.calls == []

    run(main())


def test_a_resumable_stream_without_readers_is_aborted_after_the_grace_period() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True, resume_grace_s=30)
        cursor = stream.subscribe(per_token())
        await until(2.0)
        cursor.close("client_disconnect")
        assert engine.calls == []
        end = await stream.wait_end()
        assert now() == 32.0
        assert engine.calls_of("abort") == [("s1", 32.0)]
        assert end.finish_reason == "cancelled"
        assert stream.abort_reason == "client_disconnect"

    run(main())


def test_one_reader_leaving_another_still_reading_aborts_nothing() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True, resume_grace_s=30)
        stream.subscribe(per_token())
        stream.subscribe(per_token()).close("client_disconnect")
        engine.script("s1", [(100.0, "a", "stop")])
        assert (await stream.wait_end()).finish_reason == "stop"
        assert engine.calls == []

    run(main())


def test_a_reader_coming_back_within_the_grace_period_keeps_the_stream() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True, resume_grace_s=30)
        engine.push("s1", "a")
        stream.subscribe(per_token()).close("client_disconnect")
        await until(20.0)
        back = stream.subscribe(per_token(), start=1)
        engine.script("s1", [(100.0, "b", "stop")])
        reading = asyncio.create_task(collect(back))
        assert (await stream.wait_end()).finish_reason == "stop"
        assert engine.calls == []
        assert [e for _, e in await reading] == [
            Delta("b", 1, 2),
            Finished(StreamEnd("stop", 3, 2)),
        ]

    run(main())


def test_leaving_again_restarts_the_grace_period() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True, resume_grace_s=30)
        stream.subscribe(per_token()).close("client_disconnect")
        await until(20.0)
        back = stream.subscribe(per_token())
        await until(25.0)
        back.close("send_timeout")
        await stream.wait_end()
        assert engine.calls_of("abort") == [("s1", 55.0)]
        assert stream.abort_reason == "send_timeout"

    run(main())


def test_a_stream_that_ended_during_the_grace_period_is_not_aborted() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream(resumable=True, resume_grace_s=30)
        stream.subscribe(per_token()).close("client_disconnect")
        engine.script("s1", [(10.0, "a", "stop")])
        await until(100.0)
        assert stream.end == StreamEnd("stop", 3, 1)
        assert engine.calls == [] and stream.abort_reason is None

    run(main())


# -- how it ends --------------------------------------------------------------------------


def test_text_that_cannot_be_sent_ends_this_stream_with_an_error_and_frees_the_engine() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(per_token())
        reading = asyncio.create_task(collect(cursor))
        engine.script("s1", [(0.0, "ok"), (1.0, "bad \ud800 text"), (2.0, "later")])
        events = [e for _, e in await reading]
        assert events[0] == Delta("ok", 1, 1)
        assert len(events) == 2 and isinstance(events[1], Finished)
        err = events[1].end.error
        assert isinstance(err, InternalError) and err.status_code == 500
        assert engine.calls_of("abort") == [("s1", 1.0)]
        assert stream.abort_reason == "error"
        assert stream.end is events[1].end

    run(main())


def test_receive_never_raises_even_for_the_last_output() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        # Straight into the sink, as an engine whose request already finished would.
        engine.sinks.pop("s1")
        assert stream.receive(EngineOutput("\udfff", 1, 3, 1, "stop")) is None
        end = stream.end
        assert end is not None and isinstance(end.error, InternalError)
        assert end.finish_reason is None
        assert engine.calls_of("abort") == [("s1", 0.0)]  # asked, though it found nothing
        # A late output changes nothing.
        stream.receive(EngineOutput("x", 1, 3, 2, "stop"))
        assert stream.end is end and stream.length == 0

    run(main())


def test_an_engine_error_ends_the_stream_after_the_text_before_it() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(FlushPolicy(flush_tokens=10, flush_ms=10_000))
        err = EngineError("the engine broke")
        engine.push("s1", "a")
        engine.push("s1", "b")
        stream.receive(err)
        assert [e for _, e in await collect(cursor)] == [
            Delta("ab", 2, 2),
            Finished(StreamEnd(None, 3, 2, err)),
        ]
        assert engine.calls == []

    run(main())


def test_fail_aborts_and_readers_get_the_error() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(per_token())
        reading = asyncio.create_task(collect(cursor))
        engine.script("s1", [(0.0, "a")])
        await until(1.0)
        err = InternalError("the reader broke")
        stream.fail(err, "error")
        assert [e for _, e in await reading] == [
            Delta("a", 1, 1),
            Finished(StreamEnd("cancelled", 3, 1, err)),
        ]
        assert engine.calls_of("abort") == [("s1", 1.0)] and stream.abort_reason == "error"
        # Once over, neither fail nor cancel changes anything.
        stream.fail(InternalError("again"), "error")
        assert not stream.cancel()
        assert stream.end == StreamEnd("cancelled", 3, 1, err)
        assert len(engine.calls) == 1 and stream.abort_reason == "error"

    run(main())


def test_cancel_ends_the_stream_as_cancelled_without_an_error() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        cursor = stream.subscribe(per_token())
        engine.push("s1", "a")
        assert stream.cancel()
        assert [e for _, e in await collect(cursor)] == [
            Delta("a", 1, 1),
            Finished(StreamEnd("cancelled", 3, 1)),
        ]
        assert stream.abort_reason == "cancelled"
        assert engine.calls_of("abort") == [("s1", 0.0)]

    run(main())


def test_wait_end_returns_the_end_to_every_waiter() -> None:
    async def main() -> None:
        engine = FakeEngine()
        stream, _ = engine.stream()
        waiters = [asyncio.create_task(stream.wait_end()) for _ in range(3)]
        engine.script("s1", [(4.0, "a", "length")])
        ends = await asyncio.gather(*waiters)
        assert ends == [StreamEnd("length", 3, 1)] * 3 and now() == 4.0

    run(main())
