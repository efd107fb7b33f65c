"""Every Triton kernel variant the launchers use, compiled for real GPUs (sm_80: A100, sm_90:
H100/H200) on this machine, which has no GPU: the interpreter the other Triton tests run in
accepts code the compiler rejects (a plain global read inside a kernel, say). The variants
come from the launchers themselves (para_kernels/ops/triton_ops/aot.py runs them with compiles
instead of launches); each compile runs Triton's whole pipeline down to ptxas's cubin. The
register / spill table: ``python -m para_kernels.ops.triton_ops.aot --markdown docs/triton-aot.md``.
Both targets compile at once, one process each, started when the session's tests are collected
(about 14 minutes with a cold Triton cache on 2 cores, seconds with a warm one)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")
from kit import ROOT  # noqa: E402 (the repository)

ARCHS = (80, 90)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU compiles (and runs) the kernels itself")


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


_RUNS: dict = {}  # arch -> (process, its JSON report, its log): the compiles, once started


def start(out_dir: str) -> None:
    """Start both targets' compiles in the background, one process each (idempotent).
    tests/conftest.py calls this as soon as this file is selected, so that the compiles (minutes
    with a cold Triton cache) overlap the other tests instead of following them."""
    if _RUNS:
        return
    for arch in ARCHS:
        report, log = os.path.join(out_dir, f"{arch}.json"), os.path.join(out_dir, f"{arch}.log")
        with open(log, "w") as f:  # a file, not a pipe: nobody reads it until the end
            proc = subprocess.Popen([sys.executable, "-m", "para_kernels.ops.triton_ops.aot", "--arch", str(arch),
                                     "--json", report], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
        _RUNS[arch] = (proc, report, log)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    start(str(tmp_path_factory.mktemp("aot")))
    result = {}
    for arch, (proc, report, log) in _RUNS.items():
        proc.wait(timeout=2400)
        with open(log) as f:
            text = f.read()
        assert os.path.exists(report), f"sm_{arch}: no report\n{text[-4000:]}"
        with open(report) as f:
            result[arch] = (json.load(f)[0], text)
    return result


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles(reports, arch):
    report, log = reports[arch]
    assert report["variants"], log[-2000:]
    failed = [v for v in report["variants"] if v["error"]]
    assert not failed, "\n\n".join(f"{v['kernel']} {v['constexprs']} ({v['case']}):\n{v['error'][-1500:]}"
                                   for v in failed[:10])
    assert not report["case_errors"], report["case_errors"][:10]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_is_guarded(reports, arch):
    assert not reports[arch][0]["guard_errors"], reports[arch][0]["guard_errors"][:10]


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_memory_fits_the_target(reports, arch):
    from para_kernels.ops.triton_ops.aot import TARGETS
    too_big = [v for v in reports[arch][0]["variants"] if (v["shared"] or 0) > TARGETS[arch]["smem"]]
    assert not too_big, too_big[:5]


def _kernel_name(obj):
    """The name of the @triton.jit function under capture-safe / autotune / heuristics wrappers
    (a JITFunction, or an InterpretedFunction in this interpreted test process), else None."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    for _ in range(4):
        if isinstance(obj, (JITFunction, InterpretedFunction)):
            return obj.fn.__name__
        obj = getattr(obj, "tuner", None) or getattr(obj, "fn", None)
    return None


def test_every_kernel_of_the_backend_is_compiled(reports):
    """Each @triton.jit kernel the modules define (the launched ones are named *_kernel; the
    others are device functions inlined into them) shows up among the compiled variants."""
    import importlib

    from para_kernels.ops.triton_ops import KERNEL_MODULES
    defined = set()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"para_kernels.ops.triton_ops.{name}")
        for attr in vars(module).values():
            name = _kernel_name(attr)
            if name is not None and name.endswith("_kernel"):
                defined.add(name)
    assert len(defined) >= 19, sorted(defined)
    for arch in ARCHS:
        compiled = {v["kernel"] for v in reports[arch][0]["variants"]}
        assert defined <= compiled, f"sm_{arch}: never compiled: {sorted(defined - compiled)}"


_GLOBAL_READ = '''
import triton
import triton.language as tl

ATTN = 3  # a plain Python global: the interpreter reads it, the compiler refuses it


@triton.jit
def kernel(x_ptr, MODE: tl.constexpr):
    if MODE == ATTN:
        tl.store(x_ptr, 1.0)
'''


def test_the_check_catches_a_plain_global_in_a_kernel(tmp_path):
    """The bug class that broke every CUDA prefill once (pool_generate read ATTN = 3, a plain
    global): under the compile check it is an error, not a pass."""
    (tmp_path / "global_read.py").write_text(_GLOBAL_READ)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import global_read
        from para_kernels.ops.triton_ops import aot, utils
        report = aot.Report(arch=90, triton="")
        with aot.compile_only(90, report):
            with utils.launch_guard(torch.device("cpu")):
                global_read.kernel[(1,)](torch.empty(1), MODE=3)
        print("FAILURES", report.failures())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FAILURES"))
    assert "kernel" in line and "ATTN" in line, line
