"""A request's choices as a ``StreamGroup`` on the fake clock: merged events with their
index, each choice's end and then the group's (prompt once, completions summed), a failing
choice ending the group and aborting the others, cancel by the group's id, and no second
reader."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import PARAMS, PROMPT, FakeEngine, collect
from tokenspout.errors import EngineError, StreamNotFoundError, StreamNotResumableError
from tokenspout.streaming.flush_policy import FlushPolicy
from tokenspout.streaming.stream_group import ChoiceFinished, StreamGroup
from tokenspout.streaming.stream_registry import StreamRegistry
from tokenspout.streaming.subscription import Delta, Finished


def open_group(n: int = 2) -> tuple[FakeEngine, StreamRegistry, StreamGroup]:
    engine = FakeEngine()
    registry = StreamRegistry(engine)  # type: ignore[arg-type]
    group = registry.open_group(PROMPT, [PARAMS] * n, meta="wire")
    return engine, registry, group


def per_token() -> FlushPolicy:
    return FlushPolicy(flush_tokens=1, flush_ms=0)


def test_choices_are_merged_with_their_index_and_usage_sums_them() -> None:
    async def main() -> None:
        engine, registry, group = open_group(2)
        a, b = (s.id for s in group.streams)
        assert registry.get(group.id) is group and len(registry) == 2 and group.meta == "wire"
        engine.script(a, [(1.0, "x"), (3.0, "y", "stop")])
        engine.script(b, [(2.0, "p"), (2.5, "q"), (4.0, "r", "length")])
        events = [e for _, e in await collect(group.subscribe(per_token(), heartbeat_s=60))]
        deltas = [(e.index, e.text) for e in events if isinstance(e, Delta)]
        assert deltas == [(0, "x"), (1, "p"), (1, "q"), (0, "y"), (1, "r")]
        ends = [(e.index, e.end.finish_reason) for e in events if isinstance(e, ChoiceFinished)]
        assert ends == [(0, "stop"), (1, "length")]
        last = events[-1]
        assert isinstance(last, Finished)
        assert (last.end.prompt_tokens, last.end.completion_tokens) == (3, 5)
        # Read to its end: forgotten, like a non-resumable stream.
        with pytest.raises(StreamNotFoundError):
            registry.get(group.id)

    run(main())


def test_a_failing_choice_ends_the_group_with_its_error_and_aborts_the_others() -> None:
    async def main() -> None:
        engine, _, group = open_group(3)
        ids = [s.id for s in group.streams]
        engine.script(ids[0], [(1.0, "x")])
        failing = engine.sinks[ids[1]]
        cursor = group.subscribe(per_token(), heartbeat_s=60)
        asyncio.get_running_loop().call_at(2.0, failing, EngineError("boom"))
        events = [e for _, e in await collect(cursor)]
        last = events[-1]
        assert isinstance(last, Finished) and last.end.error is not None
        assert "boom" in last.end.error.message
        assert {rid for rid, _ in engine.calls_of("abort")} == {ids[0], ids[2]}
        assert all(s.finished for s in group.streams)

    run(main())


def test_cancel_by_the_group_id_cancels_every_choice_and_a_second_reader_is_refused() -> None:
    async def main() -> None:
        _, registry, group = open_group(2)
        cursor = group.subscribe(per_token(), heartbeat_s=60)
        with pytest.raises(StreamNotResumableError, match="n > 1"):
            group.subscribe(per_token(), heartbeat_s=60)
        registry.cancel(group.id)
        events = [e for _, e in await collect(cursor)]
        ends = [e.end.finish_reason for e in events if isinstance(e, ChoiceFinished)]
        assert ends == ["cancelled", "cancelled"]
        assert isinstance(events[-1], Finished) and events[-1].end.finish_reason == "cancelled"

    run(main())


def test_the_reader_leaving_aborts_every_choice() -> None:
    async def main() -> None:
        engine, _, group = open_group(2)
        cursor = group.subscribe(per_token(), heartbeat_s=60)
        cursor.close("client_disconnect")
        assert {rid for rid, _ in engine.calls_of("abort")} == {s.id for s in group.streams}
        assert all(s.abort_reason == "client_disconnect" for s in group.streams)

    run(main())
