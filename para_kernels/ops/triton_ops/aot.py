"""Compile every Triton kernel variant the launchers use for real GPUs, on a machine with no GPU.

    python -m para_kernels.ops.triton_ops.aot [--arch 80 --arch 90] [--full] [--json F] [--markdown F]

The interpreter (``TRITON_INTERPRET=1``) runs the kernels' Python and checks almost nothing a
compiler checks, so ``make test`` also compiles them (``tests/build/test_triton_compile.py``). How:
the launchers themselves run (``pool``, ``generate``, ``scale``, ... of this package, on
uninitialised CPU tensors of the cases' shapes) in a process without ``TRITON_INTERPRET``, with

- Triton's active driver replaced by one that names the target GPU (``GPUTarget("cuda", arch,
  32)``) and has no device;
- every launch turned into a compile-only warm-up: the JIT's own specialisation (argument
  dtypes, ints equal to 1, divisibility by 16) and its whole pipeline down to ptxas's cubin;
- every autotuned kernel compiled once per config that survives its pruning (what the
  autotuner would time on that GPU);
- ``utils.num_sms`` answering the target's SM count, so grids and splits are the GPU's.

So the constexpr variants come from the launchers; the cases only span the op-level axes
(poolers, activations, dtypes, layouts, ranks, batch sizes and real models' shapes), from the
package's own lists. A kernel variant is its constexprs (tile sizes, autotune config, num_warps
and num_stages included) and its arguments' dtypes. By default a variant is compiled when it
brings a pair of those values that no compiled variant of that kernel had (every value, and
every two-way combination: each autotune config with each dtype, each activation with each
tile size, ...), which takes a few minutes; ``--full`` compiles every distinct variant. Each
variant reports registers and spills (ptxas -v) and shared memory
against the target's limit; a failed compile is recorded with its kernel and constexprs and the
run goes on. Each launch is also checked to run inside ``utils.launch_guard`` for its tensors'
device (Triton launches on the current device).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

# shared memory per block (bytes) and SM count of the GPUs each target stands for
TARGETS = {80: dict(gpu="A100", smem=166912, sms=108), 90: dict(gpu="H100/H200", smem=232448, sms=132)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Model:
    """One decoder layer's sizes: hidden d, and the q / v / FFN-up outputs PARA rescales."""
    d: int
    q: int
    v: int
    up: int

    @property
    def n(self) -> int:
        return self.q + self.v + self.up


MODELS = {"odd": Model(37, 24, 12, 40), "SmolLM2-135M": Model(576, 576, 192, 1536),
          "LLaMA-2-7B": Model(4096, 4096, 4096, 11008)}


@dataclass
class Variant:
    kernel: str
    constexprs: dict
    case: str
    registers: int | None = None
    spill_bytes: int | None = None  # stack frame per thread (cuobjdump's STACK): register spills
    shared: int | None = None
    num_warps: int | None = None
    seconds: float = 0.0  # compile time here (0 when Triton's cache had it)
    error: str | None = None


@dataclass
class Report:
    arch: int
    triton: str
    variants: list[Variant] = field(default_factory=list)
    guard_errors: list[str] = field(default_factory=list)
    case_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def failures(self) -> list[str]:
        smem = TARGETS[self.arch]["smem"]
        out = [f"{v.kernel} {v.constexprs} ({v.case}): {v.error}" for v in self.variants if v.error]
        out += [f"{v.kernel} {v.constexprs} ({v.case}): {v.shared} bytes of shared memory > {smem}"
                for v in self.variants if v.shared is not None and v.shared > smem]
        return out + self.guard_errors + self.case_errors


# ---------------------------------------------------------------------- compile-only launches
class _TargetDriver:
    """Stands in for Triton's CUDA driver: the target to compile for, no stream, and a device
    numbered after the arch (the JIT keeps its compiled kernels per device, not per target)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return -self.target.arch

    def get_current_stream(self, device=None):
        return 0


def _constexprs(fn, kwargs) -> dict:
    names = {p.name for p in fn.params if p.is_constexpr}
    out = {k: (str(v) if not isinstance(v, (int, float, bool, str)) else v) for k, v in kwargs.items() if k in names}
    return {**out, **{k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}}


def _error_chain(e: BaseException) -> str:
    """The error and its causes, innermost last (a kernel's CompilationError points at the call
    into a device function; the cause says what went wrong inside it), 3000 characters at most."""
    parts = []
    while e is not None and len(parts) < 6:
        parts.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__ or e.__context__
    text = "\n-- caused by --\n".join(parts)
    return text if len(text) <= 3000 else text[:1200] + "\n[...]\n" + text[-1800:]


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack frame bytes per thread) of a one-kernel cubin, from the cuobjdump Triton
    ships beside ptxas. These kernels have no local arrays, so a stack frame holds spills."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = _USAGE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


@contextlib.contextmanager
def compile_only(arch: int, report: Report, full: bool = False):
    """Inside, every launch of this package's Triton kernels compiles for ``arch`` and records a
    Variant in ``report`` instead of running. Needs a process without TRITON_INTERPRET."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from . import utils
    from .utils import interpreting
    if interpreting():
        raise RuntimeError("compile_only needs a process without TRITON_INTERPRET=1")
    seen: dict = {}
    case = {"name": ""}
    jit_run, tuner_run = JITFunction.run, Autotuner.run

    def run(self, *args, grid, warmup, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        guard = utils.guarded_device()
        if guard is None or any(t.device != guard for t in tensors):
            report.guard_errors.append(f"{self.__name__} ({case['name']}): launched outside launch_guard "
                                       f"of its tensors' device (guard: {guard})")
        constexprs = _constexprs(self, kwargs)
        features = [*((k, repr(v)) for k, v in sorted(constexprs.items())),
                    ("dtypes", tuple(str(t.dtype).replace("torch.", "") for t in tensors))]
        pairs = set(itertools.combinations(features, 2)) if not full else {tuple(features)}
        covered = seen.setdefault(self.__name__, set())
        if pairs <= covered:  # see the module docstring: every value pair (--full: every variant)
            return None
        covered |= pairs
        variant = Variant(self.__name__, constexprs, case["name"])
        report.variants.append(variant)
        t0 = time.perf_counter()
        try:
            kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # a compile error: record it, go on with the other variants
            variant.error = _error_chain(e)
            return None
        finally:
            variant.seconds = round(time.perf_counter() - t0, 3)
        variant.shared, variant.num_warps = kernel.metadata.shared, kernel.metadata.num_warps
        variant.registers, variant.spill_bytes = _resource_usage(kernel.asm["cubin"])
        return kernel

    def tune(self, *args, **kwargs):
        """What the autotuner would time: every config left after pruning, compiled."""
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.nargs = None
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.best_config = configs[0]

    previous = driver._active  # None until a real driver is created (never, without a GPU)
    driver.set_active(_TargetDriver(arch))
    JITFunction.run, Autotuner.run = run, tune
    utils.TARGET_SMS = TARGETS[arch]["sms"]
    for tuner in utils.CaptureSafeAutotuner.registry:
        tuner.chosen.clear()
    try:
        yield case
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        utils.TARGET_SMS = None
        for tuner in utils.CaptureSafeAutotuner.registry:
            tuner.chosen.clear()
        driver._active = previous


# ---------------------------------------------------------------------- the cases
def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype)


def _ranges(B: int, idx=torch.int64):
    return _t(B, dtype=idx), _t(B, dtype=idx)


def cases(full: bool = False):
    """(name, thunk) pairs; each thunk calls launchers. The default set gives every op every
    pooler / activation x dtype x layout, real models' sizes at decode and prefill batch sizes,
    and the ranks whose padded width R changes the tiles; --full takes the whole product."""
    from ..activations import ACTIVATIONS
    from ..checks import GLU_ACTIVATIONS
    from . import generate, pool, pool_generate, scale, scaled_glu, scaled_linear
    pool_modes = tuple(pool.POOL_MODE_IDS)
    models = MODELS if full else {k: MODELS[k] for k in ("odd", "LLaMA-2-7B")}
    ranks = (5, 12, 17, 33, 64, 100) if full else (12, 17, 64)

    # pool: every pooler x dtype x layout x model, forward and backward (+ int32 ranges, strided hidden)
    for mname, m in models.items():
        for dt in DTYPES:
            for mode in pool_modes:
                for packed in (False, True):
                    B, T = 5, 7
                    h = _t(B * T, m.d, dtype=dt) if packed else _t(B, T, m.d, dtype=dt)
                    w = _t(B, m.d, dtype=dt) if mode == "attn" else None
                    name = f"pool {mode} {'packed' if packed else 'padded'} {_DTYPE_NAME[dt]} {mname}"
                    yield name, lambda h=h, w=w, mode=mode, B=B: (
                        pool.pool(h, *_ranges(B), mode, w),
                        pool.pool_backward(_t(B, h.shape[-1], dtype=h.dtype), h, *_ranges(B), mode, w))
    for mode in pool_modes:
        h = _t(4, 64, 6).transpose(1, 2)  # d not innermost
        w = _t(64, dtype=torch.float32) if mode == "attn" else None
        yield f"pool {mode} strided hidden, int32 ranges, shared w_sa", lambda h=h, w=w, mode=mode: (
            pool.pool(h, *_ranges(4, torch.int32), mode, w),
            pool.pool_backward(_t(4, 6), h, *_ranges(4, torch.int32), mode, w))

    # generate and pool_generate: activation x dtype (bank in the hidden's dtype, and fp32 banks
    # under 16-bit hidden states), batch sizes that pick each row-block size, the ranks
    def bank(A, d, r, n, dt):
        return _t(A, d, r, dtype=dt), _t(A, r, dtype=dt), _t(A, r, n, dtype=dt), _t(A, n, dtype=dt)

    def act_params(act, A, dt):
        return _t(A, 10, dtype=dt) if act == "rational" else None

    for mname, m in models.items():
        for act in ACTIVATIONS:
            for dt in DTYPES:
                bank_dts = (dt, torch.float32) if dt in (torch.float16, torch.bfloat16) else (dt,)
                for bdt in bank_dts:
                    for B in ((1, 24, 64) if full or mname != "odd" else (3,)):
                        A, r = 4, 12
                        w = bank(A, m.d, r, m.n, bdt)
                        ids = _t(B, dtype=torch.int64)
                        label = f"{act} {_DTYPE_NAME[dt]} bank {_DTYPE_NAME[bdt]} B={B} {mname}"
                        yield f"generate {label}", lambda w=w, ids=ids, act=act, B=B, m=m, bdt=bdt, A=A: (
                            generate.generate(_t(B, m.d, dtype=bdt), *w, ids, act, act_params(act, A, bdt)),
                            generate.generate_backward(_t(B, m.n, dtype=bdt), _t(B, m.d, dtype=bdt), *w, ids, act,
                                                       act_params(act, A, bdt)))
                        modes = pool_modes if (act == "gelu" or full) else ("last",)
                        for mode in modes:
                            h = _t(B, 5, m.d, dtype=dt)
                            w_sa = _t(B, m.d, dtype=dt) if mode == "attn" else None
                            yield f"pool_generate {mode} {label}", lambda h=h, w=w, w_sa=w_sa, ids=ids, act=act, \
                                mode=mode, B=B, A=A, bdt=bdt: pool_generate.pool_generate(
                                    h, *_ranges(B), mode, w_sa, *w, ids, act, act_params(act, A, bdt))
    for r in ranks:
        for dt in (torch.float32, torch.bfloat16):
            for B in (1, 64):
                m = MODELS["LLaMA-2-7B"]
                w = bank(8, m.d, r, m.n, dt)
                ids = _t(B, dtype=torch.int32)
                yield f"generate / pool_generate r={r} {_DTYPE_NAME[dt]} B={B}", lambda w=w, ids=ids, B=B, m=m, dt=dt: (
                    generate.generate(_t(B, m.d, dtype=dt), *w, ids, "gelu"),
                    generate.generate_backward(_t(B, m.n, dtype=dt), _t(B, m.d, dtype=dt), *w, ids, "gelu", None),
                    pool_generate.pool_generate(_t(B, 3, m.d, dtype=dt), *_ranges(B), "mean", None, *w, ids, "gelu"))

    # scale, scaled_glu, scaled_linear: decode (one token per row), prefill, packed rows
    for mname, m in models.items():
        for dt in DTYPES:
            for B, L in ((64, 1), (4, 96)):
                x, v = _t(B, L, m.up, dtype=dt), _t(B, m.up, dtype=dt)
                label = f"{_DTYPE_NAME[dt]} B={B} L={L} {mname}"
                yield f"scale {label}", lambda x=x, v=v: (scale.scale(x, v), scale.scale_backward(x, x, v, None))
                for act in GLU_ACTIVATIONS:
                    yield f"scaled_glu {act} {label}", lambda x=x, v=v, act=act: (
                        scaled_glu.scaled_glu(x, x, v, act), scaled_glu.scaled_glu_backward(x, x, x, v, act))
                for n, bias in ((m.q, False), (m.v, True)):
                    xin, wt, vq = _t(B, L, m.d, dtype=dt), _t(n, m.d, dtype=dt), _t(B, n, dtype=dt)
                    b = _t(n, dtype=dt) if bias else None
                    # the backward's tiles depend on M and the dtype only; its dx / dW GEMMs run on
                    # the host here (torch.mm), so it gets a narrow weight
                    xs, ws, vs = _t(B, L, 48, dtype=dt), _t(40, 48, dtype=dt), _t(B, 40, dtype=dt)
                    bs = _t(40, dtype=dt) if bias else None
                    yield f"scaled_linear n={n} bias={bias} {label}", lambda xin=xin, wt=wt, b=b, vq=vq, xs=xs, \
                        ws=ws, vs=vs, bs=bs: (scaled_linear.scaled_linear(xin, wt, b, vq),
                                              scaled_linear.scaled_linear_backward(
                                                  _t(*xs.shape[:-1], 40, dtype=xs.dtype), xs, ws, bs, vs))
            x, v = _t(300, m.up, dtype=dt), _t(6, m.up, dtype=dt)
            rows = _t(300, dtype=torch.int64)
            yield f"scale packed {_DTYPE_NAME[dt]} {mname}", lambda x=x, v=v, rows=rows: (
                scale.scale(x, v, rows), scale.scale_backward(x, x, v, rows))


def run(arch: int, full: bool = False, only: str | None = None, progress=None) -> Report:
    import triton
    report = Report(arch=arch, triton=triton.__version__)
    start = time.perf_counter()
    torch.set_num_threads(1)  # the host side of the cases is tiny; leave the cores to ptxas
    with compile_only(arch, report, full) as case:
        for name, thunk in cases(full):
            if only and only not in name:
                continue
            case["name"] = name
            n = len(report.variants)
            try:
                thunk()
            except Exception as e:  # a launcher that fails before any launch
                report.case_errors.append(f"{name}: {type(e).__name__}: {e}")
            if progress:
                progress(f"sm_{arch} {name}: {len(report.variants) - n} new variants")
    report.seconds = time.perf_counter() - start
    return report


def markdown(reports: list[Report]) -> str:
    """Per kernel and target: variants, the most registers, the most spilled bytes, the most
    shared memory; then every variant that spills."""
    lines = [f"Every Triton kernel variant of the default compile check (`python -m para_kernels.ops.triton_ops.aot "
             f"--markdown ...`), compiled by Triton {reports[0].triton} on a machine without a GPU for "
             + ", ".join(f"sm_{r.arch} ({TARGETS[r.arch]['gpu']}: {len(r.variants)} variants, "
                         f"{len(r.failures())} failures)" for r in reports)
             + ". Registers and spills (the stack frame per thread) from the cubin; shared memory as "
               "Triton allocates it at launch. These are compiler numbers; nothing here ran on a GPU.", "",
             "| kernel | target | variants | max registers | max spill (bytes / thread) | max shared (bytes) "
             "| failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    spills = []
    for rep in reports:
        kernels = sorted({v.kernel for v in rep.variants})
        for k in kernels:
            vs = [v for v in rep.variants if v.kernel == k]
            ok = [v for v in vs if not v.error]
            mx = lambda attr, ok=ok: max((getattr(v, attr) or 0 for v in ok), default=0)  # noqa: E731
            lines.append(f"| `{k}` | sm_{rep.arch} | {len(vs)} | {mx('registers')} | {mx('spill_bytes')} | "
                         f"{mx('shared')} | {len(vs) - len(ok)} |")
            spills += [(rep.arch, v) for v in ok if (v.spill_bytes or 0) > 0]
    if spills:
        lines += ["", "Variants that spill:", "",
                  "| kernel | target | constexprs | registers | spill (bytes / thread) |",
                  "| --- | --- | --- | --- | --- |"]
        for arch, v in sorted(spills, key=lambda s: -(s[1].spill_bytes or 0)):
            lines.append(f"| `{v.kernel}` | sm_{arch} | `{v.constexprs}` | {v.registers} | {v.spill_bytes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=sorted(TARGETS), help="default: all")
    p.add_argument("--full", action="store_true", help="the whole product of the case axes (slow)")
    p.add_argument("--only", help="only cases whose name contains this")
    p.add_argument("--json", help="write the variants here")
    p.add_argument("--markdown", help="write the register / spill table here")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    reports = []
    for arch in a.arch or sorted(TARGETS):
        rep = run(arch, a.full, a.only, progress=(lambda s: print(s, file=sys.stderr)) if a.verbose else None)
        reports.append(rep)
        print(f"sm_{arch}: {len(rep.variants)} variants compiled in {rep.seconds:.0f} s, "
              f"{len(rep.failures())} failures (triton {rep.triton})")
        for f in rep.failures():
            print("  FAILED", f)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in reports], f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(reports))
    return 1 if any(r.failures() for r in reports) else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # too late if triton was imported: main() then refuses
    sys.exit(main())
