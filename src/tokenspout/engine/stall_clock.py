"""The stall timeout of a streamed answer: no chunk for ``stall_s`` ends the read.

Moving an ``asyncio.timeout``'s deadline at every chunk (``Timeout.reschedule``: cancel a
timer handle, push a new one on the loop's heap) cost 11 % of the front's CPU at 400
relayed streams (py-spy). Here a chunk only notes the time; one timer handle per stall
period checks whether a chunk came since, and only then is the deadline moved (or, when
none came, the ``Timeout`` made to fire, which turns the cancellation into the
``TimeoutError`` the relay handles).
"""

from __future__ import annotations

import asyncio


class StallClock:
    """Fires ``timer`` once ``stall_s`` passed with no ``beat``; ``stop`` it while the
    read is held on purpose (backpressure) and ``start`` it again after."""

    __slots__ = ("_handle", "_last", "_loop", "_stall_s", "_timer")

    def __init__(self, timer: asyncio.Timeout, stall_s: float, loop: asyncio.AbstractEventLoop):
        self._timer = timer
        self._stall_s = stall_s
        self._loop = loop
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """From now on: the timer's own deadline is replaced by the stall clock."""
        self._timer.reschedule(None)
        self._last = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(self._last + self._stall_s, self._check)

    def beat(self) -> None:
        """A chunk came."""
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _check(self) -> None:
        due = self._last + self._stall_s
        now = self._loop.time()
        if now >= due:
            self._handle = None
            self._timer.reschedule(now)  # in the past: the timeout fires at once
        else:
            self._handle = self._loop.call_at(due, self._check)
