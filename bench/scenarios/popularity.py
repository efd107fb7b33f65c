"""Tenant popularity: the headline's batch with its rows assigned to tenants four ways —
distinct (row b -> tenant b), uniform (b mod tenants, the headline's layout), zipf (tenant k
drawn with probability ∝ 1/k^zipf_s, seeded) and identical (every row tenant 0) — with LoRA at
every rank of ``lora_ranks``. For each layout the bare model and every method decode in
lockstep (lockstep.py); the prefill that starts each run is timed too.
"""
from __future__ import annotations

import statistics

import torch

from ..harness.alternation import prefill_ratios, step_summary
from ..harness.contention import Quiet
from ..harness.stats import summary
from .lockstep import lockstep_quiet, warm_lockstep
from .methods import method_label, popularity_methods
from .serving_setup import ServingConfig, Setup, row_tenants


def popularity_rows(kind: str, cfg: ServingConfig, pool: int) -> list[int]:
    """Tenant of each row under one popularity layout."""
    B = cfg.batch
    if kind == "distinct":
        return list(range(B))
    if kind == "uniform":
        return row_tenants(cfg)
    if kind == "identical":
        return [0] * B
    if kind == "zipf":
        k = torch.arange(1, pool + 1, dtype=torch.float64)
        p = k ** -cfg.zipf_s
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.multinomial(p / p.sum(), B, replacement=True, generator=g).tolist()
    raise ValueError(f"unknown popularity layout {kind!r}")


def run_popularity(s: Setup, progress_factory) -> dict:
    """Decode-step ratios to the bare model of every popularity method under every row layout.
    Each round runs every layout once (the layout order rotating each round); each run is one
    :func:`lockstep` of all methods, so all methods of a layout are measured side by side."""
    cfg = s.cfg
    methods = popularity_methods(cfg)
    kinds = list(cfg.popularity)
    layouts = {k: popularity_rows(k, cfg, len(s.names)) for k in kinds}
    times = {k: {m: [] for m in ["bare", *methods]} for k in kinds}
    prefills = {k: [] for k in kinds}
    rounds = {k: [] for k in kinds}
    quiet = Quiet(cfg.max_other_cpu, cfg.max_wait_s / 4)
    warm_lockstep(s, methods, [s.names[t] for t in layouts[kinds[0]]])
    desc = f"tenant popularity ({cfg.interleaved_steps} lockstep steps x {len(methods) + 1} models)"
    with progress_factory(total=cfg.popularity_rounds * len(kinds), desc=desc) as bar:
        for rnd in range(cfg.popularity_rounds):
            j = rnd % len(kinds)
            for kind in kinds[j:] + kinds[:j]:
                names = [s.names[t] for t in layouts[kind]]
                r = lockstep_quiet(s, methods, cfg.interleaved_steps, names, quiet, bar, start=rnd)
                for m, ts in r["times"].items():
                    times[kind][m] += ts
                prefills[kind].append(r["prefill"])
                rounds[kind].append({"others_cpu": r["others_cpu"], "repeated": r.get("repeated", False),
                                     "ratio_medians": {m: statistics.median(a / b for a, b in zip(
                                         r["times"][m], r["times"]["bare"])) for m in methods}})
                bar.update(1)
    out = {"methods": methods, "labels": {m: method_label(m, cfg) for m in ["bare", *methods]},
           "pool_tenants": len(s.names), "steps_per_run": cfg.interleaved_steps,
           "rounds": cfg.popularity_rounds, "waited_s": quiet.waited_s, "layouts": {}}
    for kind in kinds:
        shares = [x["others_cpu"] for x in rounds[kind] if x["others_cpu"] is not None]
        others = summary(shares) if shares else None
        n = len(times[kind]["bare"])
        out["layouts"][kind] = {
            "row_tenants": layouts[kind], "distinct_tenants": len(set(layouts[kind])),
            "bare_time": summary(times[kind]["bare"]), "runs": rounds[kind], "others_cpu": others,
            "methods": {m: step_summary(times[kind], m, others, n) for m in methods},
            "prefill": prefill_ratios(prefills[kind], methods)}
    return out
