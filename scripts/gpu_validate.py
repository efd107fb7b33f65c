"""The checks of the one-shot device run (scripts/gpu_check.sh), one part per call so that the
script can run each in its own process under a hard time limit:

    python scripts/gpu_validate.py smoke --backend triton|cuda   every kernel once, tiny sizes
    python scripts/gpu_validate.py table --op OP --backend B --out F.jsonl [--big: only >2^31 elements]
    python scripts/gpu_validate.py stress --out F.jsonl          pool_generate past residency
    python scripts/gpu_validate.py streams --out F.jsonl         side streams, two streams at once
    python scripts/gpu_validate.py graphs --backend B --out F.jsonl
    python scripts/gpu_validate.py determinism --backend B --out F.jsonl
    python scripts/gpu_validate.py report DIR                    DIR/*.jsonl -> DIR/validation.md + .json

Every check compares with the PyTorch reference (para_kernels.ops.reference_ops) run in fp64 on
fp64 copies of the inputs, by ||out - ref|| / ||ref|| against docs/spec.md's bars (fp32 1e-5,
fp16 5e-3, bf16 2e-2; backward twice that: it sums rounded products), NaN never passing. The
caching allocator's free memory is filled with NaN before each call (an element a kernel
never writes shows up). Each result is appended to the .jsonl file as soon as it is known, so
a part killed at its time limit still reports what it finished. ``GPU_CHECK_QUICK=1`` (or a
machine without CUDA) runs the same code on the CPU at small sizes, for dry runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
import traceback

import torch

# the package from this tree, installed or not (on the device the build runs beside these checks)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK = bool(os.environ.get("GPU_CHECK_QUICK")) or not torch.cuda.is_available()
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu":  # dry run: the Triton backend runs in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import para_kernels  # noqa: E402
from para_kernels.ops import dispatch, reference_ops  # noqa: E402

BAR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_out = None


def emit(**row):
    row = {k: (NAMES.get(v, v) if isinstance(v, torch.dtype) else v) for k, v in row.items()}
    print(json.dumps(row), flush=True)
    if _out:
        with open(_out, "a") as f:
            f.write(json.dumps(row) + "\n")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def poison():
    """NaN in the allocator's free blocks: outputs that skip elements show NaN."""
    if DEV.type == "cuda":
        free = torch.cuda.mem_get_info()[0]
        junk = torch.full((min(free // 4, 8 << 30) // 4,), float("nan"), device=DEV)
        del junk


def rel_err(out, ref) -> float:
    if out.numel() == 0:
        return 0.0
    if out.shape != ref.shape:
        return float("inf")
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return float("nan")
    num = den = 0.0
    flat_o, flat_r = out.reshape(-1), ref.reshape(-1)
    step = 1 << 26  # fp64 chunks of 512 MB: the >2^31-element cases stay in memory
    for i in range(0, flat_o.numel(), step):
        o, r = flat_o[i:i + step].double(), flat_r[i:i + step].double()
        num += float((o - r).square().sum())
        den += float(r.square().sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def f64(args, dtype=torch.float64):
    return [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def prompt_ranges(B, T, seed=0):
    """Lengths 1 and T among random ones."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, T, (B,), generator=g)
    end = start + 1 + (torch.rand(B, generator=g) * (T - start)).long().clamp(max=T - start - 1)
    start[0], end[0] = 0, T
    if B > 1:
        start[1], end[1] = T - 1, T
    return start.to(DEV), end.to(DEV)


def bank(A, d, r, N, dtype, seed=1):
    return (randn(A, d, r, dtype=dtype, seed=seed, scale=d ** -0.5), randn(A, r, dtype=dtype, seed=seed + 1),
            randn(A, r, N, dtype=dtype, seed=seed + 2, scale=r ** -0.5), randn(A, N, dtype=dtype, seed=seed + 3))


def ids_for(B, A, seed=2):
    ids = torch.randint(-1, A, (B,), generator=torch.Generator().manual_seed(seed))
    ids[0] = -1 if B > 1 else 0
    return ids.to(DEV)


# ---------------------------------------------------------------------- cases: op -> [(label, dtype, args)]
def cases(op: str, dtype, big: bool):
    """Odd sizes, LLaMA-2-7B sizes (d 4096, FFN 11008, N = 19200), views (non-contiguous, offset,
    strided ranges, expanded w_sa), and with ``big`` inputs above 2^31 elements."""
    q = QUICK
    if op == "pool":
        for mode in ("last", "mean", "max", "attn"):
            shapes = (("odd", 5, 7, 37), ("B1 T1", 1, 1, 3)) + (() if q else (("llama7b", 32, 128, 4096),))
            for label, B, T, d in shapes:
                h = randn(B, T, d, dtype=dtype, seed=B + d)
                s, e = prompt_ranges(B, T, seed=d)
                w = randn(d, dtype=dtype, seed=3, scale=d ** -0.5) if mode == "attn" else None
                yield f"{mode} {label}", (h, s, e, mode, w)
                flat = h.reshape(B * T, d)
                off = torch.arange(B, device=DEV) * T
                w2 = randn(B, d, dtype=dtype, seed=4, scale=d ** -0.5) if mode == "attn" else None
                yield f"{mode} {label} packed", (flat, s + off, e + off, mode, w2)
            B, T, d = 5, 6, 37
            h = randn(B, d + 1, T, dtype=dtype, seed=5)[:, 1:, :].transpose(1, 2)  # offset, d not innermost
            table = torch.stack(prompt_ranges(B, T, seed=6), 1)
            w = (randn(d, dtype=dtype, seed=7, scale=d ** -0.5).expand(B, d)) if mode == "attn" else None
            yield f"{mode} views (offset transposed hidden, strided ranges, expanded w_sa)", (
                h, table[:, 0], table[:, 1], mode, w)
            if big and mode in ("mean", "attn"):  # (only these with --big: see part_table)
                B, T, d = 64, 8200, 4096  # 2^31 + 2M elements
                h = randn(B, T, d, dtype=dtype, seed=8)
                s, e = prompt_ranges(B, T, seed=9)
                w = randn(d, dtype=dtype, seed=10, scale=d ** -0.5) if mode == "attn" else None
                yield f"{mode} >2^31 elements [{B},{T},{d}]", (h, s, e, mode, w)
    elif op in ("generate", "pool_generate"):
        from para_kernels.ops.activations import ACTIVATIONS, RATIONAL_GELU_INIT
        sizes = (("odd", 5, 37, 5, 41, 3),) + (() if q else (("llama7b", 32, 4096, 12, 19200, 8),
                                                              ("llama7b B=300 r=64", 300, 4096, 64, 19200, 8)))
        for act in ACTIVATIONS:
            for label, B, d, r, N, A in sizes:
                w = bank(A, d, r, N, dtype)
                prm = (torch.tensor([RATIONAL_GELU_INIT] * A, device=DEV) + 0.05 * randn(A, 10)).to(dtype) \
                    if act == "rational" else None
                ids = ids_for(B, A)
                if op == "generate":
                    pooled = randn(B, d + 3, dtype=dtype, seed=11)[:, 3:]  # offset rows, stride d + 3
                    yield f"{act} {label}", (pooled, *w, ids, act, prm)
                else:
                    T = 9
                    s, e = prompt_ranges(B, T, seed=12)
                    for mode in (("last", "mean", "max", "attn") if act == "gelu" else ("mean",)):
                        h = randn(B, T, d, dtype=dtype, seed=13)
                        w_sa = randn(B, d, dtype=dtype, seed=14, scale=d ** -0.5) if mode == "attn" else None
                        yield f"{mode} {act} {label}", (h, s, e, mode, w_sa, *w, ids, act, prm)
    elif op == "scale":
        for label, B, L, n in (("odd", 5, 3, 37), ("decode llama7b", 32, 1, 11008), ("prefill llama7b", 4, 512, 11008)):
            if q and n > 1000:
                continue
            yield label, (randn(B, L, n, dtype=dtype, seed=15), 1 + 0.1 * randn(B, n, dtype=dtype, seed=16), None)
        gate_up = randn(4, 6, 2 * 37, dtype=dtype, seed=17)
        yield "views (half of a fused projection, strided v)", (gate_up[..., 37:], randn(37, 4, dtype=dtype).t(), None)
        rows = torch.tensor([0, 0, 1, 2, 2, 2, 4, 3], device=DEV)
        yield "packed rows", (randn(8, 37, dtype=dtype, seed=18), randn(5, 37, dtype=dtype, seed=19), rows.int())
        if big:
            yield ">2^31 elements [64,8200,4096]", (randn(64, 8200, 4096, dtype=dtype, seed=20),
                                                    randn(64, 4096, dtype=dtype, seed=21), None)
    elif op == "scaled_glu":
        for act in ("silu", "gelu", "gelu_tanh"):
            for label, B, L, n in (("odd", 5, 3, 37), ("decode llama7b", 32, 1, 11008),
                                   ("prefill llama7b", 4, 512, 11008)):
                if q and n > 1000:
                    continue
                gu = randn(B, L, 2 * n, dtype=dtype, seed=22)
                yield f"{act} {label} (halves of a fused gate_up)", (gu[..., :n], gu[..., n:],
                                                                     randn(B, n, dtype=dtype, seed=23), act)
        if big:
            n = 4096
            yield ">2^31 elements", (randn(64, 8200, n, dtype=dtype, seed=24), randn(64, 8200, n, dtype=dtype, seed=25),
                                     randn(64, n, dtype=dtype, seed=26), "silu")
    elif op == "scaled_linear":
        for label, B, L, k, n, bias in (("odd", 3, 5, 37, 41, True), ("decode llama7b q", 32, 1, 4096, 4096, False),
                                        ("prefill llama7b up", 2, 256, 4096, 11008, False)):
            if q and k > 1000:
                continue
            yield label, (randn(B, L, k, dtype=dtype, seed=27), randn(n, k, dtype=dtype, seed=28, scale=k ** -0.5),
                          randn(n, dtype=dtype, seed=29) if bias else None, randn(B, n, dtype=dtype, seed=30))


def op_names(op):
    return op, f"{op}_backward"


def force(backend: str, op: str) -> bool:
    """Force the backend; False when it has no kernel for op (it would fall back)."""
    para_kernels.set_backend(backend)
    return dispatch.backend_for(op, DEV) == backend


def check_case(op, backend, label, dtype, args, ref_dtype=torch.float64):
    fwd, bwd = (dispatch.implementation(n, DEV) for n in op_names(op))
    ref_f, ref_b = (getattr(reference_ops, n) for n in op_names(op))
    t0 = time.perf_counter()
    poison()
    out = fwd(*args)
    grad = randn(*out.shape, dtype=out.dtype, seed=31)
    poison()
    grads = bwd(grad, *args)
    sync()
    ref = ref_f(*f64(args, ref_dtype))
    ref_grads = ref_b(grad.to(ref_dtype), *f64(args, ref_dtype))
    errs = {"fwd": rel_err(out, ref)}
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        if g.numel():
            errs[f"bwd{i}"] = rel_err(g, rg)
    bar = BAR[dtype]
    ok = all(v == v and v <= (bar if k == "fwd" else 2 * bar) for k, v in errs.items())
    emit(part="table", op=op, backend=backend, dtype=dtype, case=label, ok=ok, errors=errs, bar=bar,
         seconds=round(time.perf_counter() - t0, 3))
    return ok


def part_table(a):
    if not force(a.backend, a.op):
        emit(part="table", op=a.op, backend=a.backend, case="*", ok=None,
             note=f"no {a.backend} kernel: {dispatch.backend_for(a.op, DEV)} runs")
        return True
    ok = True
    # --big: only the cases above 2^31 elements, in bf16, against an fp32 reference of the
    # upcast inputs (the spec allows it; fp64 copies of 4 GB inputs would not fit beside them)
    for dtype in (torch.bfloat16,) if a.big else DTYPES:
        for label, args in cases(a.op, dtype, a.big):
            if a.big != (">2^31" in label):
                continue
            try:
                ok &= check_case(a.op, a.backend, label, dtype, args,
                                 torch.float32 if a.big else torch.float64)
            except Exception as e:
                ok = False
                emit(part="table", op=a.op, backend=a.backend, dtype=dtype, case=label, ok=False,
                     error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            finally:
                del args
    return ok


# ---------------------------------------------------------------------- smoke: every kernel once
def part_smoke(a):
    """Every op forward and backward once at tiny sizes through the forced backend (what the
    sanitizers run); pool_generate, whose consumers spin-wait, last."""
    ok = True
    order = ("pool", "generate", "scale", "scaled_glu", "scaled_linear", "pool_generate")
    for op in order:
        if not force(a.backend, op):
            continue
        label, args = next(cases(op, torch.float32, False))
        try:
            ok &= check_case(op, a.backend, f"smoke {label}", torch.float32, args)
        except Exception as e:
            ok = False
            emit(part="smoke", op=op, backend=a.backend, ok=False, error=f"{type(e).__name__}: {e}")
    return ok


# ---------------------------------------------------------------------- pool_generate stress
def part_stress(a):
    """Grids far past residency (B up to 4096 at d = 4096: ~26K programs), against the
    reference; 5 repeats bitwise equal; every program took one ticket and every row block's
    producers reported ready."""
    from para_kernels.ops.triton_ops import pool_generate as pg
    force("triton", "pool_generate")
    counters = []
    make = pg._counters
    pg._counters = lambda *x: counters.append(make(*x)) or counters[-1]
    ok = True
    for B in ((64, 1024, 4096) if not QUICK else (20,)):
        d, N, r, A, T = (4096, 19200, 12, 8, 16) if not QUICK else (40, 50, 5, 3, 4)
        for mode in ("mean", "attn"):
            h = randn(B, T, d, dtype=torch.bfloat16, seed=B)
            s, e = prompt_ranges(B, T, seed=B + 1)
            w_sa = randn(B, d, dtype=torch.bfloat16, seed=3, scale=d ** -0.5) if mode == "attn" else None
            args = (h, s, e, mode, w_sa, *bank(A, d, r, N, torch.float32), ids_for(B, A), "gelu", None)
            t0 = time.perf_counter()
            counters.clear()
            outs = [pg.pool_generate(*args) for _ in range(5)]
            sync()
            err = rel_err(outs[0], reference_ops.pool_generate(*f64(args)))
            bitwise = all(torch.equal(outs[0], o) for o in outs[1:])
            tickets = [(int(c[0]), c[1:].tolist()) for c in counters]
            ready_ok = len({t for t, _ in tickets}) == 1 and all(len(set(r_)) == 1 for _, r_ in tickets)
            good = err <= BAR[torch.bfloat16] and bitwise and ready_ok
            ok &= good
            emit(part="stress", op="pool_generate", backend="triton", case=f"{mode} B={B} d={d}", ok=good,
                 errors={"fwd": err}, bitwise_repeats=bitwise, programs=tickets[0][0], ready=tickets[0][1][:4],
                 seconds=round(time.perf_counter() - t0, 3))
    pg._counters = make
    return ok


def part_streams(a):
    """An op on a side stream right after its input was written there (no sync between), and
    pool_generate on two streams at once; each against its own reference."""
    ok = True
    if DEV.type != "cuda":
        emit(part="streams", ok=None, note="needs CUDA")
        return True
    para_kernels.set_backend(None)
    from para_kernels import ops
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    B, T, d, r, N, A = 32, 64, 4096, 12, 19200, 8
    w = bank(A, d, r, N, torch.bfloat16)
    ids = ids_for(B, A)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        h = torch.randn(B, T, d, device=DEV).to(torch.bfloat16)  # written on the side stream
        s, e = prompt_ranges(B, T)
        out = ops.pool_generate(h, s, e, "mean", None, *w, ids, "gelu")
        x = torch.randn(B, 1, 11008, device=DEV).to(torch.bfloat16)
        y = ops.scale(x, out[:, :11008])
    torch.cuda.synchronize()
    errs = {"pool_generate": rel_err(out, reference_ops.pool_generate(*f64((h, s, e, "mean", None, *w, ids, "gelu")))),
            "scale": rel_err(y, x.double() * out[:, None, :11008].double())}
    good = all(v <= BAR[torch.bfloat16] for v in errs.values())
    emit(part="streams", case="side stream, no sync", ok=good, errors=errs)
    ok &= good
    inputs = [(randn(B, T, d, dtype=torch.bfloat16, seed=i), *prompt_ranges(B, T, seed=i)) for i in range(2)]
    w_sa = randn(d, dtype=torch.bfloat16, scale=d ** -0.5)
    torch.cuda.synchronize()
    outs = []
    for stream, (h, s, e) in zip((side, other), inputs):
        with torch.cuda.stream(stream):
            outs.append(ops.pool_generate(h, s, e, "attn", w_sa, *w, ids, "gelu"))
    torch.cuda.synchronize()
    errs = {f"stream{i}": rel_err(o, reference_ops.pool_generate(*f64((h, s, e, "attn", w_sa, *w, ids, "gelu"))))
            for i, (o, (h, s, e)) in enumerate(zip(outs, inputs))}
    good = all(v <= BAR[torch.bfloat16] for v in errs.values())
    emit(part="streams", case="pool_generate on two streams at once", ok=good, errors=errs)
    return ok and good


# ---------------------------------------------------------------------- graphs, determinism
def decode_cases(dtype):
    """The decode path's ops at LLaMA-2-7B sizes (a small size in quick runs)."""
    B, d, n, N, r, A = (32, 4096, 11008, 19200, 12, 8) if not QUICK else (5, 37, 41, 50, 5, 3)
    w = bank(A, d, r, N, dtype)
    ids = ids_for(B, A)
    s, e = prompt_ranges(B, 16)
    return {
        "scale": (randn(B, 1, n, dtype=dtype), randn(B, n, dtype=dtype), None),
        "scaled_glu": (randn(B, 1, n, dtype=dtype), randn(B, 1, n, dtype=dtype), randn(B, n, dtype=dtype), "silu"),
        "scaled_linear": (randn(B, 1, d, dtype=dtype), randn(d, d, dtype=dtype, scale=d ** -0.5), None,
                          randn(B, d, dtype=dtype)),
        "generate": (randn(B, d, dtype=dtype), *w, ids, "gelu", None),
        "pool_generate": (randn(B, 16, d, dtype=dtype), s, e, "mean", None, *w, ids, "gelu", None),
        "pool": (randn(B, 16, d, dtype=dtype), s, e, "attn", randn(d, dtype=dtype, scale=d ** -0.5)),
    }


def part_graphs(a):
    """Each decode-path op captured into a CUDA graph on a fresh stream after an eager warm-up on
    another stream, then replayed with new input values; and captured cold (a shape never run
    eagerly: nothing tuned, nothing warm)."""
    if DEV.type != "cuda":
        emit(part="graphs", ok=None, note="needs CUDA")
        return True
    ok = True
    for op, args in decode_cases(torch.bfloat16).items():
        if not force(a.backend, op):
            continue
        fn = dispatch.implementation(op, DEV)
        for cold in (False, True):
            try:
                if cold:  # one more row: new autotune keys and grids
                    args = tuple(torch.cat([t, t[:1]]) if isinstance(t, torch.Tensor) and t.dim() and
                                 t.shape[0] == args[0].shape[0] and op != "scaled_linear" else t for t in args)
                    if op == "scaled_linear":
                        args = (torch.cat([args[0], args[0][:1]]), args[1], args[2], torch.cat([args[3], args[3][:1]]))
                else:
                    warm = torch.cuda.Stream()
                    with torch.cuda.stream(warm):
                        fn(*args)
                    torch.cuda.synchronize()
                stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    out = fn(*args)
                first = [t for t in args if isinstance(t, torch.Tensor) and t.is_floating_point()][0]
                first.copy_(torch.randn_like(first, dtype=torch.float32).to(first.dtype))
                graph.replay()
                torch.cuda.synchronize()
                ref = getattr(reference_ops, op)(*f64(args))
                err = rel_err(out, ref)
                good = err <= BAR[torch.bfloat16]
                emit(part="graphs", op=op, backend=a.backend,
                     case="cold capture" if cold else "warm-up on another stream",
                     ok=good, errors={"replay": err})
            except Exception as e:
                good = False
                emit(part="graphs", op=op, backend=a.backend, case="cold capture" if cold else "warm",
                     ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])
            ok &= good
    return ok


def part_determinism(a):
    """Backward twice on the same inputs: bitwise equal where the backend claims determinism
    (everything but packed scale backward and the packed pool backward, which use atomics)."""
    ok = True
    for op, args in decode_cases(torch.bfloat16).items():
        if not force(a.backend, op):
            continue
        bwd = dispatch.implementation(f"{op}_backward", DEV)
        fwd = dispatch.implementation(op, DEV)
        grad = randn(*fwd(*args).shape, dtype=torch.bfloat16, seed=40)
        one, two = bwd(grad, *args), bwd(grad, *args)
        sync()
        same = all(torch.equal(x, y) for x, y in zip(one, two))
        ok &= same
        emit(part="determinism", op=op, backend=a.backend, ok=same)
    return ok


# ---------------------------------------------------------------------- report
def part_report(a):
    rows = []
    for path in sorted(glob.glob(os.path.join(a.dir, "*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    with open(os.path.join(a.dir, "validation.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| part | op | backend | dtype | case | ok | worst error (bar) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        errs = r.get("errors") or {}
        worst = max(errs.values(), default=None) if errs else None
        cell = r.get("error") or r.get("note") or (f"{worst:.2e} ({r['bar']:.0e})" if worst is not None and "bar" in r
                                                   else (f"{worst:.2e}" if worst is not None else ""))
        lines.append(f"| {r.get('part')} | {r.get('op', '')} | {r.get('backend', '')} | {r.get('dtype', '')} | "
                     f"{r.get('case', '')} | {'' if r.get('ok') is None else ('ok' if r['ok'] else 'FAIL')} | {cell} |")
    failed = [r for r in rows if r.get("ok") is False]
    head = f"{len(rows)} checks, {len(failed)} failed\n\n"
    with open(os.path.join(a.dir, "validation.md"), "w") as f:
        f.write(head + "\n".join(lines) + "\n")
    print(head.strip())
    return True


def main(argv=None) -> int:
    global _out
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["smoke", "table", "stress", "streams", "graphs", "determinism", "report"])
    p.add_argument("dir", nargs="?")
    p.add_argument("--op")
    p.add_argument("--backend", default="triton")
    p.add_argument("--out")
    p.add_argument("--big", action="store_true", help="only the cases above 2^31 elements (bf16)")
    a = p.parse_args(argv)
    _out = a.out
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = globals()[f"part_{a.part}"](a)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
