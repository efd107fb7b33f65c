"""Other processes on a shared machine: how much of the CPUs they used during a timed run
(:class:`CpuShare`), and waiting for a quiet moment before running again (:class:`Quiet`).
A run slowed by someone else is repeated or flagged, never silently kept."""
from __future__ import annotations

import os
import time


class CpuShare:
    """Share of the machine's CPU time that *other* processes used between ``start()`` and
    ``stop()``: (busy time of all CPUs from /proc/stat - this process's CPU time) / (wall time x
    CPUs). On a shared machine a timed run with a large share was slowed by someone else.
    Resolution: one clock tick (10 ms) per CPU. Returns None where /proc/stat is missing."""

    def __init__(self):
        self.available = os.path.exists("/proc/stat")
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = None

    def _read(self):
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return busy / self.hz, sum(vals) / self.hz, ru.ru_utime + ru.ru_stime

    def start(self) -> None:
        self._start = self._read() if self.available else None

    def stop(self) -> float | None:
        if self._start is None:
            return None
        busy, total, mine = self._read()
        d_total = total - self._start[1]
        if d_total < 0.2:  # too short to tell at one-tick resolution
            return None
        return max(0.0, (busy - self._start[0]) - (mine - self._start[2])) / d_total


class Quiet:
    """Waits for other processes to leave the CPUs alone (bounded by a total budget)."""

    def __init__(self, max_share: float, budget_s: float):
        self.max_share, self.budget_s, self.waited_s = max_share, budget_s, 0.0

    def wait(self, progress=None) -> None:
        while self.waited_s < self.budget_s:
            share = CpuShare()
            share.start()
            time.sleep(1.0)
            self.waited_s += 1.0
            busy = share.stop()
            if busy is None or busy <= self.max_share:
                return
            if progress is not None:
                progress.set_postfix_str(f"waiting for other processes ({busy:.0%} of the CPUs)")
