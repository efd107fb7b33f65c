"""The one dispatch point: which implementation runs each ``para::`` op, and the one list of ops.

Each backend package (``reference_ops``, ``triton_ops``, ``cuda_ops``) registers itself from its
``__init__`` with ``register_backend``: its implementations per op, and a predicate saying on
which devices they run. ``set_backend`` or ``PARA_KERNELS_BACKEND`` forces one; otherwise the best available
for the tensor's device is taken (CUDA C++, then Triton, then the PyTorch reference). A
forced backend that cannot run warns once and falls back, never silently.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("cuda", "triton", "reference")  # in order of preference
ENV_VAR = "PARA_KERNELS_BACKEND"
# Every para:: op (library.py defines each one's schema); a backend implements any subset.
OPS = ("pool", "pool_backward", "generate", "generate_backward", "scale", "scale_backward",
       "pool_generate", "pool_generate_backward", "scaled_glu", "scaled_glu_backward",
       "scaled_linear", "scaled_linear_backward")
FORWARD_OPS = tuple(op for op in OPS if not op.endswith("_backward"))


@dataclass
class _Backend:
    name: str
    is_available: Callable[[torch.device], bool]  # can run there when forced
    impls: dict
    unavailable_reason: str = ""
    auto: Callable[[torch.device], bool] | None = None  # chosen there unforced (default: is_available)


_backends: dict[str, _Backend] = {}
_forced: str | None = None
_warned: set = set()
_chosen: dict = {}  # (op, device type, forced) -> backend name; scale asks per projection per token


def register_backend(name: str, impls: dict, is_available: Callable[[torch.device], bool],
                     unavailable_reason: str = "",
                     auto: Callable[[torch.device], bool] | None = None) -> None:
    """Make ``impls`` ({op name: callable}) the implementation of ``name`` on devices where
    ``is_available(device)`` holds; unforced, it is chosen only where ``auto(device)`` holds
    too (e.g. Triton's interpreter runs on the CPU when forced, but is never chosen there).
    An op missing from ``impls`` falls through to the next backend. Called by each backend
    package's ``__init__``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    unknown = set(impls) - set(OPS)
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)} for backend {name!r}; ops are {OPS}")
    _backends[name] = _Backend(name, is_available, dict(impls), unavailable_reason, auto)
    _chosen.clear()


def load_implementations(package: str) -> dict:
    """{op name: function} of a backend package laid out one module per op: ``<package>.<op>``
    defines ``<op>`` and ``<op>_backward``. A module not written yet is skipped (its ops fall
    through to the next backend)."""
    impls = {}
    for op in FORWARD_OPS:
        if importlib.util.find_spec(f"{package}.{op}") is None:
            continue
        module = importlib.import_module(f"{package}.{op}")
        impls.update({name: getattr(module, name) for name in (op, f"{op}_backward") if hasattr(module, name)})
    return impls


def _check_name(name: str | None, source: str) -> str | None:
    if name in (None, "", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend for every op ('cuda', 'triton', 'reference'), or None / 'auto' for the
    best available per device. Overrides the PARA_KERNELS_BACKEND environment variable."""
    global _forced
    _forced = _check_name(name, "backend")
    _warned.clear()
    _chosen.clear()


def get_backend() -> str | None:
    """The forced backend, or None when chosen per device."""
    if _forced is not None:
        return _forced
    return _check_name(os.environ.get(ENV_VAR), ENV_VAR)


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def backend_for(op: str, device: torch.device) -> str:
    """Name of the backend that runs ``op`` on ``device`` now."""
    forced = get_backend()
    key = (op, device.type, forced)
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = _choose(op, device, forced)
    return name


def _choose(op: str, device: torch.device, forced: str | None) -> str:
    if forced is not None:
        backend = _backends.get(forced)
        key = (forced, device.type)  # one warning for a backend that cannot run here at all
        if backend is None:
            why = "it is not installed"
        elif not backend.is_available(device):
            why = backend.unavailable_reason or f"it does not run on {device.type}"
        elif op not in backend.impls:
            why, key = f"it does not implement {op!r}", (forced, device.type, op)
        else:
            return forced
        _warn_once(key, f"para_kernels: backend {forced!r} was requested for {op!r} on {device.type}, "
                   f"but {why}; falling back")
    for name in BACKENDS:
        backend = _backends.get(name)
        if backend is not None and op in backend.impls and backend.is_available(device) \
                and (backend.auto is None or backend.auto(device)):
            return name
    raise RuntimeError(f"no para_kernels backend implements {op!r} on {device}")


def implementation(op: str, device: torch.device) -> Callable:
    return _backends[backend_for(op, device)].impls[op]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [n for n in BACKENDS if n in _backends and _backends[n].is_available(device)]
