"""The para:: ops against independent fp64 oracles (PARA_SPEC §4), on every backend present."""
import math

import pytest
import torch

import oracles
from para_kernels import ops
from para_kernels.ops.activations import ACTIVATIONS, RATIONAL_GELU_INIT

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def ranges(gen, B, T, device):
    """Random prompt ranges that include length 1 and the full row."""
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


POOL_SHAPES = [(1, 1, 1), (3, 5, 3), (2, 7, 123), (1, 3, 4097), (130, 4, 3), (2, 9, 576), (1, 2, 4096)]


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,d", POOL_SHAPES)
def test_pool_matches_oracle(device_backend, mode, dtype, B, T, d):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + d)
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = torch.randn(B, d, generator=gen).to(device, dtype) / math.sqrt(d) if mode == "attn" else None
    ref = oracles.pool(hidden.cpu(), start.cpu(), end.cpu(), mode, None if w is None else w.cpu())
    for layout in ("padded", "packed"):
        args = (hidden, start, end) if layout == "padded" else packed(hidden, start, end)
        out = ops.pool(*args, mode, w)
        assert out.shape == (B, d) and out.dtype == dtype
        assert rel_err(out.cpu(), ref) <= TOL[dtype], layout


GEN_SHAPES = [  # B, d, r, N, A
    (1, 1, 1, 1, 1), (5, 3, 2, 7, 2), (150, 17, 12, 33, 4), (4, 576, 12, 576 + 192 + 1536, 3),
    (3, 4096, 12, 4096 + 4096 + 11008, 2),
]


def bank(gen, A, d, r, N, device, dtype, activation):
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device, dtype)
    params = None
    if activation == "rational":
        params = (torch.tensor([RATIONAL_GELU_INIT] * A) + 0.05 * torch.randn(A, 10, generator=gen)).to(device, dtype)
    return (t(A, d, r, scale=1 / math.sqrt(d)), t(A, r), t(A, r, N, scale=1 / math.sqrt(r)), t(A, N), params)


def adapter_ids(gen, B, A, device):
    """Mixed ids with -1 rows; adapter 0 used by one row only when B allows it."""
    ids = torch.randint(-1, A, (B,), generator=gen)
    if B >= 3:
        ids[0], ids[1] = -1, 0
        ids[2:][ids[2:] == 0] = min(1, A - 1)
    return ids.to(device)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,r,N,A", GEN_SHAPES)
def test_generate_matches_oracle(device_backend, activation, dtype, B, d, r, N, A):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(B + d + r + N + A)
    pooled = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, params = bank(gen, A, d, r, N, device, dtype, activation)
    for ids in (adapter_ids(gen, B, A, device), torch.zeros(B, dtype=torch.long, device=device)):
        out = ops.generate(pooled, wd, bd, wu, bu, ids, activation, params)
        ref = oracles.generate(*(t.cpu() for t in (pooled, wd, bd, wu, bu, ids)), activation,
                               None if params is None else params.cpu())
        assert out.shape == (B, N) and out.dtype == dtype
        assert rel_err(out.cpu(), ref) <= TOL[dtype]
        assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 3, 1536), (130, 1, 3), (4, 11008), (2, 2, 3, 5)])
def test_scale_matches_oracle(device_backend, dtype, shape):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen).to(device, dtype)
    v = (1 + 0.1 * torch.randn(shape[0], shape[-1], generator=gen)).to(device, dtype)
    out = ops.scale(x, v)
    assert out.shape == x.shape and out.dtype == dtype
    assert rel_err(out.cpu(), oracles.scale(x.cpu(), v.cpu())) <= TOL[dtype]
    rows = torch.randint(0, shape[0], (7,), generator=gen).to(device)
    xp = torch.randn(7, shape[-1], generator=gen).to(device, dtype)
    assert rel_err(ops.scale(xp, v, rows).cpu(), oracles.scale(xp.cpu(), v.cpu(), rows.cpu())) <= TOL[dtype]


# ------------------------------------------------------------------ backward
def grads(fn, inputs):
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    (out * g).sum().backward()
    return [t.grad for t in inputs if t is not None and t.is_floating_point()]


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_pool_backward_matches_oracle(device_backend, mode, dtype, layout):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(3)
    B, T, d = 6, 9, 37
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = torch.randn(B, d, generator=gen).to(device, dtype) if mode == "attn" else None
    h_in, s_in, e_in = (hidden, start, end) if layout == "padded" else packed(hidden, start, end)
    ours = grads(lambda h, w: ops.pool(h, s_in, e_in, mode, w), [h_in, w])
    ref = grads(lambda h, w: oracles.pool(h.reshape(B, T, d), start.cpu(), end.cpu(), mode, w),
                [h_in.cpu().double(), None if w is None else w.cpu().double()])
    for a, b in zip(ours, ref):
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_backward_matches_oracle(device_backend, activation, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(5)
    B, d, r, N, A = 9, 23, 5, 31, 3
    pooled = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, params = bank(gen, A, d, r, N, device, dtype, activation)
    ids = adapter_ids(gen, B, A, device)
    ours = grads(lambda *t: ops.generate(*t[:5], ids, activation, t[5]), [pooled, wd, bd, wu, bu, params])
    ref = grads(lambda *t: oracles.generate(*t[:5], ids.cpu(), activation, t[5]),
                [t.cpu().double() if t is not None else None for t in (pooled, wd, bd, wu, bu, params)])
    for a, b in zip(ours, ref):
        # bf16 weight gradients sum many rounded products: one bf16 ulp more than the forward bar
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2
    assert torch.all(ours[0][ids < 0] == 0), "rows with adapter -1 get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 17, generator=gen).to(device, dtype)
    v = torch.randn(3, 17, generator=gen).to(device, dtype)
    rows = torch.tensor([0, 2, 2, 1, 0], device=device)
    xp = torch.randn(5, 17, generator=gen).to(device, dtype)
    for args, extra in (((x, v), None), ((xp, v), rows)):
        ours = grads(lambda x, v: ops.scale(x, v, extra), list(args))
        ref = grads(lambda x, v: oracles.scale(x, v, None if extra is None else extra.cpu()),
                    [t.cpu().double() for t in args])
        for a, b in zip(ours, ref):
            assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
def _f64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


POOL_CASES = [(mode, layout, wshape) for mode in ops.POOL_MODES for layout in ("padded", "packed")
              for wshape in (("d", "Bd") if mode == "attn" else (None,))]


def _pool_case(mode, layout, wshape):
    B, T, d = 3, 5, 4
    hidden = _f64(B, T, d, seed=1)
    start, end = torch.tensor([0, 2, 4]), torch.tensor([5, 3, 5])
    if layout == "packed":
        hidden, start, end = packed(hidden, start, end)
    w = {None: None, "d": _f64(d, seed=2), "Bd": _f64(B, d, seed=2)}[wshape]
    return hidden, start, end, mode, w


@pytest.mark.parametrize("mode,layout,wshape", POOL_CASES)
def test_pool_gradcheck_and_opcheck(mode, layout, wshape):
    hidden, start, end, mode, w = _pool_case(mode, layout, wshape)
    hidden.requires_grad_()
    if w is not None:
        w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: ops.pool(h, start, end, mode, w), (hidden, w))
    torch.library.opcheck(torch.ops.para.pool.default, (hidden, start, end, mode, w))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_generate_gradcheck_and_opcheck(activation):
    B, d, r, N, A = 4, 3, 2, 5, 2
    pooled = _f64(B, d, seed=1)
    wd, bd, wu, bu = _f64(A, d, r, seed=2), _f64(A, r, seed=3), _f64(A, r, N, seed=4), _f64(A, N, seed=5)
    params = (torch.tensor([RATIONAL_GELU_INIT] * A, dtype=torch.float64) + 0.05 * _f64(A, 10, seed=6)
              if activation == "rational" else None)
    ids = torch.tensor([1, -1, 1, 0])
    inputs = [t.requires_grad_() if t is not None else None for t in (pooled, wd, bd, wu, bu, params)]
    assert torch.autograd.gradcheck(lambda *t: ops.generate(*t[:5], ids, activation, t[5]), inputs)
    torch.library.opcheck(torch.ops.para.generate.default, (*inputs[:5], ids, activation, inputs[5]))


@pytest.mark.parametrize("rows", [None, [0, 0, 2, 1, 2]])
def test_scale_gradcheck_and_opcheck(rows):
    v = _f64(3, 6, seed=1).requires_grad_()
    if rows is None:
        x, rows_t = _f64(3, 4, 6, seed=2).requires_grad_(), None
    else:
        x, rows_t = _f64(5, 6, seed=2).requires_grad_(), torch.tensor(rows)
    assert torch.autograd.gradcheck(lambda x, v: ops.scale(x, v, rows_t), (x, v))
    torch.library.opcheck(torch.ops.para.scale.default, (x, v, rows_t))


def test_ops_compile_fullgraph_with_backward():
    """pool -> generate -> scale traces into one graph (fake impls, autograd) and matches eager."""
    B, T, d, r, N, A = 3, 6, 8, 4, 10, 2
    hidden = torch.randn(B, T, d)
    start, end = torch.tensor([0, 1, 5]), torch.tensor([6, 4, 6])
    x = torch.randn(B, T, N)
    weights = [torch.randn(A, d, r) / 3, torch.randn(A, r), torch.randn(A, r, N) / 2, torch.randn(A, N)]
    w_sa = torch.randn(d)
    ids = torch.tensor([1, -1, 0])

    def layer(hidden, x, w_sa, wd, bd, wu, bu):
        pooled = ops.pool(hidden, start, end, "attn", w_sa)
        v = ops.generate(pooled, wd, bd, wu, bu, ids, "silu")
        return ops.scale(x, v).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        inputs = [t.clone().requires_grad_() for t in (hidden, x, w_sa, *weights)]
        loss = fn(*inputs)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in inputs]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ activations
def test_rational_init_approximates_gelu():
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    approx = oracles.rational(x, torch.tensor(RATIONAL_GELU_INIT, dtype=torch.float64))
    assert (approx - torch.nn.functional.gelu(x)).abs().max() < 6.5e-3


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_formula(activation):
    from para_kernels.ops.activations import activation_backward, activation_forward
    x = _f64(7, 5, seed=9).requires_grad_()
    params = (torch.tensor(RATIONAL_GELU_INIT, dtype=torch.float64) + 0.05 * _f64(10, seed=4)).requires_grad_() \
        if activation == "rational" else None
    g = _f64(7, 5, seed=10)
    (activation_forward(x, activation, params) * g).sum().backward()
    gx, gp = activation_backward(x.detach(), activation, None if params is None else params.detach(), g)
    torch.testing.assert_close(gx, x.grad)
    if params is not None:
        torch.testing.assert_close(gp, params.grad)
