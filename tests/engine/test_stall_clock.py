"""The relay's stall timeout on a fake clock: it fires exactly ``stall_s`` after the last
chunk, never while chunks keep coming, and not while it is stopped (backpressure)."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_clock import on_fake_clock
from tokenspout.engine.stall_clock import StallClock

STALL_S = 5.0


async def chunks_then_silence(gaps: list[float]) -> float:
    """Beat after each gap, then wait for the stall: the loop time it fired at."""
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as timer:
            clock = StallClock(timer, STALL_S, loop)
            clock.start()
            try:
                for gap in gaps:
                    await asyncio.sleep(gap)
                    clock.beat()
                await asyncio.sleep(10 * STALL_S)
            finally:
                clock.stop()
    return loop.time()


@on_fake_clock
async def test_it_fires_stall_s_after_the_start_without_chunks() -> None:
    assert await chunks_then_silence([]) == STALL_S


@on_fake_clock
async def test_chunks_inside_the_stall_time_keep_it_from_firing() -> None:
    gaps = [0.01] * 50 + [STALL_S * 0.99] * 20 + [1.0]
    assert await chunks_then_silence(gaps) == pytest.approx(sum(gaps) + STALL_S)


@on_fake_clock
async def test_a_gap_longer_than_the_stall_fires() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as timer:
            clock = StallClock(timer, STALL_S, loop)
            clock.start()
            await asyncio.sleep(1.0)
            clock.beat()
            await asyncio.sleep(STALL_S + 1.0)
            clock.beat()  # too late: never reached
    assert loop.time() == pytest.approx(1.0 + STALL_S)


@on_fake_clock
async def test_stopped_it_never_fires_and_started_again_it_counts_from_then() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as timer:
            clock = StallClock(timer, STALL_S, loop)
            clock.start()
            clock.stop()
            await asyncio.sleep(100 * STALL_S)  # held by backpressure
            resumed = loop.time()
            clock.start()
            await asyncio.sleep(10 * STALL_S)
    assert loop.time() == resumed + STALL_S


@on_fake_clock
async def test_start_replaces_the_first_token_deadline() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(1.0) as timer:
        clock = StallClock(timer, STALL_S, loop)
        clock.start()  # the first chunk came: from now on only the stall counts
        await asyncio.sleep(STALL_S / 2)
        clock.stop()
    assert loop.time() == STALL_S / 2
