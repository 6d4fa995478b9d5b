"""An event loop on a fake clock, for unit tests where time matters.

Its clock stands still while anything is ready to run, and jumps straight to the next
timer when every task waits for one: a test of "heartbeat after 15 s" takes microseconds,
never sleeps, and cannot flake on a loaded machine. A test that waits for something no
timer or task will ever bring fails at once with ``Deadlock`` instead of hanging.
"""

from __future__ import annotations

import asyncio
import functools
import selectors
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")


class Deadlock(RuntimeError):
    """Every task waits, and no timer is due: nothing will ever happen."""


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: FakeClockLoop | None = None

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise Deadlock("every task waits and no timer is scheduled")
        assert self.loop is not None
        self.loop.now += timeout
        return []


class FakeClockLoop(asyncio.SelectorEventLoop):
    """``time()`` is ``now``, which moves only when the loop would otherwise sleep."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self.now = 0.0

    def time(self) -> float:
        return self.now


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a fresh fake-clock loop."""
    loop = FakeClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def on_fake_clock(test: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, T]:
    """Run an ``async def`` test on a fresh fake-clock loop (a plain test for pytest)."""

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        return run(test(*args, **kwargs))

    return wrapper
