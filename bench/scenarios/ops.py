"""Op-level microbenchmarks of ``para::pool``, ``generate`` and ``scale`` (docs/spec.md §5), and of
the fused ops ``pool_generate``, ``scaled_glu`` and ``scaled_linear`` where the package has them.

For every backend that runs on the device (``para_kernels.ops.available_backends``), forward
(the public ``para_kernels.ops`` functions, no grad) and backward (the ``para::*_backward``
ops, as autograd calls them), on the hidden sizes of SmolLM2-135M, LLaMA-2-7B and (``--full``
or on a GPU) LLaMA-2-13B. Beside them, backend ``reference+compile``: the reference's PyTorch
function (``para_kernels.ops.reference_ops.<op>``) under ``torch.compile(dynamic=False)``, forward
only, compiled once per case before timing (the compile time is reported, not timed), and
the same function eager, so the compiled row has a like-for-like eager baseline.

Each case reports the median and IQR of many timed runs (CPU: perf_counter over a calibrated
number of back-to-back calls; GPU: CUDA events, L2 flushed before each run), the bytes the op
must move (each input read once, each output written once), the achieved bandwidth and its
fraction of the measured copy bandwidth, and the floor max(bytes / copy rate, FLOPs / matmul
rate) with both rates measured here.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass

import torch

from para_kernels import ops as para_ops

from ..harness.contention import CpuShare
from ..harness.deadline import NO_DEADLINE
from ..harness.stats import summary
from ..harness.timers import L2Flusher, sync, time_fn
from .ops_cases import MODELS, Case, cases, count_cases, fused_cases  # noqa: F401 - MODELS: the op shapes

COMPILED = "reference+compile"  # the backend name of the torch.compile'd reference rows


@dataclass
class OpsConfig:
    batches: tuple = (1, 8, 32)
    prompt_lens: tuple = (64,)
    models: tuple = ("SmolLM2-135M", "LLaMA-2-7B")
    pool_modes: tuple = ("last", "mean", "max", "attn")
    dtypes: tuple = ("float32",)
    adapters: int = 4
    r: int = 12
    activation: str = "gelu"
    samples: int = 25
    max_case_s: float = 0.2
    copy_mib: int = 256
    matmul_n: int = 1024
    seed: int = 0
    compile: bool = True  # also time the reference under torch.compile
    compile_batches: tuple | None = (8,)  # batch sizes of the compiled rows (None: every batch)
    compile_models: tuple | None = None  # models of the compiled rows (None: every model)
    compile_dtypes: tuple | None = None  # dtypes of the compiled rows (None: every dtype)
    compile_prompt_lens: tuple | None = None  # prompt lengths of the compiled rows (None: every one)


def copy_rate(device: torch.device, mib: int) -> dict:
    """Bytes per second of ``dst.copy_(src)`` on a large buffer, counting read + write."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, samples=15, min_sample_s=0.0, warmup=2,
                    flush=L2Flusher(device) if device.type == "cuda" else None)
    s = summary(times)
    return {"bytes": 2 * src.numel() * 4, "time": s, "bytes_per_s": 2 * src.numel() * 4 / s["median"],
            "what": f"Tensor.copy_ of a {mib} MiB fp32 buffer "
                    f"({'device to device' if device.type == 'cuda' else 'host memory'}), read + write"}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_fn(lambda: a @ b, device, samples=10, min_sample_s=0.0, warmup=2)
    s = summary(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "time": s, "flops_per_s": 2 * n**3 / s["median"]}


def _time_case(fn, device, cfg: OpsConfig, flush) -> tuple[dict, float | None]:
    """(summary of the seconds per call, share of the CPUs other processes used meanwhile)."""
    share = CpuShare()
    share.start()
    with torch.no_grad():
        times = time_fn(fn, device, samples=cfg.samples, max_total_s=cfg.max_case_s, flush=flush)
    return summary(times), share.stop()


def _row(case: Case, direction: str, backend: str, dtype_name: str, s: dict, others, rates, mm) -> dict:
    nbytes, flops = (case.bytes_fwd, case.flops_fwd) if direction == "forward" else (case.bytes_bwd, case.flops_bwd)
    bw = nbytes / s["median"]
    floor = max(nbytes / rates["copy"]["bytes_per_s"], flops / mm["flops_per_s"])
    return {**case.meta, "direction": direction, "backend": backend, "dtype": dtype_name, "time": s,
            "bytes": nbytes, "flops": flops, "gb_per_s": bw / 1e9,
            "frac_of_copy_bw": bw / rates["copy"]["bytes_per_s"], "floor_s": floor,
            "floor_over_time": floor / s["median"], "others_cpu": others}


_COMPILE_LOGGERS = ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension")


def _compile(case: Case, device: torch.device) -> dict:
    """torch.compile(dynamic=False) the case's reference function from a clean dynamo state and
    call it once (the compile). Returns the compiled callable, the compile time, how many graphs
    dynamo made (more than one: graph breaks) and the largest difference from the eager
    function's output; or the error text if compiling failed."""
    fn, args = case.reference
    levels = {name: logging.getLogger(name).level for name in _COMPILE_LOGGERS}
    for name in _COMPILE_LOGGERS:  # graph-break advice would flood the console
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        torch._dynamo.reset()
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = torch.compile(fn, dynamic=False)
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            out = compiled(*args)
            sync(device)
            compile_s = time.perf_counter() - t0
            ref = fn(*args)
        diff = float((out.double() - ref.double()).abs().max()) if out.numel() else 0.0
        return {"fn": lambda: compiled(*args), "compile_s": compile_s, "max_abs_diff": diff,
                "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before}
    except Exception as e:  # no C++ compiler, an op inductor cannot lower, ...
        return {"fn": None, "error": f"{type(e).__name__}: {e}"[:600]}
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _compiled_rows(case: Case, device, cfg: OpsConfig, flush, dtype_name: str, rates, mm, bar) -> tuple:
    """(entry of the compile table, ops row of the compiled reference or None)."""
    entry = {**case.meta, "dtype": dtype_name}
    c = _compile(case, device)
    fn = c.pop("fn")
    entry.update(c)
    bar.update(1)
    row = None
    if fn is not None:
        ref_fn, args = case.reference
        entry["eager_function_time"], _ = _time_case(lambda: ref_fn(*args), device, cfg, flush)
        s, others = _time_case(fn, device, cfg, flush)
        entry["compiled_time"] = s
        row = _row(case, "forward", COMPILED, dtype_name, s, others, rates, mm)
    bar.update(1)
    return entry, row


def _wants_compile(case: Case, cfg: OpsConfig, dtype_name: str) -> bool:
    """Compile this case? (each compile takes seconds: the compiled rows are a subset)"""
    def chosen(allowed, value):
        return allowed is None or value in allowed
    return (cfg.compile and bool(case.reference) and chosen(cfg.compile_batches, case.meta["B"])
            and chosen(cfg.compile_models, case.meta["model"]) and chosen(cfg.compile_dtypes, dtype_name)
            and chosen(cfg.compile_prompt_lens, case.meta["T"]))


class _DeviceFailed(RuntimeError):
    pass


def _check_device(device: torch.device) -> None:
    """After an error: raise _DeviceFailed if the CUDA device no longer answers (a sticky error
    such as an illegal memory access), rather than failing every remaining case."""
    if device.type != "cuda":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001
        raise _DeviceFailed(f"{type(e).__name__}: {e}"[:600]) from None


def _op_name(case: Case, direction: str) -> str:
    return case.meta["op"] + ("" if direction == "forward" else "_backward")


def run(cfg: OpsConfig, device: torch.device, *, progress_factory, log=print, deadline=NO_DEADLINE) -> dict:
    """Every case on every backend, forward and backward, then the compiled reference rows.

    The cases of one dtype are made one shape at a time and each is timed on every backend
    before the next is made, so only one shape's tensors are alive (tens of GB at the --full
    GPU shapes otherwise). A backend that lacks an op (dispatch falls back to another) is not
    timed for it: the fallback's own row is there; ``fallbacks`` records it. Past ``deadline``
    no new case starts (``skipped_cases`` counts them); SIGINT returns what was measured, with
    ``interrupted`` set."""
    rates = {"copy": copy_rate(device, cfg.copy_mib)}
    log(f"measured copy bandwidth: {rates['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    flush = L2Flusher(device) if device.type == "cuda" else None
    rows, errors, compiled, fallbacks = [], [], [], {}
    backends = para_ops.available_backends(device)
    previous = para_ops.get_backend()
    out = {"config": asdict(cfg), "rates": rates, "rows": rows, "errors": errors, "compiled": compiled,
           "fallbacks": fallbacks,
           "timer": "CUDA events, L2 flushed before each run" if device.type == "cuda"
           else "perf_counter_ns over a calibrated number of back-to-back calls (>= 0.2 ms per sample)"}
    skipped = 0
    to_compile = []  # (case, dtype name, matmul rate): compiled after every eager row
    try:
        n_cases = count_cases(cfg)
        for dtype_name in cfg.dtypes:
            if deadline.passed():
                skipped += n_cases
                continue
            dtype = getattr(torch, dtype_name)
            mm = matmul_rate(device, cfg.matmul_n, dtype)
            rates[f"matmul_{dtype_name}"] = mm
            log(f"measured {dtype_name} matmul rate: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
            with progress_factory(total=n_cases * 2 * len(backends), desc=f"ops {dtype_name}") as bar:
                made = itertools.chain(cases(cfg, device, dtype), fused_cases(cfg, device, dtype))
                for done, case in enumerate(made):
                    if deadline.passed():  # the remaining cases of this dtype are not even made
                        skipped += n_cases - done
                        break
                    for backend in backends:
                        para_ops.set_backend(backend)
                        for direction, fn in (("forward", case.forward), ("backward", case.backward)):
                            ran_on = para_ops.backend_for(_op_name(case, direction), device)
                            if ran_on != backend:  # not implemented: the fallback's row is timed anyway
                                fallbacks.setdefault(backend, {})[_op_name(case, direction)] = ran_on
                            else:
                                try:
                                    s, others = _time_case(fn, device, cfg, flush)
                                except Exception as e:  # a backend may not implement every op / shape
                                    errors.append({**case.meta, "direction": direction, "backend": backend,
                                                   "dtype": dtype_name, "error": f"{type(e).__name__}: {e}"[:300]})
                                    _check_device(device)
                                else:
                                    rows.append(_row(case, direction, backend, dtype_name, s, others, rates, mm))
                            bar.update(1)
                    para_ops.set_backend(previous)
                    if _wants_compile(case, cfg, dtype_name):
                        to_compile.append((case, dtype_name, mm))
                    del case
        para_ops.set_backend(previous)
        if to_compile:
            with progress_factory(total=2 * len(to_compile), desc="ops, reference under torch.compile") as bar:
                for case, dtype_name, mm in to_compile:
                    if deadline.passed():
                        skipped += 1
                        continue
                    entry, row = _compiled_rows(case, device, cfg, flush, dtype_name, rates, mm, bar)
                    compiled.append(entry)
                    if row is not None:
                        rows.append(row)
                    else:
                        errors.append({**case.meta, "direction": "forward", "backend": COMPILED,
                                       "dtype": dtype_name, "error": entry["error"]})
    except KeyboardInterrupt:  # a time limit's signal: hand back what was measured
        out["interrupted"] = True
    except _DeviceFailed as e:  # e.g. an illegal memory access: every later CUDA call would fail too
        out["device_error"] = str(e)
        log(f"the op suite stopped: the CUDA device failed: {e}")
    finally:
        para_ops.set_backend(previous)
        to_compile.clear()
        if compiled:
            torch._dynamo.reset()
    out["backends"] = backends + ([COMPILED] if compiled else [])
    if skipped:
        out["skipped_cases"] = skipped
        log(f"time limit: the op suite skipped {skipped} case(s)")
    return out
