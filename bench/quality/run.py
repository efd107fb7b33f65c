"""``python -m bench.quality``: train every method the same way on the task mixture and score it.

Contract:
- Modes: ``--quick`` (the tiny random Llama, a few steps, 1 seed: the harness end to end, well
  under a minute on 2 cores), default (SmolLM2-135M-Instruct, fp32, CPU, ``--seeds`` seeds, a
  45-minute budget), ``--full`` (default plus the PARA ablations, at PARA's picked learning rate;
  a 6-hour budget).
- Per seed: one data set (data.mixture_splits) and one batch order, shared by every method. The
  learning rate of each method is picked from its grid on seed 0's validation loss (the best of
  those runs is seed 0's result) and reused for the other seeds.
- Scores on the held-out test split, per family (exact match; accuracy for label tasks) and
  ``score`` (the mean over families of accuracy for label tasks, exact match otherwise).
- A unit (a method on a seed) that would overrun ``--budget-s`` is skipped and listed in
  ``skipped``. The JSON is written first (``quality-<tag>.json``), then report.py draws the
  Markdown and the PNG from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..report import single
from . import data as D
from . import methods as M
from . import metrics, report, train
from .backbone import load

# Three rates per method, centred where the first full run (docs/benchmarks/quality-cpu at 3e281c8) found
# each method's best: LoRA and (IA)3 picked the top of (3e-4, 1e-3, 3e-3) and (3e-3, 1e-2, 3e-2), so their
# grids moved up one step; 1e-2 diverges PARA. A pick at either end of a grid is flagged in the report.
GRIDS = {"para": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "ia3": (1e-2, 3e-2, 1e-1)}
QUICK_GRIDS = {"para": (3e-3, 1e-2), "lora": (3e-3, 1e-2), "ia3": (1e-2, 3e-2)}
SERVING_JSON = "docs/benchmarks/cpu.json"  # the serving benchmark whose decode ratios the report quotes
FULL_BUDGET_S = 6 * 3600  # --full has no 45-minute promise: 14 more PARA runs
PROBE = 16  # training examples whose loss is measured before and after training
MODES = {
    "quick": dict(backbone="tiny", sizes=dict(train=24, validation=6, test=6), steps=16, batch=4, seeds=1,
                  budget_s=120, grids=QUICK_GRIDS, tag="cpu-quick"),
    "default": dict(backbone="smollm2", sizes=dict(train=160, validation=12, test=24), steps=50, batch=8, seeds=2,
                    budget_s=2700, grids=GRIDS, tag="cpu"),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="tiny random model, a few steps, 1 seed (the harness check)")
    g.add_argument("--full", action="store_true", help="default plus the PARA ablations (pooler, r, targets, act)")
    ap.add_argument("--seeds", type=int, help="number of seeds (default 2; 1 with --quick)")
    ap.add_argument("--steps", type=int, help="training steps per run")
    ap.add_argument("--budget-s", type=float, help="time budget in seconds (units that would overrun are skipped)")
    ap.add_argument("--methods", help="name prefixes of the methods to run, comma-separated (default: all)")
    ap.add_argument("--out", default="docs/benchmarks", help="output folder (default docs/benchmarks)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def _summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def serving_cost(methods, path: str = SERVING_JSON) -> dict | None:
    """Decode time per step relative to the bare model, per method, from the committed serving
    benchmark (``python -m bench``), quoted with its date and commit; ``None`` where that file is
    missing. Only what it measured is quoted: PARA at its r, PEFT LoRA at its ``lora_r``, (IA)3."""
    try:
        with open(path) as f:
            bench = json.load(f)
    except (OSError, ValueError):
        return None
    serving, env = bench.get("serving") or {}, bench.get("env") or {}
    decode, lora_r = serving.get("decode") or {}, (serving.get("config") or {}).get("lora_r")
    measured = {}
    for m in methods:
        key = {"para": "para", "ia3": "ia3"}.get(m.kind)
        if m.kind == "lora" and m.params.get("r") == lora_r:
            key = "peft_lora"
        if key and m.ablation is None and "ratio" in decode.get(key, {}):
            q = decode[key]["ratio"]
            measured[m.name] = {"median": q["median"], "q1": q["q1"], "q3": q["q3"], "bench_method": key}
    return {"source": path, "date_utc": env.get("date_utc"), "commit": (env.get("git") or {}).get("commit"),
            "model": serving.get("model_name"), "batch": (serving.get("config") or {}).get("batch"),
            "decode_ratio": measured}


def evaluate(model, tok, splits, batch, tick=None) -> dict:
    test = splits["test"]
    max_new = max(len(tok.answer_ids(e.answer)) for e in test) + 2
    preds = train.generate(model, tok, test, batch=2 * batch, max_new=max_new, on_batch=tick)
    fams = {}
    for fam in sorted({e.family for e in test}):
        rows = [(e, p) for e, p in zip(test, preds) if e.family == fam]
        fams[fam] = metrics.score([e for e, _ in rows], [p for _, p in rows])
    score = statistics.fmean(f.get("accuracy", f["exact_match"]) for f in fams.values())
    return {"test_loss": train.mean_loss(model, tok, test, 2 * batch, tick), "families": fams, "score": score,
            "exact_match": statistics.fmean(f["exact_match"] for f in fams.values()),
            "samples": [{"family": e.family, "prompt": e.prompt, "answer": e.answer, "prediction": p}
                        for e, p in list(zip(test, preds))[:3]]}


def run(mode="quick", seeds=None, steps=None, budget_s=None, full=False, out="docs/benchmarks", progress=True,
        only=None):
    from tqdm import tqdm

    from bench.harness.machine import environment

    cfg = dict(MODES[mode])
    cfg.update({k: v for k, v in dict(seeds=seeds, steps=steps, budget_s=budget_s).items() if v is not None})
    if full and budget_s is None:
        cfg["budget_s"] = FULL_BUDGET_S
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.perf_counter()
    backbone, tok = load(cfg["backbone"])
    methods = M.default_methods(backbone, full=full)
    if only:
        methods = [m for m in methods if any(m.name.startswith(o) for o in only)]
    grid = lambda m: cfg["grids"][m.kind] if m.ablation is None else None
    nb = lambda split: -(-len(D.FAMILIES) * cfg["sizes"][split] // (2 * cfg["batch"]))  # batches of a split
    per_train = cfg["steps"] + 2 + nb("validation")  # steps, the probe before and after (one batch each), val
    per_eval = 2 * nb("test")
    trainings = sum(len(grid(m) or (1,)) for m in methods if m.kind != "bare")
    trainings += (cfg["seeds"] - 1) * sum(m.kind != "bare" for m in methods)
    units = trainings * per_train + cfg["seeds"] * len(methods) * per_eval
    units += cfg["seeds"] * nb("validation") * sum(m.kind == "bare" for m in methods)
    bar = tqdm(total=units, unit="batch", disable=not progress, desc="quality")
    tick = lambda: bar.update(1)
    results = {m.name: {"kind": m.kind, "params": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in m.params.items()},
                        "ablation": m.ablation, "runs": []} for m in methods}
    picked, skipped, step_s, eval_s = {}, [], [], 0.0
    for seed in range(cfg["seeds"]):
        splits = D.mixture_splits(cfg["sizes"], seed)
        order = train.batch_order(len(splits["train"]), cfg["steps"], cfg["batch"], seed)
        for m in methods:
            fallback = picked.get(m.name, picked.get("para", cfg["grids"]["para"][0]))
            lrs = [None] if m.kind == "bare" else (grid(m) if seed == 0 and grid(m) else [fallback])
            guess = (statistics.fmean(step_s) if step_s else 0.0) * cfg["steps"] * len(lrs) + eval_s
            if time.perf_counter() - t_start + guess > cfg["budget_s"]:
                skipped.append({"method": m.name, "seed": seed, "why": "budget"})
                bar.update(per_eval + (nb("validation") if m.kind == "bare" else per_train * len(lrs)))
                continue
            best, grid_losses = None, {}
            for lr in lrs:
                model = M.build(m, backbone, seed)
                rec = {"seed": seed, "lr": lr, "trainable": M.trainable(model)}
                if lr is not None:
                    rec.update(train.train(model, tok, splits["train"], order, lr, on_step=tick, probe=PROBE))
                    step_s.append(rec["step_s"])
                rec["val_loss"] = grid_losses[str(lr)] = train.mean_loss(model, tok, splits["validation"],
                                                                         2 * cfg["batch"], tick)
                if best is None or rec["val_loss"] < best[1]["val_loss"]:
                    best = (model, rec)
                del model
            model, rec = best
            rec["grid"] = grid_losses if len(lrs) > 1 else None
            if len(lrs) > 1:
                picked[m.name] = rec["lr"]
            t_eval = time.perf_counter()
            rec.update(evaluate(model, tok, splits, cfg["batch"], tick))
            eval_s = max(eval_s, time.perf_counter() - t_eval)
            results[m.name]["runs"].append(rec)
            bar.set_postfix_str(f"{m.name} seed {seed}: score {rec['score']:.2f}")
    bar.close()
    for r in results.values():
        runs = r["runs"]
        r["trainable"] = runs[0]["trainable"] if runs else None
        r["summary"] = {k: _summary([x.get(k) for x in runs]) for k in ("score", "exact_match", "test_loss",
                                                                        "step_s")}
        fams = sorted({f for x in runs for f in x["families"]})
        r["families"] = {f: {k: _summary([x["families"][f].get(k) for x in runs]) for k in ("exact_match", "accuracy")}
                         for f in fams}
    result = {"benchmark": "quality", "mode": mode + ("+full" if full else ""), "backbone": cfg["backbone"],
              "config": {k: v for k, v in cfg.items() if k != "grids"}, "grids": {k: list(v) for k, v in
                                                                                  cfg["grids"].items()},
              "picked_lr": picked, "families": list(D.FAMILIES), "labels": {k: list(v) for k, v in D.LABELS.items()},
              "methods": results, "skipped": skipped, "serving_cost": serving_cost(methods),
              "wall_s": time.perf_counter() - t_start,
              "environment": environment(torch.device("cpu"), torch.get_num_threads())}
    return single.save(result, os.path.join(out, f"quality-{cfg['tag']}{'-full' if full else ''}.json"),
                       report.write)


def main(argv=None) -> int:
    a = parse(argv)
    only = a.methods.split(",") if a.methods else None
    path = run("quick" if a.quick else "default", a.seeds, a.steps, a.budget_s, a.full, a.out, not a.no_progress, only)
    print(f"wrote {path} and its .md / .png")
    return 0
