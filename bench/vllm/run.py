"""One run: prepare (this venv), measure (the vLLM venv, a subprocess), report.

``run(quick=False)`` serves SmolLM2-135M-Instruct (4 tenants, batch 16, prompts of about 64
tokens, 32 new tokens, 5 rounds); ``quick=True`` a tiny random LLaMA (2 tenants, batch 4, 4 new
tokens, 2 rounds: the harness end to end, for tests). Writes ``<out>/vllm-<tag>.json`` (the
measurements with the machine and commit), then report.py's ``.md`` and ``.png``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from bench.harness.machine import REPO_ROOT, environment
from bench.report import single

from . import prepare, report

VLLM_PYTHON = os.path.join(REPO_ROOT, ".venv-vllm", "bin", "python")
TEXT = ("The quarterly report from the northern warehouse lists {n} pallets of canned tomatoes, several crates of "
        "olive oil, and a shipment of dried pasta that arrived late because of the storm. Summarise the report for "
        "the store manager in one short paragraph.")


def plan_for(quick: bool, work: str) -> dict:
    if quick:
        from tests.kit.vllm_engine import build_model

        model = os.path.join(work, "model")
        build_model(model)
        sizes = dict(tenants=2, batch=4, new_tokens=4, rounds=2, max_model_len=256)
    else:
        model = prepare.model(os.path.join(work, "model"))
        sizes = dict(tenants=4, batch=16, new_tokens=32, rounds=5, max_model_len=512)
    adapters = prepare.adapters(work, model, sizes["tenants"])
    prompts = [TEXT.format(n=17 * i + 3) for i in range(sizes["batch"])]
    return dict(sizes, model=model, adapters=adapters, lora_ranks=[8, 16], prompts=prompts, quick=quick)


def run(quick: bool = False, out: str = "docs/benchmarks", vllm_python: str = VLLM_PYTHON, log=print) -> str:
    if not os.path.exists(vllm_python):
        raise FileNotFoundError(f"{vllm_python} not found: the vLLM benchmark runs in the vLLM venv "
                                "(make vllm-install)")
    t0 = time.perf_counter()
    import torch

    env = environment(torch.device("cpu"), torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="para-vllm-bench-") as work:
        plan = plan_for(quick, work)
        with open(os.path.join(work, "plan.json"), "w") as f:
            json.dump(plan, f)
        raw = os.path.join(work, "measured.json")
        child_env = dict(os.environ, PYTHONPATH=REPO_ROOT, VLLM_CPU_KVCACHE_SPACE="1")
        if quick:
            child_env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        log(f"vLLM benchmark: measuring in {vllm_python} ({'quick' if quick else 'default'} run)")
        proc = subprocess.run([vllm_python, "-m", "bench.vllm.measure", work, raw], cwd=REPO_ROOT, env=child_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not os.path.exists(raw):
            raise RuntimeError(f"the vLLM measurement failed (exit {proc.returncode}):\n{proc.stdout[-6000:]}")
        with open(raw) as f:
            measured = json.load(f)
    measured["plan"] = {k: v for k, v in measured["plan"].items() if k not in ("model", "adapters")}
    result = {"benchmark": "vllm", "mode": "quick" if quick else "default",
              "model": "tiny random LLaMA" if quick else "SmolLM2-135M-Instruct", "environment": env,
              "measured": measured, "exit_code": proc.returncode, "wall_s": time.perf_counter() - t0}
    return single.save(result, os.path.join(out, f"vllm-cpu{'-quick' if quick else ''}.json"), report.write)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.vllm", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few tokens (the harness check)")
    ap.add_argument("--out", default="docs/benchmarks")
    ap.add_argument("--vllm-python", default=VLLM_PYTHON, help="the vLLM venv's python (default .venv-vllm)")
    a = ap.parse_args(argv)
    path = run(a.quick, a.out, a.vllm_python, log=lambda m: print(m, file=sys.stderr))
    with open(path) as f:
        res = json.load(f)
    print(report.console(res))
    return res["exit_code"]
