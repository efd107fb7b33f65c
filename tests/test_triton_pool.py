"""The Triton pool kernels beyond the generic op tests: int32 ranges, strided inputs, packed
ranges that overlap or touch, max ties, random cases against the reference, outputs that
must be written in full, strided range tensors and expanded w_sa. (Every kernel is compiled
for sm_80 / sm_90 by tests/test_triton_compile.py.)"""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import para_kernels
from para_kernels import ops
from para_kernels.ops import dispatch

ref_pool = importlib.import_module("para_kernels.ops.reference_ops.pool")  # the package re-exports a function `pool`

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in dispatch.available_backends(DEVICE),
                                reason="the Triton backend cannot run here")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def triton_backend():
    para_kernels.set_backend("triton")
    try:
        yield
    finally:
        para_kernels.set_backend(None)


def tpool():
    return importlib.import_module("para_kernels.ops.triton_ops.pool")


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check(hidden, start, end, mode, w=None, tol_scale=2.0):
    """Forward and backward through the dispatcher (which must pick Triton) against the
    reference on fp64 copies; hidden / w may have any strides."""
    assert ops.backend_for("pool", hidden.device) == "triton"
    dtype = hidden.dtype
    gen = torch.Generator().manual_seed(11)
    grad = torch.randn(start.shape[0], hidden.shape[-1], generator=gen).to(hidden.device, dtype)
    out = ops.pool(hidden, start, end, mode, w)
    g_h, g_w = torch.ops.para.pool_backward(grad, hidden, start, end, mode, w)

    c = lambda t: None if t is None else t.detach().cpu().double()  # noqa: E731
    ref = ref_pool.pool(c(hidden), start.cpu(), end.cpu(), mode, c(w))
    ref_gh, ref_gw = ref_pool.pool_backward(c(grad), c(hidden), start.cpu(), end.cpu(), mode, c(w))
    tol = TOL[dtype] * tol_scale
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out.cpu(), ref) <= tol, "forward"
    assert g_h.shape == hidden.shape and g_h.dtype == dtype
    assert rel_err(g_h.cpu(), ref_gh) <= tol, "grad_hidden"
    # zero outside the prompts, exactly
    assert torch.equal(g_h.cpu()[ref_gh == 0], torch.zeros_like(g_h.cpu()[ref_gh == 0]))
    if w is None:
        assert g_w.numel() == 0
    else:
        assert g_w.shape == w.shape and g_w.dtype == dtype
        assert rel_err(g_w.cpu(), ref_gw) <= tol, "grad_w_sa"
    return out, g_h, g_w


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def attn_w(B, d, per_row, dtype=torch.float32, seed=5):
    return randn(*((B, d) if per_row else (d,)), seed=seed, dtype=dtype) / math.sqrt(d)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_int32_ranges(mode, layout):
    B, T, d = 3, 6, 19
    hidden = randn(B, T, d)
    start = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([6, 4, 6], dtype=torch.int32, device=DEVICE)
    if layout == "packed":
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B, dtype=torch.int32, device=DEVICE) * T, end + torch.arange(
            B, dtype=torch.int32, device=DEVICE) * T
    out32 = check(hidden, start, end, mode, attn_w(B, d, True) if mode == "attn" else None)
    w = attn_w(B, d, True) if mode == "attn" else None
    out64 = ops.pool(hidden, start.long(), end.long(), mode, w)
    assert torch.equal(out32[0], out64)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_strided_inputs(mode):
    """Padded hidden with d not innermost, packed hidden with a row stride > d, strided w_sa."""
    B, T, d = 3, 5, 21
    hidden = randn(B, d, T, seed=1).transpose(1, 2)  # stride along d is T
    start, end = torch.tensor([0, 1, 4], device=DEVICE), torch.tensor([5, 3, 5], device=DEVICE)
    w = randn(d, B, seed=2).t() / math.sqrt(d) if mode == "attn" else None  # [B, d], strides (1, B)
    assert not hidden.is_contiguous()
    check(hidden, start, end, mode, w)
    packed = randn(9, 2 * d, seed=3)[:, :d]  # row stride 2d
    check(packed, torch.tensor([0, 3, 8], device=DEVICE), torch.tensor([3, 8, 9], device=DEVICE), mode,
          w if w is None else w[0])  # shared [d] w_sa, stride B


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_strided_range_tensors(mode, layout):
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
    check(hidden, start, end, mode, attn_w(B, d, True) if mode == "attn" else None)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_attn_expanded_w_sa(layout):
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
    check(hidden, start, end, "attn", w)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packed_overlapping_and_adjacent_ranges(mode, dtype):
    """Rows may share tokens (their gradients add up, as index_add does) or touch; some
    tokens belong to no row and must get a zero gradient."""
    total, d = 12, 37
    hidden = randn(total, d, seed=4, dtype=dtype)
    start = torch.tensor([0, 2, 2, 5, 5, 9, 11], device=DEVICE)
    end = torch.tensor([5, 7, 7, 9, 6, 10, 12], device=DEVICE)  # token 10 is in no prompt
    for per_row in (False, True):
        w = attn_w(7, d, per_row, dtype) if mode == "attn" else None
        check(hidden, start, end, mode, w)
        if mode != "attn":
            break


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_max_ties_go_to_the_first_token(layout):
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


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_matches_reference(case):
    B, T, d, dtype = case["B"], case["T"], case["d"], case["dtype"]
    hidden = randn(B, T, d, seed=case["seed"], dtype=dtype)
    start = torch.tensor([r[0] for r in case["ranges"]], dtype=case["index"], device=DEVICE)
    end = torch.tensor([r[1] for r in case["ranges"]], dtype=case["index"], device=DEVICE)
    if case["layout"] == "packed":  # rows' prompts at their padded offsets, the rest untouched
        shift = torch.arange(B, dtype=case["index"], device=DEVICE) * T
        hidden, start, end = hidden.reshape(B * T, d), start + shift, end + shift
    w = attn_w(B, d, case["per_row"], dtype, seed=case["seed"] + 1) if case["mode"] == "attn" else None
    check(hidden, start, end, case["mode"], w, tol_scale=4.0 if dtype in (torch.float16, torch.bfloat16) else 2.0)


class _PoisonTorch:
    """torch, except that ``empty`` returns memory full of NaN (floats) or -1 (ints)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -1)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_every_output_element_is_written(mode, monkeypatch):
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
            check(h, s, e, mode, attn_w(B, d, per_row, torch.bfloat16) if mode == "attn" else None)
            if mode != "attn":
                break


def test_empty_batch():
    hidden = randn(2, 3, 5)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert ops.pool(hidden.reshape(6, 5), empty, empty, "mean").shape == (0, 5)
    g_h, g_w = tpool().pool_backward(randn(0, 5), hidden.reshape(6, 5), empty, empty, "attn", randn(5))
    assert torch.equal(g_h, torch.zeros(6, 5, device=DEVICE)) and torch.equal(g_w, torch.zeros(5, device=DEVICE))


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_max_nan_like_torch(layout):
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
