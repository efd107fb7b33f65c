"""Alternation of variants within one run, so a slow drift of the machine cancels out.

Contract: ``alternated(s, methods, rounds, timer, keys, progress)`` runs the sequence
``bare, m1, bare, m2, ..., bare`` (:func:`sequence`, the method order rotating every round),
calling ``timer(s, method) -> dict`` once per entry; ``s.cfg`` supplies the contention limits
(``max_other_cpu``, ``retry_share``, ``max_wait_s``). A run during which other processes used
more than ``max_other_cpu`` of the CPUs is repeated (within a retry budget). Each method run is
divided by the mean of the two bare runs beside it; the result holds every run and the summary
of those per-run ratios. :func:`step_summary` and :func:`prefill_ratios` do the same for
lockstep runs (per-step and per-run ratios to the bare model).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .contention import Quiet
from .stats import summary

if TYPE_CHECKING:  # the harness never imports a scenario at run time
    from ..scenarios.serving_setup import Setup


def sequence(methods, rounds: int) -> list[str]:
    """bare, m1, bare, m2, ..., bare: the method order rotates every round."""
    seq = ["bare"]
    for r in range(rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            seq += [m, "bare"]
    return seq


def alternated(s: Setup, methods, rounds: int, timer, keys: dict, progress) -> dict:
    """Time the alternated sequence; for each method and each ``keys`` entry {name: run field},
    the per-run ratios to the mean of the neighbouring bare runs and their summary."""
    seq = sequence(list(methods), rounds)
    cfg = s.cfg
    budget = int(cfg.retry_share * len(seq))
    quiet = Quiet(cfg.max_other_cpu, cfg.max_wait_s)
    runs, retried = [], 0
    for m in seq:
        while True:
            r = timer(s, m)
            busy = r.get("others_cpu")
            contended = busy is not None and busy > cfg.max_other_cpu
            if not contended or retried >= budget:
                break
            retried += 1
            progress.set_postfix_str(f"run again: others used {busy:.0%} of the CPUs")
            quiet.wait(progress)
        r["contended"] = contended
        runs.append((m, r))
        if retried:
            progress.set_postfix_str(f"{retried} run(s) repeated (other processes were busy)")
        progress.update(1)
    primary = next(iter(keys.values()))
    shares = [r["others_cpu"] for _, r in runs if r.get("others_cpu") is not None]
    out = {"sequence": seq, "retried_runs": retried, "waited_s": quiet.waited_s,
           "contended_runs_kept": sum(r["contended"] for _, r in runs),
           "others_cpu": summary(shares) if shares else None,
           "bare": {"runs": [r for m, r in runs if m == "bare"],
                    "time": summary([r[primary] for m, r in runs if m == "bare"])}}
    for m in methods:
        idx = [i for i, (name, _) in enumerate(runs) if name == m]
        entry = {"runs": [runs[i][1] for i in idx], "time": summary([runs[i][1][primary] for i in idx])}
        for label, key in keys.items():
            ratios = [runs[i][1][key] / (0.5 * (runs[i - 1][1][key] + runs[i + 1][1][key])) for i in idx]
            entry[label] = summary(ratios)
            entry[label + "_runs"] = ratios
        out[m] = entry
    return out


def step_summary(times: dict, method: str, others, steps: int) -> dict:
    ratios = [a / b for a, b in zip(times[method], times["bare"])]
    return {"ratio": summary(ratios), "time": summary(times[method]), "bare_time": summary(times["bare"]),
            "steps": steps, "others_cpu": others}


def prefill_ratios(prefills: list[dict], methods) -> dict:
    """``prefills``: one {model: seconds} per lockstep run. Per method: the summary of its
    per-run ratio to that run's bare prefill, and of its times."""
    out = {"bare": {"time": summary([p["bare"] for p in prefills])}}
    for m in methods:
        out[m] = {"time": summary([p[m] for p in prefills]),
                  "ratio": summary([p[m] / p["bare"] for p in prefills])}
    return out
