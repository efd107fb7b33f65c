"""The ``cuda`` backend: the CUDA C++ kernels of csrc/, built by setup.py into ``para_kernels._C``.

The kernels are ``torch.ops.para_cuda.*`` ops with the ``para::`` schemas; this module loads
``_C`` only when its ``_build_info.json`` matches the running torch, and registers the ops it
has CUDA kernels for (the others fall through to Triton). Why a namespace of its own, the
version check and the fallback warnings: docs/kernels.md, "CUDA C++ backend".
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings

import torch

from .. import dispatch

PACKAGE = "para_kernels"
EXTENSION = f"{PACKAGE}._C"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_INFO_PATH = os.path.join(PACKAGE_DIR, "_build_info.json")
# The ops csrc/library.cpp defines (C++ cannot read this list; tests/ops/test_registry.py checks
# they agree). Only for what to offer while _C is not loaded; once loaded, the backend offers the
# ops _C has CUDA kernels for, asked of the extension itself (kernel_ops).
OPS = ("pool", "pool_backward", "generate", "generate_backward", "scale", "scale_backward")
# a wheel's user has no source tree: point at the matching wheel first (README, "Wheels")
HOW_TO_BUILD = ("install the para_kernels wheel built for this torch and CUDA, or rebuild from source: "
                "pip install --no-build-isolation . with a CUDA build of torch and nvcc")
NOT_BUILT = f"the CUDA C++ extension is not built ({HOW_TO_BUILD})"

loaded = False       # _C imported and its kernels registered
reason = NOT_BUILT   # why not, when not loaded
build_info: dict | None = None  # what _build_info.json says, when present
_warned_fallback = False


def read_build_info() -> dict | None:
    """The build metadata setup.py recorded, or None without a build."""
    try:
        with open(BUILD_INFO_PATH) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _major_minor(version: str | None) -> str | None:
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


def version_mismatch(info: dict, torch_version: str, torch_cuda: str | None) -> str | None:
    """Why an extension built as ``info`` says must not be loaded into this torch, or None."""
    if "error" in info:
        return f"its build metadata {BUILD_INFO_PATH} is unreadable ({info['error']}); {HOW_TO_BUILD}"
    built_torch, built_cuda = info.get("torch"), info.get("torch_cuda")
    if _major_minor(built_torch) == _major_minor(torch_version) and built_cuda == torch_cuda:
        return None
    return (f"the CUDA C++ extension was built for torch {built_torch} with CUDA {built_cuda}, but torch "
            f"{torch_version} with CUDA {torch_cuda} is running; {HOW_TO_BUILD}")


def extension_built() -> bool:
    return importlib.util.find_spec(EXTENSION) is not None


def load() -> tuple[bool, str, dict | None]:
    """(loaded, why not, build metadata): imports _C only when its metadata matches this torch."""
    if not extension_built():
        return False, NOT_BUILT, None
    info = read_build_info()
    if info is None:
        return False, f"the CUDA C++ extension has no build metadata ({BUILD_INFO_PATH}); {HOW_TO_BUILD}", None
    mismatch = version_mismatch(info, torch.__version__, torch.version.cuda)
    if mismatch:
        return False, mismatch, info
    try:
        importlib.import_module(EXTENSION)
    except Exception as e:  # a broken build must not break the package
        return False, f"{EXTENSION} does not load ({type(e).__name__}: {e}); {HOW_TO_BUILD}", info
    return True, "", info


def _has_cuda_kernel(op: str) -> bool:
    """The schema is always defined by library.cpp; a kernel only once its .cu/.cpp is built in."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"para_cuda::{op}", "CUDA")
    except RuntimeError:  # no such op
        return False


def kernel_ops() -> list[str]:
    """The ops _C has CUDA kernels for, as the loaded extension registered them."""
    return [op for op in dispatch.OPS if loaded and _has_cuda_kernel(op)]


def arch_runs_on(archs: str, capability: tuple[int, int]) -> bool:
    """Whether code built for TORCH_CUDA_ARCH_LIST ``archs`` runs on a GPU of ``capability``: a
    binary for X.Y runs on X.Z with Z >= Y ("X.Ya" on X.Y only); PTX for X.Y on anything >= X.Y."""
    for arch in archs.replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        major, minor = arch.removesuffix("+PTX").split(".")
        specific = minor.endswith("a")
        built = (int(major), int(minor.rstrip("a")))
        if built[0] == capability[0] and (capability[1] == built[1] if specific else capability[1] >= built[1]):
            return True
        if ptx and capability >= built:
            return True
    return False


def _gpu_not_supported(device: torch.device) -> str | None:
    archs = (build_info or {}).get("archs")
    if not archs:
        return None
    try:
        capability = torch.cuda.get_device_capability(device)
    except Exception:  # cannot tell: let the kernels try
        return None
    if arch_runs_on(archs, capability):
        return None
    cap = f"{capability[0]}.{capability[1]}"
    return (f"the CUDA C++ extension was built for TORCH_CUDA_ARCH_LIST={archs}, which cannot run on this "
            f"GPU (compute capability {cap}); rebuild it with TORCH_CUDA_ARCH_LIST={cap}")


def is_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    why_not = reason if not loaded else _gpu_not_supported(device)
    if why_not and dispatch.get_backend() != "cuda":  # forced: the dispatcher warns with the reason
        _warn_fallback_once(why_not)
    return not why_not


def _warn_fallback_once(why_not: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"para_kernels: the CUDA C++ kernels are not used: {why_not}. CUDA tensors take the "
                      f"Triton / PyTorch kernels instead", RuntimeWarning, stacklevel=4)


def _not_loaded(*args, **kwargs):
    raise RuntimeError(f"para_kernels: {reason}")


def register() -> None:
    """Load _C if it is built for this torch, then register the backend (again, in tests)."""
    global loaded, reason, build_info, _warned_fallback
    loaded, reason, build_info = load()
    _warned_fallback = False
    if loaded:
        impls = {op: getattr(torch.ops.para_cuda, op).default for op in kernel_ops()}
        unavailable = f"it runs on CUDA GPUs it was built for (TORCH_CUDA_ARCH_LIST={(build_info or {}).get('archs')})"
    else:
        # Stand-ins that never run (is_available is False) but let the dispatcher ask
        # is_available on the first CUDA tensor, where the missing build is reported.
        impls, unavailable = dict.fromkeys(OPS, _not_loaded), reason
    dispatch.register_backend("cuda", impls, is_available, unavailable_reason=unavailable)


def status() -> dict:
    """What `python -m para_kernels.info` shows about the extension."""
    extension = None
    if loaded:
        try:
            extension = importlib.import_module(EXTENSION).build_info()
        except Exception as e:
            extension = f"{type(e).__name__}: {e}"
    return {"built": extension_built(), "loaded": loaded, "reason": reason or None,
            "build_info": build_info if build_info is not None else read_build_info(),
            "compiled_against": extension, "kernel_ops": kernel_ops()}


register()
