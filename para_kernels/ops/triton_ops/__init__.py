"""Triton kernels for the ``para::`` ops, registered as the ``triton`` backend.

They run on CUDA tensors, where they are chosen by default, and on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), where they run
only when forced with ``set_backend("triton")`` — that is how the CPU tests reach them.
Every kernel loads in the input dtype, computes in fp32 and stores in the output dtype; launch
grids depend on shapes only, never on tensor values, so decode steps can be graph-captured.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .. import dispatch

KERNEL_MODULES = ("pool", "generate", "scale", "fused", "pool_generate")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not break the package
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


def is_available(device: torch.device) -> bool:
    return _ERROR is None and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def _implementations() -> dict:
    impls = {}
    for name in KERNEL_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is None:
            continue
        module = importlib.import_module(f"{__name__}.{name}")
        impls.update({op: getattr(module, op) for op in dispatch.OPS if hasattr(module, op)})
    return impls


_ERROR = _import_error()
dispatch.register_backend(
    "triton",
    _implementations() if _ERROR is None else {},
    is_available,
    unavailable_reason=_ERROR or "Triton runs on CUDA devices, or on the CPU under TRITON_INTERPRET=1",
    auto=lambda device: device.type == "cuda",
)
