"""``python -m bench`` (``make bench``): the para_kernels benchmark suite.

    python -m bench [--quick | --full] [--check | --no-check] [--out docs/benchmarks]

1. Headline: multi-tenant greedy decode (and prefill) — bare vs PARA vs PEFT LoRA vs BGMV-style
   LoRA vs (IA)³, as ratios to the bare model (bench/scenarios/serving.py), after correctness checks; the
   decode-step and prefill ratios under four tenant-popularity layouts (distinct, uniform, zipf,
   identical) with LoRA at ranks 8 and 16; generate() tokens per second; then PARA's decode
   overhead measured piece by piece (bench/scenarios/attribution.py). On the CPU for SmolLM2-135M (real
   weights); on a GPU for SmolLM2-135M and for LLaMA-2-7B shapes with random weights (batch 32
   from 8 tenants), with PARA through every backend present, the decode step under CUDA-graph
   replay (bench/scenarios/graphs.py) and, with --full, a tenant-count sweep at batch 64 (8 to 64 tenants).
2. Op microbenchmarks of pool / generate / scale and the fused ops, forward and backward, per
   backend, plus the reference under torch.compile (bench/scenarios/ops.py).

Writes <out>/<device>.json, <device>.md and PNG plots; prints a table.

``--vllm`` runs instead the vLLM comparison (bench/vllm): vLLM bare vs vLLM + PARA vs vLLM's own
multi-LoRA, measured in the vLLM venv; writes <out>/vllm-cpu.json, .md and .png.
"""
from __future__ import annotations

import argparse

from .harness.deadline import Deadline
from .scenarios import models
from .scenarios.methods import backend_methods
from .scenarios.models import MODEL_NAMES, SMOLLM2
from .scenarios.ops import OpsConfig
from .scenarios.serving_setup import ServingConfig


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false",
                      help="short run, under 10 minutes on an idle 2-core CPU (default)")
    size.add_argument("--full", dest="full", action="store_true",
                      help="more runs, longer decodes, more shapes, an A/A control and a profile")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="check correctness before timing (default: on)")
    p.add_argument("--out", default="docs/benchmarks", help="report folder (default: docs/benchmarks)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype of the decode comparison (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--only", choices=("serving", "ops"), default=None, help="run one part only")
    p.add_argument("--models", default=None,
                   help="override: comma-separated serving models, from " + ", ".join(MODEL_NAMES)
                   + " (default: SmolLM2-135M on the CPU; SmolLM2-135M,LLaMA-2-7B on a GPU)")
    p.add_argument("--graph-rounds", type=int, default=None,
                   help="override: CUDA-graph replay rounds of the decode step (0 skips it; CUDA only)")
    p.add_argument("--sweep-tenants", default=None,
                   help="override: comma-separated tenant counts of the tenant sweep ('' skips it)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="profile PARA vs bare decoding (default: with --full, or when PARA's decode ratio > 1.03)")
    p.add_argument("--rounds", type=int, default=None, help="override: alternated decode runs per method")
    p.add_argument("--new-tokens", type=int, default=None, help="override: tokens decoded per run")
    p.add_argument("--prefill-rounds", type=int, default=None, help="override: alternated prefill runs per method")
    p.add_argument("--lockstep-steps", type=int, default=None,
                   help="override: decode steps per lockstep run (popularity table; 0 skips it)")
    p.add_argument("--popularity-rounds", type=int, default=None, help="override: lockstep runs per popularity layout")
    p.add_argument("--ops-models", default=None, help="override: comma-separated op-benchmark models "
                   "(SmolLM2-135M, LLaMA-2-7B, LLaMA-2-13B)")
    p.add_argument("--ops-batches", default=None, help="override: comma-separated op-benchmark batch sizes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="time the reference under torch.compile too (default: on)")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="end within about S seconds (a device lease): the optional serving parts (CUDA-graph "
                   "replay, popularity table, tenant sweep, attribution, profile) are skipped once the serving "
                   "share of S is spent, and the op suite stops starting new cases at S; the report says what "
                   "was skipped (default: no limit)")
    p.add_argument("--time-after-failed-checks", action="store_true",
                   help="time a model even when one of its correctness checks failed (the failure is still "
                   "reported and the exit status is 1; default: timing is skipped)")
    p.add_argument("--vllm", action="store_true",
                   help="instead of the suite: vLLM bare vs vLLM + PARA vs vLLM's multi-LoRA, measured in the vLLM "
                   "venv (bench/vllm; --quick: a tiny model; writes <out>/vllm-cpu.*)")
    p.set_defaults(full=False)
    return p.parse_args(argv)


FULL_METHODS = ("para", "para_none", "peft_lora", "bgmv_lora", "ia3", "bare_again")


QUICK_METHODS = ("para", "peft_lora", "bgmv_lora", "ia3")


def _with_backends(methods: tuple, device) -> tuple:
    """``methods`` with 'para@<backend>' for every backend present after 'para' (GPU only)."""
    extra = backend_methods(device)
    i = methods.index("para") + 1 if "para" in methods else len(methods)
    return methods[:i] + extra + methods[i:]


def serving_config(name: str, args, device, dtype: str):
    """The decode comparison's settings for model ``name`` on ``device`` (quick or full).

    CPU: SmolLM2-135M as always (the quick run must end within 10 minutes on 2 cores). GPU:
    sized so that `--full` (SmolLM2, LLaMA-2-7B, the sweep and the op suite) ends in about 5
    minutes on an H200: few alternated runs, short decodes, many cheap CUDA-graph replays."""
    methods = FULL_METHODS if args.full else QUICK_METHODS
    # random backbones: PARA adapters with a clearly visible effect on the logits (the 16-bit
    # checks' bars scale with the effect, and a random model's logits are noisier than SmolLM2's)
    visible = {"para_w_up_std": 0.05, "para_b_up_std": 0.05} if models.is_random(name) else {}
    if device.type != "cuda":
        if args.full:
            return ServingConfig(model=name, new_tokens=64, rounds=11, prefill_rounds=15, dtype=dtype,
                                 interleaved_steps=32, popularity_rounds=3, methods=methods, **visible)
        return ServingConfig(model=name, new_tokens=32, rounds=5, prefill_rounds=4, dtype=dtype, methods=methods,
                             **visible)
    methods = _with_backends(methods, device)
    if name == "LLaMA-2-7B":  # the target of issue 3: 32 requests from 8 tenants
        return ServingConfig(model=name, batch=32, tenants=8, new_tokens=16, rounds=3, prefill_rounds=5,
                             interleaved_steps=16, popularity_rounds=2, dtype=dtype, methods=methods,
                             graph_rounds=200 if args.full else 100,
                             sweep_tenants=(8, 16, 32, 64) if args.full else (), sweep_batch=64,
                             sweep_steps=16, sweep_rounds=2, **visible)
    return ServingConfig(model=name, new_tokens=32, rounds=5, prefill_rounds=9, interleaved_steps=16,
                         popularity_rounds=2, dtype=dtype, methods=methods, graph_rounds=200 if args.full else 100,
                         **visible)


def configs(args, device):
    """(serving configs, one per model; op-suite config)."""
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.models:
        names = tuple(m.strip() for m in args.models.split(",") if m.strip())
    else:
        names = (SMOLLM2, "LLaMA-2-7B") if device.type == "cuda" else (SMOLLM2,)
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {', '.join(MODEL_NAMES)}")
    servings = [serving_config(n, args, device, dtype) for n in names]
    if args.full:
        ops = OpsConfig(batches=(1, 8, 32, 128), prompt_lens=(64, 512), samples=100, max_case_s=2.0,
                        models=("SmolLM2-135M", "LLaMA-2-7B", "LLaMA-2-13B"), compile_batches=None)
    else:
        ops = OpsConfig()
    if device.type == "cuda":
        ops.dtypes = ("bfloat16", "float32")
        ops.copy_mib, ops.matmul_n = 1024, 8192
        ops.samples, ops.max_case_s = 50, 0.5
        ops.models = ("SmolLM2-135M", "LLaMA-2-7B", "LLaMA-2-13B")
        # each inductor compile takes seconds: the compiled rows are LLaMA-2-7B, bf16, T = 64,
        # B = 32 (--full: also B = 8), beside every backend's rows
        ops.compile_batches = (8, 32) if args.full else (32,)
        ops.compile_models, ops.compile_dtypes, ops.compile_prompt_lens = ("LLaMA-2-7B",), ("bfloat16",), (64,)
    overrides = {"rounds": args.rounds, "new_tokens": args.new_tokens, "prefill_rounds": args.prefill_rounds,
                 "interleaved_steps": args.lockstep_steps, "popularity_rounds": args.popularity_rounds,
                 "graph_rounds": args.graph_rounds}
    if args.sweep_tenants is not None:
        overrides["sweep_tenants"] = tuple(int(k) for k in args.sweep_tenants.split(",") if k.strip())
    for serving in servings:
        for name, value in overrides.items():
            if value is not None:
                setattr(serving, name, value)
    if args.ops_models:
        ops.models = tuple(m.strip() for m in args.ops_models.split(","))
        ops.compile_models = None if ops.compile_models is None else \
            tuple(m for m in ops.compile_models if m in ops.models) or ops.models[:1]
    if args.ops_batches:
        ops.batches = tuple(int(b) for b in args.ops_batches.split(","))
        ops.compile_batches = None if ops.compile_batches is None else \
            tuple(b for b in ops.compile_batches if b in ops.batches) or ops.batches[:1]
    ops.compile = args.compile
    return servings, ops


def time_shares(limit_s: float | None) -> tuple:
    """(serving deadline, whole-run deadline) of ``--time-limit``: the op suite keeps the last
    30 % of the limit (at least a minute, at most half), the serving comparison the rest."""
    end = Deadline.after(limit_s)
    if limit_s is None:
        return end, end
    ops_share = min(max(60.0, 0.3 * limit_s), 0.5 * limit_s)
    return end.earlier(ops_share), end
