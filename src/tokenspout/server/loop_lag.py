"""Event-loop lag: how late a sleeping task wakes up. Every stream shares one loop, so a
blocked loop delays every client's next event by the same amount."""

from __future__ import annotations

import asyncio

from prometheus_client import Gauge


async def watch_loop_lag(gauge: Gauge, interval_s: float = 0.5) -> None:
    """Sleep ``interval_s`` again and again and set ``gauge`` to the oversleep; runs until
    cancelled (the app's lifespan starts and cancels it)."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval_s)
        gauge.set(max(0.0, loop.time() - before - interval_s))
