"""Timed wake-ups for stream readers, many of them behind one event-loop timer.

Every event a reader sends used to arm and cancel asyncio timers (its flush deadline and its
heartbeat): about 2 µs each with uvloop, a fifth of a stream's CPU per event at 400 streams.
Here a wake-up is a tuple in a heap, and one loop timer fires for the earliest.

* ``wake_at(when, future)``: a one-shot wake-up (a flush deadline, at most ``flush_ms``
  away). An entry whose future is done by then is simply dropped when it comes due.
* ``Alarm``: a reader's heartbeat. Its ``due`` only ever moves later (each event postpones
  it), which costs nothing: its one heap entry, when it comes due, finds the new time and
  is queued again. So a reader has at most one entry, however many events it sends.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math


def wake(future: asyncio.Future[None] | None) -> None:
    """Complete a wait's future unless it is done already."""
    if future is not None and not future.done():
        future.set_result(None)


class Alarm:
    """A postponable wake-up of whatever future a reader is waiting on (``future``)."""

    __slots__ = ("_queued", "closed", "due", "future")

    def __init__(self) -> None:
        self.due = math.inf
        self.future: asyncio.Future[None] | None = None
        self.closed = False
        self._queued = False


class WakeTimers:
    """See the module docstring. Bound to the running loop at first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, Alarm | asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._heap)

    def wake_at(self, when: float, future: asyncio.Future[None]) -> None:
        self._push(when, future)

    def set_alarm(self, alarm: Alarm, due: float) -> None:
        """Make ``alarm`` due at ``due``, which must not be earlier than its last due time
        while it is queued (a heartbeat only moves later)."""
        alarm.due = due
        if not alarm._queued:
            alarm._queued = True
            self._push(due, alarm)

    def _push(self, when: float, target: Alarm | asyncio.Future[None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), target))
        if when < self._timer_at:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        # While due entries are handled, _push must not arm the timer (it is armed once,
        # below, for whatever is earliest then).
        self._timer, self._timer_at = None, -math.inf
        heap = self._heap
        due: list[Alarm | asyncio.Future[None]] = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap)[2])
        for target in due:
            if not isinstance(target, Alarm):
                wake(target)
                continue
            target._queued = False
            if target.closed:
                continue
            if target.due > now:
                self.set_alarm(target, target.due)
            else:
                wake(target.future)
        self._timer_at = math.inf
        if heap:
            self._timer_at = heap[0][0]
            self._timer = self._loop.call_at(self._timer_at, self._fire)
