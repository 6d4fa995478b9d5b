"""``SendWatchdog`` on the fake clock: a send stuck past the timeout is found within one
period and its stream told once; sends that complete, and released guards, never are."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.fake_clock import run
from tests.streaming.stream_fakes import now, until
from tokenspout.server.send_watchdog import SendWatchdog


class Timeouts:
    def __init__(self) -> None:
        self.at: dict[str, list[float]] = {}

    def callback(self, name: str) -> Callable[[], None]:
        """An ``on_timeout`` that notes the loop times it was called at under ``name``."""
        self.at[name] = []
        return lambda: self.at[name].append(now())


async def assert_watch_ends(watchdog: SendWatchdog) -> None:
    """With no guard held, the watch task ends within a period."""
    await until(now() + watchdog.period_s + 0.25)
    assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.parametrize("timeout_s", [0, -1.0])
def test_the_timeout_must_be_positive(timeout_s: float) -> None:
    with pytest.raises(ValueError):
        SendWatchdog(timeout_s)


def test_the_default_period_is_a_tenth_of_the_timeout_at_most_a_second() -> None:
    assert SendWatchdog(5.0).period_s == 0.5
    assert SendWatchdog(30.0).period_s == 1.0
    assert SendWatchdog(30.0, period_s=0.25).period_s == 0.25


def test_a_stuck_send_is_found_within_a_period_of_the_timeout_and_told_once() -> None:
    async def main() -> tuple[list[float], float]:
        timeouts = Timeouts()
        watchdog = SendWatchdog(5.0, period_s=1.0)
        guard = watchdog.guard(timeouts.callback("stuck"))
        await until(0.5)
        sent_at = now()
        guard.sending()  # and never sent
        await until(30.0)
        # Told, the stuck guard was dropped; none left, the watch ended.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return timeouts.at["stuck"], sent_at

    at, sent_at = run(main())
    assert len(at) == 1
    assert sent_at + 5.0 <= at[0] <= sent_at + 5.0 + 1.0


def test_sends_that_complete_are_never_timed_out() -> None:
    async def main() -> list[float]:
        timeouts = Timeouts()
        watchdog = SendWatchdog(2.0, period_s=0.5)
        guard = watchdog.guard(timeouts.callback("fine"))
        # Many sends, each well under the timeout, for far longer than the timeout.
        for start in range(20):
            await until(start + 0.25)
            guard.sending()
            await until(start + 1.75)
            guard.sent()
        watchdog.release(guard)
        await assert_watch_ends(watchdog)
        return timeouts.at["fine"]

    assert run(main()) == []


def test_only_the_stuck_stream_is_told() -> None:
    async def main() -> dict[str, list[float]]:
        timeouts = Timeouts()
        watchdog = SendWatchdog(2.0, period_s=0.5)
        stuck = watchdog.guard(timeouts.callback("stuck"))
        idle = watchdog.guard(timeouts.callback("idle"))  # between sends: never stuck
        quick = watchdog.guard(timeouts.callback("quick"))
        stuck.sending()
        quick.sending()
        await until(1.0)
        quick.sent()
        await until(10.0)
        watchdog.release(idle)
        watchdog.release(quick)
        await assert_watch_ends(watchdog)
        return timeouts.at

    at = run(main())
    assert at["idle"] == [] and at["quick"] == []
    assert len(at["stuck"]) == 1 and 2.0 <= at["stuck"][0] <= 2.5


def test_a_released_guard_is_not_watched() -> None:
    async def main() -> list[float]:
        timeouts = Timeouts()
        watchdog = SendWatchdog(2.0, period_s=0.5)
        keep = watchdog.guard(timeouts.callback("other"))
        guard = watchdog.guard(timeouts.callback("released"))
        guard.sending()
        await until(1.0)
        watchdog.release(guard)  # the stream ended in the middle of a send
        await until(10.0)
        watchdog.release(keep)
        await assert_watch_ends(watchdog)
        return timeouts.at["released"]

    assert run(main()) == []


def test_the_watch_task_runs_only_while_guards_are_held_and_restarts() -> None:
    async def main() -> list[float]:
        timeouts = Timeouts()
        watchdog = SendWatchdog(2.0, period_s=0.5)
        first = watchdog.guard(timeouts.callback("first"))
        watchdog.release(first)
        # With nothing held, the watch ends: nothing is left to wake the loop, and waiting
        # on an event no one sets would be a deadlock rather than an endless poll.
        await until(5.0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        again = watchdog.guard(timeouts.callback("again"))
        again.sending()
        await until(10.0)
        assert asyncio.all_tasks() == {asyncio.current_task()}
        return timeouts.at["again"]

    at = run(main())
    assert len(at) == 1 and 7.0 <= at[0] <= 7.5
