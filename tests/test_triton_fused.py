"""Triton kernels of scaled_glu / scaled_linear (triton_ops/scaled_*.py) beyond test_ops_fused.py:
non-contiguous inputs, decode shapes, odd sizes, the split-K and chunked paths, every output
element written (poisoned allocations), determinism, and a property test, all forward and
backward against the reference run in fp64. On the CPU they run under Triton's interpreter."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import para_kernels
from para_kernels.ops import dispatch
from para_kernels.ops import reference_ops as ref
from para_kernels.ops.reference_ops.scaled_glu import glu_activation
from test_ops import TOL, rel_err

DEVICES = [d for d in ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           if "triton" in dispatch.available_backends(d)]
pytestmark = pytest.mark.skipif(not DEVICES, reason="Triton needs CUDA or TRITON_INTERPRET=1")
if DEVICES:
    from para_kernels.ops.triton_ops import scaled_glu as glu_kernels
    from para_kernels.ops.triton_ops import scaled_linear as linear_kernels

P = torch.ops.para
GLU = ("silu", "gelu", "gelu_tanh")


@pytest.fixture(params=DEVICES)
def device(request):
    para_kernels.set_backend("triton")
    yield request.param
    para_kernels.set_backend(None)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


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


def _check_glu(gate, up, v, act, grad, dtype):
    """Forward and backward (the backward op called directly) against the fp64 reference."""
    d = lambda t: t.cpu().double()
    _close(P.scaled_glu(gate, up, v, act), ref.scaled_glu(d(gate), d(up), d(v), act), dtype, what="out")
    ours = P.scaled_glu_backward(grad, gate, up, v, act)
    theirs = ref.scaled_glu_backward(d(grad), d(gate), d(up), d(v), act)
    mag_v = (d(grad).abs() * glu_activation(d(gate), act).abs() * d(up).abs()).reshape(v.shape[0], -1, v.shape[1]).sum(1)
    for name, a, b, mag in zip(("gate", "up", "v"), ours, theirs, (None, None, mag_v)):
        _close(a, b, dtype, 2, what=f"grad_{name}", mag=mag)


def _check_linear(x, weight, bias, v, grad, dtype):
    d = lambda t: None if t is None else t.cpu().double()
    a = lambda t: None if t is None else d(t).abs()
    ours = P.scaled_linear(x, weight, bias, v)
    _close(ours, ref.scaled_linear(d(x), d(weight), d(bias), d(v)), dtype, what="out",
           mag=ref.scaled_linear(a(x), a(weight), a(bias), a(v)))
    ours = P.scaled_linear_backward(grad, x, weight, bias, v)
    theirs = ref.scaled_linear_backward(d(grad), d(x), d(weight), d(bias), d(v))
    mags = ref.scaled_linear_backward(a(grad), a(x), a(weight), a(bias), a(v))
    for name, o, t, m in zip(("x", "weight", "bias", "v"), ours, theirs, mags):
        if name == "bias" and bias is None:
            assert o.numel() == 0
            continue
        _close(o, t, dtype, 2, what=f"grad_{name}", mag=m)


# ------------------------------------------------------------------ scaled_glu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["halves", "strided", "unmergeable", "v_slice"])
def test_glu_non_contiguous(device, dtype, layout):
    gen = torch.Generator().manual_seed(len(layout))
    B, T, n = 3, 5, 37
    to = lambda t: t.to(device, dtype)
    if layout == "halves":  # gate, up = the two halves of a fused gate_up projection
        gu = to(_randn(gen, B, T, 2 * n))
        gate, up = gu[..., :n], gu[..., n:]
    elif layout == "strided":  # feature stride 2
        gate, up = to(_randn(gen, B, T, 2 * n))[..., ::2], to(_randn(gen, B, T, 2 * n))[..., 1::2]
    elif layout == "unmergeable":  # [B, 2, 3, n] whose middle dims cannot be flattened without a copy
        gate, up = (to(_randn(gen, B, 3, 2, n)).transpose(1, 2) for _ in range(2))
    else:
        gate, up = to(_randn(gen, B, T, n)), to(_randn(gen, B, T, n))
    v = to(1 + 0.2 * _randn(gen, B, 3 * n))[:, n:2 * n]  # a slice of the generator's output
    grad = to(_randn(gen, *gate.shape[:-1], 2 * n))[..., ::2]  # non-contiguous grad too
    for act in GLU:
        _check_glu(gate, up, v, act, grad, dtype)


@pytest.mark.parametrize("shape", [(130, 1, 3), (1, 1, 4097), (64, 1, 1), (3, 100, 3), (4, 2, 3, 5)],
                         ids=["decode-B130", "n4097", "n1", "chunked", "4d"])
def test_glu_decode_and_odd_sizes(device, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for dtype, act in ((torch.bfloat16, "silu"), (torch.float32, "gelu"), (torch.float16, "gelu_tanh")):
        gate, up, grad = (_randn(gen, *shape, scale=2).to(device, dtype) for _ in range(3))
        v = (1 + 0.2 * _randn(gen, shape[0], shape[-1])).to(device, dtype)
        _check_glu(gate, up, v, act, grad, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, in the interpreter
def test_glu_extreme_inputs(device):
    """Large |gate|: exp overflows to inf inside sigmoid; results must stay finite and exact."""
    gate = torch.tensor([[-200.0, -30.0, -1e-6, 0.0, 1e-6, 30.0, 200.0, 1e4]], dtype=torch.float32, device=device)
    up = torch.ones_like(gate)
    v = torch.ones_like(gate)
    for act in GLU:
        _check_glu(gate, up, v, act, torch.ones_like(gate), torch.float32)


# ------------------------------------------------------------------ scaled_linear
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row_stride", "transposed_x", "unmergeable", "transposed_weight"])
def test_linear_non_contiguous(device, dtype, layout):
    gen = torch.Generator().manual_seed(len(layout) + 7)
    B, T, k, n = 3, 4, 19, 23
    to = lambda t: t.to(device, dtype)
    if layout == "row_stride":  # every other token: rows strided by 2k
        x = to(_randn(gen, B, 2 * T, k))[:, ::2]
    elif layout == "transposed_x":  # feature stride T (grad_x then has x's strides too)
        x = to(_randn(gen, B, k, T)).transpose(1, 2)
    elif layout == "unmergeable":
        x = to(_randn(gen, B, 2, 2, k)).transpose(1, 2)
    else:
        x = to(_randn(gen, B, T, k))
    scale = 1 / math.sqrt(k)
    weight = to(_randn(gen, k, n, scale=scale)).T if layout == "transposed_weight" else to(_randn(gen, n, k, scale=scale))
    bias = to(_randn(gen, 2 * n))[::2]
    v = to(1 + 0.2 * _randn(gen, B, 2 * n))[:, n:]
    grad = to(_randn(gen, *x.shape[:-1], 2 * n))[..., 1::2]
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


@pytest.mark.parametrize("B,T,k,n,with_bias", LINEAR_SHAPES, ids=[f"{s[0]}x{s[1]}x{s[2]}->{s[3]}" for s in LINEAR_SHAPES])
def test_linear_decode_and_odd_sizes(device, B, T, k, n, with_bias):
    gen = torch.Generator().manual_seed(B + T + k + n)
    if (B, T, k, n) == (1, 1, 4097, 3):
        assert linear_kernels._k_splits(B * T, n, k, torch.device(device))[0] > 1, "split-K path not exercised"
    for dtype in (torch.float32, torch.bfloat16):
        x = _randn(gen, B, T, k).to(device, dtype)
        weight = _randn(gen, n, k, scale=1 / math.sqrt(k)).to(device, dtype)
        bias = _randn(gen, n).to(device, dtype) if with_bias else None
        v = (1 + 0.2 * _randn(gen, B, n)).to(device, dtype)
        grad = _randn(gen, B, T, n).to(device, dtype)
        _check_linear(x, weight, bias, v, grad, dtype)


def test_linear_fp16_2d_input(device):
    gen = torch.Generator().manual_seed(3)
    x = _randn(gen, 6, 33).to(device, torch.float16)  # [B, k]: one token per row
    weight = _randn(gen, 17, 33, scale=0.2).to(device, torch.float16)
    v = (1 + 0.2 * _randn(gen, 6, 17)).to(device, torch.float16)
    _check_linear(x, weight, None, v, _randn(gen, 6, 17).to(device, torch.float16), torch.float16)


# ------------------------------------------------------------------ every element written
class _PoisonedTorch:
    """torch, except that empty / empty_like return NaN-filled tensors (outputs and workspaces)."""
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


def test_every_output_element_written(device, monkeypatch):
    monkeypatch.setattr(glu_kernels, "torch", _PoisonedTorch())
    monkeypatch.setattr(linear_kernels, "torch", _PoisonedTorch())
    gen = torch.Generator().manual_seed(11)
    dt = torch.float32
    for shape in ((3, 100, 3), (3, 2, 4097)):  # chunked grad_v (rows > 64 tokens); two feature blocks
        gate, up, grad = (_randn(gen, *shape).to(device, dt) for _ in range(3))
        v = (1 + 0.2 * _randn(gen, shape[0], shape[-1])).to(device, dt)
        _check_glu(gate, up, v, "silu", grad, dt)
    for B, T, k, n, with_bias in LINEAR_SHAPES[:1] + LINEAR_SHAPES[5:]:  # split K; row reductions
        x = _randn(gen, B, T, k).to(device, dt)
        weight = _randn(gen, n, k, scale=1 / math.sqrt(k)).to(device, dt)
        bias = _randn(gen, n).to(device, dt) if with_bias else None
        v = (1 + 0.2 * _randn(gen, B, n)).to(device, dt)
        _check_linear(x, weight, bias, v, _randn(gen, B, T, n).to(device, dt), dt)
    assert _PoisonedTorch.calls > 20  # the allocations really went through the poisoned factory


def test_reduction_paths_are_exercised(device, monkeypatch):
    """The shapes above reach the split-K epilogue and the chunked grad_v sum (guards the tests'
    coverage against tile-size changes)."""
    launched = []

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for module, name in ((glu_kernels, "sum_chunks_kernel"), (linear_kernels, "_split_epilogue_kernel")):
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    gen = torch.Generator().manual_seed(2)
    g, v = _randn(gen, 3, 100, 3).to(device, torch.float32), _randn(gen, 3, 3).to(device, torch.float32)
    P.scaled_glu_backward(g, g, g, v, "silu")
    assert launched == ["sum_chunks_kernel"]
    x, w = _randn(gen, 1, 1, 4097).to(device, torch.float32), _randn(gen, 3, 4097).to(device, torch.float32)
    P.scaled_linear(x, w, None, v[:1])
    assert launched[-1] == "_split_epilogue_kernel"


def test_backward_is_deterministic(device):
    gen = torch.Generator().manual_seed(5)
    gate, up, grad = (_randn(gen, 3, 100, 3).to(device, torch.float32) for _ in range(3))
    v = _randn(gen, 3, 3).to(device, torch.float32)
    first = P.scaled_glu_backward(grad, gate, up, v, "gelu")
    assert all(torch.equal(a, b) for a, b in zip(first, P.scaled_glu_backward(grad, gate, up, v, "gelu")))
    x, g = _randn(gen, 2, 100, 5).to(device), _randn(gen, 2, 100, 6).to(device)
    w, b, v = _randn(gen, 6, 5).to(device), _randn(gen, 6).to(device), _randn(gen, 2, 6).to(device)
    x, g, w, b, v = (t.float() for t in (x, g, w, b, v))
    first = P.scaled_linear_backward(g, x, w, b, v)
    assert all(torch.equal(a, c) for a, c in zip(first, P.scaled_linear_backward(g, x, w, b, v)))


def test_gradcheck_and_opcheck(device):
    """fp64 end to end through autograd (fast-mode gradcheck) and the op registration checks
    (fake impl strides/dtypes match these kernels' outputs)."""
    gen = torch.Generator().manual_seed(17)
    leaf = lambda *shape: _randn(gen, *shape).to(device).requires_grad_()
    gate, up, v = leaf(2, 2, 3), leaf(2, 2, 3), leaf(2, 3)
    for act in GLU:
        assert torch.autograd.gradcheck(lambda g, u, s: P.scaled_glu(g, u, s, act), (gate, up, v), fast_mode=True)
    x, w, b, vl = leaf(2, 2, 5), leaf(3, 5), leaf(3), leaf(2, 3)
    assert torch.autograd.gradcheck(P.scaled_linear, (x, w, b, vl), fast_mode=True)
    torch.library.opcheck(P.scaled_glu.default, (gate, up, v, "gelu"))
    torch.library.opcheck(P.scaled_linear.default, (x, w, None, vl))


# ------------------------------------------------------------------ property
@st.composite
def fused_cases(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    k, n = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    return B, T, k, n, dtype, draw(st.sampled_from(GLU)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=20, deadline=None)
@given(fused_cases())
def test_fused_property(case):
    B, T, k, n, dtype, act, with_bias, seed = case
    gen = torch.Generator().manual_seed(seed)
    para_kernels.set_backend("triton")
    try:
        for device in DEVICES:
            to = lambda t: t.to(device, dtype)
            gate, up, grad = (to(_randn(gen, B, T, n)) for _ in range(3))
            v = to(1 + 0.2 * _randn(gen, B, n))
            _check_glu(gate, up, v, act, grad, dtype)
            x = to(_randn(gen, B, T, k))
            weight = to(_randn(gen, n, k, scale=1 / math.sqrt(k)))
            bias = to(_randn(gen, n)) if with_bias else None
            _check_linear(x, weight, bias, v, grad, dtype)
    finally:
        para_kernels.set_backend(None)
