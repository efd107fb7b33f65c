"""Tenant-count sweep (GPU, --full): a batch of ``sweep_batch`` rows, row b -> tenant b mod K for
each K of ``sweep_tenants``, PARA and BGMV LoRA against the bare model in lockstep (and under
CUDA-graph replay), on its own Setup sharing the headline's backbone.
"""
from __future__ import annotations

import gc
import time
from dataclasses import replace

import torch

from ..harness.alternation import prefill_ratios, step_summary
from ..harness.contention import Quiet
from ..harness.deadline import NO_DEADLINE
from ..harness.stats import summary
from . import graphs
from .lockstep import lockstep_quiet, warm_lockstep
from .methods import method_label
from .serving_setup import ServingConfig, Setup


def sweep_config(cfg: ServingConfig) -> ServingConfig:
    """The sweep's own configuration: batch ``sweep_batch`` with adapters for max(sweep_tenants)
    tenants, PARA and BGMV LoRA (random banks: no PEFT model) only."""
    methods = tuple(m for m in ("para", "bgmv_lora") if m in cfg.methods)
    return replace(cfg, batch=cfg.sweep_batch, tenants=max(cfg.sweep_tenants), methods=methods, popularity=(),
                   interleaved_steps=cfg.sweep_steps, notes=[])


def sweep_rows(batch: int, tenants: int) -> list[int]:
    """Row b -> tenant b mod tenants."""
    return [b % tenants for b in range(batch)]


def run_sweep(s: Setup, progress_factory, log=print, deadline=NO_DEADLINE) -> dict:
    """Decode-step ratios to the bare model of PARA and BGMV LoRA at batch ``sweep_batch`` for each
    tenant count K of ``sweep_tenants`` (row b -> tenant b mod K): ``sweep_rounds`` lockstep runs
    of ``sweep_steps`` steps per K (the K order rotating each round), and on a GPU the step under
    CUDA-graph replay. ``s``: a Setup built from :func:`sweep_config`."""
    cfg = s.cfg
    methods = list(cfg.methods)
    ks = list(cfg.sweep_tenants)
    times = {k: {m: [] for m in ["bare", *methods]} for k in ks}
    prefills = {k: [] for k in ks}
    quiet = Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
    warm_lockstep(s, methods, [s.names[t] for t in sweep_rows(cfg.batch, ks[0])])
    with progress_factory(total=cfg.sweep_rounds * len(ks),
                          desc=f"tenant sweep, batch {cfg.batch} ({cfg.sweep_steps} lockstep steps)") as bar:
        for rnd in range(cfg.sweep_rounds):
            j = rnd % len(ks)
            for k in ks[j:] + ks[:j]:
                names = [s.names[t] for t in sweep_rows(cfg.batch, k)]
                r = lockstep_quiet(s, methods, cfg.sweep_steps, names, quiet, bar, start=rnd)
                for m, ts in r["times"].items():
                    times[k][m] += ts
                prefills[k].append(r["prefill"])
                bar.update(1)
    out = {"batch": cfg.batch, "tenants": ks, "methods": methods,
           "labels": {m: method_label(m, cfg) for m in ["bare", *methods]},
           "steps_per_run": cfg.sweep_steps, "rounds": cfg.sweep_rounds, "by_tenants": {}}
    for k in ks:
        n = len(times[k]["bare"])
        out["by_tenants"][k] = {"bare_time": summary(times[k]["bare"]),
                                "methods": {m: step_summary(times[k], m, None, n) for m in methods},
                                "prefill": prefill_ratios(prefills[k], methods)}
    if cfg.graph_rounds and s.device.type == "cuda":
        for k in ks:
            if deadline.passed():
                out.setdefault("skipped", []).append(f"CUDA-graph replay at {k} tenants (--time-limit)")
                continue
            log(f"  tenant sweep: CUDA-graph replay, {k} tenants")
            names = [s.names[t] for t in sweep_rows(cfg.batch, k)]
            out["by_tenants"][k]["graph"] = graphs.run(s, methods, cfg.graph_rounds, row_names=names, log=log)
    return out


def run_sweep_guarded(s: Setup, progress_factory, log, deadline=NO_DEADLINE) -> dict:
    """:func:`run_sweep` on a Setup of :func:`sweep_config` sharing ``s``'s backbone; an error
    becomes an entry, never a crash of the whole run."""
    t0 = time.perf_counter()
    sweep = None
    try:
        sweep = Setup(sweep_config(s.cfg), s.device, log=log, backbone=(s.bare, s.tokenizer))
        out = run_sweep(sweep, progress_factory, log=log, deadline=deadline)
    except Exception as e:  # e.g. out of memory at batch 64
        log(f"tenant sweep failed: {type(e).__name__}: {e}")
        out = {"error": f"{type(e).__name__}: {e}"[:600]}
    finally:
        del sweep
        gc.collect()
        if s.device.type == "cuda":
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t0
    return out
