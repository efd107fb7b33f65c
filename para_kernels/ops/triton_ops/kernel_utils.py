"""Device-side helpers the Triton kernels share: activations and their derivatives, and the
ordered sum of per-chunk partials.

Activations are picked by a constexpr id (``ACTIVATION_IDS``), so each kernel variant compiles
only the branch it uses. Every function takes and returns fp32 / fp64 values: the kernels
upcast their loads first. The derivatives are the closed forms of the PyTorch reference
(``activations.activation_backward``, ``reference_ops.scaled_glu.glu_activation_grad``).
Constants are ``tl.constexpr``: a kernel may read a global only when it is one (the
ahead-of-time compile check fails on a plain global).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The constexpr id of each activation: generate's ``g`` (activations.ACTIVATIONS) and the
# gated FFN's (checks.GLU_ACTIVATIONS) share one numbering.
ACTIVATION_IDS = {"relu": 0, "gelu": 1, "silu": 2, "tanh": 3, "identity": 4, "rational": 5, "gelu_tanh": 6}
RELU: tl.constexpr = tl.constexpr(ACTIVATION_IDS["relu"])
GELU: tl.constexpr = tl.constexpr(ACTIVATION_IDS["gelu"])
SILU: tl.constexpr = tl.constexpr(ACTIVATION_IDS["silu"])
TANH: tl.constexpr = tl.constexpr(ACTIVATION_IDS["tanh"])
IDENTITY: tl.constexpr = tl.constexpr(ACTIVATION_IDS["identity"])
RATIONAL: tl.constexpr = tl.constexpr(ACTIVATION_IDS["rational"])  # needs its coefficients: generate.py
GELU_TANH: tl.constexpr = tl.constexpr(ACTIVATION_IDS["gelu_tanh"])

INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)       # 1 / sqrt(2)
INV_SQRT2PI: tl.constexpr = tl.constexpr(0.3989422804014327)     # 1 / sqrt(2 pi)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_A: tl.constexpr = tl.constexpr(0.044715)               # the cubic term of gelu_tanh


@triton.jit
def tanh(x):
    # exp-based, with a Taylor branch where 1 - e^{-2|x|} would cancel (no expm1 in tl)
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    y = tl.where(ax < 0.0625, small, big)
    return tl.where(x < 0.0, -y, y)


@triton.jit
def sign(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0)).to(x.dtype)


@triton.jit
def apply_activation(x, ACT: tl.constexpr):
    """act(x) for every activation id but RATIONAL."""
    if ACT == RELU:
        y = tl.where(x < 0.0, 0.0, x)
    elif ACT == GELU:
        y = 0.5 * x * (1.0 + tl.math.erf(x * INV_SQRT2))
    elif ACT == SILU:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == TANH:
        y = tanh(x)
    elif ACT == GELU_TANH:
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u): no tanh needed, no cancellation for u << 0
        u = SQRT_2_OVER_PI * (x + GELU_TANH_A * x * x * x)
        y = x / (1.0 + tl.exp(-2.0 * u))
    else:  # IDENTITY
        y = x
    return y


@triton.jit
def activation_grad(x, ACT: tl.constexpr):
    """d act / dx for every activation id but RATIONAL."""
    if ACT == RELU:
        y = tl.where(x > 0.0, 1.0, 0.0).to(x.dtype)
    elif ACT == GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(x * INV_SQRT2))
        y = cdf + x * tl.exp(-0.5 * x * x) * INV_SQRT2PI
    elif ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-x))
        y = s * (1.0 + x * (1.0 - s))
    elif ACT == TANH:
        t = tanh(x)
        y = 1.0 - t * t
    elif ACT == GELU_TANH:
        u = SQRT_2_OVER_PI * (x + GELU_TANH_A * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))  # = 0.5 (1 + tanh u); 1 - tanh² = 4 s (1 - s)
        y = s + 2.0 * x * s * (1.0 - s) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_TANH_A * x * x)
    else:  # IDENTITY
        y = tl.full(x.shape, 1.0, x.dtype)
    return y


@triton.jit
def sum_chunks_kernel(part_ptr, out_ptr, n, n_chunks, out_stride_row, out_stride_feat,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r, f] = Σ_c part[r, c, f] (part: contiguous [R, n_chunks, n], fp32 / fp64), cast to
    out's dtype. Grid (R, cdiv(n, BLOCK_N)). The chunks are added in a fixed order, so the sum is
    run-to-run deterministic: BLOCK_C = 1 adds them one by one; a larger BLOCK_C loads
    [BLOCK_C, BLOCK_N] tiles (more bytes in flight for a long reduction of few rows) and adds
    chunk c into lane c % BLOCK_C, then sums the lanes."""
    r = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = (f < n)[None, :]
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=part_ptr.dtype.element_ty)
    for c0 in range(0, n_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        acc += tl.load(part_ptr + (r * n_chunks + c)[:, None] * n + f[None, :],
                       mask=(c < n_chunks)[:, None] & f_ok, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + r * out_stride_row + f * out_stride_feat, total.to(out_ptr.dtype.element_ty), mask=f < n)
