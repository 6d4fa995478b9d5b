"""How many threads the model may use: the CPUs this process may really run on, and fewer
while other processes compete for them.

Two cores and two torch threads are fastest on a quiet machine, but when other CPU-bound
processes share the cores, every parallel op waits at its barrier for the thread that the
kernel has just descheduled: one stream fell to 1-21 % of its quiet speed with gaps of a
second between tokens. One thread has no barrier to wait at and slows smoothly, in proportion
to its share of the CPU. So the budget watches how long the thread that runs the steps waits
for a CPU (``run_delay`` in ``/proc/thread-self/schedstat``) and drops to one thread while
that wait is a large part of the time. It probes all of them again once the wait is gone,
holding back twice as long after each probe that met contention (one busy process beside
two threads on two cores would otherwise flip the count every look). It starts with one
thread: a step of two threads under contention can stall for a second before the first
look, while one thread on a quiet machine only runs slower until then.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

#: Seconds between two looks at the run-queue delay (each look reads one /proc file).
INTERVAL_S = 0.2
#: Waiting per second of wall time above which the step thread is contended: beside two
#: busy processes on two cores it waits ~0.5 s per second with two threads, ~0.33 with one.
CONTENDED = 0.25
#: ...and below which the machine is quiet again.
QUIET = 0.05
#: The longest wait, in looks, before probing all threads again (~6 s).
MAX_HOLD = 32


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota
    (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return cpus


def _cgroup_quota(root: Path) -> float | None:
    try:
        v2 = (root / "cpu.max").read_text().split()
        if v2[0] != "max":
            return int(v2[0]) / int(v2[1])
        return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def run_delay_ns() -> int:
    """Nanoseconds the calling thread has spent runnable but waiting for a CPU."""
    return int(Path("/proc/thread-self/schedstat").read_text().split()[1])


class CpuBudget:
    """The thread count for the next model step (``threads()``), between 1 and ``limit``;
    always ``limit`` when not ``adaptive`` (a count the user chose).

    Call ``threads()`` from the thread that runs the steps: it is the one whose waiting is
    measured.
    """

    def __init__(
        self,
        limit: int,
        *,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        delay_ns: Callable[[], int] = run_delay_ns,
    ):
        self.limit = limit
        self.adaptive = adaptive and limit > 1
        self._clock, self._delay_ns = clock, delay_ns
        self._current = 1 if self.adaptive else limit
        self._since = clock()
        self._delay_at: int | None = None
        self._hold = 1  # quiet looks needed before probing all threads again
        self._quiet = 0
        self._probing = False

    def threads(self) -> int:
        """The thread count to use now; cheap between looks (one clock read)."""
        now = self._clock()
        if not self.adaptive or now - self._since < INTERVAL_S:
            return self._current
        try:
            delay = self._delay_ns()
        except (OSError, IndexError, ValueError):  # no schedstat (not Linux): stay put
            return self._current
        if self._delay_at is None:  # the first look only sets the baseline
            self._since, self._delay_at = now, delay
            return self._current
        waiting = (delay - self._delay_at) / 1e9 / (now - self._since)
        self._since, self._delay_at = now, delay
        if self._current == self.limit:
            if waiting > CONTENDED:
                self._current, self._quiet = 1, 0
                if self._probing:
                    self._hold = min(self._hold * 2, MAX_HOLD)
            elif self._probing:
                self._hold = 1
            self._probing = False
        else:
            self._quiet = self._quiet + 1 if waiting < QUIET else 0
            if self._quiet >= self._hold:
                self._current, self._probing = self.limit, True
        return self._current
