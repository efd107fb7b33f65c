"""The ``triton`` backend: Triton kernels of the ``para::`` ops, one module per op
(``<op>.py`` defines the launchers ``<op>`` and ``<op>_backward``), host-side helpers in
``utils.py``, shared device functions in ``kernel_utils.py``, the ahead-of-time compile check in
``aot.py``.

Chosen by default on CUDA tensors; on CPU tensors the kernels run under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported) only when forced with
``set_backend("triton")`` — that is how the CPU tests reach them. Every kernel loads in the input
dtype, computes in fp32 (fp64 for fp64 inputs) and stores in the output dtype; launch grids
depend on shapes only, never on tensor values, so decode steps can be graph-captured.
"""
from __future__ import annotations

import torch

from .. import dispatch

# The modules whose kernels the compile check (tests/build/test_triton_compile.py) looks for.
KERNEL_MODULES = (*dispatch.FORWARD_OPS, "kernel_utils")


def _import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not break the package
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    return None


_ERROR = _import_error()
if _ERROR is None:
    from .utils import interpreting


def is_available(device: torch.device) -> bool:
    return _ERROR is None and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


dispatch.register_backend(
    "triton",
    dispatch.load_implementations(__name__) if _ERROR is None else {},
    is_available,
    unavailable_reason=_ERROR or "Triton runs on CUDA devices, or on the CPU under TRITON_INTERPRET=1",
    auto=lambda device: device.type == "cuda",
)
