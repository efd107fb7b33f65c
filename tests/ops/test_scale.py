"""The scale op (docs/spec.md §1: x * v, padded [B, ..., n] or packed [total, n] with token_rows):
the fp64-oracle grid on every backend, gradcheck / opcheck, a property test, then each backend's
own kernels (Triton, CUDA C++) forward and backward against the reference in fp64: index dtypes,
layouts, decode shapes, poisoned outputs, the chunked backward, CUDA graphs, argument checks.

On a machine without CUDA the Triton kernels run on CPU tensors in Triton's interpreter (tests/
conftest.py sets TRITON_INTERPRET=1); the CUDA C++ tests need a GPU and the built extension."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
import para_kernels
from para_kernels import ops
from para_kernels.ops import dispatch, reference_ops

from kit import (
    DEVICE,
    DTYPES,
    TOL,
    cuda_kernels_built,
    f64,
    grads,
    misaligned,
    names_argument,
    oracles,
    poison_cuda_allocator,
    randn,
    rel_err,
    triton_runs,
)
from kit.checks import check_scale

K = importlib.import_module("para_kernels.ops.triton_ops.scale") if triton_runs() else None  # the Triton kernels

needs_triton = pytest.mark.skipif(K is None, reason="the Triton backend cannot run here")
needs_cuda = pytest.mark.skipif(not cuda_kernels_built("scale", "scale_backward"),
                                reason="needs a GPU and the para_cuda extension with CUDA scale kernels")


# ------------------------------------------------------------------ every backend: the fp64 oracle
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 17, generator=gen).to(device, dtype)
    v = torch.randn(3, 17, generator=gen).to(device, dtype)
    rows = torch.tensor([0, 2, 2, 1, 0], device=device)
    xp = torch.randn(5, 17, generator=gen).to(device, dtype)
    for args, extra in (((x, v), None), ((xp, v), rows)):
        ours = grads(lambda x, v, extra=extra: ops.scale(x, v, extra), list(args))
        ref = grads(lambda x, v, extra=extra: oracles.scale(x, v, None if extra is None else extra.cpu()),
                    [t.cpu().double() for t in args])
        for a, b in zip(ours, ref):
            assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
@pytest.mark.parametrize("rows", [None, [0, 0, 2, 1, 2]])
def test_scale_gradcheck_and_opcheck(rows):
    v = f64(3, 6, seed=1).requires_grad_()
    if rows is None:
        x, rows_t = f64(3, 4, 6, seed=2).requires_grad_(), None
    else:
        x, rows_t = f64(5, 6, seed=2).requires_grad_(), torch.tensor(rows)
    assert torch.autograd.gradcheck(lambda x, v: ops.scale(x, v, rows_t), (x, v))
    torch.library.opcheck(torch.ops.para.scale.default, (x, v, rows_t))


# ------------------------------------------------------------------ property (the dispatched op)
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 33), st.integers(0, 2**31 - 1))
def test_scale_property(B, T, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n, generator=gen)
    v = torch.randn(B, n, generator=gen)
    torch.testing.assert_close(ops.scale(x, v).double(), oracles.scale(x, v), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ Triton kernels
def triton_check(x, v, rows=None, grad=None):
    """Forward and backward of the Triton kernels against the reference on fp64 copies."""
    return check_scale(K.scale, K.scale_backward, x, v, rows, TOL[x.dtype], grad=grad)


@needs_triton
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("order", ["runs", "shuffled"])
def test_triton_packed_token_rows(index_dtype, order):
    B, n = 5, 37
    rows = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 1] + [4] * 40)  # row 4 spans several tiles
    if order == "shuffled":
        rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))]
    x, v = randn(rows.numel(), n, seed=1), 1 + 0.1 * randn(B, n, seed=2)
    triton_check(x, v, rows.to(DEVICE, index_dtype))


@needs_triton
def test_triton_packed_unused_rows_get_zero_grad():
    x, v = randn(6, 9, seed=1), randn(4, 9, seed=2)
    rows = torch.tensor([3, 3, 0, 0, 3, 0], device=DEVICE, dtype=torch.int32)
    triton_check(x, v, rows)
    _, gv = K.scale_backward(torch.ones_like(x), x, v, rows)
    assert torch.all(gv[1:3] == 0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_4d_x(dtype):
    x, v = randn(3, 4, 5, 70, dtype=dtype, seed=1), randn(3, 70, dtype=dtype, seed=2)
    triton_check(x, v)


@needs_triton
@pytest.mark.parametrize("layout", ["strided_tokens", "features_not_unit_stride", "unmergeable", "v_slice"])
def test_triton_non_contiguous(layout):
    B, T, n = 3, 6, 19
    v = randn(B, n, seed=2)
    if layout == "strided_tokens":  # every other token: mergeable strides, no copy
        x = randn(B, 2 * T, n, seed=1)[:, ::2]
    elif layout == "features_not_unit_stride":  # dense but transposed: out keeps x's strides
        x = randn(B, n, T, seed=1).transpose(1, 2)
    elif layout == "unmergeable":  # middle dims that cannot be one stride: copied first
        x = randn(B, 4, T, n, seed=1).transpose(1, 2)
    else:  # v as a column slice of the generator's [B, N] output
        x = randn(B, T, n, seed=1)
        v = randn(B, 3 * n, seed=2)[:, n:2 * n]
    assert not x.is_contiguous() or not v.is_contiguous()
    triton_check(x, v)
    out = K.scale(x, v)
    assert out.stride() == torch.empty_like(x).stride(), "must match the fake impl's layout"


@needs_triton
@pytest.mark.parametrize("B,n,dtype", [(130, 4096, torch.bfloat16), (257, 576, torch.float16)])
def test_triton_decode_many_rows(B, n, dtype):
    """T = 1 decode with B > 128, padded [B, 1, n] and packed [B, n] with one token per row."""
    x, v = randn(B, 1, n, dtype=dtype, seed=1), 1 + 0.1 * randn(B, n, dtype=dtype, seed=2)
    triton_check(x, v)
    rows = torch.arange(B, device=DEVICE, dtype=torch.int32).flip(0)
    triton_check(x[:, 0], v, rows)


@pytest.fixture
def poisoned(monkeypatch):
    """Every empty/empty_like (outputs and partial buffers) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@needs_triton
@pytest.mark.parametrize("case", ["padded", "decode", "chunked", "rows_and_chunks", "packed", "tiny"])
def test_triton_every_element_written(poisoned, case):
    shapes = {"padded": (3, 7, 77), "decode": (150, 1, 5), "chunked": (1, 200, 17), "packed": (23, 21),
              "rows_and_chunks": (3, 200, 3),  # several rows per tile and several chunks per row
              "tiny": (1, 1, 1)}
    x = randn(*shapes[case], seed=1)
    v = randn(4 if case == "packed" else x.shape[0], x.shape[-1], seed=2)
    rows = torch.randint(0, 4, (23,)).to(DEVICE) if case == "packed" else None
    triton_check(x, v, rows)


@needs_triton
def test_triton_chunked_backward_is_used_and_deterministic(monkeypatch):
    """Long rows split into chunks (partials + ordered sum): right, and bitwise repeatable."""
    launches = []
    kernel = K.sum_chunks_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "sum_chunks_kernel", Spy())
    x, v = randn(2, 300, 33, dtype=torch.bfloat16, seed=1), randn(2, 33, dtype=torch.bfloat16, seed=2)
    triton_check(x, v)
    assert launches, "expected the chunked path for long rows"
    g = randn(2, 300, 33, dtype=torch.bfloat16, seed=3)
    a, b = K.scale_backward(g, x, v, None), K.scale_backward(g, x, v, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_triton
def test_triton_float64_and_empty():
    x, v = randn(2, 3, 5, dtype=torch.float64, seed=1), randn(2, 5, dtype=torch.float64, seed=2)
    triton_check(x, v)
    e = torch.empty(2, 0, 5, device=DEVICE)
    assert K.scale(e, v.float()).shape == e.shape
    gx, gv = K.scale_backward(e, e, v.float(), None)
    assert gx.shape == e.shape and torch.all(gv == 0)


@needs_triton
def test_triton_through_dispatch_autograd_and_opcheck():
    """Forced through set_backend, autograd and the custom op's fake impl agree with the kernels."""
    para_kernels.set_backend("triton")
    try:
        assert dispatch.backend_for("scale", torch.device(DEVICE)) == "triton"
        x = randn(3, 4, 6, seed=1).requires_grad_()
        v = randn(3, 6, seed=2).requires_grad_()
        (para_kernels.ops.scale(x, v) * randn(3, 4, 6, seed=3)).sum().backward()
        rx, rv = reference_ops.scale_backward(randn(3, 4, 6, seed=3).double(), x.detach().double(),
                                          v.detach().double(), None)
        assert rel_err(x.grad.cpu(), rx.cpu()) <= 1e-5 and rel_err(v.grad.cpu(), rv.cpu()) <= 1e-5
        rows = torch.tensor([0, 2, 2, 1, 0], device=DEVICE, dtype=torch.int32)
        torch.library.opcheck(torch.ops.para.scale.default, (randn(5, 6, seed=4), randn(3, 6, seed=5), rows),
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        para_kernels.set_backend(None)


@needs_triton
def test_triton_gpu_config_pruning(monkeypatch):
    """The GPU autotune list: small inputs get one config (never benchmarked, so graph capture is
    safe); large ones keep only configs that give distinct tiles."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    configs = K._fwd_configs()
    assert len(configs) > 1
    assert len(K._fwd_prune(configs, {"n": 11008, "R": 256, "L": 1}, PACKED=False, F64=False)) == 1
    big = K._fwd_prune(configs, {"n": 4096, "R": 8, "L": 4096}, PACKED=False, F64=False)
    assert len(big) == len(configs)
    narrow = K._fwd_prune(configs, {"n": 200, "R": 8, "L": 4096}, PACKED=True, F64=False)
    tiles = [(*K._tile(c.kwargs["N_CAP"], c.kwargs["TILE"], 200, 8, 4096, True), c.num_warps) for c in narrow]
    assert 1 <= len(narrow) < len(configs) and len(set(tiles)) == len(tiles)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_triton_cuda_graph_decode():
    B, n = 200, 1536
    x, v = randn(B, 1, n, dtype=torch.bfloat16, seed=1), randn(B, n, dtype=torch.bfloat16, seed=2)
    K.scale(x, v)  # autotune before capture: the tuner cannot benchmark inside a capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.scale(x, v)
    x.copy_(randn(B, 1, n, dtype=torch.bfloat16, seed=3))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out.cpu(), reference_ops.scale(x.double().cpu(), v.double().cpu())) <= TOL[torch.bfloat16]


@st.composite
def scale_cases(draw):
    B = draw(st.integers(1, 5))
    middle = draw(st.lists(st.integers(1, 6), min_size=0, max_size=2))
    n = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    packed = draw(st.booleans())
    total = draw(st.integers(1, 24))
    index_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    transposed = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, middle, n, dtype, packed, total, index_dtype, transposed, seed


@needs_triton
@settings(max_examples=25, deadline=None)
@given(scale_cases())
def test_triton_property_forward_and_backward(case):
    B, middle, n, dtype, packed, total, index_dtype, transposed, seed = case
    gen = torch.Generator().manual_seed(seed)
    shape = (total, n) if packed else (B, *middle, n)
    x = torch.randn(*shape, generator=gen)
    if transposed:  # same values, features not the fastest dim
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    x = x.to(DEVICE, dtype)
    v = (1 + 0.3 * torch.randn(B, n, generator=gen)).to(DEVICE, dtype)
    rows = torch.randint(0, B, (total,), generator=gen).to(DEVICE, index_dtype) if packed else None
    grad = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    triton_check(x, v, rows, grad)


# ------------------------------------------------------------------ CUDA C++ kernels (torch.ops.para_cuda)
def cuda_check_scale(x, v, rows, tol, grad=None):
    """The CUDA kernels on a NaN-poisoned allocator: backward within tol too, forward bitwise x * v."""
    return check_scale(torch.ops.para_cuda.scale, torch.ops.para_cuda.scale_backward, x, v, rows, tol,
                       grad_tol=tol, grad=grad, grad_seed=5, bitwise_eager=True, before=poison_cuda_allocator)[1]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 577, 4097])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 3), (130, 1), (130, 7)])
def test_cuda_scale_padded(B, T, n, dtype):
    x = randn(B, T, n, dtype=dtype, seed=B * T + n)
    v = 1 + randn(B, n, dtype=dtype, seed=n) * 0.1
    cuda_check_scale(x, v, None, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 577, 4097])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_cuda_scale_packed(n, dtype, index_dtype):
    """Rows in runs (the usual packed layout) and a shuffled tail (rows revisited)."""
    B, g = 5, torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 40, (B,), generator=g)
    runs = torch.repeat_interleave(torch.arange(B), lengths)
    rows = torch.cat([runs, torch.randint(0, B, (23,), generator=g)])
    x = randn(rows.shape[0], n, dtype=dtype, seed=n + 1)
    v = 1 + randn(B, n, dtype=dtype, seed=n + 2) * 0.1
    cuda_check_scale(x, v, rows.to("cuda", index_dtype), TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_cuda_scale_layouts(dtype):
    """4-D x, misaligned x and v (scalar path), a column slice of v, unmergeable middle dims."""
    B, H, T, n = 3, 4, 5, 37
    tol = TOL[dtype]
    x = randn(B, H, T, n, dtype=dtype, seed=1)
    v = randn(B, n, dtype=dtype, seed=2)
    cuda_check_scale(x, v, None, tol)
    cuda_check_scale(misaligned(x), misaligned(v), None, tol)
    wide = randn(B, 3 * n, dtype=dtype, seed=3)
    cuda_check_scale(x, wide[:, n:2 * n], None, tol)
    cuda_check_scale(x.transpose(1, 2), v, None, tol)  # [B, T, H, n] view: middle dims do not merge
    cuda_check_scale(x[:, :, :, ::2], v[:, ::2], None, tol)  # feature stride 2


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_scale_backward_chunked_deterministic(dtype):
    """Long rows are cut into chunks summed in a fixed order: bitwise repeatable grad_v."""
    B, T, n = 2, 5000, 64
    x = randn(B, T, n, dtype=dtype, seed=4)
    v = randn(B, n, dtype=dtype, seed=5)
    grad = randn(B, T, n, dtype=dtype, seed=6)
    gv = cuda_check_scale(x, v, None, TOL[dtype], grad=grad)
    for _ in range(3):
        assert torch.equal(torch.ops.para_cuda.scale_backward(grad, x, v, None)[1], gv)


@needs_cuda
def test_cuda_scale_empty():
    x, v = randn(2, 0, 8), randn(2, 8)
    assert torch.ops.para_cuda.scale(x, v, None).shape == x.shape
    gx, gv = torch.ops.para_cuda.scale_backward(x, x, v, None)
    assert gx.shape == x.shape and torch.equal(gv, torch.zeros_like(v))


@needs_cuda
@pytest.mark.parametrize("case,name", [
    ("x_int", "x"), ("v_dtype", "v"), ("v_1d", "v"), ("x_features", "x"), ("x_rows", "x"),
    ("rows_float", "token_rows"), ("rows_shape", "token_rows"), ("rows_cpu", "token_rows"),
    ("packed_3d", "x")])
def test_cuda_scale_errors(case, name):
    x, v, rows = randn(3, 4, 8), randn(3, 8), None
    if case == "x_int":
        x = x.to(torch.int32)
    elif case == "v_dtype":
        v = v.half()
    elif case == "v_1d":
        v = v[0]
    elif case == "x_features":
        x = randn(3, 4, 9)
    elif case == "x_rows":
        x = randn(2, 4, 8)
    elif case == "packed_3d":
        rows = torch.zeros(3, dtype=torch.long, device="cuda")
    else:
        x = randn(12, 8)
        rows = torch.zeros(12, dtype=torch.long, device="cuda")
        if case == "rows_float":
            rows = rows.float()
        elif case == "rows_shape":
            rows = rows[:5]
        elif case == "rows_cpu":
            rows = rows.cpu()
    with pytest.raises(RuntimeError, match=names_argument(name)):
        torch.ops.para_cuda.scale(x, v, rows)


@needs_cuda
def test_cuda_scale_backward_grad_errors():
    x, v = randn(3, 4, 8), randn(3, 8)
    with pytest.raises(RuntimeError, match=names_argument("grad")):
        torch.ops.para_cuda.scale_backward(randn(3, 4, 7), x, v, None)
