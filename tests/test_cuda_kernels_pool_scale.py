"""The CUDA C++ pool and scale kernels (csrc/pool.cu, csrc/scale.cu), called directly as
torch.ops.para_cuda.*, against the PyTorch reference computed in fp64: every pool mode,
fp32 / fp16 / bf16 (and fp64), padded and packed (overlapping ranges), odd sizes, prompt
length 1 and = T, misaligned views (the scalar path), int32 / int64 indices, the chunked
scale backward, and the wrappers' argument checks. GPU only: skipped unless CUDA is available
and the extension registered CUDA kernels for these ops.
"""
import importlib
import math

import pytest
import torch

try:  # importing the package loads the compiled extension, when there is one
    import para_kernels  # noqa: F401
except Exception:  # pragma: no cover - the skip below reports it
    pass

ref_pool = importlib.import_module("para_kernels.ops.reference_ops.pool")
ref_scale = importlib.import_module("para_kernels.ops.reference_ops.scale")


def _has_cuda_kernel(op: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"para_cuda::{op}", "CUDA")
    except RuntimeError:  # no such op
        return False


OPS = ("pool", "pool_backward", "scale", "scale_backward")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not all(_has_cuda_kernel(op) for op in OPS),
    reason="needs a GPU and the para_cuda extension with CUDA pool / scale kernels")

DEV = "cuda"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["last", "mean", "max", "attn"]


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output (an element never written?)"
    ref = ref.double().cpu()
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def poison():
    """Fill the allocator's free blocks with NaN, so outputs that skip elements show up."""
    junk = torch.full((64 << 20,), float("nan"), device=DEV)  # 256 MB
    del junk


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def misaligned(t):
    """t's values in a view that starts one element into its storage (rows misaligned too)."""
    base = torch.empty(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    view = base[..., 1:]
    view.copy_(t)
    return view


def c64(t):
    return None if t is None else t.detach().cpu().double()


# ------------------------------------------------------------------ pool
def ranges(B, T, seed):
    """Prompt ranges with lengths 1 and T among random ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    start = torch.stack([torch.randint(0, T - int(n) + 1, (1,), generator=g)[0] for n in lengths])
    return start, start + lengths


def check_pool(hidden, start, end, mode, w, tol):
    """Forward and backward of the kernels against the fp64 reference."""
    B, d = start.shape[0], hidden.shape[-1]
    grad = randn(B, d, dtype=hidden.dtype, seed=3)
    poison()
    out = torch.ops.para_cuda.pool(hidden, start, end, mode, w)
    poison()
    g_h, g_w = torch.ops.para_cuda.pool_backward(grad, hidden, start, end, mode, w)
    torch.cuda.synchronize()
    ref = ref_pool.pool(c64(hidden), start.cpu(), end.cpu(), mode, c64(w))
    ref_gh, ref_gw = ref_pool.pool_backward(c64(grad), c64(hidden), start.cpu(), end.cpu(), mode, c64(w))
    assert out.shape == (B, d) and out.dtype == hidden.dtype
    assert rel_err(out, ref) <= tol, "pool"
    assert g_h.shape == hidden.shape and g_h.dtype == hidden.dtype
    assert rel_err(g_h, ref_gh) <= tol, "grad_hidden"
    outside = ref_gh == 0  # exact zeros where no prompt reaches (mean / attn may round to 0 too)
    if mode in ("last", "max"):
        assert torch.equal(g_h.cpu().double()[outside], ref_gh[outside])
    if w is None:
        assert g_w.numel() == 0
    else:
        assert g_w.shape == w.shape and g_w.dtype == w.dtype
        assert rel_err(g_w, ref_gw) <= tol, "grad_w_sa"


SHAPES = [(1, 1, 1), (5, 7, 37), (130, 3, 577), (2, 9, 4097), (5, 33, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,d", SHAPES)
def test_pool_padded(B, T, d, mode, dtype):
    hidden = randn(B, T, d, dtype=dtype, seed=B + T + d)
    start, end = ranges(B, T, seed=d)
    w = randn(d, dtype=dtype, seed=7) / math.sqrt(d) if mode == "attn" else None
    check_pool(hidden, start.to(DEV), end.to(DEV), mode, w, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,T,d", SHAPES)
def test_pool_packed_overlapping(B, T, d, mode, dtype):
    """Packed [total, d] with ranges that may overlap or touch: gradients sum."""
    total = B * T
    hidden = randn(total, d, dtype=dtype, seed=total + d)
    g = torch.Generator().manual_seed(d)
    a = torch.randint(0, total, (B,), generator=g)
    b = torch.randint(0, total, (B,), generator=g)
    start, end = torch.minimum(a, b), torch.maximum(a, b) + 1
    start[0], end[0] = 0, total  # one prompt over everything
    w = randn(B, d, dtype=dtype, seed=8) / math.sqrt(d) if mode == "attn" else None
    check_pool(hidden, start.to(DEV, torch.int32), end.to(DEV, torch.int32), mode, w, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_pool_misaligned_and_strided(mode, dtype, packed):
    """Views that start off a 16-byte boundary, and feature strides != 1: the scalar path."""
    B, T, d = 5, 6, 37 if dtype != torch.float64 else 9
    hidden = randn(B, T, d, dtype=dtype, seed=1)
    start, end = ranges(B, T, seed=2)
    if packed:
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B) * T, end + torch.arange(B) * T
    w = randn(B, d, dtype=dtype, seed=4) / math.sqrt(d) if mode == "attn" else None
    s64, e64 = start.to(DEV), end.to(DEV)
    check_pool(misaligned(hidden), s64, e64, mode, None if w is None else misaligned(w), TOL[dtype])
    strided = hidden.transpose(-1, -2).contiguous().transpose(-1, -2)  # feature stride = tokens
    check_pool(strided, s64, e64, mode, w, TOL[dtype])


@pytest.mark.parametrize("mode", ["max"])
def test_pool_max_ties_and_nan(mode):
    """Ties give the gradient to the first maximal token; NaN propagates, as in torch."""
    hidden = torch.tensor([[[1.0, 2.0], [1.0, 5.0], [1.0, 5.0]]], device=DEV)
    start, end = torch.tensor([0], device=DEV), torch.tensor([3], device=DEV)
    grad = torch.tensor([[10.0, 20.0]], device=DEV)
    g_h, _ = torch.ops.para_cuda.pool_backward(grad, hidden, start, end, mode, None)
    assert g_h.cpu().tolist() == [[[10.0, 0.0], [0.0, 20.0], [0.0, 0.0]]]
    hidden[0, 1, 0] = float("nan")
    out = torch.ops.para_cuda.pool(hidden, start, end, mode, None)
    assert math.isnan(out[0, 0].item()) and out[0, 1].item() == 5.0


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pool_attn_expanded_w_sa(packed, dtype):
    """w_sa [B, d] expanded from one [d] row (row stride 0): the gradient is [B, d] and every one
    of its B * d elements is written (a stride test once took it for a shared [d] w_sa and wrote
    only d of them, leaving the rest uninitialised; check_pool poisons the allocator first)."""
    B, T, d = 6, 5, 37
    hidden = randn(B, T, d, dtype=dtype, seed=12)
    start, end = ranges(B, T, seed=13)
    if packed:
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B) * T, end + torch.arange(B) * T
    w = (randn(d, dtype=dtype, seed=14) / math.sqrt(d)).expand(B, d)
    assert w.stride(0) == 0
    check_pool(hidden, start.to(DEV), end.to(DEV), "attn", w, TOL[dtype])


@pytest.mark.parametrize("mode", MODES)
def test_pool_strided_range_tensors(mode):
    """prompt_start / prompt_end as columns of a [B, 2] table (stride 2)."""
    B, T, d = 5, 6, 37
    hidden = randn(B, T, d, seed=15)
    start, end = ranges(B, T, seed=16)
    table = torch.stack([start, end], 1).to(DEV)
    w = randn(B, d, seed=17) / math.sqrt(d) if mode == "attn" else None
    check_pool(hidden, table[:, 0], table[:, 1], mode, w, TOL[torch.float32])


def test_pool_attn_long_prompt_fp32():
    """Many token tiles (online softmax rescaling) and a shared w_sa summed over 130 rows."""
    B, T, d = 130, 70, 96
    hidden = randn(B, T, d, seed=9) * 3
    start, end = ranges(B, T, seed=10)
    w = randn(d, seed=11)
    check_pool(hidden, start.to(DEV), end.to(DEV), "attn", w, TOL[torch.float32])


def test_pool_empty_batch():
    hidden = randn(0, 4, 8)
    idx = torch.zeros(0, dtype=torch.long, device=DEV)
    assert torch.ops.para_cuda.pool(hidden, idx, idx, "mean", None).shape == (0, 8)
    g_h, g_w = torch.ops.para_cuda.pool_backward(randn(0, 8), hidden, idx, idx, "mean", None)
    assert g_h.shape == hidden.shape and g_w.numel() == 0


# ------------------------------------------------------------------ scale
def check_scale(x, v, rows, tol, grad=None):
    grad = randn(*x.shape, dtype=x.dtype, seed=5) if grad is None else grad
    poison()
    out = torch.ops.para_cuda.scale(x, v, rows)
    poison()
    gx, gv = torch.ops.para_cuda.scale_backward(grad, x, v, rows)
    torch.cuda.synchronize()
    rows_c = None if rows is None else rows.cpu()
    ref = ref_scale.scale(c64(x), c64(v), rows_c)
    ref_gx, ref_gv = ref_scale.scale_backward(c64(grad), c64(x), c64(v), rows_c)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= tol
    # one product rounded once, as PyTorch's own x * v: bitwise equal
    eager = x * (v[rows.long()] if rows is not None else v.reshape(v.shape[0], *([1] * (x.dim() - 2)), -1))
    assert torch.equal(out, eager)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert rel_err(gx, ref_gx) <= tol, "grad_x"
    assert gv.shape == v.shape and gv.dtype == v.dtype
    assert rel_err(gv, ref_gv) <= tol, "grad_v"
    return gv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 577, 4097])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 3), (130, 1), (130, 7)])
def test_scale_padded(B, T, n, dtype):
    x = randn(B, T, n, dtype=dtype, seed=B * T + n)
    v = 1 + randn(B, n, dtype=dtype, seed=n) * 0.1
    check_scale(x, v, None, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 37, 577, 4097])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_scale_packed(n, dtype, index_dtype):
    """Rows in runs (the usual packed layout) and a shuffled tail (rows revisited)."""
    B, g = 5, torch.Generator().manual_seed(n)
    lengths = torch.randint(1, 40, (B,), generator=g)
    runs = torch.repeat_interleave(torch.arange(B), lengths)
    rows = torch.cat([runs, torch.randint(0, B, (23,), generator=g)])
    x = randn(rows.shape[0], n, dtype=dtype, seed=n + 1)
    v = 1 + randn(B, n, dtype=dtype, seed=n + 2) * 0.1
    check_scale(x, v, rows.to(DEV, index_dtype), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_scale_layouts(dtype):
    """4-D x, misaligned x and v (scalar path), a column slice of v, unmergeable middle dims."""
    B, H, T, n = 3, 4, 5, 37
    tol = TOL[dtype]
    x = randn(B, H, T, n, dtype=dtype, seed=1)
    v = randn(B, n, dtype=dtype, seed=2)
    check_scale(x, v, None, tol)
    check_scale(misaligned(x), misaligned(v), None, tol)
    wide = randn(B, 3 * n, dtype=dtype, seed=3)
    check_scale(x, wide[:, n:2 * n], None, tol)
    check_scale(x.transpose(1, 2), v, None, tol)  # [B, T, H, n] view: middle dims do not merge
    check_scale(x[:, :, :, ::2], v[:, ::2], None, tol)  # feature stride 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_backward_chunked_deterministic(dtype):
    """Long rows are cut into chunks summed in a fixed order: bitwise repeatable grad_v."""
    B, T, n = 2, 5000, 64
    x = randn(B, T, n, dtype=dtype, seed=4)
    v = randn(B, n, dtype=dtype, seed=5)
    grad = randn(B, T, n, dtype=dtype, seed=6)
    gv = check_scale(x, v, None, TOL[dtype], grad=grad)
    for _ in range(3):
        assert torch.equal(torch.ops.para_cuda.scale_backward(grad, x, v, None)[1], gv)


def test_scale_empty():
    x, v = randn(2, 0, 8), randn(2, 8)
    assert torch.ops.para_cuda.scale(x, v, None).shape == x.shape
    gx, gv = torch.ops.para_cuda.scale_backward(x, x, v, None)
    assert gx.shape == x.shape and torch.equal(gv, torch.zeros_like(v))


# ------------------------------------------------------------------ argument checks
def names(arg):
    """A TORCH_CHECK message that names the argument: '<arg> must ...', '<arg> has ...', '<arg> is ...'."""
    return rf"\b{arg} (must|has|is)\b"


def _pool_args():
    hidden = randn(2, 5, 8)
    start = torch.tensor([0, 1], device=DEV)
    end = torch.tensor([5, 3], device=DEV)
    return hidden, start, end


@pytest.mark.parametrize("case,name", [
    ("hidden_int", "hidden"), ("hidden_1d", "hidden"), ("start_float", "prompt_start"),
    ("start_shape", "prompt_start"), ("end_cpu", "prompt_end"), ("bad_mode", "mode"),
    ("w_missing", "w_sa"), ("w_shape", "w_sa"), ("w_dtype", "w_sa")])
def test_pool_errors(case, name):
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
    with pytest.raises(RuntimeError, match=names(name)):
        torch.ops.para_cuda.pool(hidden, start, end, mode, w)


def test_pool_backward_grad_errors():
    hidden, start, end = _pool_args()
    with pytest.raises(RuntimeError, match=names("grad")):
        torch.ops.para_cuda.pool_backward(randn(2, 9), hidden, start, end, "mean", None)
    with pytest.raises(RuntimeError, match=names("grad")):
        torch.ops.para_cuda.pool_backward(randn(2, 8, dtype=torch.float16), hidden, start, end, "mean", None)


@pytest.mark.parametrize("case,name", [
    ("x_int", "x"), ("v_dtype", "v"), ("v_1d", "v"), ("x_features", "x"), ("x_rows", "x"),
    ("rows_float", "token_rows"), ("rows_shape", "token_rows"), ("rows_cpu", "token_rows"),
    ("packed_3d", "x")])
def test_scale_errors(case, name):
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
        rows = torch.zeros(3, dtype=torch.long, device=DEV)
    else:
        x = randn(12, 8)
        rows = torch.zeros(12, dtype=torch.long, device=DEV)
        if case == "rows_float":
            rows = rows.float()
        elif case == "rows_shape":
            rows = rows[:5]
        elif case == "rows_cpu":
            rows = rows.cpu()
    with pytest.raises(RuntimeError, match=names(name)):
        torch.ops.para_cuda.scale(x, v, rows)


def test_scale_backward_grad_errors():
    x, v = randn(3, 4, 8), randn(3, 8)
    with pytest.raises(RuntimeError, match=names("grad")):
        torch.ops.para_cuda.scale_backward(randn(3, 4, 7), x, v, None)
