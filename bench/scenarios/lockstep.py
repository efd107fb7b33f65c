"""Lockstep decoding: the bare model and several methods decode greedily side by side, one
forward each per step, the order rotating every step, each from its own prefill and KV cache.
A method's step time divided by the bare step of the same step cancels the machine's drift at
the scale of one step (the popularity table, the tenant sweep, the interleaved cross-check).

Contract: ``lockstep(s, methods, steps, row_names, start) -> {"times": {model: [s per step]},
"prefill": {model: s}, "others_cpu": share or None}`` for a Setup ``s``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..harness.contention import CpuShare
from ..harness.timers import sync

if TYPE_CHECKING:
    from ..harness.contention import Quiet
    from .serving_setup import Setup


def lockstep(s: Setup, methods, steps: int, row_names=None, start: int = 0) -> dict:
    """Greedy decode of the bare model and of every method in ``methods`` in lockstep: each from
    its own prefill and KV cache, one forward each per step, the order rotating every step (for
    one method: bare, m / m, bare / ...). The per-step ratio to that step's bare forward cancels
    the machine's drift at the scale of one step. The first step after the prefills is run
    untimed (first-call allocations). Each prefill (input_ids [B, T] -> cache, logits of the
    last position) is timed too, synchronised, in an order rotated by ``start``. Returns each
    model's step times and prefill time."""
    order = ["bare", *methods]
    B, T = s.input_ids.shape
    times = {m: [] for m in order}
    prefill = {}
    share = CpuShare()
    share.start()
    with torch.no_grad():
        state = {}
        k = start % len(order)
        for m in order[k:] + order[:k]:
            sync(s.device)
            t0 = time.perf_counter()
            out = s.forward(m, use_cache=True, logits_to_keep=1, row_names=row_names)
            nxt = out.logits[:, -1:].argmax(-1)
            sync(s.device)
            prefill[m] = time.perf_counter() - t0
            state[m] = (out.past_key_values, nxt)
        for i in range(steps + 1):
            mask = torch.ones(B, T + i + 1, dtype=torch.long, device=s.device)
            k = i % len(order)
            for m in order[k:] + order[:k]:
                cache, tok = state[m]
                sync(s.device)
                t0 = time.perf_counter()
                out = s.forward(m, input_ids=tok, attention_mask=mask, past_key_values=cache, use_cache=True,
                                logits_to_keep=1, row_names=row_names)
                nxt = out.logits[:, -1:].argmax(-1)
                sync(s.device)
                if i > 0:
                    times[m].append(time.perf_counter() - t0)
                state[m] = (out.past_key_values, nxt)
    return {"times": times, "prefill": prefill, "others_cpu": share.stop()}


def lockstep_quiet(s: Setup, methods, steps: int, row_names, quiet: "Quiet", bar, start: int = 0) -> dict:
    """:func:`lockstep`, run once more (after waiting for a quiet moment) if other processes
    used more than ``max_other_cpu`` of the CPUs during it."""
    r = lockstep(s, methods, steps, row_names, start)
    if r["others_cpu"] is not None and r["others_cpu"] > s.cfg.max_other_cpu:
        bar.set_postfix_str(f"run again: others used {r['others_cpu']:.0%} of the CPUs")
        quiet.wait(bar)
        r = lockstep(s, methods, steps, row_names, start)
        r["repeated"] = True
    return r


def warm_lockstep(s: Setup, methods, row_names) -> None:
    """One untimed lockstep step of every model first: the first calls of a model the headline
    did not warm up (LoRA at its other rank) or at new shapes (a GPU's cuBLAS heuristics and
    Triton autotuning at this batch) must not land in the first run's timed prefill."""
    lockstep(s, methods, 1, row_names)
