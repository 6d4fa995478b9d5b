"""Wake-ups behind one loop timer, on the fake clock: futures woken at their time in order,
alarms that only move later and cost one heap entry, closed alarms that stay silent."""

from __future__ import annotations

import asyncio

from tests.fake_clock import run
from tests.streaming.stream_fakes import now, until
from tokenspout.streaming.wake_timers import Alarm, WakeTimers, wake


async def woken_at(future: asyncio.Future[None]) -> float:
    await future
    return now()


def test_futures_wake_at_their_times_in_order_whatever_the_order_they_were_set() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        woken: list[tuple[str, float]] = []
        for name, when in [("c", 9.0), ("a", 2.0), ("b", 5.0), ("a2", 2.0)]:
            future = loop.create_future()
            future.add_done_callback(lambda _, name=name: woken.append((name, now())))
            timers.wake_at(when, future)
        await until(20.0)
        assert len(timers) == 0
        return woken

    assert run(main()) == [("a", 2.0), ("a2", 2.0), ("b", 5.0), ("c", 9.0)]


def test_a_future_done_before_its_time_is_dropped_quietly() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        early, later = loop.create_future(), loop.create_future()
        timers.wake_at(1.0, early)
        timers.wake_at(4.0, later)
        early.set_result(None)  # the tokens came first
        return await woken_at(later)

    assert run(main()) == 4.0


def test_an_earlier_wake_up_set_after_a_later_one_still_comes_first() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        late, soon = loop.create_future(), loop.create_future()
        timers.wake_at(10.0, late)
        await until(1.0)
        timers.wake_at(3.0, soon)
        return [await woken_at(soon), await woken_at(late)]

    assert run(main()) == [3.0, 10.0]


def test_a_wake_up_set_while_others_fire_is_armed() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        first, second = loop.create_future(), loop.create_future()
        # Set from inside the firing of the first.
        first.add_done_callback(lambda _: timers.wake_at(now() + 2.0, second))
        timers.wake_at(1.0, first)
        return await woken_at(second)

    assert run(main()) == 3.0


def test_an_alarm_postponed_wakes_at_its_last_due_time_with_one_heap_entry() -> None:
    async def main() -> tuple[float, list[int]]:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        alarm = Alarm()
        alarm.future = loop.create_future()
        sizes = []
        timers.set_alarm(alarm, 10.0)
        for at, due in ((8.0, 12.0), (11.0, 15.0), (14.0, 25.0)):
            await until(at)
            timers.set_alarm(alarm, due)  # a heartbeat postponed by an event
            sizes.append(len(timers))
        return await woken_at(alarm.future), sizes

    assert run(main()) == (25.0, [1, 1, 1])


def test_an_alarm_wakes_the_future_it_holds_when_due() -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        alarm = Alarm()
        old = loop.create_future()
        alarm.future = old
        timers.set_alarm(alarm, 5.0)
        old.set_result(None)  # that wait ended; the reader waits on a new one
        alarm.future = loop.create_future()
        at = await woken_at(alarm.future)
        # Due again later: it is queued again.
        alarm.future = loop.create_future()
        timers.set_alarm(alarm, 9.0)
        assert len(timers) == 1
        return old.done(), at + await woken_at(alarm.future)

    assert run(main()) == (True, 5.0 + 9.0)


def test_a_closed_alarm_never_wakes_anything() -> None:
    async def main() -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        timers = WakeTimers()
        alarm = Alarm()
        alarm.future = loop.create_future()
        timers.set_alarm(alarm, 2.0)
        alarm.closed = True
        other = loop.create_future()
        timers.wake_at(6.0, other)
        at = await woken_at(other)
        return alarm.future.done(), at

    assert run(main()) == (False, 6.0)


def test_wake_is_a_no_op_for_none_or_a_done_future() -> None:
    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        wake(None)
        wake(future)
        assert future.done() and future.result() is None
        wake(future)  # no InvalidStateError

    run(main())
