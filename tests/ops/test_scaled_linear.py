"""The scaled_linear op ((x W^T + b) * v, a projection scaled per row): the fp64-oracle grid on
every backend, backward, gradcheck / opcheck, then the Triton kernels forward and backward against
the reference in fp64: non-contiguous inputs, decode shapes, odd sizes, the split-K path, every
output element written (poisoned allocations), determinism, and a property test. On the CPU they
run under Triton's interpreter. (No CUDA C++ kernel implements it.)"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
import para_kernels
from para_kernels import ops

from kit import DTYPES, TOL, TRITON_DEVICES, PoisonedTorch, f64, grads, oracles, randn64, rel_err
from kit.checks import check_scaled_linear

# the Triton kernels
tf = importlib.import_module("para_kernels.ops.triton_ops.scaled_linear") if TRITON_DEVICES else None

P = torch.ops.para


# ------------------------------------------------------------------ every backend: the fp64 oracle
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n", [((1, 1, 1), 1), ((3, 5, 7), 9), ((4, 1, 576), 192), ((2, 3, 64), 130)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_linear_matches_oracle(device_backend, dtype, shape, n, with_bias):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(sum(shape) + n)
    x = torch.randn(*shape, generator=gen).to(device, dtype)
    weight = (torch.randn(n, shape[-1], generator=gen) / math.sqrt(shape[-1])).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    v = (1 + 0.1 * torch.randn(shape[0], n, generator=gen)).to(device, dtype)
    out = ops.scaled_linear(x, weight, bias, v)
    assert out.shape == (*shape[:-1], n) and out.dtype == dtype
    ref = oracles.scaled_linear(x.cpu(), weight.cpu(), None if bias is None else bias.cpu(), v.cpu())
    assert rel_err(out.cpu(), ref) <= TOL[dtype]


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_linear_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(13)
    B, T, d, N = 4, 5, 19, 11
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    v = torch.randn(B, N, generator=gen).to(device, dtype)
    weight, bias = torch.randn(N, d, generator=gen).to(device, dtype), torch.randn(N, generator=gen).to(device, dtype)
    inputs = [hidden, weight, bias, v]
    ours = grads(ops.scaled_linear, inputs)
    ref = grads(oracles.scaled_linear, [t.cpu().double() for t in inputs])
    for a, b in zip(ours, ref):
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_linear_gradcheck_and_opcheck(with_bias):
    x, weight, v = f64(3, 5, 4, seed=1), f64(6, 4, seed=2), f64(3, 6, seed=3)
    bias = f64(6, seed=4).requires_grad_() if with_bias else None
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias, v.requires_grad_())
    assert torch.autograd.gradcheck(ops.scaled_linear, inputs)
    torch.library.opcheck(torch.ops.para.scaled_linear.default, inputs)


# ------------------------------------------------------------------ Triton kernels
def _check_linear(x, weight, bias, v, grad, dtype):
    """Forward and backward (the backward op called directly) against the fp64 reference."""
    check_scaled_linear(P.scaled_linear, P.scaled_linear_backward, x, weight, bias, v, grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row_stride", "transposed_x", "unmergeable", "transposed_weight"])
def test_triton_linear_non_contiguous(triton_device, dtype, layout):
    gen = torch.Generator().manual_seed(len(layout) + 7)
    B, T, k, n = 3, 4, 19, 23
    to = lambda t: t.to(triton_device, dtype)
    if layout == "row_stride":  # every other token: rows strided by 2k
        x = to(randn64(gen, B, 2 * T, k))[:, ::2]
    elif layout == "transposed_x":  # feature stride T (grad_x then has x's strides too)
        x = to(randn64(gen, B, k, T)).transpose(1, 2)
    elif layout == "unmergeable":
        x = to(randn64(gen, B, 2, 2, k)).transpose(1, 2)
    else:
        x = to(randn64(gen, B, T, k))
    scale = 1 / math.sqrt(k)
    weight = to(randn64(gen, k, n, scale=scale)).T if layout == "transposed_weight" \
        else to(randn64(gen, n, k, scale=scale))
    bias = to(randn64(gen, 2 * n))[::2]
    v = to(1 + 0.2 * randn64(gen, B, 2 * n))[:, n:]
    grad = to(randn64(gen, *x.shape[:-1], 2 * n))[..., 1::2]
    _check_linear(x, weight, bias, v, grad, dtype)
    g_x, g_w, _, _ = P.scaled_linear_backward(grad, x, weight, bias, v)
    assert g_x.stride() == torch.empty_like(x).stride() and g_w.stride() == torch.empty_like(weight).stride()


LINEAR_SHAPES = [  # B, T, k, n, bias
    (1, 1, 4097, 3, True),     # decode, K split across programs
    (64, 1, 576, 192, False),  # decode, 64 rows in one M block, split K
    (130, 1, 3, 5, True),      # B > 128, one token per row: 64 rows per M block
    (2, 1, 3, 4097, True),     # wide n
    (5, 3, 1, 1, False),       # k = n = 1
    (20, 3, 7, 9, True),       # 21+ rows per M block (one-hot reduction wider than 16)
    (2, 100, 5, 6, True),      # rows that straddle M blocks
]


@pytest.mark.parametrize("B,T,k,n,with_bias", LINEAR_SHAPES,
                         ids=[f"{s[0]}x{s[1]}x{s[2]}->{s[3]}" for s in LINEAR_SHAPES])
def test_triton_linear_decode_and_odd_sizes(triton_device, B, T, k, n, with_bias):
    gen = torch.Generator().manual_seed(B + T + k + n)
    if (B, T, k, n) == (1, 1, 4097, 3):
        assert tf._k_splits(B * T, n, k, torch.device(triton_device))[0] > 1, "split-K path not exercised"
    for dtype in (torch.float32, torch.bfloat16):
        x = randn64(gen, B, T, k).to(triton_device, dtype)
        weight = randn64(gen, n, k, scale=1 / math.sqrt(k)).to(triton_device, dtype)
        bias = randn64(gen, n).to(triton_device, dtype) if with_bias else None
        v = (1 + 0.2 * randn64(gen, B, n)).to(triton_device, dtype)
        grad = randn64(gen, B, T, n).to(triton_device, dtype)
        _check_linear(x, weight, bias, v, grad, dtype)


def test_triton_linear_fp16_2d_input(triton_device):
    gen = torch.Generator().manual_seed(3)
    x = randn64(gen, 6, 33).to(triton_device, torch.float16)  # [B, k]: one token per row
    weight = randn64(gen, 17, 33, scale=0.2).to(triton_device, torch.float16)
    v = (1 + 0.2 * randn64(gen, 6, 17)).to(triton_device, torch.float16)
    _check_linear(x, weight, None, v, randn64(gen, 6, 17).to(triton_device, torch.float16), torch.float16)


def test_triton_every_output_element_written(triton_device, monkeypatch):
    monkeypatch.setattr(tf, "torch", PoisonedTorch())
    calls = PoisonedTorch.calls
    gen = torch.Generator().manual_seed(11)
    dt = torch.float32
    for B, T, k, n, with_bias in LINEAR_SHAPES[:1] + LINEAR_SHAPES[5:]:  # split K; row reductions
        x = randn64(gen, B, T, k).to(triton_device, dt)
        weight = randn64(gen, n, k, scale=1 / math.sqrt(k)).to(triton_device, dt)
        bias = randn64(gen, n).to(triton_device, dt) if with_bias else None
        v = (1 + 0.2 * randn64(gen, B, n)).to(triton_device, dt)
        _check_linear(x, weight, bias, v, randn64(gen, B, T, n).to(triton_device, dt), dt)
    assert PoisonedTorch.calls - calls > 14  # (25 today; with scaled_glu's > 6: the old joint test's > 20)
    # the allocations really went through the poisoned factory


def test_triton_reduction_paths_are_exercised(triton_device, monkeypatch):
    """The split-K shape above reaches the split-K epilogue (guards the tests' coverage against
    tile-size changes)."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("sum_chunks_kernel", "_split_epilogue_kernel"):
        monkeypatch.setattr(tf, name, Spy(name, getattr(tf, name)))
    gen = torch.Generator().manual_seed(2)
    v = randn64(gen, 3, 3).to(triton_device, torch.float32)
    x = randn64(gen, 1, 1, 4097).to(triton_device, torch.float32)
    w = randn64(gen, 3, 4097).to(triton_device, torch.float32)
    P.scaled_linear(x, w, None, v[:1])
    assert launched[-1] == "_split_epilogue_kernel"


def test_triton_backward_is_deterministic(triton_device):
    gen = torch.Generator().manual_seed(5)
    x, g = randn64(gen, 2, 100, 5).to(triton_device), randn64(gen, 2, 100, 6).to(triton_device)
    w, b = randn64(gen, 6, 5).to(triton_device), randn64(gen, 6).to(triton_device)
    v = randn64(gen, 2, 6).to(triton_device)
    x, g, w, b, v = (t.float() for t in (x, g, w, b, v))
    first = P.scaled_linear_backward(g, x, w, b, v)
    assert all(torch.equal(a, c) for a, c in zip(first, P.scaled_linear_backward(g, x, w, b, v)))


def test_triton_gradcheck_and_opcheck(triton_device):
    """fp64 end to end through autograd (fast-mode gradcheck) and the op registration checks
    (fake impl strides/dtypes match these kernels' outputs)."""
    gen = torch.Generator().manual_seed(17)
    leaf = lambda *shape: randn64(gen, *shape).to(triton_device).requires_grad_()  # noqa: E731
    x, w, b, vl = leaf(2, 2, 5), leaf(3, 5), leaf(3), leaf(2, 3)
    assert torch.autograd.gradcheck(P.scaled_linear, (x, w, b, vl), fast_mode=True)
    torch.library.opcheck(P.scaled_linear.default, (x, w, None, vl))


# ------------------------------------------------------------------ property
@st.composite
def linear_cases(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    k, n = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    return B, T, k, n, dtype, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=20, deadline=None)
@given(linear_cases())
def test_triton_property(case):
    B, T, k, n, dtype, with_bias, seed = case
    gen = torch.Generator().manual_seed(seed)
    para_kernels.set_backend("triton")
    try:
        for device in TRITON_DEVICES:
            to = lambda t, device=device: t.to(device, dtype)  # noqa: E731
            grad = to(randn64(gen, B, T, n))
            v = to(1 + 0.2 * randn64(gen, B, n))
            x = to(randn64(gen, B, T, k))
            weight = to(randn64(gen, n, k, scale=1 / math.sqrt(k)))
            bias = to(randn64(gen, n)) if with_bias else None
            _check_linear(x, weight, bias, v, grad, dtype)
    finally:
        para_kernels.set_backend(None)
