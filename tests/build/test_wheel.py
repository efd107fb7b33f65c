"""The wheel as a user gets it: built here (or taken from dist/, where `make wheel` puts it),
installed into a fresh venv with no source tree beside it, imported and run; and, beside a
torch it was not built for, loaded without _C and with one warning that says why.

The fresh venv reuses this venv's torch and transformers (a path line in a .pth, written after
the install so that pip never sees the editable para_kernels there). A path line does not run
the .pth files of the folder it adds, so the editable install's finder stays off too.
"""
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest
import torch

pytestmark = pytest.mark.wheel
from kit import ROOT  # noqa: E402 (the repository)

SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "para_kernels/py.typed",
           "csrc/*", "para_kernels/**/*.py"]
OTHER_TORCH = "2.0.0+cu118"


def _setup_py():
    spec = importlib.util.spec_from_file_location("para_kernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected() -> tuple[str, bool]:
    """(the version setup.py gives a wheel built here, whether it holds _C)."""
    setup = _setup_py()
    cuda_home = setup.find_cuda_home()
    nvcc = setup.nvcc_release(cuda_home) if setup.is_toolkit(cuda_home) else None
    build, _ = setup.build_decision(os.environ, torch.__version__, torch.version.cuda, cuda_home, nvcc)
    return setup.full_version(os.environ, torch.__version__, torch.version.cuda, build), build


def _newest_source() -> float:
    return max(os.path.getmtime(p) for pattern in SOURCES
               for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


@pytest.fixture(scope="module")
def wheel() -> tuple[str, bool]:
    """The newest wheel in dist/ for this Python, torch and CUDA, built first if missing or
    older than the sources (make test builds it once, through make wheel)."""
    version, with_extension = _expected()
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}" if with_extension else "py3"
    pattern = os.path.join(ROOT, "dist", f"para_kernels-{version}-{tag}-*.whl")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found or os.path.getmtime(found[-1]) < _newest_source():
        subprocess.run(["bash", "scripts/build_wheels.sh"], cwd=ROOT, check=True, timeout=3600,
                       env={**os.environ, "PYTHON": sys.executable, "DIST": "dist"})
        found = sorted(glob.glob(pattern), key=os.path.getmtime)
    assert found, f"no {pattern} after the build"
    return found[-1], with_extension


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """(python, site-packages) of a fresh venv with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel_venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = str(root / "venv" / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-index", wheel[0]], check=True, timeout=300)
    with open(os.path.join(site, "para_kernels_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def _run(venv, code: str, cwd) -> subprocess.CompletedProcess:
    """``code`` in the fresh venv, from a folder outside the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    return subprocess.run([venv[0], "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**env, "PYTHONWARNINGS": "default"})


def _info(venv, cwd) -> dict:
    """`python -m para_kernels.info` in the venv, as {label: value} (the first of each label)."""
    result = subprocess.run([venv[0], "-m", "para_kernels.info"], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        lines.setdefault(line[:14].strip(), line[14:])
    return lines


def test_wheel_holds_the_package_and_nothing_else(wheel):
    path, with_extension = wheel
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{dist_info}/METADATA").decode()
        build_info = json.loads(z.read("para_kernels/_build_info.json")) if with_extension else None
    assert {n.split("/")[0] for n in names} == {"para_kernels", dist_info}, sorted(names)
    leftovers = [n for n in names if n.endswith((".o", ".pyc", ".cu", ".cpp", ".h", ".ninja_log"))
                 or "__pycache__" in n or "/tests/" in n or "/bench/" in n]
    assert not leftovers
    assert "para_kernels/py.typed" in names and "para_kernels/info.py" in names
    assert f"{dist_info}/licenses/LICENSE" in names and "License-Expression: Apache-2.0" in metadata
    extension = [n for n in names if n.startswith("para_kernels/_C.") and n.endswith(".so")]
    if with_extension:
        assert len(extension) == 1, names
        assert build_info["torch"] == torch.__version__ and build_info["torch_cuda"] == torch.version.cuda
        assert build_info["para_kernels"] in os.path.basename(path) and build_info["archs"]
    else:
        assert not extension and os.path.basename(path).endswith("-py3-none-any.whl")
    print(f"\n{os.path.basename(path)}: {os.path.getsize(path) / 2**20:.2f} MiB")


FORWARD = """
    import os, sys, warnings
    warnings.simplefilter("always")
    import torch, transformers
    import para_kernels as pk
    assert os.path.dirname(pk.__file__).startswith(sys.prefix), pk.__file__
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = pk.get_para_model(transformers.AutoModelForCausalLM.from_config(config),
                              pk.PARAConfig(r=4, pooler="last"))
    ids = torch.randint(3, 64, (2, 7))
    labels = ids.masked_fill(torch.arange(7) < 3, -100)  # the prompt: the first 3 tokens
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 7, 64)
    print("forward ok", pk.__version__, pk.__file__)
"""


def test_installed_wheel_imports_and_runs_a_para_forward(venv, wheel, tmp_path):
    result = _run(venv, FORWARD, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "forward ok" in result.stdout and ROOT not in result.stdout
    assert "para_kernels" not in result.stderr, result.stderr  # nothing to warn about on the CPU
    info = _info(venv, tmp_path)
    version = os.path.basename(wheel[0]).split("-")[1]
    assert info["para_kernels"] == f"{version} at {os.path.join(venv[1], 'para_kernels')}", info
    if wheel[1]:
        assert info["_C"] == "built and loaded", info
        assert info["built for"].startswith(f"torch {torch.__version__}, CUDA {torch.version.cuda}"), info
    else:
        assert info["_C"].startswith("not built"), info


MISMATCH = """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as at_import:
        warnings.simplefilter("always")
        import torch
        import para_kernels
        from para_kernels.ops import cuda_ops, dispatch
    with warnings.catch_warnings(record=True) as at_use:  # what a CUDA tensor would be told
        warnings.simplefilter("always")
        chosen = {op: dispatch.backend_for(op, torch.device("cuda")) for op in dispatch.OPS}
    print(json.dumps({"import": [str(w.message) for w in at_import], "use": [str(w.message) for w in at_use],
                      "loaded": cuda_ops.loaded, "reason": cuda_ops.reason, "chosen": chosen,
                      "available": dispatch.available_backends("cuda"),
                      "_C imported": "para_kernels._C" in sys.modules}))
"""


def test_wheel_beside_another_torch_is_refused_with_one_warning(venv, wheel, tmp_path):
    """The wheel's _build_info.json claims another torch: import still works, _C is not loaded,
    the cuda backend is unavailable with a reason naming both versions, one warning says so
    (at the first CUDA tensor: a CPU-only run stays quiet) and info shows it."""
    if not wheel[1]:
        pytest.skip("a pure wheel has no _C to refuse")
    info_path = os.path.join(venv[1], "para_kernels", "_build_info.json")
    shutil.copy(info_path, tmp_path / "saved.json")
    with open(info_path) as f:
        recorded = json.load(f)
    with open(info_path, "w") as f:
        json.dump({**recorded, "torch": OTHER_TORCH}, f)
    try:
        result = _run(venv, MISMATCH, tmp_path)
        info = _info(venv, tmp_path)
    finally:
        shutil.copy(tmp_path / "saved.json", info_path)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[-1])
    assert not seen["loaded"] and not seen["_C imported"]
    assert f"built for torch {OTHER_TORCH}" in seen["reason"] and f"torch {torch.__version__}" in seen["reason"]
    assert "cuda" not in seen["available"] and set(seen["chosen"].values()) <= {"triton", "reference"}
    assert seen["import"] == [] and len(seen["use"]) == 1, seen
    assert OTHER_TORCH in seen["use"][0] and torch.__version__ in seen["use"][0], seen["use"]
    assert info["_C"] == f"built, NOT loaded: {seen['reason']}", info
    assert info["built for"].startswith(f"torch {OTHER_TORCH}, CUDA {torch.version.cuda}"), info
