"""Build script: the pure-Python package, plus the CUDA C++ extension ``para_kernels._C``
(every csrc/*.cu and csrc/*.cpp) when torch is a CUDA build and nvcc is found.

torch is a dependency, never downloaded by this script: install it first, then
``pip install -e . --no-build-isolation`` (an isolated build has no torch, so it installs the
pure package). Switches, all environment variables:

    PARA_KERNELS_SKIP_CUDA_BUILD=1  install the pure package even where the extension could build
    PARA_KERNELS_FORCE_BUILD=1      build the extension or fail, never fall back to the pure package
    PARA_KERNELS_KEEP_BUILD=1       installing the pure package, keep an extension this checkout built
                                    for another venv (default: removed as stale); the Makefile's vLLM venv
    TORCH_CUDA_ARCH_LIST            GPU archs to compile for (default "8.0;9.0+PTX")
    MAX_JOBS                        parallel compile jobs (default: from free memory and CPUs)
    NVCC_THREADS                    threads per nvcc job, one per arch (default: nvcc's, 1)
    CUDA_HOME                       the toolkit (default: found from nvcc, through wrapper scripts)
    PARA_KERNELS_LOCAL_VERSION      the wheel's local version label (default: cu130torch2.14 for
                                    a build with _C, none for the pure package; "" for none)

A wheel with _C is versioned 0.1.0+cu<CUDA>torch<major.minor> (0.1.0+cu130torch2.14): it runs
only beside that torch and CUDA. The pure wheel (no _C: Triton and PyTorch kernels) is plain
0.1.0, py3-none-any, and runs beside any torch.

The build writes para_kernels/_build_info.json (versions it was built for), which
para_kernels/ops/cuda_ops/__init__.py checks against the running torch before loading _C.
"""
from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "para_kernels"
EXTENSION = f"{PACKAGE}._C"
BUILD_INFO = "_build_info.json"
DEFAULT_ARCHS = "8.0;9.0+PTX"  # A100-class and H100 binaries, PTX that newer GPUs JIT-compile
GB_PER_JOB = 2.5  # peak memory of one compile job (cicc on a .cu, or g++ on torch's headers)
# Headers that torch's CUDA headers include but a compiler-only toolkit may lack; the nvidia-*
# pip packages that a CUDA build of torch depends on ship them.
LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def _log(message: str) -> None:
    print(f"para_kernels setup: {message}", file=sys.stderr, flush=True)


def switched_on(env, name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_toolkit(folder: str | None) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "bin", "nvcc")) \
        and os.path.isfile(os.path.join(folder, "include", "cuda_runtime_api.h"))


def _wrapped_toolkits(script: str) -> list[str]:
    """Toolkits named by a small wrapper script around nvcc (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`)."""
    try:
        if os.path.getsize(script) > 4096:  # a real nvcc binary, not a wrapper
            return []
        with open(script, errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return re.findall(r"(/[^\s'\";]+)/bin/nvcc\b", text)


def _version_key(folder: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", os.path.basename(folder)))


def find_cuda_home(env=os.environ) -> str | None:
    """CUDA_HOME / CUDA_PATH when set (the user's word, checked later), else the toolkit of the
    nvcc on PATH (through symlinks and wrapper scripts), else /usr/local/cuda, else the newest
    /usr/local/cuda-*. torch's own guess takes nvcc's grandparent, which for a wrapper in
    /usr/local/bin is /usr/local: wrong, hence this."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    candidates = []
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates += [os.path.dirname(os.path.dirname(real)), *_wrapped_toolkits(real)]
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)]
    return next((folder for folder in candidates if is_toolkit(folder)), None)


def nvcc_release(cuda_home: str) -> str | None:
    """'13.0' from `nvcc --version`, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def build_decision(env, torch_version: str | None, torch_cuda: str | None, cuda_home: str | None,
                   nvcc_cuda: str | None) -> tuple[bool, str]:
    """(build the CUDA extension?, why), from the switches and what was found. Pure, so that
    tests can check every branch without a build."""
    if switched_on(env, "PARA_KERNELS_SKIP_CUDA_BUILD"):
        return False, "PARA_KERNELS_SKIP_CUDA_BUILD is set"
    if torch_version is None:
        return False, "torch is not importable here (install torch first, then pip install --no-build-isolation)"
    if not torch_cuda:
        return False, f"torch {torch_version} is not a CUDA build"
    if cuda_home is None:
        return False, "no CUDA toolkit found (nvcc not on PATH, no /usr/local/cuda; set CUDA_HOME)"
    if not is_toolkit(cuda_home):
        return False, f"CUDA_HOME={cuda_home} has no bin/nvcc and include/cuda_runtime_api.h"
    if nvcc_cuda is None:
        return False, f"{cuda_home}/bin/nvcc --version does not run"
    if nvcc_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return False, f"nvcc is CUDA {nvcc_cuda} but torch {torch_version} was built with CUDA {torch_cuda}"
    return True, f"torch {torch_version} (CUDA {torch_cuda}), nvcc {nvcc_cuda} in {cuda_home}"


def default_max_jobs() -> int:
    """As many jobs as CPUs, but no more than free memory holds (GB_PER_JOB each)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return max(1, min(cpus, int(available_kb / 2**20 / GB_PER_JOB)))
    except (OSError, StopIteration, ValueError):
        return cpus


def pip_cuda_include_dirs() -> list[str]:
    """Include folders of the installed nvidia-* wheels (nvidia/cu13/include, nvidia/cudnn/include...)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))


def _put_ninja_on_path() -> None:
    """torch builds in parallel only with ninja, which it looks up on PATH; the ninja wheel
    installs it next to this Python, which is not on PATH when pip is called by its path."""
    if shutil.which("ninja"):
        return
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja
        folders.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "ninja")):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return
    _log("ninja not found (pip install ninja): compiling one file at a time")


def _package_version() -> str:
    with open(os.path.join(ROOT, PACKAGE, "_version.py")) as f:
        return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read()).group(1)


def local_version(env, torch_version: str | None, torch_cuda: str | None, with_extension: bool) -> str:
    """The local version label ('cu130torch2.14' or ''): what a wheel with _C was built for,
    so that wheels for several torch / CUDA pairs can sit side by side on one index."""
    if "PARA_KERNELS_LOCAL_VERSION" in env:
        return env["PARA_KERNELS_LOCAL_VERSION"].strip().lstrip("+")
    if not with_extension:
        return ""
    torch_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    return f"cu{torch_cuda.replace('.', '')}torch{torch_minor}"


def full_version(env, torch_version: str | None, torch_cuda: str | None, with_extension: bool) -> str:
    local = local_version(env, torch_version, torch_cuda, with_extension)
    return _package_version() + (f"+{local}" if local else "")


def _compiler_version() -> str:
    try:
        return subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True,
                              timeout=60).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _remove_stale_build() -> None:
    """A pure install must not leave an older in-tree _C (editable installs load it from here)."""
    for path in glob.glob(os.path.join(ROOT, PACKAGE, "_C.*.so")) + [os.path.join(ROOT, PACKAGE, BUILD_INFO)]:
        if os.path.exists(path):
            os.remove(path)
            _log(f"removed the stale {os.path.relpath(path, ROOT)}")


def _distinct_object_names(object_filenames):
    """Object names that keep the source's suffix (csrc/pool.cu.o, csrc/pool.cpp.o): a kernel's
    pool.cu and its bindings' pool.cpp would otherwise both compile to pool.o."""
    def names(sources, strip_dir=False, output_dir=""):
        objects = object_filenames(sources, strip_dir=strip_dir, output_dir=output_dir)
        return [f"{os.path.splitext(obj)[0]}{os.path.splitext(src)[1]}{os.path.splitext(obj)[1]}"
                for src, obj in zip(sources, objects)]
    return names


def cuda_extension_kwargs(cuda_home: str, build_info: dict) -> dict:
    """setup() arguments that build para_kernels._C. Imports torch's cpp_extension only after
    CUDA_HOME is set, since it reads it at import."""
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    _put_ninja_on_path()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cu", root_dir=ROOT) + glob.glob("csrc/*.cpp", root_dir=ROOT),
                     key=lambda path: (not path.endswith(".cu"), path))  # the long nvcc jobs first
    # The .cu files include only CUDA headers and csrc/*.h, so C++17 suffices there; the .cpp
    # files include torch's headers and keep the standard torch's build flags ask for (C++20 here).
    # -g0 overrides Python's -g: debug info for torch's headers made a 16 MB module and a
    # slower compile, for no use in a release build.
    cxx_flags, nvcc_flags = ["-O3", "-g0"], ["-O3", "-std=c++17"]
    if os.environ.get("NVCC_THREADS"):  # nvcc compiles the archs of one file in parallel
        nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
    toolkit_include = os.path.join(cuda_home, "include")
    if not all(os.path.isfile(os.path.join(toolkit_include, h)) for h in LIBRARY_HEADERS):
        # For the .cpp files (torch's CUDA headers include these). -isystem is searched after
        # the toolkit's -I, so only headers the toolkit lacks come from the wheels. Not given to
        # nvcc: the .cu files need none, and torch drops its arch flags when any nvcc flag
        # contains "arch" (a path such as /home/research/... would).
        for folder in pip_cuda_include_dirs():
            cxx_flags += ["-isystem", folder]
    build_info["sources"] = sources
    _log(f"compiling {len(sources)} sources for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
         f"with MAX_JOBS={os.environ['MAX_JOBS']}")

    class BuildExtensionWithInfo(BuildExtension):
        """torch's BuildExtension, then _build_info.json next to the built module (and in
        the source tree for an editable install, where _C is copied too)."""

        def build_extensions(self):
            self.compiler.object_filenames = _distinct_object_names(self.compiler.object_filenames)
            super().build_extensions()

        def run(self):
            super().run()
            build_info["archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
            build_info["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            folders = {os.path.join(self.build_lib, PACKAGE)}
            if self.inplace or getattr(self, "editable_mode", False):
                folders.add(os.path.join(ROOT, PACKAGE))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(build_info, f, indent=1, sort_keys=True)

    extension = CUDAExtension(
        EXTENSION, sources,
        depends=sorted(glob.glob("csrc/*.h", root_dir=ROOT) + glob.glob("csrc/*.cuh", root_dir=ROOT)),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtensionWithInfo}}


def main() -> None:
    try:
        import torch
        torch_version, torch_cuda = torch.__version__, torch.version.cuda
    except ImportError:
        torch_version = torch_cuda = None
    cuda_home = find_cuda_home()
    nvcc_cuda = nvcc_release(cuda_home) if is_toolkit(cuda_home) else None
    build, why = build_decision(os.environ, torch_version, torch_cuda, cuda_home, nvcc_cuda)
    if not build and switched_on(os.environ, "PARA_KERNELS_FORCE_BUILD"):
        raise SystemExit(f"para_kernels setup: PARA_KERNELS_FORCE_BUILD=1 but the CUDA extension cannot be "
                         f"built: {why}")
    if not build:
        _log(f"installing the pure-Python package without the CUDA extension: {why}")
        if switched_on(os.environ, "PARA_KERNELS_KEEP_BUILD"):
            _log("PARA_KERNELS_KEEP_BUILD is set: an extension built in this checkout for another environment stays "
                 "(it loads only where its _build_info.json matches the running torch)")
        else:
            _remove_stale_build()
        setup(version=full_version(os.environ, torch_version, torch_cuda, False))
        return
    _log(f"building the CUDA extension {EXTENSION}: {why}")
    version = full_version(os.environ, torch_version, torch_cuda, True)
    build_info = {
        "para_kernels": version, "torch": torch_version, "torch_cuda": torch_cuda,
        "nvcc_cuda": nvcc_cuda, "cuda_home": cuda_home, "compiler": _compiler_version(),
    }
    setup(version=version, **cuda_extension_kwargs(cuda_home, build_info))


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the functions
    main()
