"""The Triton scale kernels beyond tests/test_ops.py: index dtypes, layouts, ranks, decode shapes,
poisoned outputs, the chunked backward, and a property test, all against the fp64 reference.

On a machine without CUDA they run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1); with CUDA, on the GPU.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import para_kernels
from para_kernels.ops import dispatch, reference_ops

pytest.importorskip("triton")
from para_kernels.ops.triton_ops import scale as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in dispatch.available_backends(DEVICE),
                                reason="the Triton backend cannot run here")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output (an element was never written?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check(x, v, rows=None, grad=None, dtype=None):
    """Forward and backward of the kernels against the reference on fp64 copies."""
    dtype = dtype or x.dtype
    tol = TOL[dtype] * 2  # backward sums many rounded products: one ulp more than the forward
    xd, vd = x.double(), v.double()
    rows_ref = None if rows is None else rows.cpu()
    out = K.scale(x, v, rows)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out.cpu(), reference_ops.scale(xd.cpu(), vd.cpu(), rows_ref)) <= TOL[dtype]
    if grad is None:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    gx, gv = K.scale_backward(grad, x, v, rows)
    rx, rv = reference_ops.scale_backward(grad.double().cpu(), xd.cpu(), vd.cpu(), rows_ref)
    assert gx.shape == x.shape and gx.dtype == x.dtype and gv.shape == v.shape and gv.dtype == v.dtype
    assert rel_err(gx.cpu(), rx) <= tol
    assert rel_err(gv.cpu(), rv) <= tol


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("order", ["runs", "shuffled"])
def test_packed_token_rows(index_dtype, order):
    B, n = 5, 37
    rows = torch.tensor([0, 0, 0, 2, 2, 3, 3, 3, 3, 3, 1] + [4] * 40)  # row 4 spans several tiles
    if order == "shuffled":
        rows = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))]
    x, v = rand(rows.numel(), n, seed=1), 1 + 0.1 * rand(B, n, seed=2)
    check(x, v, rows.to(DEVICE, index_dtype))


def test_packed_unused_rows_get_zero_grad():
    x, v = rand(6, 9, seed=1), rand(4, 9, seed=2)
    rows = torch.tensor([3, 3, 0, 0, 3, 0], device=DEVICE, dtype=torch.int32)
    check(x, v, rows)
    _, gv = K.scale_backward(torch.ones_like(x), x, v, rows)
    assert torch.all(gv[1:3] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4d_x(dtype):
    x, v = rand(3, 4, 5, 70, dtype=dtype, seed=1), rand(3, 70, dtype=dtype, seed=2)
    check(x, v)


@pytest.mark.parametrize("layout", ["strided_tokens", "features_not_unit_stride", "unmergeable", "v_slice"])
def test_non_contiguous(layout):
    B, T, n = 3, 6, 19
    v = rand(B, n, seed=2)
    if layout == "strided_tokens":  # every other token: mergeable strides, no copy
        x = rand(B, 2 * T, n, seed=1)[:, ::2]
    elif layout == "features_not_unit_stride":  # dense but transposed: out keeps x's strides
        x = rand(B, n, T, seed=1).transpose(1, 2)
    elif layout == "unmergeable":  # middle dims that cannot be one stride: copied first
        x = rand(B, 4, T, n, seed=1).transpose(1, 2)
    else:  # v as a column slice of the generator's [B, N] output
        x = rand(B, T, n, seed=1)
        v = rand(B, 3 * n, seed=2)[:, n:2 * n]
    assert not x.is_contiguous() or not v.is_contiguous()
    check(x, v)
    out = K.scale(x, v)
    assert out.stride() == torch.empty_like(x).stride(), "must match the fake impl's layout"


@pytest.mark.parametrize("B,n,dtype", [(130, 4096, torch.bfloat16), (257, 576, torch.float16)])
def test_decode_many_rows(B, n, dtype):
    """T = 1 decode with B > 128, padded [B, 1, n] and packed [B, n] with one token per row."""
    x, v = rand(B, 1, n, dtype=dtype, seed=1), 1 + 0.1 * rand(B, n, dtype=dtype, seed=2)
    check(x, v)
    rows = torch.arange(B, device=DEVICE, dtype=torch.int32).flip(0)
    check(x[:, 0], v, rows)


@pytest.fixture
def poisoned(monkeypatch):
    """Every empty/empty_like (outputs and partial buffers) starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))


@pytest.mark.parametrize("case", ["padded", "decode", "chunked", "rows_and_chunks", "packed", "tiny"])
def test_every_element_written(poisoned, case):
    shapes = {"padded": (3, 7, 77), "decode": (150, 1, 5), "chunked": (1, 200, 17), "packed": (23, 21),
              "rows_and_chunks": (3, 200, 3),  # several rows per tile and several chunks per row
              "tiny": (1, 1, 1)}
    x = rand(*shapes[case], seed=1)
    v = rand(4 if case == "packed" else x.shape[0], x.shape[-1], seed=2)
    rows = torch.randint(0, 4, (23,)).to(DEVICE) if case == "packed" else None
    check(x, v, rows)


def test_chunked_backward_is_used_and_deterministic(monkeypatch):
    """Long rows split into chunks (partials + ordered sum): right, and bitwise repeatable."""
    launches = []
    kernel = K.sum_chunks_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(K, "sum_chunks_kernel", Spy())
    x, v = rand(2, 300, 33, dtype=torch.bfloat16, seed=1), rand(2, 33, dtype=torch.bfloat16, seed=2)
    check(x, v)
    assert launches, "expected the chunked path for long rows"
    g = rand(2, 300, 33, dtype=torch.bfloat16, seed=3)
    a, b = K.scale_backward(g, x, v, None), K.scale_backward(g, x, v, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_float64_and_empty():
    x, v = rand(2, 3, 5, dtype=torch.float64, seed=1), rand(2, 5, dtype=torch.float64, seed=2)
    check(x, v)
    e = torch.empty(2, 0, 5, device=DEVICE)
    assert K.scale(e, v.float()).shape == e.shape
    gx, gv = K.scale_backward(e, e, v.float(), None)
    assert gx.shape == e.shape and torch.all(gv == 0)


def test_through_dispatch_autograd_and_opcheck():
    """Forced through set_backend, autograd and the custom op's fake impl agree with the kernels."""
    para_kernels.set_backend("triton")
    try:
        assert dispatch.backend_for("scale", torch.device(DEVICE)) == "triton"
        x = rand(3, 4, 6, seed=1).requires_grad_()
        v = rand(3, 6, seed=2).requires_grad_()
        (para_kernels.ops.scale(x, v) * rand(3, 4, 6, seed=3)).sum().backward()
        rx, rv = reference_ops.scale_backward(rand(3, 4, 6, seed=3).double(), x.detach().double(),
                                          v.detach().double(), None)
        assert rel_err(x.grad.cpu(), rx.cpu()) <= 1e-5 and rel_err(v.grad.cpu(), rv.cpu()) <= 1e-5
        rows = torch.tensor([0, 2, 2, 1, 0], device=DEVICE, dtype=torch.int32)
        torch.library.opcheck(torch.ops.para.scale.default, (rand(5, 6, seed=4), rand(3, 6, seed=5), rows),
                              test_utils=("test_schema", "test_faketensor"))
    finally:
        para_kernels.set_backend(None)


def test_gpu_config_pruning(monkeypatch):
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode():
    B, n = 200, 1536
    x, v = rand(B, 1, n, dtype=torch.bfloat16, seed=1), rand(B, n, dtype=torch.bfloat16, seed=2)
    K.scale(x, v)  # autotune before capture: the tuner cannot benchmark inside a capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.scale(x, v)
    x.copy_(rand(B, 1, n, dtype=torch.bfloat16, seed=3))
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


@settings(max_examples=25, deadline=None)
@given(scale_cases())
def test_property_forward_and_backward(case):
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
    check(x, v, rows, grad)
