"""Host-side helpers every Triton launcher shares: the launch guard, the SM count, tile-size
and dtype helpers, and autotuned kernels that are safe to call inside a CUDA-graph capture.

- ``launch_guard(device)``: every launch runs inside it. On CUDA it makes the tensors' device
  current (Triton launches on the current device and its current stream, so tensors on
  ``cuda:1`` under accelerate's ``device_map`` would otherwise run on ``cuda:0``'s stream).
  It also records the device in ``guarded_device()``, which the ahead-of-time compile check
  (``aot.py``) compares with every launch's tensors: a launcher that forgets the guard fails
  ``make test`` on a machine with no GPU.
- ``num_sms(device)``: the multiprocessor count that sizes grids, cached per device; the
  ahead-of-time check replaces it with the target GPU's count, the interpreter gets 4.
- ``CaptureSafeAutotuner``: wraps a ``triton.autotune`` kernel. Triton's autotuner times every
  surviving config (and synchronises) the first time it sees a key; inside a CUDA-graph
  capture that breaks the capture. The wrapper remembers the config chosen for each key; an
  eager call of a new key tunes as usual, a call inside a capture of a key never tuned runs
  the first config left after pruning, untimed, and leaves the key untuned.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The smallest power of two >= n (and >= lo), capped at hi: a block size covering n."""
    v = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return v if hi is None else min(v, hi)


def acc_dtypes(dtype: torch.dtype):
    """(Triton, torch) accumulation dtype of inputs of ``dtype``: fp64 for fp64, else fp32."""
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands upcast from ``dtype``: tf32 for 16-bit inputs (their
    values are exact in tf32), IEEE for fp32 / fp64 (TF32 would round them)."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"


def empty_buffer(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised output or scratch buffer, for launchers whose kernels write every
    element they own (their tests replace it with a NaN fill to prove it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def view_rows(t: torch.Tensor, rows: int) -> torch.Tensor | None:
    """t [rows, ..., n] as a [rows, L, n] view (no copy, any strides), or None when its middle
    dims cannot merge (the launcher then copies once)."""
    try:
        return t.view(rows, -1, t.shape[-1])
    except RuntimeError:
        return None


_GUARDED = contextvars.ContextVar("para_triton_launch_device", default=None)


@contextlib.contextmanager
def launch_guard(device: torch.device):
    """Launch on ``device`` (and its current stream); see the module docstring."""
    token = _GUARDED.set(torch.device(device))
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        _GUARDED.reset(token)


def guarded_device() -> torch.device | None:
    """The device of the innermost ``launch_guard``, or None outside any."""
    return _GUARDED.get()


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


TARGET_SMS: int | None = None  # set by aot.compile_only: the SM count of the GPU compiled for


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a CUDA device; the index defaults to the current one)."""
    if TARGET_SMS is not None:
        return TARGET_SMS
    if interpreting():  # no SMs there: a small count keeps the split paths small but reachable
        return 4
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def capturing(device: torch.device) -> bool:
    """Whether launches on ``device`` are being recorded into a CUDA graph right now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class CaptureSafeAutotuner:
    """``kernel[grid](...)`` like the wrapped autotuner, never timing configs inside a capture."""

    registry: list["CaptureSafeAutotuner"] = []  # every wrapper, so tests can forget tuned keys

    def __init__(self, tuner):
        self.tuner = tuner
        self.chosen: dict = {}  # key -> triton.Config
        CaptureSafeAutotuner.registry.append(self)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def key(self, args, kwargs) -> tuple:
        """The tuner's own key: its key arguments' values, then every tensor argument's dtype."""
        named = {**dict(zip(self.tuner.arg_names, args)), **kwargs}
        named = {k: v for k, v in named.items() if k in self.tuner.arg_names}
        return (*(named[k] for k in self.tuner.keys if k in named),
                *(str(v.dtype) for v in named.values() if hasattr(v, "dtype")))

    def first_config(self, args, kwargs) -> triton.Config:
        """The config a capture runs for an untuned key: the first left after pruning (no timing)."""
        self.tuner.nargs = dict(zip(self.tuner.arg_names, args))
        try:
            return self.tuner.prune_configs(kwargs)[0]
        finally:
            self.tuner.nargs = None

    def run(self, grid, args, kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        key = self.key(args, kwargs)
        config = self.chosen.get(key)
        if config is None:
            if not capturing(device):
                result = self.tuner[grid](*args, **kwargs)
                self.chosen[key] = self.tuner.best_config
                return result
            config = self.first_config(args, kwargs)
        return self.tuner.fn[grid](*args, **kwargs, **config.all_kwargs())


def capture_safe(tuner) -> CaptureSafeAutotuner:
    """Decorator form: ``@capture_safe`` above ``@triton.autotune(...)``."""
    return CaptureSafeAutotuner(tuner)
