"""Triton ``generate`` / ``generate_backward`` beyond tests/test_ops.py: int32 ids, adapter
sharing extremes, all rows -1, every kernel loop and tail (small forced tiles, split d), a
property test against the PyTorch reference, output poisoning, determinism, and (GPU only)
no host sync plus CUDA-graph capture. On a CPU host the kernels run in Triton's interpreter."""
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles
from para_kernels import ops
from para_kernels.ops import dispatch
from para_kernels.ops.activations import ACTIVATIONS, RATIONAL_GELU_INIT

ref = importlib.import_module("para_kernels.ops.reference_ops.generate")
tri = importlib.import_module("para_kernels.ops.triton_ops.generate") \
    if "triton" in dispatch.available_backends("cuda" if torch.cuda.is_available() else "cpu") else None

pytestmark = pytest.mark.skipif(tri is None, reason="the Triton backend cannot run here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Tiles at tl.dot's minimum and a 3-way d split: several row blocks, N tiles, d tiles and
# splits, with ragged tails, on shapes small enough for the interpreter.
SMALL_TILES = dict(block_b_down=16, block_d_down=16, splits=3, block_b_up=16, block_n_up=16,
                   block_b_bwd=16, block_n_bwd=16, block_d_bwd=16)


def rel_err(out, expected):
    assert not torch.isnan(out).any(), "NaN in output"
    out, expected = out.double().cpu(), expected.double().cpu()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-3)).item()


def make(B, d, r, N, A, dtype, activation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(DEVICE, dtype)
    params = None
    if activation == "rational":
        params = (torch.tensor([RATIONAL_GELU_INIT] * A) + 0.05 * torch.randn(A, 10, generator=gen)).to(DEVICE, dtype)
    return dict(pooled=t(B, d), w_down=t(A, d, r, scale=1 / math.sqrt(max(d, 1))), b_down=t(A, r),
                w_up=t(A, r, N, scale=1 / math.sqrt(max(r, 1))), b_up=t(A, N), act_params=params)


def run_both(bank, ids, activation, grad=None):
    """(forward, backward) of triton and of the reference on fp64 copies of the inputs."""
    args = [bank[k] for k in ("pooled", "w_down", "b_down", "w_up", "b_up")]
    params = bank["act_params"]
    grad = torch.randn(ids.shape[0], args[3].shape[2], generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(args[0]) if grad is None else grad
    ours = (tri.generate(*args, ids, activation, params),
            tri.generate_backward(grad, *args, ids, activation, params))
    up = lambda t: None if t is None else t.double()
    args64, params64 = [up(t) for t in args], up(params)
    theirs = (ref.generate(*args64, ids, activation, params64),
              ref.generate_backward(grad.double(), *args64, ids, activation, params64))
    return ours, theirs


def check(bank, ids, activation, dtype, grad=None):
    (out, grads), (ref_out, ref_grads) = run_both(bank, ids, activation, grad)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert torch.all(out[ids < 0] == 1), "rows with adapter -1 must be exactly one"
    for name, g, g_ref, like in zip(("pooled", "w_down", "b_down", "w_up", "b_up", "act_params"), grads, ref_grads,
                                    (*(bank[k] for k in ("pooled", "w_down", "b_down", "w_up", "b_up")),
                                     bank["act_params"])):
        if like is None:
            assert g.numel() == 0
            continue
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert rel_err(g, g_ref) <= 2 * TOL[dtype], name
    assert torch.all(grads[0][ids < 0] == 0), "rows with adapter -1 get no gradient"
    return out, grads


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", SMALL_TILES)


def test_int32_and_int64_ids_agree(small_tiles):
    bank = make(21, 24, 12, 30, 5, torch.float32, "gelu")
    ids = torch.tensor([(i * 7) % 6 - 1 for i in range(21)], device=DEVICE)  # -1..4, mixed
    out64, grads64 = check(bank, ids, "gelu", torch.float32)
    out32, grads32 = check(bank, ids.int(), "gelu", torch.float32)
    assert torch.equal(out64, out32)
    for a, b in zip(grads64, grads32):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sharing", ["one_row_each", "all_rows_one", "unused_adapters"])
def test_adapter_sharing_extremes(small_tiles, sharing):
    activation = "rational"  # the most per-adapter state: its coefficients' gradient too
    B, A = 20, {"one_row_each": 20, "all_rows_one": 3, "unused_adapters": 7}[sharing]
    bank = make(B, 20, 5, 20, A, torch.float32, activation, seed=2)
    if sharing == "one_row_each":  # every adapter used by exactly one row, scattered
        ids = torch.randperm(B, generator=torch.Generator().manual_seed(3))
    elif sharing == "all_rows_one":  # one adapter used by all rows, spanning row blocks
        ids = torch.full((B,), 1)
    else:  # adapters 0, 2, 5 unused: their gradients must be (written) zeros
        ids = torch.tensor([1, 3, 4, 6, -1] * 4)
    _, grads = check(bank, ids.to(DEVICE, torch.int32), activation, torch.float32)
    if sharing == "unused_adapters":
        for g in grads[1:]:
            assert torch.all(g[[0, 2, 5]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_rows_without_adapter(small_tiles, dtype):
    bank = make(19, 21, 3, 35, 2, dtype, "tanh")
    ids = torch.full((19,), -1, device=DEVICE, dtype=torch.int32)
    (out, grads), _ = run_both(bank, ids, "tanh")
    assert torch.all(out == 1) and out.dtype == dtype
    for g in grads:
        assert torch.all(g == 0)


def test_no_adapters_in_bank():
    """A = 0 is legal when every row is -1."""
    bank = make(3, 4, 2, 5, 0, torch.float32, "relu")
    ids = torch.full((3,), -1, device=DEVICE)
    (out, grads), _ = run_both(bank, ids, "relu")
    assert torch.all(out == 1) and torch.all(grads[0] == 0)
    assert [tuple(g.shape) for g in grads[1:5]] == [(0, 4, 2), (0, 2), (0, 2, 5), (0, 5)]


@pytest.mark.parametrize("shape", [(0, 5, 3, 7, 2), (4, 0, 3, 7, 2), (4, 5, 3, 0, 2)])
def test_empty_dimensions(shape):
    B, d, r, N, A = shape
    bank = make(B, d, r, N, A, torch.float32, "gelu")
    ids = torch.tensor([0, -1, 1, 1][:B], device=DEVICE, dtype=torch.long)
    check(bank, ids, "gelu", torch.float32)


@pytest.mark.parametrize("r", [1, 16, 17, 64])
def test_ranks_around_tile_sizes(small_tiles, r):
    bank = make(18, 19, r, 23, 3, torch.float32, "rational", seed=r)
    ids = torch.tensor([0, 1, 2, -1, 2, 2] * 3, device=DEVICE)
    check(bank, ids, "rational", torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_with_small_tiles(small_tiles, dtype):
    bank = make(21, 20, 12, 24, 3, dtype, "gelu", seed=4)
    ids = torch.tensor([2, -1, 0, 1, 1, 2, 0] * 3, device=DEVICE)
    check(bank, ids, "gelu", dtype)


def test_every_output_element_is_written(monkeypatch):
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
            check(bank, ids, activation, torch.float32)


def test_backward_is_deterministic(small_tiles):
    bank = make(24, 20, 12, 24, 3, torch.float32, "rational", seed=6)
    ids = torch.randint(-1, 3, (24,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    (_, first), _ = run_both(bank, ids, "rational")
    (_, second), _ = run_both(bank, ids, "rational")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_through_the_op_and_autograd(small_tiles):
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
        assert rel_err(out, ref_out.detach()) <= 1e-5
        for t, t64 in zip(leaves, leaves64):
            assert rel_err(t.grad, t64.grad) <= 2e-5
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


@settings(max_examples=25, deadline=None)
@given(cases())
def test_property_matches_reference(case):
    tri.CONFIG_OVERRIDE = case["tiles"]  # not a fixture: hypothesis re-runs the body per example
    try:
        bank = make(case["B"], case["d"], case["r"], case["N"], case["A"], case["dtype"], case["activation"],
                    seed=case["seed"])
        ids = torch.tensor(case["ids"], dtype=case["id_dtype"], device=DEVICE)
        check(bank, ids, case["activation"], case["dtype"])
    finally:
        tri.CONFIG_OVERRIDE = None


# ------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B", [1, 16, 200])
def test_no_host_sync_and_cuda_graph_replay(B):
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
    assert rel_err(out, expected) <= TOL[torch.bfloat16]
    assert torch.all(out[ids < 0] == 1)
