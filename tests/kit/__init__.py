"""The test kit: what more than one test module needs, in one place.

- ``TOL``, ``DTYPES``, ``rel_err``: the spec's per-dtype relative-error bars (docs/spec.md §4) and
  the one error measure every test uses;
- ``ranges``, ``packed``, ``adapter_ids``, ``adapter_bank``, ``f64``, ``grads``: op inputs
  (prompt ranges, the packed layout, routing ids, the adapter bank) and autograd helpers;
- ``kit.oracles``: independent fp64 oracles written from the spec;
- ``kit.checks``: one checker per op (forward and backward of a backend's kernels against the
  PyTorch reference run in fp64);
- ``kit.models``: tiny random-weight Hugging Face models (nothing is downloaded) and adapter helpers;
- ``kit.readme``: the README's Python blocks by section; ``kit.vllm_engine``: the vLLM plugin tests' model,
  adapters and in-process engine.

Fixtures live in the conftest.py files (tests/, tests/ops/, tests/wrapper/, tests/build/), never
here: test modules use them by name, without importing them.
"""
from __future__ import annotations

import importlib
import math
import os

import torch

# para_kernels internals
from para_kernels.ops import dispatch
from para_kernels.ops.activations import RATIONAL_GELU_INIT

CUDA_BACKEND = "para_kernels.ops.cuda_ops"  # imported by cuda_kernels_built (it loads _C when it matches)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel tests run their kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BANK = ("w_down", "b_down", "w_up", "b_up")  # the adapter bank's weights, in the ops' argument order


def rel_err(out: torch.Tensor, ref: torch.Tensor, floor: float = 1e-300) -> float:
    """‖out − ref‖ / max(‖ref‖, floor), in fp64 on the CPU. ``out`` must be finite: NaN is what
    an element a kernel never wrote looks like (the tests poison their allocations with it)."""
    out, ref = out.detach(), ref.detach()
    assert torch.isfinite(out).all(), "NaN or inf in output (an element never written?)"
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def ranges(gen, B, T, device):
    """Random prompt ranges [start, end) of B rows of T tokens that include length 1 and the full row."""
    start = torch.randint(0, T, (B,), generator=gen)
    end = start + 1 + (torch.rand(B, generator=gen) * (T - start)).long().clamp(max=T - start - 1)
    start[0], end[0] = 0, T
    if B > 1:
        start[1], end[1] = T - 1, T
    return start.to(device), end.to(device)


def packed(hidden, start, end):
    """The same rows as one packed [total, d] tensor with shifted ranges."""
    B, T, d = hidden.shape
    return hidden.reshape(B * T, d), start + torch.arange(B, device=start.device) * T, end + torch.arange(
        B, device=start.device) * T


def adapter_ids(gen, B, A, device):
    """Mixed ids with -1 rows; adapter 0 used by one row only when B allows it."""
    ids = torch.randint(-1, A, (B,), generator=gen)
    if B >= 3:
        ids[0], ids[1] = -1, 0
        ids[2:][ids[2:] == 0] = min(1, A - 1)
    return ids.to(device)


def adapter_bank(gen, A, d, r, N, device, dtype, activation=None, *, batch=None, pooled_dtype=None):
    """The one adapter-bank builder: random weights (never zeros) of A adapters, a dict with
    w_down [A, d, r], b_down [A, r], w_up [A, r, N], b_up [A, N] (``BANK``) and act_params
    [A, 10] (None unless activation is 'rational'; the GELU start, nudged), all in ``dtype``.
    With ``batch``, also ``pooled`` [batch, d] in ``pooled_dtype`` (default ``dtype``).
    Draws from ``gen`` in the order act_params, pooled, w_down, b_down, w_up, b_up."""
    t = lambda *s, scale=1.0, dt=dtype: (torch.randn(*s, generator=gen) * scale).to(device, dt)  # noqa: E731
    bank = {}
    params = None
    if activation == "rational":
        params = (torch.tensor([RATIONAL_GELU_INIT] * A) + 0.05 * torch.randn(A, 10, generator=gen)).to(device, dtype)
    if batch is not None:
        bank["pooled"] = t(batch, d, dt=pooled_dtype or dtype)
    bank.update(w_down=t(A, d, r, scale=1 / math.sqrt(max(d, 1))), b_down=t(A, r),
                w_up=t(A, r, N, scale=1 / math.sqrt(max(r, 1))), b_up=t(A, N), act_params=params)
    return bank


def f64(*shape, seed=0):
    """A seeded fp64 CPU tensor (gradcheck inputs)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(fn, inputs):
    """Gradients of sum(fn(*inputs) * g) (g seeded) with respect to the floating inputs."""
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    (out * g).sum().backward()
    return [t.grad for t in inputs if t is not None and t.is_floating_point()]


def randn(*shape, seed=0, dtype=torch.float32, device=DEVICE):
    """A seeded standard-normal tensor, drawn on the CPU, then moved to ``device`` in ``dtype``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def misaligned(t):
    """t's values in a view that starts one element into its storage (rows misaligned too)."""
    base = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    view = base[..., 1:]
    view.copy_(t)
    return view


def poison_cuda_allocator(nbytes=256 << 20):
    """Leave NaN in the CUDA caching allocator's free blocks, so that outputs and scratch the
    kernels fail to write (or read before writing) show up as NaN."""
    torch.cuda.synchronize()
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del block
    for size in (1 << 10, 1 << 14, 1 << 18, 1 << 20):  # small-pool blocks too
        junk = [torch.full((size // 4,), float("nan"), device="cuda") for _ in range(8)]
        del junk


# ------------------------------------------------------------------ which backends run here
def triton_runs(device=DEVICE) -> bool:
    """The Triton backend runs on ``device`` here (on a GPU, or on the CPU in Triton's interpreter)."""
    return "triton" in dispatch.available_backends(device)


# the devices the Triton backend runs on here
TRITON_DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if triton_runs(d)]


def cuda_kernels_built(*ops) -> bool:
    """A GPU is present and the compiled extension registered CUDA kernels for every para_cuda op in ``ops``."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module(CUDA_BACKEND)  # loads _C when it matches this torch
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"para_cuda::{op}", "CUDA") for op in ops)
    except Exception:
        return False


def names_argument(arg):
    """A TORCH_CHECK message that names the argument: '<arg> must ...', '<arg> has ...', '<arg> is ...'."""
    return rf"\b{arg} (must|has|is)\b"


def bank_weights(bank):
    """(w_down, b_down, w_up, b_up, act_params) of an adapter_bank, in the ops' argument order."""
    return tuple(bank[k] for k in (*BANK, "act_params"))


def randn64(gen, *shape, scale=1.0):
    """fp64 standard-normal values from ``gen``, times ``scale``, on the CPU."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


class PoisonedTorch:
    """torch, except that empty / empty_like return NaN-filled tensors (outputs and workspaces):
    monkeypatch a kernel module's ``torch`` with it. ``calls`` counts the poisoned allocations."""
    calls = 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def _poison(self, t):
        type(self).calls += 1
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *a, **kw):
        return self._poison(torch.empty(*a, **kw))

    def empty_like(self, *a, **kw):
        return self._poison(torch.empty_like(*a, **kw))
