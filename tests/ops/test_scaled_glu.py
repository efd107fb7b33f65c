"""The scaled_glu op (act(gate) * up * v, the MLP's gated product scaled per row): the fp64-oracle
grid on every backend, backward, gradcheck / opcheck, then the Triton kernels forward and backward
against the reference in fp64: non-contiguous inputs, decode shapes, odd sizes, extreme inputs,
the chunked grad_v, every output element written (poisoned allocations), determinism, and a
property test. On the CPU they run under Triton's interpreter. (No CUDA C++ kernel implements it.)"""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
import para_kernels
from para_kernels import ops

from kit import DTYPES, TOL, TRITON_DEVICES, PoisonedTorch, f64, grads, oracles, randn64, rel_err
from kit.checks import check_scaled_glu

tf = importlib.import_module("para_kernels.ops.triton_ops.scaled_glu") if TRITON_DEVICES else None  # the Triton kernels

P = torch.ops.para
GLU = ("silu", "gelu", "gelu_tanh")


# ------------------------------------------------------------------ every backend: the fp64 oracle
@pytest.mark.parametrize("activation", GLU)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 3, 1536), (130, 1, 5), (4, 11008)])
def test_scaled_glu_matches_oracle(device_backend, activation, dtype, shape):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(sum(shape))
    gate, up = (torch.randn(*shape, generator=gen).to(device, dtype) for _ in range(2))
    v = (1 + 0.1 * torch.randn(shape[0], shape[-1], generator=gen)).to(device, dtype)
    out = ops.scaled_glu(gate, up, v, activation)
    assert out.shape == gate.shape and out.dtype == dtype
    assert rel_err(out.cpu(), oracles.scaled_glu(gate.cpu(), up.cpu(), v.cpu(), activation)) <= TOL[dtype]


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_glu_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(13)
    B, T, N = 4, 5, 11
    gate, up = (torch.randn(B, T, N, generator=gen).to(device, dtype) for _ in range(2))
    v = torch.randn(B, N, generator=gen).to(device, dtype)
    ours = grads(lambda g, u, v: ops.scaled_glu(g, u, v, "silu"), [gate, up, v])
    ref = grads(lambda g, u, v: oracles.scaled_glu(g, u, v, "silu"), [t.cpu().double() for t in (gate, up, v)])
    for a, b in zip(ours, ref):
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
@pytest.mark.parametrize("activation", GLU)
def test_scaled_glu_gradcheck_and_opcheck(activation):
    gate, up, v = f64(3, 5, 6, seed=1), f64(3, 5, 6, seed=2), f64(3, 6, seed=3)
    inputs = tuple(t.requires_grad_() for t in (gate, up, v))
    assert torch.autograd.gradcheck(lambda g, u, v: ops.scaled_glu(g, u, v, activation), inputs)
    torch.library.opcheck(torch.ops.para.scaled_glu.default, (*inputs, activation))


# ------------------------------------------------------------------ Triton kernels
def _check_glu(gate, up, v, act, grad, dtype):
    """Forward and backward (the backward op called directly) against the fp64 reference."""
    check_scaled_glu(P.scaled_glu, P.scaled_glu_backward, gate, up, v, act, grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["halves", "strided", "unmergeable", "v_slice"])
def test_triton_glu_non_contiguous(triton_device, dtype, layout):
    gen = torch.Generator().manual_seed(len(layout))
    B, T, n = 3, 5, 37
    to = lambda t: t.to(triton_device, dtype)
    if layout == "halves":  # gate, up = the two halves of a fused gate_up projection
        gu = to(randn64(gen, B, T, 2 * n))
        gate, up = gu[..., :n], gu[..., n:]
    elif layout == "strided":  # feature stride 2
        gate, up = to(randn64(gen, B, T, 2 * n))[..., ::2], to(randn64(gen, B, T, 2 * n))[..., 1::2]
    elif layout == "unmergeable":  # [B, 2, 3, n] whose middle dims cannot be flattened without a copy
        gate, up = (to(randn64(gen, B, 3, 2, n)).transpose(1, 2) for _ in range(2))
    else:
        gate, up = to(randn64(gen, B, T, n)), to(randn64(gen, B, T, n))
    v = to(1 + 0.2 * randn64(gen, B, 3 * n))[:, n:2 * n]  # a slice of the generator's output
    grad = to(randn64(gen, *gate.shape[:-1], 2 * n))[..., ::2]  # non-contiguous grad too
    for act in GLU:
        _check_glu(gate, up, v, act, grad, dtype)


@pytest.mark.parametrize("shape", [(130, 1, 3), (1, 1, 4097), (64, 1, 1), (3, 100, 3), (4, 2, 3, 5)],
                         ids=["decode-B130", "n4097", "n1", "chunked", "4d"])
def test_triton_glu_decode_and_odd_sizes(triton_device, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for dtype, act in ((torch.bfloat16, "silu"), (torch.float32, "gelu"), (torch.float16, "gelu_tanh")):
        gate, up, grad = (randn64(gen, *shape, scale=2).to(triton_device, dtype) for _ in range(3))
        v = (1 + 0.2 * randn64(gen, shape[0], shape[-1])).to(triton_device, dtype)
        _check_glu(gate, up, v, act, grad, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_triton_glu_extreme_inputs(triton_device):
    """Large |gate|: exp overflows to inf inside sigmoid; results must stay finite and exact."""
    gate = torch.tensor([[-200.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 200.0, 1e4]], dtype=torch.float32,
                        device=triton_device)
    up = torch.ones_like(gate)
    v = torch.ones_like(gate)
    for act in GLU:
        _check_glu(gate, up, v, act, torch.ones_like(gate), torch.float32)


def test_triton_every_output_element_written(triton_device, monkeypatch):
    monkeypatch.setattr(tf, "torch", PoisonedTorch())
    calls = PoisonedTorch.calls
    gen = torch.Generator().manual_seed(11)
    dt = torch.float32
    for shape in ((3, 100, 3), (3, 2, 4097)):  # chunked grad_v (rows > 64 tokens); two feature blocks
        gate, up, grad = (randn64(gen, *shape).to(triton_device, dt) for _ in range(3))
        v = (1 + 0.2 * randn64(gen, shape[0], shape[-1])).to(triton_device, dt)
        _check_glu(gate, up, v, "silu", grad, dt)
    assert PoisonedTorch.calls - calls > 6  # (9 today; with scaled_linear's > 14: the old joint test's > 20)
    # the allocations really went through the poisoned factory


def test_triton_reduction_paths_are_exercised(triton_device, monkeypatch):
    """The shapes above reach the chunked grad_v sum (guards the tests' coverage against
    tile-size changes)."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(tf, "sum_chunks_kernel", Spy("sum_chunks_kernel", tf.sum_chunks_kernel))
    gen = torch.Generator().manual_seed(2)
    g, v = randn64(gen, 3, 100, 3).to(triton_device, torch.float32), randn64(gen, 3, 3).to(triton_device, torch.float32)
    P.scaled_glu_backward(g, g, g, v, "silu")
    assert launched == ["sum_chunks_kernel"]


def test_triton_backward_is_deterministic(triton_device):
    gen = torch.Generator().manual_seed(5)
    gate, up, grad = (randn64(gen, 3, 100, 3).to(triton_device, torch.float32) for _ in range(3))
    v = randn64(gen, 3, 3).to(triton_device, torch.float32)
    first = P.scaled_glu_backward(grad, gate, up, v, "gelu")
    assert all(torch.equal(a, b) for a, b in zip(first, P.scaled_glu_backward(grad, gate, up, v, "gelu")))


def test_triton_gradcheck_and_opcheck(triton_device):
    """fp64 end to end through autograd (fast-mode gradcheck) and the op registration checks
    (fake impl strides/dtypes match these kernels' outputs)."""
    gen = torch.Generator().manual_seed(17)
    leaf = lambda *shape: randn64(gen, *shape).to(triton_device).requires_grad_()  # noqa: E731
    gate, up, v = leaf(2, 2, 3), leaf(2, 2, 3), leaf(2, 3)
    for act in GLU:
        assert torch.autograd.gradcheck(lambda g, u, s, act=act: P.scaled_glu(g, u, s, act), (gate, up, v),
                                        fast_mode=True)
    torch.library.opcheck(P.scaled_glu.default, (gate, up, v, "gelu"))


# ------------------------------------------------------------------ property
@st.composite
def glu_cases(draw):
    B, T, n = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    return B, T, n, dtype, draw(st.sampled_from(GLU)), draw(st.integers(0, 2**31 - 1))


@pytest.mark.skipif(not TRITON_DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=20, deadline=None)
@given(glu_cases())
def test_triton_property(case):
    B, T, n, dtype, act, seed = case
    gen = torch.Generator().manual_seed(seed)
    para_kernels.set_backend("triton")
    try:
        for device in TRITON_DEVICES:
            to = lambda t, device=device: t.to(device, dtype)  # noqa: E731
            gate, up, grad = (to(randn64(gen, B, T, n)) for _ in range(3))
            v = to(1 + 0.2 * randn64(gen, B, n))
            _check_glu(gate, up, v, act, grad, dtype)
    finally:
        para_kernels.set_backend(None)
