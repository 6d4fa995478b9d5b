"""Bounds how long a send to a client may block, for every HTTP stream at once.

A timeout scope around each send (``anyio.fail_after``) cost more CPU than the send itself
at 400 streams: it arms and cancels a timer and looks up the running task and library every
time. The watchdog instead checks, every ``period_s``, the streams that are inside a send;
marking a send costs two attribute writes. A send stuck for ``timeout_s`` is found within
``timeout_s + period_s``, and its stream is told to stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class SendGuard:
    """One stream's view of the watchdog: mark each send with ``sending`` / ``sent``."""

    __slots__ = ("_clock", "_on_timeout", "since")

    def __init__(self, clock: Callable[[], float], on_timeout: Callable[[], None]):
        self._clock = clock
        self._on_timeout = on_timeout
        #: Loop time at which the current send began; None between sends.
        self.since: float | None = None

    def sending(self) -> None:
        self.since = self._clock()

    def sent(self) -> None:
        self.since = None


class SendWatchdog:
    """Watches the guards it hands out; its task runs only while some guard is held."""

    def __init__(self, timeout_s: float, *, period_s: float | None = None):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.timeout_s = timeout_s
        self.period_s = period_s if period_s is not None else min(1.0, timeout_s / 10)
        self._guards: set[SendGuard] = set()
        self._task: asyncio.Task[None] | None = None

    def guard(self, on_timeout: Callable[[], None]) -> SendGuard:
        """A guard for one stream; ``on_timeout`` is called (once) when a send overstays.
        Give it back with ``release``."""
        loop = asyncio.get_running_loop()
        guard = SendGuard(loop.time, on_timeout)
        self._guards.add(guard)
        if self._task is None:
            self._task = loop.create_task(self._watch(loop))
        return guard

    def release(self, guard: SendGuard) -> None:
        self._guards.discard(guard)

    async def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while self._guards:
                await asyncio.sleep(self.period_s)
                limit = loop.time() - self.timeout_s
                stuck = [g for g in self._guards if g.since is not None and g.since <= limit]
                for guard in stuck:
                    self._guards.discard(guard)
                    guard._on_timeout()
        finally:
            self._task = None
