"""The CUDA C++ extension's build and loading, checked on any machine (no GPU needed):
para_kernels._C is built wherever setup.py can build it, its para_cuda:: schemas are the
para:: ones, a stale build is refused with one warning, and CPU tensors never reach it."""
import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings

import pytest
import torch

import para_kernels
from para_kernels.ops import cuda_ops, dispatch

from kit import ROOT  # noqa: E402 (the repository)


def _load_setup():
    """setup.py's functions (it runs setup() only as __main__)."""
    spec = importlib.util.spec_from_file_location("para_kernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = _load_setup()


def _can_build_here() -> tuple[bool, str]:
    """What setup.py decides on this machine with this environment."""
    cuda_home = setup_py.find_cuda_home()
    nvcc = setup_py.nvcc_release(cuda_home) if setup_py.is_toolkit(cuda_home) else None
    return setup_py.build_decision(os.environ, torch.__version__, torch.version.cuda, cuda_home, nvcc)


CAN_BUILD, WHY = _can_build_here()
needs_extension = pytest.mark.skipif(not CAN_BUILD, reason=f"the CUDA extension is not built here: {WHY}")


@pytest.fixture
def patched_cuda_backend(monkeypatch):
    """monkeypatch for cuda_ops; afterwards the real backend is registered again."""
    yield monkeypatch
    monkeypatch.undo()
    para_kernels.set_backend(None)
    cuda_ops.register()


# ---------------------------------------------------------------- the build
@needs_extension
def test_extension_is_built_and_loaded():
    assert cuda_ops.extension_built(), "setup.py could build para_kernels._C here but it is missing"
    assert cuda_ops.loaded, cuda_ops.reason
    info = cuda_ops.build_info
    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    compiled = sys.modules[cuda_ops.EXTENSION].build_info()
    assert compiled["torch"] == torch.__version__.split("+")[0]


@needs_extension
def test_para_cuda_schemas_are_the_para_ones():
    for op in cuda_ops.OPS:
        ours = str(getattr(torch.ops.para_cuda, op).default._schema)
        theirs = str(getattr(torch.ops.para, op).default._schema)
        assert ours.replace("para_cuda::", "para::", 1) == theirs


@needs_extension
def test_every_built_kernel_file_registers_its_ops():
    """An op has a CUDA kernel exactly when its csrc/<op>.cpp was compiled in, and the cuda
    backend offers exactly those ops (the others fall through to Triton)."""
    for op in cuda_ops.OPS:
        has_source = os.path.exists(os.path.join(ROOT, "csrc", op.removesuffix("_backward") + ".cpp"))
        assert cuda_ops._has_cuda_kernel(op) == has_source, op
    assert sorted(dispatch._backends["cuda"].impls) == sorted(cuda_ops.kernel_ops())


def _fatbin_archs(data: bytes) -> set[str]:
    """{'sm_80', 'compute_90', ...} from the fatbin headers embedded in a shared object (for
    when cuobjdump is absent). Layout: a 16-byte header (magic 0xBA55ED50, version, header
    size, payload size), then entries whose header holds kind (1 PTX, 2 cubin) at 0, its own
    size at 4, payload size at 8 and the SM number at 28."""
    archs, magic = set(), struct.pack("<I", 0xBA55ED50)
    at = data.find(magic)
    while at >= 0:
        header_size, fat_size = struct.unpack_from("<HQ", data, at + 6)
        entry, end = at + header_size, at + header_size + fat_size
        while entry + 32 <= min(end, len(data)):
            kind, entry_header, payload = struct.unpack_from("<HxxIQ", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            archs.add(f"{'compute' if kind == 1 else 'sm'}_{sm}")
            entry += entry_header + payload
        at = data.find(magic, max(end, at + 4))
    return archs


def _cuobjdump() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "cuobjdump"),
                  shutil.which("cuobjdump")]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


@needs_extension
def test_extension_holds_sm80_and_sm90_code():
    if os.environ.get("TORCH_CUDA_ARCH_LIST", setup_py.DEFAULT_ARCHS) != setup_py.DEFAULT_ARCHS:
        pytest.skip("built for a TORCH_CUDA_ARCH_LIST of the user's choice")
    if not any(f.endswith(".cu") for f in os.listdir(os.path.join(ROOT, "csrc"))):
        pytest.skip("no .cu source yet: no device code to check")
    so = importlib.util.find_spec(cuda_ops.EXTENSION).origin
    cuobjdump = _cuobjdump()
    if cuobjdump:
        out = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
        assert "sm_80" in out and "sm_90" in out, out
    else:  # read the fatbin headers ourselves
        with open(so, "rb") as f:
            archs = _fatbin_archs(f.read())
        assert {"sm_80", "sm_90", "compute_90"} <= archs, archs


# ---------------------------------------------------------------- setup.py's decision
def test_setup_skip_switch_wins():
    env = {"PARA_KERNELS_SKIP_CUDA_BUILD": "1"}
    build, why = setup_py.build_decision(env, "2.14.1+cu130", "13.0", "/usr/local/cuda", "13.0")
    assert not build and "PARA_KERNELS_SKIP_CUDA_BUILD" in why


@pytest.mark.parametrize("torch_version,torch_cuda,cuda_home,nvcc,expect", [
    (None, None, "/usr/local/cuda", "13.0", "not importable"),
    ("2.14.1+cpu", None, "/usr/local/cuda", "13.0", "not a CUDA build"),
    ("2.14.1+cu130", "13.0", None, None, "no CUDA toolkit"),
    ("2.14.1+cu130", "13.0", "/nonexistent", None, "has no bin/nvcc"),
])
def test_setup_installs_pure_package_when_it_cannot_build(torch_version, torch_cuda, cuda_home, nvcc, expect):
    build, why = setup_py.build_decision({}, torch_version, torch_cuda, cuda_home, nvcc)
    assert not build and expect in why


def test_setup_builds_with_a_cuda_torch_and_nvcc(tmp_path):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "bin" / "nvcc").write_text("")
    (home / "include" / "cuda_runtime_api.h").write_text("")
    assert setup_py.build_decision({}, "2.14.1+cu130", "13.0", str(home), "13.0")[0]
    build, why = setup_py.build_decision({}, "2.14.1+cu130", "13.0", str(home), "12.8")
    assert not build and "nvcc is CUDA 12.8" in why


@pytest.mark.parametrize("env,with_extension,expect", [
    ({}, True, "0.1.0+cu128torch2.10"),  # what the wheel was built for, in its name
    ({}, False, "0.1.0"),                # the pure wheel runs beside any torch
    ({"PARA_KERNELS_LOCAL_VERSION": "+mine"}, True, "0.1.0+mine"),
    ({"PARA_KERNELS_LOCAL_VERSION": ""}, True, "0.1.0"),
])
def test_setup_version_says_what_the_wheel_is_for(env, with_extension, expect):
    assert setup_py.full_version(env, "2.10.0+cu128", "12.8", with_extension) == expect.replace(
        "0.1.0", setup_py._package_version(), 1)


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(tmp_path):
    """nvcc on PATH as a script that execs the real one (torch's own guess would be its grandparent)."""
    home = tmp_path / "cuda-13.0"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "bin" / "nvcc").write_text("")
    (home / "include" / "cuda_runtime_api.h").write_text("")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert setup_py.find_cuda_home({"PATH": str(wrappers), "CUDA_HOME": ""}) == str(home)
    assert setup_py.find_cuda_home({"PATH": str(wrappers), "CUDA_HOME": "/opt/mine"}) == "/opt/mine"


def test_setup_max_jobs_is_at_least_one():
    assert setup_py.default_max_jobs() >= 1


# ---------------------------------------------------------------- dispatch without a GPU
def test_cpu_tensors_take_the_reference():
    assert dispatch.backend_for("pool", torch.device("cpu")) == "reference"
    assert "cuda" not in dispatch.available_backends("cpu")


def test_forcing_cuda_on_cpu_warns_once_and_falls_back():
    x, v = torch.randn(2, 3, 4), torch.rand(2, 4) + 0.5
    hidden, start, end = torch.randn(2, 5, 4), torch.tensor([0, 1]), torch.tensor([5, 3])
    para_kernels.set_backend("cuda")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = para_kernels.ops.scale(x, v)
            pooled = para_kernels.ops.pool(hidden, start, end, "mean")
            para_kernels.ops.pool(hidden, start, end, "mean")
    finally:
        para_kernels.set_backend(None)
    messages = [str(w.message) for w in caught if "'cuda'" in str(w.message)]
    assert len(messages) == 1, messages
    assert "falling back" in messages[0]
    torch.testing.assert_close(out, x * v[:, None, :])
    torch.testing.assert_close(pooled, torch.stack([hidden[0].mean(0), hidden[1, 1:3].mean(0)]))


@pytest.mark.parametrize("recorded,expect", [
    ({"torch": "1.0.0", "torch_cuda": torch.version.cuda, "archs": "8.0"}, "built for torch 1.0.0"),
    ({"torch": torch.__version__, "torch_cuda": "9.9", "archs": "8.0"}, "with CUDA 9.9"),
    (None, "no build metadata"),
])
def test_stale_build_is_not_loaded_and_warns_once(patched_cuda_backend, recorded, expect):
    patched_cuda_backend.setattr(cuda_ops, "extension_built", lambda: True)
    patched_cuda_backend.setattr(cuda_ops, "read_build_info", lambda: recorded)
    cuda_ops.register()
    assert not cuda_ops.loaded and expect in cuda_ops.reason and "rebuild" in cuda_ops.reason
    cuda = torch.device("cuda")  # only dispatch is asked: no GPU needed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = {op: dispatch.backend_for(op, cuda) for op in ("pool", "scale", "generate_backward")}
        assert "cuda" not in dispatch.available_backends(cuda)
    assert set(chosen.values()) <= {"triton", "reference"}
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and expect in messages[0] and "Triton" in messages[0], messages
    para_kernels.set_backend("cuda")  # forced: the dispatcher's warning carries the same reason
    with pytest.warns(RuntimeWarning, match=expect):
        assert dispatch.backend_for("pool", torch.device("cpu")) == "reference"


@pytest.mark.parametrize("archs,capability,runs", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 9), True), ("8.0;9.0+PTX", (9, 0), True),
    ("8.0;9.0+PTX", (12, 0), True), ("8.0;9.0+PTX", (7, 5), False), ("9.0a", (9, 0), True),
    ("9.0a", (10, 0), False), ("8.0", (9, 0), False),
])
def test_arch_list_decides_which_gpus_run_the_kernels(archs, capability, runs):
    assert cuda_ops.arch_runs_on(archs, capability) == runs


# ---------------------------------------------------------------- subprocesses
def _run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_import_without_gpu_is_quiet():
    result = _run("-c", "import para_kernels, torch; "
                  "assert para_kernels.ops.backend_for('pool', torch.device('cpu')) == 'reference'",
                  env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert "para_kernels:" not in result.stderr, result.stderr


def test_info_prints_the_key_lines():
    result = _run("-m", "para_kernels.info")
    assert result.returncode == 0, result.stderr
    labels = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    for label in ("para_kernels", "Python", "torch", "Triton", "GPU", "nvcc", "_C", "backend", "cpu"):
        assert label in labels, result.stdout
    if cuda_ops.loaded:
        assert "built and loaded" in result.stdout and "built for" in result.stdout
    else:
        assert cuda_ops.reason in result.stdout
    as_json = json.loads(_run("-m", "para_kernels.info", "--json").stdout)
    assert as_json["dispatch"]["backend_for"]["cpu"]["pool"] == "reference"
    assert as_json["extension"]["loaded"] == cuda_ops.loaded
