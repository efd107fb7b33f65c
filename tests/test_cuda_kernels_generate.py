"""CUDA C++ ``para_cuda::generate`` / ``generate_backward`` (csrc/generate.cu) against the PyTorch
reference on fp64 copies: every activation, fp32 / fp16 / bf16 (and bf16 pooled with an fp32
bank), -1 rows, unused adapters, ranks around the 16-column chunk, odd and LLaMA-2-7B sizes,
uninitialised (NaN-poisoned) outputs, determinism, CUDA-graph replay and argument errors.
GPU only: skipped unless CUDA is available and the extension carries these kernels."""
import importlib
import math

import pytest
import torch

from para_kernels.ops.activations import ACTIVATIONS, RATIONAL_GELU_INIT

ref = importlib.import_module("para_kernels.ops.reference_ops.generate")


def _kernels_built() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("para_kernels.ops.cuda_ops")  # loads _C when it matches this torch
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"para_cuda::{op}", "CUDA")
                   for op in ("generate", "generate_backward"))
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _kernels_built(), reason="needs CUDA and the built para_cuda generate kernels")

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
NAMES = ("pooled", "w_down", "b_down", "w_up", "b_up")


def rel_err(out, expected):
    assert not torch.isnan(out).any(), "NaN in output"
    out, expected = out.double(), expected.double().to(out.device)
    return ((out - expected).norm() / expected.norm().clamp_min(1e-3)).item()


def make(B, d, r, N, A, dtype, activation, seed=0, bank_dtype=None):
    """Random inputs (never zeros): pooled in dtype, the bank in bank_dtype (default dtype)."""
    bank_dtype = bank_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0, dt=bank_dtype: (torch.randn(*s, generator=gen) * scale).to("cuda", dt)
    params = None
    if activation == "rational":
        params = (torch.tensor(RATIONAL_GELU_INIT).repeat(A, 1) + 0.05 * torch.randn(A, 10, generator=gen)).to("cuda",
                                                                                                      bank_dtype)
    return dict(pooled=t(B, d, dt=dtype), w_down=t(A, d, r, scale=1 / math.sqrt(max(d, 1))), b_down=t(A, r),
                w_up=t(A, r, N, scale=1 / math.sqrt(max(r, 1))), b_up=t(A, N), act_params=params)


def poison_allocator(nbytes=256 << 20):
    """Leave NaN in the caching allocator's free blocks, so that outputs and scratch the kernels
    fail to write (or read before writing) show up as NaN."""
    torch.cuda.synchronize()
    block = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del block
    for size in (1 << 10, 1 << 14, 1 << 18, 1 << 20):  # small-pool blocks too
        junk = [torch.full((size // 4,), float("nan"), device="cuda") for _ in range(8)]
        del junk


def cuda_fwd(bank, ids, activation):
    return torch.ops.para_cuda.generate(*(bank[k] for k in NAMES), ids, activation, bank["act_params"])


def cuda_bwd(grad, bank, ids, activation):
    return torch.ops.para_cuda.generate_backward(grad, *(bank[k] for k in NAMES), ids, activation, bank["act_params"])


def check(bank, ids, activation, tol_dtype=None, seed=1):
    """Forward and backward against the fp64 reference; returns (out, grads)."""
    dtype = bank["pooled"].dtype
    tol = TOL[tol_dtype or dtype]
    grad = torch.randn(ids.shape[0], bank["w_up"].shape[2], generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to("cuda", dtype)
    poison_allocator()
    out = cuda_fwd(bank, ids, activation)
    poison_allocator()
    grads = cuda_bwd(grad, bank, ids, activation)
    up = lambda t: None if t is None else t.double()
    args64, params64 = [up(bank[k]) for k in NAMES], up(bank["act_params"])
    ref_out = ref.generate(*args64, ids, activation, params64)
    ref_grads = ref.generate_backward(grad.double(), *args64, ids, activation, params64)

    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) <= tol
    assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"
    likes = [bank[k] for k in NAMES] + [bank["act_params"]]
    for name, g, g_ref, like in zip(NAMES + ("act_params",), grads, ref_grads, likes):
        if like is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert rel_err(g, g_ref) <= 2 * tol, name
    assert torch.all(grads[0][ids < 0] == 0), "rows with adapter -1 get no gradient"
    return out, grads


def mixed_ids(B, A, seed=3, dtype=torch.int64):
    ids = torch.randint(-1, A, (B,), generator=torch.Generator().manual_seed(seed))
    ids[0] = -1
    return ids.to("cuda", dtype)


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float64, None)],
                         ids=["fp32", "fp16", "bf16", "bf16-fp32bank", "fp16-fp32bank", "fp64"])
def test_matches_reference(activation, dtypes):
    dtype, bank_dtype = dtypes
    bank = make(45, 123, 12, 301, 6, dtype, activation, seed=2, bank_dtype=bank_dtype)
    ids = torch.tensor([-1 if i % 7 == 0 else (i * 3) % 4 for i in range(45)])  # adapters 4, 5 unused
    _, grads = check(bank, ids.to("cuda"), activation)
    for g in grads[1:]:
        if g.numel():
            assert torch.all(g[[4, 5]] == 0), "unused adapters get zero gradients"


@pytest.mark.parametrize("r", [1, 12, 16, 17, 33, 64])
@pytest.mark.parametrize("activation", ["gelu", "rational"])
def test_ranks_around_the_column_chunk(r, activation):
    bank = make(37, 70, r, 130, 3, torch.float32, activation, seed=r)
    check(bank, mixed_ids(37, 3, seed=r), activation)


@pytest.mark.parametrize("shape", [(1, 1, 3, 1, 1), (3, 3, 5, 7, 2), (5, 4097, 12, 131, 3), (33, 64, 12, 4099, 2),
                                   (1, 576, 12, 1536, 1), (300, 257, 12, 513, 9)],
                         ids=["tiny", "odd", "d4097", "N4099", "B1", "B300"])
def test_odd_sizes(shape):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, "silu", seed=B + d)
    ids = mixed_ids(B, A, seed=d) if B > 1 else torch.zeros(1, dtype=torch.long, device="cuda")
    check(bank, ids, "silu")


@pytest.mark.parametrize("shape", [(0, 5, 3, 7, 2), (4, 0, 3, 7, 2), (4, 5, 3, 0, 2), (4, 5, 0, 7, 2)],
                         ids=["B0", "d0", "N0", "r0"])
@pytest.mark.parametrize("activation", ["tanh", "rational"])
def test_empty_dimensions(shape, activation):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, activation)
    check(bank, torch.tensor([0, -1, 1, 1][:B], device="cuda"), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_llama2_7b_sizes(dtype):
    """d 4096, N = 4096 + 4096 + 11008 (q, v, up), r 12, 8 tenants, a decode batch of 32."""
    bank = make(32, 4096, 12, 19200, 8, dtype, "gelu", seed=4)
    check(bank, mixed_ids(32, 8, seed=5), "gelu")


def test_llama2_7b_rational_fp32_bank():
    bank = make(32, 4096, 12, 19200, 8, torch.bfloat16, "rational", seed=6, bank_dtype=torch.float32)
    check(bank, mixed_ids(32, 8, seed=7), "rational", tol_dtype=torch.bfloat16)


@pytest.mark.parametrize("sharing", ["all_rows_one", "one_row_each", "all_rows_none"])
def test_adapter_sharing_extremes(sharing):
    B, A = 70, {"all_rows_one": 3, "one_row_each": 70, "all_rows_none": 4}[sharing]
    bank = make(B, 50, 12, 90, A, torch.float32, "rational", seed=8)
    if sharing == "all_rows_one":
        ids = torch.full((B,), 1)
    elif sharing == "one_row_each":
        ids = torch.randperm(B, generator=torch.Generator().manual_seed(9))
    else:
        ids = torch.full((B,), -1)
    out, grads = check(bank, ids.to("cuda", torch.int32), "rational")
    if sharing == "all_rows_none":
        assert torch.all(out == 1)
        for g in grads:
            assert torch.all(g == 0)


def test_int32_and_int64_ids_agree():
    bank = make(40, 33, 12, 77, 5, torch.float32, "gelu", seed=10)
    ids = mixed_ids(40, 5, seed=11)
    out64, grads64 = check(bank, ids, "gelu")
    out32, grads32 = check(bank, ids.int(), "gelu")
    assert torch.equal(out64, out32)
    for a, b in zip(grads64, grads32):
        assert torch.equal(a, b)


def test_out_of_range_ids_read_nothing():
    """The op does not range-check ids (the Python layer does); the kernels treat them as -1."""
    bank = make(6, 16, 12, 40, 2, torch.float32, "relu", seed=12)
    ids = torch.tensor([0, 2, -5, 1, 1 << 40, -1], device="cuda")
    out = cuda_fwd(bank, ids, "relu")
    grads = cuda_bwd(torch.ones_like(out), bank, ids, "relu")
    bad = torch.tensor([False, True, True, False, True, True], device="cuda")
    assert torch.all(out[bad] == 1) and torch.all(grads[0][bad] == 0)
    clean = torch.where(bad, -1, ids)
    assert torch.equal(out, cuda_fwd(bank, clean, "relu"))


def test_backward_is_deterministic():
    bank = make(96, 1000, 12, 3000, 4, torch.float32, "rational", seed=13)
    ids = mixed_ids(96, 4, seed=14)
    grad = torch.randn(96, 3000, device="cuda")
    first = cuda_bwd(grad, bank, ids, "rational")
    second = cuda_bwd(grad, bank, ids, "rational")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(cuda_fwd(bank, ids, "rational"), cuda_fwd(bank, ids, "rational"))


def test_non_contiguous_inputs():
    bank = make(20, 30, 12, 50, 3, torch.float32, "gelu", seed=15)
    ids = mixed_ids(20, 3, seed=16)
    strided = dict(bank, pooled=torch.randn(30, 20, device="cuda").t(),
                   w_up=bank["w_up"].transpose(1, 2).contiguous().transpose(1, 2))
    check(strided, ids, "gelu")


def test_cuda_graph_replay():
    B, A = 24, 4
    bank = make(B, 512, 12, 2048, A, torch.bfloat16, "gelu", seed=17)
    ids = mixed_ids(B, A, seed=18)
    cuda_fwd(bank, ids, "gelu")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_fwd(bank, ids, "gelu")
    ids.copy_(mixed_ids(B, A, seed=19))  # new tenants, same graph
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.generate(*(bank[k].double() for k in NAMES), ids, "gelu")
    assert rel_err(out, expected) <= TOL[torch.bfloat16]
    assert torch.all(out[ids < 0] == 1)


# ------------------------------------------------------------------ argument errors
def _good(activation="gelu"):
    bank = make(4, 8, 3, 10, 2, torch.float32, activation)
    return bank, torch.tensor([0, 1, -1, 0], device="cuda")


def _call(bank, ids, activation="gelu", grad=None):
    if grad is None:
        return cuda_fwd(bank, ids, activation)
    return cuda_bwd(grad, bank, ids, activation)


@pytest.mark.parametrize("case, name", [
    ("pooled_int", "pooled"), ("pooled_cpu", "pooled"), ("pooled_1d", "pooled"),
    ("w_down_d", "w_down"), ("w_down_2d", "w_down"), ("w_down_fp16", "w_down"), ("w_down_cpu", "w_down"),
    ("b_down_shape", "b_down"), ("w_up_r", "w_up"), ("w_up_dtype", "w_up"), ("b_up_shape", "b_up"),
    ("b_up_cpu", "b_up"), ("ids_float", "adapter_ids"), ("ids_len", "adapter_ids"), ("ids_cpu", "adapter_ids"),
    ("activation", "activation"), ("params_missing", "act_params"), ("params_extra", "act_params"),
    ("params_shape", "act_params"), ("grad_shape", "grad"), ("grad_dtype", "grad"),
])
def test_errors_name_the_argument(case, name):
    activation = "rational" if case in ("params_missing", "params_shape") else "gelu"
    bank, ids = _good("rational" if case in ("params_extra", "params_shape") else "gelu")
    grad = None
    if case == "pooled_int":
        bank["pooled"] = bank["pooled"].int()
    elif case == "pooled_cpu":
        bank["pooled"] = bank["pooled"].cpu()
    elif case == "pooled_1d":
        bank["pooled"] = bank["pooled"][0]
    elif case == "w_down_d":
        bank["w_down"] = bank["w_down"][:, :5]
    elif case == "w_down_2d":
        bank["w_down"] = bank["w_down"][0]
    elif case == "w_down_fp16":
        bank["w_down"] = bank["w_down"].half()
    elif case == "w_down_cpu":
        bank["w_down"] = bank["w_down"].cpu()
    elif case == "b_down_shape":
        bank["b_down"] = bank["b_down"][:, :2]
    elif case == "w_up_r":
        bank["w_up"] = bank["w_up"][:, :2]
    elif case == "w_up_dtype":
        bank["w_up"] = bank["w_up"].double()
    elif case == "b_up_shape":
        bank["b_up"] = bank["b_up"][:1]
    elif case == "b_up_cpu":
        bank["b_up"] = bank["b_up"].cpu()
    elif case == "ids_float":
        ids = ids.float()
    elif case == "ids_len":
        ids = ids[:3]
    elif case == "ids_cpu":
        ids = ids.cpu()
    elif case == "activation":
        activation = "softplus"
    elif case == "params_missing":
        bank["act_params"] = None
    elif case == "params_shape":
        bank["act_params"] = bank["act_params"][:, :9]
    elif case == "grad_shape":
        grad = torch.ones(4, 9, device="cuda")
    elif case == "grad_dtype":
        grad = torch.ones(4, 10, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match=name):
        _call(bank, ids, activation, grad)
    if grad is None:  # the backward checks the same arguments
        with pytest.raises(RuntimeError, match=name):
            _call(bank, ids, activation, torch.ones(4, 10, device="cuda"))
