"""The headline's timed phases for one Setup: warm-up, decode (alternated generate() runs, each
step stamped), the decode step under CUDA-graph replay (CUDA), prefill (alternated forwards),
tenant popularity and the interleaved cross-check (lockstep).

A run's time per token is the median of its decode-step intervals; each method run is divided
by the mean of the bare runs on either side (harness/alternation.py), and the reported ratio is
the median of those per-run ratios. generate() throughput is rows x new tokens / wall time.
"""
from __future__ import annotations

import statistics
import time

from ..harness.alternation import alternated, step_summary
from ..harness.contention import CpuShare, Quiet
from ..harness.deadline import NO_DEADLINE
from ..harness.stats import summary
from ..harness.timers import StepStamps, sync
from . import graphs
from .lockstep import lockstep_quiet
from .popularity import run_popularity
from .serving_setup import Setup


def time_generate(s: Setup, method: str) -> dict:
    stamps = StepStamps(s.device)
    share = CpuShare()
    sync(s.device)
    share.start()
    t0 = time.perf_counter()
    s.generate(method, s.cfg.new_tokens, logits_processor=stamps)
    sync(s.device)
    t1 = time.perf_counter()
    others = share.stop()
    steps = [b - a for a, b in zip(stamps.t, stamps.t[1:])]
    rows = s.input_ids.shape[0]
    return {"total_s": t1 - t0, "tokens_per_s": rows * s.cfg.new_tokens / (t1 - t0),
            "first_step_s": stamps.t[0] - t0,
            "step_median_s": statistics.median(steps) if steps else float("nan"),
            "step_mean_s": sum(steps) / len(steps) if steps else float("nan"), "steps": len(steps),
            "others_cpu": others}


def time_prefill(s: Setup, method: str) -> dict:
    share = CpuShare()
    sync(s.device)
    share.start()
    t0 = time.perf_counter()
    s.forward(method, use_cache=True, logits_to_keep=1)
    sync(s.device)
    t1 = time.perf_counter()
    return {"total_s": t1 - t0, "others_cpu": share.stop()}


def run_timing(s: Setup, progress_factory, log=print, deadline=NO_DEADLINE, out: dict | None = None) -> dict:
    """The timed phases: warm-up, decode (alternated generate runs), the decode step under
    CUDA-graph replay (CUDA), prefill, tenant popularity (lockstep) and the interleaved
    cross-check. Past ``deadline`` the optional phases (graph replay, popularity, the
    interleaved cross-check) are skipped and listed under "skipped"; decode and prefill,
    the headline's columns, always run. Each phase's result goes into ``out`` (returned) as soon
    as it is measured."""
    cfg = s.cfg
    methods = list(cfg.methods)
    out = {} if out is None else out
    phases = out["phases_s"] = {}
    skipped = []
    t0 = time.perf_counter()
    # warm-up: every method decodes once (allocator, caches, lazy init) and runs its prefill
    with progress_factory(total=2 * (len(methods) + 1), desc="warm-up") as bar:
        for m in ["bare", *methods]:
            s.generate(m, cfg.warmup_tokens)
            bar.update(1)
            time_prefill(s, m)
            bar.update(1)
    phases["warm_up"] = time.perf_counter() - t0
    n_decode = 1 + 2 * cfg.rounds * len(methods)
    t0 = time.perf_counter()
    with progress_factory(total=n_decode, desc=f"decode ({cfg.new_tokens} tokens/run)") as bar:
        decode = alternated(s, methods, cfg.rounds, time_generate,
                             {"ratio": "step_median_s", "ratio_mean_interval": "step_mean_s",
                              "ratio_total_time": "total_s"}, bar)
    for m in ["bare", *methods]:  # end to end: rows x new tokens / whole generate() wall time
        decode[m]["tokens_per_s"] = summary([r["tokens_per_s"] for r in decode[m]["runs"]])
    phases["decode"] = time.perf_counter() - t0
    out["decode"] = decode
    if cfg.graph_rounds and s.device.type == "cuda":
        if deadline.passed():
            skipped.append("CUDA-graph replay")
        else:
            t0 = time.perf_counter()
            log(f"decode step under CUDA-graph replay ({cfg.graph_rounds} rounds)")
            out["graph"] = graphs.run(s, [m for m in cfg.graph_methods if m in cfg.methods], cfg.graph_rounds,
                                      log=log)
            phases["graph_replay"] = time.perf_counter() - t0
    n_prefill = 1 + 2 * cfg.prefill_rounds * len(methods)
    t0 = time.perf_counter()
    with progress_factory(total=n_prefill, desc="prefill (1 forward)") as bar:
        out["prefill"] = alternated(s, methods, cfg.prefill_rounds, time_prefill, {"ratio": "total_s"}, bar)
    phases["prefill"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    interleaved = {}
    if cfg.interleaved_steps and cfg.popularity and deadline.passed():
        skipped.append("tenant popularity")
    elif cfg.interleaved_steps and cfg.popularity:
        out["popularity"] = pop = run_popularity(s, progress_factory)
        if "uniform" in pop["layouts"]:  # the headline's layout: its lockstep column comes from here
            for m, r in pop["layouts"]["uniform"]["methods"].items():
                if m in methods:
                    interleaved[m] = {**r, "source": "tenant popularity, uniform layout"}
    phases["popularity"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    missing = [m for m in methods if m not in interleaved] if cfg.interleaved_steps else []
    if missing and deadline.passed():
        skipped.append("decode steps interleaved")
    elif missing:
        quiet = Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
        desc = f"decode, steps interleaved ({cfg.interleaved_steps} each)"
        with progress_factory(total=len(missing), desc=desc) as bar:
            for m in missing:
                r = lockstep_quiet(s, [m], cfg.interleaved_steps, None, quiet, bar)
                interleaved[m] = {**step_summary(r["times"], m, r["others_cpu"], cfg.interleaved_steps),
                                  "repeated": r.get("repeated", False)}
                bar.update(1)
    phases["decode_interleaved"] = time.perf_counter() - t0
    out["decode_interleaved"] = interleaved
    if skipped:
        log(f"time limit: skipped {', '.join(skipped)}")
        out["skipped"] = [f"{x} (--time-limit)" for x in skipped]
    return out
