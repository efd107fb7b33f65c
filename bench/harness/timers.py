"""Timers. Every number the suite reports comes from a timer in this module
(``time.perf_counter`` / ``perf_counter_ns`` on the CPU, CUDA events on a GPU); nothing is
estimated or copied from elsewhere.

    time_fn      seconds per call of a small op: calibrated repeats (CPU) or events (CUDA)
    wall         seconds of one synchronised call
    StepStamps   a logits processor stamping every generate() step (decode intervals)
"""
from __future__ import annotations

import time
from typing import Callable

import torch


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


class StepStamps:
    """Logits processor that stamps the time at every generation step (after its forward)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.t.append(time.perf_counter())
        return scores
