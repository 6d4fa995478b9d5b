"""CpuBudget's policy on a fake clock and fake run-queue delays; usable_cpus on fake cgroup
files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenspout.engine.cpu_budget import (
    INTERVAL_S,
    MAX_HOLD,
    CpuBudget,
    run_delay_ns,
    usable_cpus,
)


class FakeThread:
    """A clock and a run-queue delay that advance together: ``wait(w)`` moves time on by one
    look interval during which the thread waited ``w`` seconds per second."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delay_ns = 0

    def clock(self) -> float:
        return self.now

    def delay(self) -> int:
        return self.delay_ns

    def wait(self, waiting: float) -> None:
        step = INTERVAL_S * 1.001  # just past the interval, whatever the float rounding
        self.now += step
        self.delay_ns += int(waiting * step * 1e9)


def budget(limit: int = 2) -> tuple[CpuBudget, FakeThread]:
    """A budget past its start: one thread until a quiet look, then ``limit``."""
    t = FakeThread()
    b = CpuBudget(limit, clock=t.clock, delay_ns=t.delay)
    assert b.threads() == 1
    t.wait(0.0)
    assert b.threads() == 1  # the first look only sets the baseline
    t.wait(0.0)
    assert b.threads() == limit
    t.wait(0.0)
    assert b.threads() == limit
    return b, t


def test_contention_from_the_start_stays_at_one_thread() -> None:
    t = FakeThread()
    b = CpuBudget(2, clock=t.clock, delay_ns=t.delay)
    for _ in range(5):
        t.wait(0.4)
        assert b.threads() == 1


def test_quiet_keeps_every_thread() -> None:
    b, t = budget()
    for _ in range(10):
        t.wait(0.01)
        assert b.threads() == 2


def test_contention_drops_to_one_thread_and_quiet_brings_them_back() -> None:
    b, t = budget()
    t.wait(0.9)
    assert b.threads() == 1
    t.wait(0.3)  # one thread beside two busy processes still waits: stay at one
    assert b.threads() == 1
    t.wait(0.0)
    assert b.threads() == 2


def test_no_look_between_intervals() -> None:
    b, t = budget()
    t.delay_ns += 10**9  # a second of waiting, but less than an interval has passed
    t.now += INTERVAL_S / 2
    assert b.threads() == 2


def test_a_probe_that_meets_contention_holds_back_twice_as_long() -> None:
    b, t = budget()
    t.wait(0.9)
    assert b.threads() == 1
    holds = []
    for _ in range(7):
        quiet_looks = 0
        while True:  # one busy process: one thread never waits, two always do
            t.wait(0.0)
            quiet_looks += 1
            if b.threads() == 2:
                break
        holds.append(quiet_looks)
        t.wait(0.6)
        assert b.threads() == 1
    assert holds == [1, 2, 4, 8, 16, 32, 32]
    assert holds[-1] == MAX_HOLD


def test_a_probe_that_stays_quiet_resets_the_hold() -> None:
    b, t = budget()
    t.wait(0.9)
    b.threads()
    t.wait(0.0)
    assert b.threads() == 2  # probe
    t.wait(0.9)
    assert b.threads() == 1  # contended: hold 2
    for _ in range(2):
        t.wait(0.0)
        b.threads()
    assert b.threads() == 2
    t.wait(0.0)
    assert b.threads() == 2  # the probe stayed quiet: hold back to 1
    t.wait(0.9)
    assert b.threads() == 1
    t.wait(0.0)
    assert b.threads() == 2


@pytest.mark.parametrize(("limit", "adaptive"), [(1, True), (2, False)])
def test_a_fixed_count_never_looks(limit: int, adaptive: bool) -> None:
    def fail() -> int:
        raise AssertionError("looked")

    clock = iter([0.0, 10.0, 20.0, 30.0]).__next__
    b = CpuBudget(limit, adaptive=adaptive, clock=clock, delay_ns=fail)
    assert [b.threads(), b.threads(), b.threads()] == [limit] * 3


def test_run_delay_reads_this_threads_schedstat() -> None:
    first = run_delay_ns()
    assert isinstance(first, int) and first >= 0
    assert run_delay_ns() >= first  # a counter: never goes back


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "150000 100000\n"}, 2),
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
    ids=["v2-unlimited", "v2-half", "v2-one-and-a-half", "v1-one", "v1-unlimited", "none"],
)
def test_usable_cpus_caps_affinity_by_the_cgroup_quota(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    import os

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    want = affinity if expected is None else min(affinity, expected)
    assert usable_cpus(tmp_path) == want
