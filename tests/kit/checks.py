"""One checker per op: a backend's forward and backward kernels against the PyTorch reference
(para_kernels.ops.reference_ops) run on fp64 copies of the same inputs.

Each checker takes the kernels to test as ``fwd`` / ``bwd`` (the Triton module's functions, the
``torch.ops.para_cuda`` ops, or the dispatched ``torch.ops.para`` ops), so every backend's tests
compare in the same way; ``before`` runs before each kernel call (e.g. to poison the CUDA
caching allocator with NaN, so that elements a kernel never writes show up).
"""
from __future__ import annotations

import importlib

import torch

from . import TOL, rel_err

# the PyTorch reference (imported by module path: reference_ops re-exports functions of the same names)
ref_pool = importlib.import_module("para_kernels.ops.reference_ops.pool")
ref_generate = importlib.import_module("para_kernels.ops.reference_ops.generate")
ref_scale = importlib.import_module("para_kernels.ops.reference_ops.scale")
ref_glu = importlib.import_module("para_kernels.ops.reference_ops.scaled_glu")
ref_linear = importlib.import_module("para_kernels.ops.reference_ops.scaled_linear")

POOL_MODES = ("last", "mean", "max", "attn")
GENERATE_ARGS = ("pooled", "w_down", "b_down", "w_up", "b_up")


def _c64(t):
    return None if t is None else t.detach().cpu().double()


def _sync(t):
    if t.is_cuda:
        torch.cuda.synchronize()


# ------------------------------------------------------------------ pool
def check_pool(fwd, bwd, hidden, start, end, mode, w, tol, *, grad_seed=11, exact_zero_modes=POOL_MODES,
               before=None):
    """pool and pool_backward: outputs, dtypes and shapes; grad_hidden exactly zero outside every
    prompt (for ``exact_zero_modes``). Returns (out, grad_hidden, grad_w_sa)."""
    B, d, dtype = start.shape[0], hidden.shape[-1], hidden.dtype
    grad = torch.randn(B, d, generator=torch.Generator().manual_seed(grad_seed)).to(hidden.device, dtype)
    if before is not None:
        before()
    out = fwd(hidden, start, end, mode, w)
    if before is not None:
        before()
    g_h, g_w = bwd(grad, hidden, start, end, mode, w)
    _sync(hidden)
    ref = ref_pool.pool(_c64(hidden), start.cpu(), end.cpu(), mode, _c64(w))
    ref_gh, ref_gw = ref_pool.pool_backward(_c64(grad), _c64(hidden), start.cpu(), end.cpu(), mode, _c64(w))
    assert out.shape == ref.shape == (B, d) and out.dtype == dtype
    assert rel_err(out, ref) <= tol, "forward"
    assert g_h.shape == hidden.shape and g_h.dtype == dtype
    assert rel_err(g_h, ref_gh) <= tol, "grad_hidden"
    if mode in exact_zero_modes:  # zero outside the prompts, exactly
        outside = ref_gh == 0
        assert torch.equal(g_h.cpu()[outside], torch.zeros_like(g_h.cpu()[outside]))
    if w is None:
        assert g_w.numel() == 0
    else:
        assert g_w.shape == w.shape and g_w.dtype == w.dtype == dtype
        assert rel_err(g_w, ref_gw) <= tol, "grad_w_sa"
    return out, g_h, g_w


# ------------------------------------------------------------------ generate
def run_generate(fwd, bwd, bank, ids, activation, grad=None, grad_seed=1, before=None):
    """((out, grads), (ref_out, ref_grads)): the kernels on ``bank`` (a kit.adapter_bank with
    ``pooled``) and the reference on fp64 copies (on the same device)."""
    args = [bank[k] for k in GENERATE_ARGS]
    params = bank["act_params"]
    if grad is None:
        grad = torch.randn(ids.shape[0], args[3].shape[2], generator=torch.Generator().manual_seed(grad_seed),
                           dtype=torch.float64).to(args[0])
    if before is not None:
        before()
    out = fwd(*args, ids, activation, params)
    if before is not None:
        before()
    grads = bwd(grad, *args, ids, activation, params)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    args64, params64 = [up(t) for t in args], up(params)
    ref_out = ref_generate.generate(*args64, ids, activation, params64)
    ref_grads = ref_generate.generate_backward(grad.double(), *args64, ids, activation, params64)
    return (out, grads), (ref_out, ref_grads)


def check_generate(fwd, bwd, bank, ids, activation, tol, *, grad=None, grad_seed=1, before=None):
    """generate and generate_backward: rows with adapter -1 exactly one (forward) and zero
    (grad_pooled); every gradient's dtype, shape and error (2 tol: sums of rounded products).
    Returns (out, grads)."""
    (out, grads), (ref_out, ref_grads) = run_generate(fwd, bwd, bank, ids, activation, grad, grad_seed, before)
    dtype = bank["pooled"].dtype
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out, floor=1e-3) <= tol
    assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"
    likes = [bank[k] for k in GENERATE_ARGS] + [bank["act_params"]]
    for name, g, g_ref, like in zip(GENERATE_ARGS + ("act_params",), grads, ref_grads, likes):
        if like is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert rel_err(g, g_ref, floor=1e-3) <= 2 * tol, name
    assert torch.all(grads[0][ids < 0] == 0), "rows with adapter -1 get no gradient"
    return out, grads


# ------------------------------------------------------------------ scale
def check_scale(fwd, bwd, x, v, rows, tol, *, grad_tol=None, grad=None, grad_seed=1, bitwise_eager=False,
                before=None):
    """scale and scale_backward; with ``bitwise_eager``, the forward (one product rounded once)
    must equal PyTorch's own x * v bitwise. Returns (grad_x, grad_v)."""
    grad_tol = 2 * tol if grad_tol is None else grad_tol  # backward sums many rounded products
    if grad is None:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.device, x.dtype)
    if before is not None:
        before()
    out = fwd(x, v, rows)
    if before is not None:
        before()
    gx, gv = bwd(grad, x, v, rows)
    _sync(x)
    rows_c = None if rows is None else rows.cpu()
    ref = ref_scale.scale(_c64(x), _c64(v), rows_c)
    ref_gx, ref_gv = ref_scale.scale_backward(_c64(grad), _c64(x), _c64(v), rows_c)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= tol
    if bitwise_eager:
        eager = x * (v[rows.long()] if rows is not None else v.reshape(v.shape[0], *([1] * (x.dim() - 2)), -1))
        assert torch.equal(out, eager)
    assert gx.shape == x.shape and gx.dtype == x.dtype and gv.shape == v.shape and gv.dtype == v.dtype
    assert rel_err(gx, ref_gx) <= grad_tol, "grad_x"
    assert rel_err(gv, ref_gv) <= grad_tol, "grad_v"
    return gx, gv


# ------------------------------------------------------------------ pool_generate
def check_pool_generate(fwd, args, tol):
    """pool_generate's forward (one launch) against the fp64 oracle; args are the op's arguments."""
    from . import oracles

    out = fwd(*args)
    expected = oracles.pool_generate(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    bank_dtype, ids = args[5].dtype, args[9]
    assert out.shape == (ids.shape[0], args[7].shape[2]) and out.dtype == bank_dtype
    assert rel_err(out, expected, floor=1e-3) <= tol
    assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"
    return out


# ------------------------------------------------------------------ scaled_glu / scaled_linear
def _close(ours, theirs, dtype, factor=1.0, what="", mag=None):
    """‖ours − theirs‖ / ‖theirs‖ within the spec's tolerance; for sums, relative to ‖mag‖, the
    same sums of absolute values, so that cancellation (a one-element output that sums to ~0)
    does not fail a correctly rounded result."""
    assert ours.dtype == dtype and ours.shape == theirs.shape, what
    assert not torch.isnan(ours).any(), f"NaN in {what}"
    err = rel_err(ours.cpu(), theirs)
    if mag is not None:
        err = err * theirs.norm().item() / max(mag.norm().item(), 1e-300)
    assert err <= TOL[dtype] * factor, what


def check_scaled_glu(fwd, bwd, gate, up, v, act, grad, dtype):
    """scaled_glu and its backward against the fp64 reference (grad_v relative to its magnitude)."""
    d = lambda t: t.cpu().double()  # noqa: E731
    _close(fwd(gate, up, v, act), ref_glu.scaled_glu(d(gate), d(up), d(v), act), dtype, what="out")
    ours = bwd(grad, gate, up, v, act)
    theirs = ref_glu.scaled_glu_backward(d(grad), d(gate), d(up), d(v), act)
    mag_v = (d(grad).abs() * ref_glu.glu_activation(d(gate), act).abs() * d(up).abs()).reshape(
        v.shape[0], -1, v.shape[1]).sum(1)
    for name, a, b, mag in zip(("gate", "up", "v"), ours, theirs, (None, None, mag_v)):
        _close(a, b, dtype, 2, what=f"grad_{name}", mag=mag)


def check_scaled_linear(fwd, bwd, x, weight, bias, v, grad, dtype):
    """scaled_linear and its backward against the fp64 reference (relative to magnitudes)."""
    d = lambda t: None if t is None else t.cpu().double()  # noqa: E731
    a = lambda t: None if t is None else d(t).abs()  # noqa: E731
    ours = fwd(x, weight, bias, v)
    _close(ours, ref_linear.scaled_linear(d(x), d(weight), d(bias), d(v)), dtype, what="out",
           mag=ref_linear.scaled_linear(a(x), a(weight), a(bias), a(v)))
    ours = bwd(grad, x, weight, bias, v)
    theirs = ref_linear.scaled_linear_backward(d(grad), d(x), d(weight), d(bias), d(v))
    mags = ref_linear.scaled_linear_backward(a(grad), a(x), a(weight), a(bias), a(v))
    for name, o, t, m in zip(("x", "weight", "bias", "v"), ours, theirs, mags):
        if name == "bias" and bias is None:
            assert o.numel() == 0
            continue
        _close(o, t, dtype, 2, what=f"grad_{name}", mag=m)
