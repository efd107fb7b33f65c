"""The fused ops (pool_generate, scaled_glu, scaled_linear) against fp64 oracles, on every
backend present, plus gradcheck / opcheck of the reference and their argument checks."""
import math

import pytest
import torch

import oracles
from para_kernels import ops
from test_ops import DTYPES, TOL, adapter_ids, bank, grads, ranges, rel_err

GLU = ("silu", "gelu", "gelu_tanh")


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,d,r,N,A", [(1, 1, 1, 1, 1, 1), (5, 6, 37, 4, 19, 3), (3, 4, 576, 12, 2304, 2)])
def test_pool_generate_matches_oracle(device_backend, mode, dtype, B, T, d, r, N, A):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(B + T + d + N)
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = (torch.randn(B, d, generator=gen) / math.sqrt(d)).to(device, dtype) if mode == "attn" else None
    wd, bd, wu, bu, _ = bank(gen, A, d, r, N, device, torch.float32, "gelu")
    ids = adapter_ids(gen, B, A, device)
    out = ops.pool_generate(hidden, start, end, mode, w, wd, bd, wu, bu, ids, "gelu")
    ref = oracles.pool_generate(*(t.cpu() if t is not None else None
                                  for t in (hidden, start, end)), mode, None if w is None else w.cpu(),
                                *(t.cpu() for t in (wd, bd, wu, bu, ids)), "gelu")
    assert out.shape == (B, N) and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) <= TOL[dtype]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(13)
    B, T, d, r, N, A = 4, 5, 19, 3, 11, 2
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, _ = bank(gen, A, d, r, N, device, torch.float32, "silu")
    ids = adapter_ids(gen, B, A, device)
    cases = [
        (lambda h, w, *bank: ops.pool_generate(h, start, end, "attn", w, *bank, ids, "silu"),
         lambda h, w, *bank: oracles.pool_generate(h, start.cpu(), end.cpu(), "attn", w, *bank, ids.cpu(), "silu"),
         [hidden, w, wd, bd, wu, bu]),
    ]
    gate, up = (torch.randn(B, T, N, generator=gen).to(device, dtype) for _ in range(2))
    v = torch.randn(B, N, generator=gen).to(device, dtype)
    cases.append((lambda g, u, v: ops.scaled_glu(g, u, v, "silu"),
                  lambda g, u, v: oracles.scaled_glu(g, u, v, "silu"), [gate, up, v]))
    weight, bias = torch.randn(N, d, generator=gen).to(device, dtype), torch.randn(N, generator=gen).to(device, dtype)
    cases.append((ops.scaled_linear, oracles.scaled_linear, [hidden, weight, bias, v]))
    for ours_fn, ref_fn, inputs in cases:
        ours = grads(ours_fn, inputs)
        ref = grads(ref_fn, [t.cpu().double() for t in inputs])
        for a, b in zip(ours, ref):
            assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


def _f64(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_pool_generate_gradcheck_and_opcheck(mode):
    hidden = _f64(3, 5, 4, seed=1).requires_grad_()
    start, end = torch.tensor([0, 1, 2]), torch.tensor([5, 3, 3])
    w = _f64(3, 4, seed=2).requires_grad_() if mode == "attn" else None
    bank_ = [_f64(2, 4, 3, seed=3), _f64(2, 3, seed=4), _f64(2, 3, 6, seed=5), _f64(2, 6, seed=6)]
    bank_ = [t.requires_grad_() for t in bank_]
    ids = torch.tensor([1, -1, 0])
    fn = lambda h, w, *b: ops.pool_generate(h, start, end, mode, w, *b, ids, "tanh")
    assert torch.autograd.gradcheck(fn, (hidden, w, *bank_))
    torch.library.opcheck(torch.ops.para.pool_generate.default, (hidden, start, end, mode, w, *bank_, ids, "tanh", None))


@pytest.mark.parametrize("activation", GLU)
def test_scaled_glu_gradcheck_and_opcheck(activation):
    gate, up, v = _f64(3, 5, 6, seed=1), _f64(3, 5, 6, seed=2), _f64(3, 6, seed=3)
    inputs = tuple(t.requires_grad_() for t in (gate, up, v))
    assert torch.autograd.gradcheck(lambda g, u, v: ops.scaled_glu(g, u, v, activation), inputs)
    torch.library.opcheck(torch.ops.para.scaled_glu.default, (*inputs, activation))


@pytest.mark.parametrize("with_bias", [True, False])
def test_scaled_linear_gradcheck_and_opcheck(with_bias):
    x, weight, v = _f64(3, 5, 4, seed=1), _f64(6, 4, seed=2), _f64(3, 6, seed=3)
    bias = _f64(6, seed=4).requires_grad_() if with_bias else None
    inputs = (x.requires_grad_(), weight.requires_grad_(), bias, v.requires_grad_())
    assert torch.autograd.gradcheck(ops.scaled_linear, inputs)
    torch.library.opcheck(torch.ops.para.scaled_linear.default, inputs)


X, V = torch.randn(2, 3, 4), torch.randn(2, 4)
FUSED_ERRORS = [
    ("glu: up shape", lambda: ops.scaled_glu(X, X[:, :2], V), "up must have gate's shape"),
    ("glu: v rows", lambda: ops.scaled_glu(X, X, torch.randn(3, 4)), "gate must be [B, ..., n] = [3, ..., 4]"),
    ("glu: activation", lambda: ops.scaled_glu(X, X, V, "relu"), "activation must be one of"),
    ("linear: weight k", lambda: ops.scaled_linear(X, torch.randn(5, 3), None, torch.randn(2, 5)),
     "weight must be [n, k] with k = 4"),
    ("linear: bias n", lambda: ops.scaled_linear(X, torch.randn(5, 4), torch.randn(4), torch.randn(2, 5)),
     "bias must have shape"),
    ("linear: v shape", lambda: ops.scaled_linear(X, torch.randn(5, 4), None, V), "v must be [B, n] = [2, 5]"),
    ("pool_generate: d", lambda: ops.pool_generate(X, torch.tensor([0, 0]), torch.tensor([3, 3]), "last", None,
                                                    torch.randn(1, 5, 2), torch.randn(1, 2), torch.randn(1, 2, 3),
                                                    torch.randn(1, 3), torch.tensor([0, -1])),
     "w_down must have shape"),
    ("pool_generate: range", lambda: ops.pool_generate(X, torch.tensor([0, 0]), torch.tensor([4, 3]), "last", None,
                                                        torch.randn(1, 4, 2), torch.randn(1, 2), torch.randn(1, 2, 3),
                                                        torch.randn(1, 3), torch.tensor([0, -1])), "T = 3"),
]


@pytest.mark.parametrize("name,call,fragment", FUSED_ERRORS, ids=[c[0] for c in FUSED_ERRORS])
def test_fused_bad_input_is_named(name, call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert fragment in str(info.value)
