"""Shared pieces of the benchmark suite: the environment record, statistics and timers.

Every number the suite reports comes from a timer in this module (``time.perf_counter_ns``
on the CPU, CUDA events on a GPU); nothing is estimated or copied from elsewhere.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- statistics
def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of a non-empty sequence."""
    s = sorted(xs)
    if len(s) == 1:
        return float(s[0])
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def summary(xs) -> dict:
    """median, quartiles, IQR, min, max and count of a sample."""
    xs = [float(x) for x in xs]
    q1, q3 = quantile(xs, 0.25), quantile(xs, 0.75)
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(xs), "max": max(xs), "n": len(xs)}


# ----------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()})"


def device_slug(device: torch.device) -> str:
    """Short file-name tag for a device: 'cpu', 'cuda-nvidia-h200', ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")


def environment(device: torch.device, threads: int) -> dict:
    import transformers

    try:
        import peft
        peft_version = peft.__version__
    except ImportError:  # pragma: no cover - peft is a bench dependency
        peft_version = None
    import para_kernels

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "device_name": device_label(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "para_kernels": para_kernels.__version__,
        "git": git_commit(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


# ----------------------------------------------------------------- other processes
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


# ----------------------------------------------------------------- time budget
class Deadline:
    """A point in time (``time.perf_counter()`` seconds) after which optional work is skipped;
    ``Deadline(None)`` never passes. Used by ``--time-limit`` so that a bounded run (a device
    lease) ends by itself with a complete report of what it measured."""

    def __init__(self, at: float | None = None):
        self.at = at

    @classmethod
    def after(cls, seconds: float | None) -> "Deadline":
        return cls(None if seconds is None else time.perf_counter() + seconds)

    def left(self) -> float:
        return float("inf") if self.at is None else self.at - time.perf_counter()

    def passed(self) -> bool:
        return self.left() <= 0

    def earlier(self, seconds: float) -> "Deadline":
        """The same deadline moved ``seconds`` earlier."""
        return Deadline(None if self.at is None else self.at - seconds)


NO_DEADLINE = Deadline(None)


# ----------------------------------------------------------------- timers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class L2Flusher:
    """Writes a buffer larger than the GPU's L2 cache between timed runs (no-op on CPU)."""

    def __init__(self, device: torch.device, mib: int = 256):
        self.buf = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device) \
            if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_fn(fn: Callable[[], object], device: torch.device, *, samples: int, min_sample_s: float = 2e-4,
            warmup: int = 3, max_total_s: float | None = None, flush: L2Flusher | None = None) -> list[float]:
    """Seconds per call of ``fn``: a list of ``samples`` measurements (fewer if ``max_total_s``
    runs out, but at least 5).

    CPU: each sample times ``k`` back-to-back calls with perf_counter_ns, ``k`` chosen so a
    sample lasts at least ``min_sample_s`` (tiny ops are otherwise below the timer's noise).
    CUDA: one call per sample between CUDA events, with the L2 cache flushed before each.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    out: list[float] = []
    start_all = time.perf_counter()
    if device.type == "cuda":
        flush = flush or L2Flusher(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(samples)]
        done = 0
        for i in range(samples):
            flush()
            starts[i].record()
            fn()
            ends[i].record()
            done += 1
            if max_total_s is not None and done >= 5 and time.perf_counter() - start_all > max_total_s:
                break
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts[:done], ends[:done])]
    # CPU: calibrate the inner repeat count
    t0 = time.perf_counter_ns()
    fn()
    once = max((time.perf_counter_ns() - t0) / 1e9, 1e-7)
    k = max(1, int(min_sample_s / once))
    for _ in range(samples):
        t0 = time.perf_counter_ns()
        for _ in range(k):
            fn()
        out.append((time.perf_counter_ns() - t0) / 1e9 / k)
        if max_total_s is not None and len(out) >= 5 and time.perf_counter() - start_all > max_total_s:
            break
    return out


def wall(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, synchronised."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0
