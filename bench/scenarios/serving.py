"""The headline comparison (docs/spec.md §5): multi-tenant greedy decoding of one backbone —
SmolLM2-135M with its real weights, or LLaMA shapes with random weights (models.py) — bare vs
PARA vs PEFT LoRA vs BGMV-style LoRA vs (IA)3 (methods.py).

``run(cfg, device, check=...)`` for one model: set-up (serving_setup.py), the correctness
checks (checks.py; a failure skips the timing unless ``time_failed``), the timed phases
(decode.py: decode, CUDA-graph replay, prefill, popularity, interleaved cross-check) and the
tenant sweep (sweep.py). The result dict is filled part by part, so a run interrupted or
failing half-way keeps what finished; its fields are the "serving" part of the report JSON
(bench/report/schema.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..harness.deadline import NO_DEADLINE
from . import models
from .checks import run_checks
from .decode import run_timing
from .methods import method_label, para_backend
from .serving_setup import ServingConfig, Setup
from .sweep import run_sweep_guarded


def run(cfg: ServingConfig, device: torch.device, *, check: bool, progress_factory, log=print,
        deadline=NO_DEADLINE, time_failed: bool = False, out: dict | None = None) -> dict:
    """One model's serving comparison: set-up, checks, timing, tenant sweep. A failed check
    skips the timing unless ``time_failed``; past ``deadline`` the optional parts are skipped
    (see :func:`run_timing`; the sweep too). ``out``: the dict to fill (returned), part by part
    as each finishes, so that a run interrupted or failing half-way keeps its finished parts."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    result = {} if out is None else out
    result.update({"model": cfg.model, "model_name": models.full_name(cfg.model), "config": asdict(cfg),
                   "device": str(device), "methods": {m: method_label(m, cfg) for m in ["bare", *cfg.methods]}})
    s = Setup(cfg, device, log=log)
    result.update({"random_weights": s.shared, "load_s": s.load_s,
                   "row_tenants": s.row_ids, "pool_tenants": len(s.names), "prompt_tokens": list(s.input_ids.shape),
                   "para_backends": {m: s.backends_used(m) for m in cfg.methods if m == "para" or para_backend(m)}
                   if s.para is not None else {},
                   "setup_s": time.perf_counter() - t0})
    if check:
        log("checks:")
        t1 = time.perf_counter()
        result["checks"] = {}
        try:
            run_checks(s, log=log, results=result["checks"])
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a failed check, recorded
            what = f"{type(e).__name__}: {e}"[:500]
            log(f"  a check raised: {what}")
            result["checks"]["checks_raised"] = {"value": float("nan"), "bar": "no exception", "ok": False,
                                                 "what": f"the checks stopped here: {what}"}
        result["checks_s"] = time.perf_counter() - t1
        failed = [k for k, v in result["checks"].items() if isinstance(v, dict) and v.get("ok") is False]
        if failed:
            result["failed_checks"] = failed
            if not time_failed:
                log(f"checks FAILED: {failed}; timing skipped")
                return result
            log(f"checks FAILED: {failed}; timing anyway (--time-after-failed-checks)")
            result["timed_despite_failed_checks"] = True
    run_timing(s, progress_factory, log=log, deadline=deadline, out=result)
    if cfg.sweep_tenants and deadline.passed():
        result.setdefault("skipped", []).append("tenant sweep (--time-limit)")
        log("time limit: tenant sweep skipped")
    elif cfg.sweep_tenants:
        result["sweep"] = run_sweep_guarded(s, progress_factory, log, deadline=deadline)
        result["phases_s"]["tenant_sweep"] = result["sweep"]["wall_s"]
    result["wall_s"] = time.perf_counter() - t0
    result["setup"] = s  # dropped before serialisation; used by the attribution and profile
    return result
