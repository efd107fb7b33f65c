"""The generate op (docs/spec.md §1: v = 1 + act(pooled W_down + b_down) W_up + b_up per row, with
the row's adapter; rows with adapter -1 get exactly 1): the fp64-oracle grid on every backend,
backward, gradcheck / opcheck, the activations, then each backend's own kernels (Triton, CUDA C++)
forward and backward against the reference in fp64: int32 ids, adapter sharing extremes, all rows
-1, empty dimensions, ranks around tile sizes, every loop and tail (small forced tiles), poisoned
outputs, determinism, a property test, (GPU only) no host sync and CUDA-graph replay, argument checks.
On a CPU host the Triton kernels run in Triton's interpreter."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
from para_kernels import ops
from para_kernels.ops.activations import ACTIVATIONS, RATIONAL_GELU_INIT, activation_backward, activation_forward

from kit import (
    DEVICE,
    DTYPES,
    TOL,
    adapter_bank,
    adapter_ids,
    bank_weights,
    cuda_kernels_built,
    f64,
    grads,
    oracles,
    poison_cuda_allocator,
    rel_err,
    triton_runs,
)
from kit.checks import GENERATE_ARGS as NAMES
from kit.checks import check_generate, run_generate

ref_generate = importlib.import_module("para_kernels.ops.reference_ops.generate")
tri = importlib.import_module("para_kernels.ops.triton_ops.generate") if triton_runs() else None  # Triton kernels

needs_triton = pytest.mark.skipif(tri is None, reason="the Triton backend cannot run here")
needs_cuda = pytest.mark.skipif(not cuda_kernels_built("generate", "generate_backward"),
                                reason="needs CUDA and the built para_cuda generate kernels")


def make(B, d, r, N, A, dtype, activation, seed=0, bank_dtype=None):
    """pooled [B, d] in dtype and a bank of A adapters in bank_dtype (default dtype), on DEVICE."""
    return adapter_bank(torch.Generator().manual_seed(seed), A, d, r, N, DEVICE, bank_dtype or dtype, activation,
                        batch=B, pooled_dtype=dtype)


# ------------------------------------------------------------------ every backend: the fp64 oracle
GEN_SHAPES = [  # B, d, r, N, A
    (1, 1, 1, 1, 1), (5, 3, 2, 7, 2), (150, 17, 12, 33, 4), (4, 576, 12, 576 + 192 + 1536, 3),
    (3, 4096, 12, 4096 + 4096 + 11008, 2),
]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,d,r,N,A", GEN_SHAPES)
def test_generate_matches_oracle(device_backend, activation, dtype, B, d, r, N, A):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(B + d + r + N + A)
    pooled = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, params = bank_weights(adapter_bank(gen, A, d, r, N, device, dtype, activation))
    for ids in (adapter_ids(gen, B, A, device), torch.zeros(B, dtype=torch.long, device=device)):
        out = ops.generate(pooled, wd, bd, wu, bu, ids, activation, params)
        ref = oracles.generate(*(t.cpu() for t in (pooled, wd, bd, wu, bu, ids)), activation,
                               None if params is None else params.cpu())
        assert out.shape == (B, N) and out.dtype == dtype
        assert rel_err(out.cpu(), ref) <= TOL[dtype]
        assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generate_backward_matches_oracle(device_backend, activation, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(5)
    B, d, r, N, A = 9, 23, 5, 31, 3
    pooled = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, params = bank_weights(adapter_bank(gen, A, d, r, N, device, dtype, activation))
    ids = adapter_ids(gen, B, A, device)
    ours = grads(lambda *t: ops.generate(*t[:5], ids, activation, t[5]), [pooled, wd, bd, wu, bu, params])
    ref = grads(lambda *t: oracles.generate(*t[:5], ids.cpu(), activation, t[5]),
                [t.cpu().double() if t is not None else None for t in (pooled, wd, bd, wu, bu, params)])
    for a, b in zip(ours, ref):
        # bf16 weight gradients sum many rounded products: one bf16 ulp more than the forward bar
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2
    assert torch.all(ours[0][ids < 0] == 0), "rows with adapter -1 get no gradient"


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_generate_gradcheck_and_opcheck(activation):
    B, d, r, N, A = 4, 3, 2, 5, 2
    pooled = f64(B, d, seed=1)
    wd, bd, wu, bu = f64(A, d, r, seed=2), f64(A, r, seed=3), f64(A, r, N, seed=4), f64(A, N, seed=5)
    params = (torch.tensor([RATIONAL_GELU_INIT] * A, dtype=torch.float64) + 0.05 * f64(A, 10, seed=6)
              if activation == "rational" else None)
    ids = torch.tensor([1, -1, 1, 0])
    inputs = [t.requires_grad_() if t is not None else None for t in (pooled, wd, bd, wu, bu, params)]
    assert torch.autograd.gradcheck(lambda *t: ops.generate(*t[:5], ids, activation, t[5]), inputs)
    torch.library.opcheck(torch.ops.para.generate.default, (*inputs[:5], ids, activation, inputs[5]))


# ------------------------------------------------------------------ activations
def test_rational_init_approximates_gelu():
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)
    approx = oracles.rational(x, torch.tensor(RATIONAL_GELU_INIT, dtype=torch.float64))
    assert (approx - torch.nn.functional.gelu(x)).abs().max() < 6.5e-3


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_backward_formula(activation):
    x = f64(7, 5, seed=9).requires_grad_()
    params = (torch.tensor(RATIONAL_GELU_INIT, dtype=torch.float64) + 0.05 * f64(10, seed=4)).requires_grad_() \
        if activation == "rational" else None
    g = f64(7, 5, seed=10)
    (activation_forward(x, activation, params) * g).sum().backward()
    gx, gp = activation_backward(x.detach(), activation, None if params is None else params.detach(), g)
    torch.testing.assert_close(gx, x.grad)
    if params is not None:
        torch.testing.assert_close(gp, params.grad)


# ------------------------------------------------------------------ Triton kernels
# Tiles at tl.dot's minimum and a 3-way d split: several row blocks, N tiles, d tiles and
# splits, with ragged tails, on shapes small enough for the interpreter.
SMALL_TILES = dict(block_b_down=16, block_d_down=16, splits=3, block_b_up=16, block_n_up=16,
                   block_b_bwd=16, block_n_bwd=16, block_d_bwd=16)


def triton_run_both(bank, ids, activation, grad=None):
    """(forward, backward) of triton and of the reference on fp64 copies of the inputs."""
    return run_generate(tri.generate, tri.generate_backward, bank, ids, activation, grad)


def triton_check(bank, ids, activation, dtype, grad=None):
    return check_generate(tri.generate, tri.generate_backward, bank, ids, activation, TOL[dtype], grad=grad)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", SMALL_TILES)


@needs_triton
def test_triton_int32_and_int64_ids_agree(small_tiles):
    bank = make(21, 24, 12, 30, 5, torch.float32, "gelu")
    ids = torch.tensor([(i * 7) % 6 - 1 for i in range(21)], device=DEVICE)  # -1..4, mixed
    out64, grads64 = triton_check(bank, ids, "gelu", torch.float32)
    out32, grads32 = triton_check(bank, ids.int(), "gelu", torch.float32)
    assert torch.equal(out64, out32)
    for a, b in zip(grads64, grads32):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("sharing", ["one_row_each", "all_rows_one", "unused_adapters"])
def test_triton_adapter_sharing_extremes(small_tiles, sharing):
    activation = "rational"  # the most per-adapter state: its coefficients' gradient too
    B, A = 20, {"one_row_each": 20, "all_rows_one": 3, "unused_adapters": 7}[sharing]
    bank = make(B, 20, 5, 20, A, torch.float32, activation, seed=2)
    if sharing == "one_row_each":  # every adapter used by exactly one row, scattered
        ids = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    elif sharing == "all_rows_one":  # one adapter used by all rows, spanning row blocks
        ids = torch.full((B,), 1)
    else:  # adapters 0, 2, 5 unused: their gradients must be (written) zeros
        ids = torch.tensor([1, 3, 4, 6, -1] * 4)
    _, grads = triton_check(bank, ids.to(DEVICE, torch.int32), activation, torch.float32)
    if sharing == "unused_adapters":
        for g in grads[1:]:
            assert torch.all(g[[0, 2, 5]] == 0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_all_rows_without_adapter(small_tiles, dtype):
    bank = make(19, 21, 3, 35, 2, dtype, "tanh")
    ids = torch.full((19,), -1, device=DEVICE, dtype=torch.int32)
    (out, grads), _ = triton_run_both(bank, ids, "tanh")
    assert torch.all(out == 1) and out.dtype == dtype
    for g in grads:
        assert torch.all(g == 0)


@needs_triton
def test_triton_no_adapters_in_bank():
    """A = 0 is legal when every row is -1."""
    bank = make(3, 4, 2, 5, 0, torch.float32, "relu")
    ids = torch.full((3,), -1, device=DEVICE)
    (out, grads), _ = triton_run_both(bank, ids, "relu")
    assert torch.all(out == 1) and torch.all(grads[0] == 0)
    assert [tuple(g.shape) for g in grads[1:5]] == [(0, 4, 2), (0, 2), (0, 2, 5), (0, 5)]


@needs_triton
@pytest.mark.parametrize("shape", [(0, 5, 3, 7, 2), (4, 0, 3, 7, 2), (4, 5, 3, 0, 2)])
def test_triton_empty_dimensions(shape):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, "gelu")
    ids = torch.tensor([0, -1, 1, 1][:B], device=DEVICE, dtype=torch.long)
    triton_check(bank, ids, "gelu", torch.float32)


@needs_triton
@pytest.mark.parametrize("r", [1, 16, 17, 64])
def test_triton_ranks_around_tile_sizes(small_tiles, r):
    bank = make(18, 19, r, 23, 3, torch.float32, "rational", seed=r)
    ids = torch.tensor([0, 1, 2, -1, 2, 2] * 3, device=DEVICE)
    triton_check(bank, ids, "rational", torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_triton_dtypes_with_small_tiles(small_tiles, dtype):
    bank = make(21, 20, 12, 24, 3, dtype, "gelu", seed=4)
    ids = torch.tensor([2, -1, 0, 1, 1, 2, 0] * 3, device=DEVICE)
    triton_check(bank, ids, "gelu", dtype)


@needs_triton
def test_triton_every_output_element_is_written(monkeypatch):
    """Outputs and scratch buffers start as NaN: any element a kernel skips, or any scratch
    element read before it is written (e.g. dz partials of -1 rows), shows up as NaN."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tri, "empty_buffer", poisoned)
    ids = torch.tensor([3, -1, 0, 0, -1, 3, 1] * 3, device=DEVICE)  # adapters 2, 4 unused
    for override in (None, SMALL_TILES):
        monkeypatch.setattr(tri, "CONFIG_OVERRIDE", override)
        for activation in ("gelu", "rational"):
            bank = make(21, 20, 12, 24, 5, torch.float32, activation, seed=5)
            triton_check(bank, ids, activation, torch.float32)


@needs_triton
def test_triton_backward_is_deterministic(small_tiles):
    bank = make(24, 20, 12, 24, 3, torch.float32, "rational", seed=6)
    ids = torch.randint(-1, 3, (24,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    (_, first), _ = triton_run_both(bank, ids, "rational")
    (_, second), _ = triton_run_both(bank, ids, "rational")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_triton_through_the_op_and_autograd(small_tiles):
    """The registered op dispatches here and its autograd matches the fp64 oracle."""
    ops.set_backend("triton")
    try:
        bank = make(17, 9, 4, 20, 3, torch.float32, "silu", seed=8)
        ids = torch.tensor([0, 2, -1, 1] * 4 + [2], device=DEVICE, dtype=torch.int32)
        assert ops.backend_for("generate", torch.device(DEVICE)) == "triton"
        leaves = [bank[k].detach().requires_grad_() for k in ("pooled", "w_down", "b_down", "w_up", "b_up")]
        out = ops.generate(*leaves, ids, "silu")
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
        (out * g).sum().backward()
        leaves64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
        ref_out = oracles.generate(*leaves64, ids.cpu(), "silu")
        (ref_out * g.double().cpu()).sum().backward()
        assert rel_err(out, ref_out.detach(), floor=1e-3) <= 1e-5
        for t, t64 in zip(leaves, leaves64):
            assert rel_err(t.grad, t64.grad, floor=1e-3) <= 2e-5
    finally:
        ops.set_backend(None)


# ------------------------------------------------------------------ property test
@st.composite
def cases(draw):
    B = draw(st.integers(1, 24))
    A = draw(st.integers(1, 5))
    ids = draw(st.lists(st.integers(-1, A - 1), min_size=B, max_size=B))
    return dict(B=B, d=draw(st.integers(1, 24)), r=draw(st.integers(1, 20)), N=draw(st.integers(1, 24)), A=A,
                ids=ids, id_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                activation=draw(st.sampled_from(ACTIVATIONS)),
                dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
                tiles=draw(st.sampled_from([None, SMALL_TILES, dict(SMALL_TILES, splits=1, block_b_up=32)])),
                seed=draw(st.integers(0, 2**31 - 1)))


@needs_triton
@settings(max_examples=25, deadline=None)
@given(cases())
def test_triton_property_matches_reference(case):
    tri.CONFIG_OVERRIDE = case["tiles"]  # not a fixture: hypothesis re-runs the body per example
    try:
        bank = make(case["B"], case["d"], case["r"], case["N"], case["A"], case["dtype"], case["activation"],
                    seed=case["seed"])
        ids = torch.tensor(case["ids"], dtype=case["id_dtype"], device=DEVICE)
        triton_check(bank, ids, case["activation"], case["dtype"])
    finally:
        tri.CONFIG_OVERRIDE = None


# ------------------------------------------------------------------ GPU only
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 16, 200])
def test_triton_no_host_sync_and_cuda_graph_replay(B):
    A, d, r, N = 4, 4096, 12, 19200
    bank = make(B, d, r, N, A, torch.bfloat16, "gelu", seed=10)
    args = [bank[k] for k in ("pooled", "w_down", "b_down", "w_up", "b_up")]
    ids = torch.randint(-1, A, (B,), generator=torch.Generator().manual_seed(11)).cuda()
    tri.generate(*args, ids, "gelu")  # autotune outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tri.generate(*args, ids, "gelu")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tri.generate(*args, ids, "gelu")
    ids.copy_(torch.randint(-1, A, (B,), generator=torch.Generator().manual_seed(12)))  # new tenants, same graph
    graph.replay()
    torch.cuda.synchronize()
    expected = oracles.generate(*(t.cpu() for t in args), ids.cpu(), "gelu")
    assert rel_err(out, expected, floor=1e-3) <= TOL[torch.bfloat16]
    assert torch.all(out[ids < 0] == 1)


# ------------------------------------------------------------------ CUDA C++ kernels (torch.ops.para_cuda)
def cuda_fwd(bank, ids, activation):
    return torch.ops.para_cuda.generate(*(bank[k] for k in NAMES), ids, activation, bank["act_params"])


def cuda_bwd(grad, bank, ids, activation):
    return torch.ops.para_cuda.generate_backward(grad, *(bank[k] for k in NAMES), ids, activation, bank["act_params"])


def cuda_check(bank, ids, activation, tol_dtype=None, seed=1):
    """Forward and backward, each on a NaN-poisoned allocator, against the fp64 reference; returns (out, grads)."""
    return check_generate(torch.ops.para_cuda.generate, torch.ops.para_cuda.generate_backward, bank, ids, activation,
                          TOL[tol_dtype or bank["pooled"].dtype], grad_seed=seed, before=poison_cuda_allocator)


def mixed_ids(B, A, seed=3, dtype=torch.int64):
    ids = torch.randint(-1, A, (B,), generator=torch.Generator().manual_seed(seed))
    ids[0] = -1
    return ids.to("cuda", dtype)


@needs_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float64, None)],
                         ids=["fp32", "fp16", "bf16", "bf16-fp32bank", "fp16-fp32bank", "fp64"])
def test_cuda_matches_reference(activation, dtypes):
    dtype, bank_dtype = dtypes
    bank = make(45, 123, 12, 301, 6, dtype, activation, seed=2, bank_dtype=bank_dtype)
    ids = torch.tensor([-1 if i % 7 == 0 else (i * 3) % 4 for i in range(45)])  # adapters 4, 5 unused
    _, grads = cuda_check(bank, ids.to("cuda"), activation)
    for g in grads[1:]:
        if g.numel():
            assert torch.all(g[[4, 5]] == 0), "unused adapters get zero gradients"


@needs_cuda
@pytest.mark.parametrize("r", [1, 12, 16, 17, 33, 64])
@pytest.mark.parametrize("activation", ["gelu", "rational"])
def test_cuda_ranks_around_the_column_chunk(r, activation):
    bank = make(37, 70, r, 130, 3, torch.float32, activation, seed=r)
    cuda_check(bank, mixed_ids(37, 3, seed=r), activation)


@needs_cuda
@pytest.mark.parametrize("shape", [(1, 1, 3, 1, 1), (3, 3, 5, 7, 2), (5, 4097, 12, 131, 3), (33, 64, 12, 4099, 2),
                                   (1, 576, 12, 1536, 1), (300, 257, 12, 513, 9)],
                         ids=["tiny", "odd", "d4097", "N4099", "B1", "B300"])
def test_cuda_odd_sizes(shape):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, "silu", seed=B + d)
    ids = mixed_ids(B, A, seed=d) if B > 1 else torch.zeros(1, dtype=torch.long, device="cuda")
    cuda_check(bank, ids, "silu")


@needs_cuda
@pytest.mark.parametrize("shape", [(0, 5, 3, 7, 2), (4, 0, 3, 7, 2), (4, 5, 3, 0, 2), (4, 5, 0, 7, 2)],
                         ids=["B0", "d0", "N0", "r0"])
@pytest.mark.parametrize("activation", ["tanh", "rational"])
def test_cuda_empty_dimensions(shape, activation):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, activation)
    cuda_check(bank, torch.tensor([0, -1, 1, 1][:B], device="cuda"), activation)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_llama2_7b_sizes(dtype):
    """d 4096, N = 4096 + 4096 + 11008 (q, v, up), r 12, 8 tenants, a decode batch of 32."""
    bank = make(32, 4096, 12, 19200, 8, dtype, "gelu", seed=4)
    cuda_check(bank, mixed_ids(32, 8, seed=5), "gelu")


@needs_cuda
def test_cuda_llama2_7b_rational_fp32_bank():
    bank = make(32, 4096, 12, 19200, 8, torch.bfloat16, "rational", seed=6, bank_dtype=torch.float32)
    cuda_check(bank, mixed_ids(32, 8, seed=7), "rational", tol_dtype=torch.bfloat16)


@needs_cuda
@pytest.mark.parametrize("sharing", ["all_rows_one", "one_row_each", "all_rows_none"])
def test_cuda_adapter_sharing_extremes(sharing):
    B, A = 70, {"all_rows_one": 3, "one_row_each": 70, "all_rows_none": 4}[sharing]
    bank = make(B, 50, 12, 90, A, torch.float32, "rational", seed=8)
    if sharing == "all_rows_one":
        ids = torch.full((B,), 1)
    elif sharing == "one_row_each":
        ids = torch.randperm(B, generator=torch.Generator().manual_seed(9))
    else:
        ids = torch.full((B,), -1)
    out, grads = cuda_check(bank, ids.to("cuda", torch.int32), "rational")
    if sharing == "all_rows_none":
        assert torch.all(out == 1)
        for g in grads:
            assert torch.all(g == 0)


@needs_cuda
def test_cuda_int32_and_int64_ids_agree():
    bank = make(40, 33, 12, 77, 5, torch.float32, "gelu", seed=10)
    ids = mixed_ids(40, 5, seed=11)
    out64, grads64 = cuda_check(bank, ids, "gelu")
    out32, grads32 = cuda_check(bank, ids.int(), "gelu")
    assert torch.equal(out64, out32)
    for a, b in zip(grads64, grads32):
        assert torch.equal(a, b)


@needs_cuda
def test_cuda_out_of_range_ids_read_nothing():
    """The op does not range-check ids (the Python layer does); the kernels treat them as -1."""
    bank = make(6, 16, 12, 40, 2, torch.float32, "relu", seed=12)
    ids = torch.tensor([0, 2, -5, 1, 1 << 40, -1], device="cuda")
    out = cuda_fwd(bank, ids, "relu")
    grads = cuda_bwd(torch.ones_like(out), bank, ids, "relu")
    bad = torch.tensor([False, True, True, False, True, True], device="cuda")
    assert torch.all(out[bad] == 1) and torch.all(grads[0][bad] == 0)
    clean = torch.where(bad, -1, ids)
    assert torch.equal(out, cuda_fwd(bank, clean, "relu"))


@needs_cuda
def test_cuda_backward_is_deterministic():
    bank = make(96, 1000, 12, 3000, 4, torch.float32, "rational", seed=13)
    ids = mixed_ids(96, 4, seed=14)
    grad = torch.randn(96, 3000, device="cuda")
    first = cuda_bwd(grad, bank, ids, "rational")
    second = cuda_bwd(grad, bank, ids, "rational")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(cuda_fwd(bank, ids, "rational"), cuda_fwd(bank, ids, "rational"))


@needs_cuda
def test_cuda_non_contiguous_inputs():
    bank = make(20, 30, 12, 50, 3, torch.float32, "gelu", seed=15)
    ids = mixed_ids(20, 3, seed=16)
    strided = dict(bank, pooled=torch.randn(30, 20, device="cuda").t(),
                   w_up=bank["w_up"].transpose(1, 2).contiguous().transpose(1, 2))
    cuda_check(strided, ids, "gelu")


@needs_cuda
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
    expected = ref_generate.generate(*(bank[k].double() for k in NAMES), ids, "gelu")
    assert rel_err(out, expected, floor=1e-3) <= TOL[torch.bfloat16]
    assert torch.all(out[ids < 0] == 1)


# ------------------------------------------------------------------ argument errors
def _good(activation="gelu"):
    bank = make(4, 8, 3, 10, 2, torch.float32, activation)
    return bank, torch.tensor([0, 1, -1, 0], device="cuda")


def _call(bank, ids, activation="gelu", grad=None):
    if grad is None:
        return cuda_fwd(bank, ids, activation)
    return cuda_bwd(grad, bank, ids, activation)


@needs_cuda
@pytest.mark.parametrize("case, name", [
    ("pooled_int", "pooled"), ("pooled_cpu", "pooled"), ("pooled_1d", "pooled"),
    ("w_down_d", "w_down"), ("w_down_2d", "w_down"), ("w_down_fp16", "w_down"), ("w_down_cpu", "w_down"),
    ("b_down_shape", "b_down"), ("w_up_r", "w_up"), ("w_up_dtype", "w_up"), ("b_up_shape", "b_up"),
    ("b_up_cpu", "b_up"), ("ids_float", "adapter_ids"), ("ids_len", "adapter_ids"), ("ids_cpu", "adapter_ids"),
    ("activation", "activation"), ("params_missing", "act_params"), ("params_extra", "act_params"),
    ("params_shape", "act_params"), ("grad_shape", "grad"), ("grad_dtype", "grad"),
])
def test_cuda_errors_name_the_argument(case, name):
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
