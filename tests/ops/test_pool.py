"""The pool op (docs/spec.md §1: last / mean / max / attn pooling of each row's prompt, padded
[B, T, d] or packed [total, d]): the fp64-oracle grid on every backend, backward, gradcheck /
opcheck, a property test, then each backend's own kernels (Triton, CUDA C++) forward and backward
against the reference in fp64: int32 ranges, strided inputs, packed ranges that overlap or touch,
max ties and NaN, outputs that must be written in full, strided range tensors, expanded w_sa,
argument checks. (Every Triton kernel is compiled for sm_80 / sm_90 by tests/build/test_triton_compile.py.)"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
from para_kernels import ops

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
    packed,
    poison_cuda_allocator,
    randn,
    ranges,
    rel_err,
    triton_runs,
)
from kit.checks import check_pool

ref_pool = importlib.import_module("para_kernels.ops.reference_ops.pool")  # the package re-exports a function `pool`


def tpool():
    return importlib.import_module("para_kernels.ops.triton_ops.pool")


needs_triton = pytest.mark.skipif(not triton_runs(), reason="the Triton backend cannot run here")
needs_cuda = pytest.mark.skipif(not cuda_kernels_built("pool", "pool_backward"),
                                reason="needs a GPU and the para_cuda extension with CUDA pool kernels")


# ------------------------------------------------------------------ every backend: the fp64 oracle
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


# ------------------------------------------------------------------ backward
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


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
POOL_CASES = [(mode, layout, wshape) for mode in ops.POOL_MODES for layout in ("padded", "packed")
              for wshape in (("d", "Bd") if mode == "attn" else (None,))]


def _pool_case(mode, layout, wshape):
    B, T, d = 3, 5, 4
    hidden = f64(B, T, d, seed=1)
    start, end = torch.tensor([0, 2, 4]), torch.tensor([5, 3, 5])
    if layout == "packed":
        hidden, start, end = packed(hidden, start, end)
    w = {None: None, "d": f64(d, seed=2), "Bd": f64(B, d, seed=2)}[wshape]
    return hidden, start, end, mode, w


@pytest.mark.parametrize("mode,layout,wshape", POOL_CASES)
def test_pool_gradcheck_and_opcheck(mode, layout, wshape):
    hidden, start, end, mode, w = _pool_case(mode, layout, wshape)
    hidden.requires_grad_()
    if w is not None:
        w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: ops.pool(h, start, end, mode, w), (hidden, w))
    torch.library.opcheck(torch.ops.para.pool.default, (hidden, start, end, mode, w))


# ------------------------------------------------------------------ property (the dispatched op)
@st.composite
def pool_inputs(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(1, 9))
    d = draw(st.integers(1, 40))
    bounds = [sorted(draw(st.lists(st.integers(0, T), min_size=2, max_size=2, unique=True)))
              for _ in range(B)] if T > 1 else [[0, 1]] * B
    mode = draw(st.sampled_from(ops.POOL_MODES))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, T, d, bounds, mode, dtype, seed


@settings(max_examples=60, deadline=None)
@given(pool_inputs())
def test_pool_property(case):
    B, T, d, bounds, mode, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen, dtype=dtype)
    start = torch.tensor([b[0] for b in bounds])
    end = torch.tensor([b[1] for b in bounds])
    w = torch.randn(d, generator=gen, dtype=dtype) if mode == "attn" else None
    out = ops.pool(hidden, start, end, mode, w)
    ref = oracles.pool(hidden, start, end, mode, w)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)) <= tol


# ------------------------------------------------------------------ Triton kernels
def triton_check(hidden, start, end, mode, w=None, tol_scale=2.0):
    """Forward and backward through the dispatcher (which must pick Triton) against the
    reference on fp64 copies; hidden / w may have any strides."""
    assert ops.backend_for("pool", hidden.device) == "triton"
    return check_pool(ops.pool, torch.ops.para.pool_backward, hidden, start, end, mode, w,
                      TOL[hidden.dtype] * tol_scale, grad_seed=11)


def attn_w(B, d, per_row, dtype=torch.float32, seed=5):
    return randn(*((B, d) if per_row else (d,)), seed=seed, dtype=dtype) / math.sqrt(d)


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_int32_ranges(mode, layout):
    B, T, d = 3, 6, 19
    hidden = randn(B, T, d)
    start = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([6, 4, 6], dtype=torch.int32, device=DEVICE)
    if layout == "packed":
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B, dtype=torch.int32, device=DEVICE) * T, end + torch.arange(
            B, dtype=torch.int32, device=DEVICE) * T
    out32 = triton_check(hidden, start, end, mode, attn_w(B, d, True) if mode == "attn" else None)
    w = attn_w(B, d, True) if mode == "attn" else None
    out64 = ops.pool(hidden, start.long(), end.long(), mode, w)
    assert torch.equal(out32[0], out64)


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_triton_strided_inputs(mode):
    """Padded hidden with d not innermost, packed hidden with a row stride > d, strided w_sa."""
    B, T, d = 3, 5, 21
    hidden = randn(B, d, T, seed=1).transpose(1, 2)  # stride along d is T
    start, end = torch.tensor([0, 1, 4], device=DEVICE), torch.tensor([5, 3, 5], device=DEVICE)
    w = randn(d, B, seed=2).t() / math.sqrt(d) if mode == "attn" else None  # [B, d], strides (1, B)
    assert not hidden.is_contiguous()
    triton_check(hidden, start, end, mode, w)
    packed = randn(9, 2 * d, seed=3)[:, :d]  # row stride 2d
    triton_check(packed, torch.tensor([0, 3, 8], device=DEVICE), torch.tensor([3, 8, 9], device=DEVICE), mode,
          w if w is None else w[0])  # shared [d] w_sa, stride B


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_strided_range_tensors(mode, layout):
    """prompt_start / prompt_end as the columns of a [B, 2] table (stride 2): the kernels read
    ranges as ptr + b, so the launcher must hand them contiguous copies."""
    B, T, d = 4, 6, 19
    hidden = randn(B, T, d, seed=6)
    table = torch.tensor([[0, 6], [2, 4], [5, 6], [1, 3]], device=DEVICE)
    if layout == "packed":
        hidden = hidden.reshape(B * T, d)
        table = table + torch.arange(B, device=DEVICE)[:, None] * T
    start, end = table[:, 0], table[:, 1]
    assert not start.is_contiguous()
    triton_check(hidden, start, end, mode, attn_w(B, d, True) if mode == "attn" else None)


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_attn_expanded_w_sa(layout):
    """w_sa [B, d] expanded from one [d] vector (row stride 0, as a broadcast query is): the
    gradient is per row, all B * d elements of it (autograd sums them into the [d] source)."""
    B, T, d = 5, 4, 23
    hidden = randn(B, T, d, seed=7)
    start, end = torch.tensor([0, 1, 2, 0, 3], device=DEVICE), torch.tensor([4, 4, 3, 2, 4], device=DEVICE)
    if layout == "packed":
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B, device=DEVICE) * T, end + torch.arange(B, device=DEVICE) * T
    w = attn_w(1, d, False).expand(B, d)
    assert w.stride(0) == 0
    triton_check(hidden, start, end, "attn", w)


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_packed_overlapping_and_adjacent_ranges(mode, dtype):
    """Rows may share tokens (their gradients add up, as index_add does) or touch; some
    tokens belong to no row and must get a zero gradient."""
    total, d = 12, 37
    hidden = randn(total, d, seed=4, dtype=dtype)
    start = torch.tensor([0, 2, 2, 5, 5, 9, 11], device=DEVICE)
    end = torch.tensor([5, 7, 7, 9, 6, 10, 12], device=DEVICE)  # token 10 is in no prompt
    for per_row in (False, True):
        w = attn_w(7, d, per_row, dtype) if mode == "attn" else None
        triton_check(hidden, start, end, mode, w)
        if mode != "attn":
            break


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_max_ties_go_to_the_first_token(layout):
    """Exact ties everywhere: the gradient of each feature goes to its first maximal token."""
    B, T, d = 2, 7, 13
    hidden = torch.randint(0, 3, (B, T, d), generator=torch.Generator().manual_seed(6)).float().to(DEVICE)
    hidden[1, :, 0] = float("-inf")  # a feature that is -inf at every token: the reference picks the first
    start, end = torch.tensor([0, 2], device=DEVICE), torch.tensor([7, 6], device=DEVICE)
    if layout == "packed":
        hidden, start, end = hidden.reshape(B * T, d), start + torch.tensor([0, T], device=DEVICE), \
            end + torch.tensor([0, T], device=DEVICE)
    grad = randn(B, d, seed=7)
    g_h, _ = torch.ops.para.pool_backward(grad, hidden, start, end, "max", None)
    ref_gh, _ = ref_pool.pool_backward(grad.cpu(), hidden.cpu(), start.cpu(), end.cpu(), "max", None)
    assert torch.equal(g_h.cpu(), ref_gh)


@st.composite
def cases(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 8))
    d = draw(st.integers(1, 70))
    ranges = []
    for _ in range(B):
        s = draw(st.integers(0, T - 1))
        ranges.append((s, draw(st.integers(s + 1, T))))
    return dict(B=B, T=T, d=d, ranges=ranges, mode=draw(st.sampled_from(ops.POOL_MODES)),
                layout=draw(st.sampled_from(["padded", "packed"])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])),
                index=draw(st.sampled_from([torch.int32, torch.int64])),
                per_row=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@settings(max_examples=25, deadline=None)
@given(cases())
def test_triton_property_matches_reference(case):
    B, T, d, dtype = case["B"], case["T"], case["d"], case["dtype"]
    hidden = randn(B, T, d, seed=case["seed"], dtype=dtype)
    start = torch.tensor([r[0] for r in case["ranges"]], dtype=case["index"], device=DEVICE)
    end = torch.tensor([r[1] for r in case["ranges"]], dtype=case["index"], device=DEVICE)
    if case["layout"] == "packed":  # rows' prompts at their padded offsets, the rest untouched
        shift = torch.arange(B, dtype=case["index"], device=DEVICE) * T
        hidden, start, end = hidden.reshape(B * T, d), start + shift, end + shift
    w = attn_w(B, d, case["per_row"], dtype, seed=case["seed"] + 1) if case["mode"] == "attn" else None
    triton_check(hidden, start, end, case["mode"], w,
                 tol_scale=4.0 if dtype in (torch.float16, torch.bfloat16) else 2.0)


class _PoisonTorch:
    """torch, except that ``empty`` returns memory full of NaN (floats) or -1 (ints)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_triton_every_output_element_is_written(mode, monkeypatch):
    """Outputs and scratch come from a poisoned torch.empty: any element a kernel forgets
    (or scratch it reads before writing) shows up as NaN."""
    module = tpool()
    monkeypatch.setattr(module, "torch", _PoisonTorch())
    B, T, d = 3, 6, 300  # d spans two blocks of the interpreter's config, with a masked tail
    hidden = randn(B, T, d, seed=8, dtype=torch.bfloat16)
    start, end = torch.tensor([0, 3, 5], device=DEVICE), torch.tensor([2, 6, 6], device=DEVICE)
    for layout in ("padded", "packed"):
        h, s, e = (hidden, start, end) if layout == "padded" else (
            hidden.reshape(B * T, d), start + torch.tensor([0, T, 2 * T], device=DEVICE),
            end + torch.tensor([0, T, 2 * T], device=DEVICE))
        for per_row in (False, True):
            triton_check(h, s, e, mode, attn_w(B, d, per_row, torch.bfloat16) if mode == "attn" else None)
            if mode != "attn":
                break


@needs_triton
@pytest.mark.usefixtures("triton_backend")
def test_triton_empty_batch():
    hidden = randn(2, 3, 5)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert ops.pool(hidden.reshape(6, 5), empty, empty, "mean").shape == (0, 5)
    g_h, g_w = tpool().pool_backward(randn(0, 5), hidden.reshape(6, 5), empty, empty, "attn", randn(5))
    assert torch.equal(g_h, torch.zeros(6, 5, device=DEVICE)) and torch.equal(g_w, torch.zeros(5, device=DEVICE))


@needs_triton
@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_triton_max_nan_like_torch(layout):
    """A NaN in a prompt makes that feature NaN (torch.amax) and takes its gradient (torch.argmax);
    a NaN outside every prompt changes nothing."""
    B, T, d = 2, 5, 6
    hidden = randn(B, T, d, seed=9)
    hidden[0, 3, 1] = hidden[0, 1, 1] = float("nan")  # two NaNs: the first one wins
    hidden[1, 0, 2] = float("nan")  # outside row 1's prompt [1, 4)
    start, end = torch.tensor([0, 1], device=DEVICE), torch.tensor([5, 4], device=DEVICE)
    if layout == "packed":
        hidden, start, end = hidden.reshape(B * T, d), start + torch.tensor([0, T], device=DEVICE), \
            end + torch.tensor([0, T], device=DEVICE)
    grad = randn(B, d, seed=10)
    out = ops.pool(hidden, start, end, "max")
    ref = ref_pool.pool(hidden.cpu(), start.cpu(), end.cpu(), "max")
    assert torch.equal(out.cpu().isnan(), ref.isnan()) and out.cpu().isnan().sum() == 1
    torch.testing.assert_close(out.cpu().nan_to_num(), ref.nan_to_num())
    g_h, _ = torch.ops.para.pool_backward(grad, hidden, start, end, "max", None)
    ref_gh, _ = ref_pool.pool_backward(grad.cpu(), hidden.cpu(), start.cpu(), end.cpu(), "max", None)
    assert torch.equal(g_h.cpu(), ref_gh)


# ------------------------------------------------------------------ CUDA C++ kernels (torch.ops.para_cuda)
def cuda_check_pool(hidden, start, end, mode, w, tol):
    """Forward and backward of the kernels, on a NaN-poisoned allocator, against the fp64 reference
    (exact zeros outside the prompts for last / max: mean / attn may round to 0 in the reference too)."""
    check_pool(torch.ops.para_cuda.pool, torch.ops.para_cuda.pool_backward, hidden, start, end, mode, w, tol,
               grad_seed=3, exact_zero_modes=("last", "max"), before=poison_cuda_allocator)


def cuda_ranges(B, T, seed):
    """Prompt ranges with lengths 1 and T among random ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    start = torch.stack([torch.randint(0, T - int(n) + 1, (1,), generator=g)[0] for n in lengths])
    return start, start + lengths


CUDA_SHAPES = [(1, 1, 1), (5, 7, 37), (130, 3, 577), (2, 9, 4097), (5, 33, 64)]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("B,T,d", CUDA_SHAPES)
def test_cuda_pool_padded(B, T, d, mode, dtype):
    hidden = randn(B, T, d, dtype=dtype, seed=B + T + d)
    start, end = cuda_ranges(B, T, seed=d)
    w = randn(d, dtype=dtype, seed=7) / math.sqrt(d) if mode == "attn" else None
    cuda_check_pool(hidden, start.to("cuda"), end.to("cuda"), mode, w, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("B,T,d", CUDA_SHAPES)
def test_cuda_pool_packed_overlapping(B, T, d, mode, dtype):
    """Packed [total, d] with ranges that may overlap or touch: gradients sum."""
    total = B * T
    hidden = randn(total, d, dtype=dtype, seed=total + d)
    g = torch.Generator().manual_seed(d)
    a = torch.randint(0, total, (B,), generator=g)
    b = torch.randint(0, total, (B,), generator=g)
    start, end = torch.minimum(a, b), torch.maximum(a, b) + 1
    start[0], end[0] = 0, total  # one prompt over everything
    w = randn(B, d, dtype=dtype, seed=8) / math.sqrt(d) if mode == "attn" else None
    cuda_check_pool(hidden, start.to("cuda", torch.int32), end.to("cuda", torch.int32), mode, w, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_pool_misaligned_and_strided(mode, dtype, packed):
    """Views that start off a 16-byte boundary, and feature strides != 1: the scalar path."""
    B, T, d = 5, 6, 37 if dtype != torch.float64 else 9
    hidden = randn(B, T, d, dtype=dtype, seed=1)
    start, end = cuda_ranges(B, T, seed=2)
    if packed:
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B) * T, end + torch.arange(B) * T
    w = randn(B, d, dtype=dtype, seed=4) / math.sqrt(d) if mode == "attn" else None
    s64, e64 = start.to("cuda"), end.to("cuda")
    cuda_check_pool(misaligned(hidden), s64, e64, mode, None if w is None else misaligned(w), TOL[dtype])
    strided = hidden.transpose(-1, -2).contiguous().transpose(-1, -2)  # feature stride = tokens
    cuda_check_pool(strided, s64, e64, mode, w, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("mode", ["max"])
def test_cuda_pool_max_ties_and_nan(mode):
    """Ties give the gradient to the first maximal token; NaN propagates, as in torch."""
    hidden = torch.tensor([[[1.0, 2.0], [1.0, 5.0], [1.0, 5.0]]], device="cuda")
    start, end = torch.tensor([0], device="cuda"), torch.tensor([3], device="cuda")
    grad = torch.tensor([[10.0, 20.0]], device="cuda")
    g_h, _ = torch.ops.para_cuda.pool_backward(grad, hidden, start, end, mode, None)
    assert g_h.cpu().tolist() == [[[10.0, 0.0], [0.0, 20.0], [0.0, 0.0]]]
    hidden[0, 1, 0] = float("nan")
    out = torch.ops.para_cuda.pool(hidden, start, end, mode, None)
    assert math.isnan(out[0, 0].item()) and out[0, 1].item() == 5.0


@needs_cuda
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_pool_attn_expanded_w_sa(packed, dtype):
    """w_sa [B, d] expanded from one [d] row (row stride 0): the gradient is [B, d] and every one
    of its B * d elements is written (a stride test once took it for a shared [d] w_sa and wrote
    only d of them, leaving the rest uninitialised; check_pool poisons the allocator first)."""
    B, T, d = 6, 5, 37
    hidden = randn(B, T, d, dtype=dtype, seed=12)
    start, end = cuda_ranges(B, T, seed=13)
    if packed:
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B) * T, end + torch.arange(B) * T
    w = (randn(d, dtype=dtype, seed=14) / math.sqrt(d)).expand(B, d)
    assert w.stride(0) == 0
    cuda_check_pool(hidden, start.to("cuda"), end.to("cuda"), "attn", w, TOL[dtype])


@needs_cuda
@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_cuda_pool_strided_range_tensors(mode):
    """prompt_start / prompt_end as columns of a [B, 2] table (stride 2)."""
    B, T, d = 5, 6, 37
    hidden = randn(B, T, d, seed=15)
    start, end = cuda_ranges(B, T, seed=16)
    table = torch.stack([start, end], 1).to("cuda")
    w = randn(B, d, seed=17) / math.sqrt(d) if mode == "attn" else None
    cuda_check_pool(hidden, table[:, 0], table[:, 1], mode, w, TOL[torch.float32])


@needs_cuda
def test_cuda_pool_attn_long_prompt_fp32():
    """Many token tiles (online softmax rescaling) and a shared w_sa summed over 130 rows."""
    B, T, d = 130, 70, 96
    hidden = randn(B, T, d, seed=9) * 3
    start, end = cuda_ranges(B, T, seed=10)
    w = randn(d, seed=11)
    cuda_check_pool(hidden, start.to("cuda"), end.to("cuda"), "attn", w, TOL[torch.float32])


@needs_cuda
def test_cuda_pool_empty_batch():
    hidden = randn(0, 4, 8)
    idx = torch.zeros(0, dtype=torch.long, device="cuda")
    assert torch.ops.para_cuda.pool(hidden, idx, idx, "mean", None).shape == (0, 8)
    g_h, g_w = torch.ops.para_cuda.pool_backward(randn(0, 8), hidden, idx, idx, "mean", None)
    assert g_h.shape == hidden.shape and g_w.numel() == 0


def _pool_args():
    hidden = randn(2, 5, 8)
    start = torch.tensor([0, 1], device="cuda")
    end = torch.tensor([5, 3], device="cuda")
    return hidden, start, end


@needs_cuda
@pytest.mark.parametrize("case,name", [
    ("hidden_int", "hidden"), ("hidden_1d", "hidden"), ("start_float", "prompt_start"),
    ("start_shape", "prompt_start"), ("end_cpu", "prompt_end"), ("bad_mode", "mode"),
    ("w_missing", "w_sa"), ("w_shape", "w_sa"), ("w_dtype", "w_sa")])
def test_cuda_pool_errors(case, name):
    hidden, start, end = _pool_args()
    mode, w = "mean", None
    if case == "hidden_int":
        hidden = hidden.to(torch.int32)
    elif case == "hidden_1d":
        hidden = hidden[0, 0]
    elif case == "start_float":
        start = start.float()
    elif case == "start_shape":
        start = start[:1]
    elif case == "end_cpu":
        end = end.cpu()
    elif case == "bad_mode":
        mode = "median"
    elif case == "w_missing":
        mode = "attn"
    elif case == "w_shape":
        mode, w = "attn", randn(9)
    elif case == "w_dtype":
        mode, w = "attn", randn(8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=names_argument(name)):
        torch.ops.para_cuda.pool(hidden, start, end, mode, w)


@needs_cuda
def test_cuda_pool_backward_grad_errors():
    hidden, start, end = _pool_args()
    with pytest.raises(RuntimeError, match=names_argument("grad")):
        torch.ops.para_cuda.pool_backward(randn(2, 9), hidden, start, end, "mean", None)
    with pytest.raises(RuntimeError, match=names_argument("grad")):
        torch.ops.para_cuda.pool_backward(randn(2, 8, dtype=torch.float16), hidden, start, end, "mean", None)
