"""The pool_generate op (pool -> generate in one op; docs/spec.md §1): the fp64-oracle grid on every
backend, backward, gradcheck / opcheck, then the Triton kernel (one launch for the whole op: pool ->
down -> activation -> up) against the fp64 oracle on every pooler, padded and packed, mixed adapters
with -1 rows, prompt length 1 and full; small forced tiles drive several row blocks, d-slices and
consumer programs through the producer / consumer wait under the interpreter; the sync counters are
left at zero; every output element is written; (GPU only) CUDA-graph capture and replay.
(No CUDA C++ kernel implements it: the CUDA backend runs pool then generate.)"""
import importlib
import math
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# para_kernels internals
from para_kernels import ops
from para_kernels.ops.activations import ACTIVATIONS

from kit import (
    DEVICE,
    DTYPES,
    TOL,
    adapter_bank,
    adapter_ids,
    bank_weights,
    f64,
    grads,
    oracles,
    ranges,
    rel_err,
    triton_runs,
)
from kit.checks import check_pool_generate

tri = importlib.import_module("para_kernels.ops.triton_ops.pool_generate") if triton_runs() else None  # the kernel

needs_triton = pytest.mark.skipif(tri is None, reason="the Triton backend cannot run here")


# ------------------------------------------------------------------ every backend: the fp64 oracle
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,d,r,N,A", [(1, 1, 1, 1, 1, 1), (5, 6, 37, 4, 19, 3), (3, 4, 576, 12, 2304, 2)])
def test_pool_generate_matches_oracle(device_backend, mode, dtype, B, T, d, r, N, A):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(B + T + d + N)
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = (torch.randn(B, d, generator=gen) / math.sqrt(d)).to(device, dtype) if mode == "attn" else None
    wd, bd, wu, bu, _ = bank_weights(adapter_bank(gen, A, d, r, N, device, torch.float32, "gelu"))
    ids = adapter_ids(gen, B, A, device)
    out = ops.pool_generate(hidden, start, end, mode, w, wd, bd, wu, bu, ids, "gelu")
    ref = oracles.pool_generate(*(t.cpu() if t is not None else None
                                  for t in (hidden, start, end)), mode, None if w is None else w.cpu(),
                                *(t.cpu() for t in (wd, bd, wu, bu, ids)), "gelu")
    assert out.shape == (B, N) and out.dtype == torch.float32
    assert rel_err(out.cpu(), ref) <= TOL[dtype]


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_generate_backward_matches_oracle(device_backend, dtype):
    device, _ = device_backend
    gen = torch.Generator().manual_seed(13)
    B, T, d, r, N, A = 4, 5, 19, 3, 11, 2
    hidden = torch.randn(B, T, d, generator=gen).to(device, dtype)
    start, end = ranges(gen, B, T, device)
    w = torch.randn(B, d, generator=gen).to(device, dtype)
    wd, bd, wu, bu, _ = bank_weights(adapter_bank(gen, A, d, r, N, device, torch.float32, "silu"))
    ids = adapter_ids(gen, B, A, device)
    ours = grads(lambda h, w, *bank: ops.pool_generate(h, start, end, "attn", w, *bank, ids, "silu"),
                 [hidden, w, wd, bd, wu, bu])
    ref = grads(lambda h, w, *bank: oracles.pool_generate(h, start.cpu(), end.cpu(), "attn", w, *bank, ids.cpu(),
                                                          "silu"),
                [t.cpu().double() for t in (hidden, w, wd, bd, wu, bu)])
    for a, b in zip(ours, ref):
        assert rel_err(a.cpu(), b) <= TOL[dtype] * 2


# ------------------------------------------------------------------ gradcheck / opcheck (reference, fp64)
@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_pool_generate_gradcheck_and_opcheck(mode):
    hidden = f64(3, 5, 4, seed=1).requires_grad_()
    start, end = torch.tensor([0, 1, 2]), torch.tensor([5, 3, 3])
    w = f64(3, 4, seed=2).requires_grad_() if mode == "attn" else None
    bank_ = [f64(2, 4, 3, seed=3), f64(2, 3, seed=4), f64(2, 3, 6, seed=5), f64(2, 6, seed=6)]
    bank_ = [t.requires_grad_() for t in bank_]
    ids = torch.tensor([1, -1, 0])
    fn = lambda h, w, *b: ops.pool_generate(h, start, end, mode, w, *b, ids, "tanh")
    assert torch.autograd.gradcheck(fn, (hidden, w, *bank_))
    torch.library.opcheck(torch.ops.para.pool_generate.default,
                          (hidden, start, end, mode, w, *bank_, ids, "tanh", None))


# ------------------------------------------------------------------ Triton kernel
# 3 d-slices of 16 features, 2 consumers of 16-wide tiles, 2-token tiles: every loop and tail
SMALL = dict(block_b=16, splits=3, consumers=2, block_n=16, block_d=16, block_t=2)


def case(B, T, d, r, N, A, mode, dtype, activation="gelu", packed=False, seed=0, bank_dtype=torch.float32):
    """The op's arguments: hidden in dtype, the bank in bank_dtype, ids with row 0 at -1 (B > 1)."""
    gen = torch.Generator().manual_seed(seed)
    start, end = ranges(gen, B, T, DEVICE)
    hidden = torch.randn(B, T, d, generator=gen).to(DEVICE, dtype)
    if packed:  # rows back to back in one token axis: ranges index it
        hidden = hidden.reshape(B * T, d)
        start, end = start + torch.arange(B, device=DEVICE) * T, end + torch.arange(B, device=DEVICE) * T
    w_sa = (torch.randn(B, d, generator=gen) * (1 / math.sqrt(d))).to(DEVICE, dtype) if mode == "attn" else None
    ids = torch.randint(-1, A, (B,), generator=gen)
    ids[0] = -1 if B > 1 else ids[0]
    *weights, params = bank_weights(adapter_bank(gen, A, d, r, N, DEVICE, bank_dtype, activation))
    return (hidden, start, end, mode, w_sa, *weights, ids.to(DEVICE), activation, params)


def triton_check(args, tol):
    return check_pool_generate(tri.pool_generate, args, tol)


@pytest.fixture(params=[None, SMALL], ids=["default_tiles", "small_tiles"])
def tiles(request, monkeypatch):
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", request.param)
    return request.param


@needs_triton
@pytest.mark.parametrize("mode", ops.POOL_MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_triton_matches_oracle(tiles, mode, dtype, packed):
    triton_check(case(19, 5, 37, 5, 41, 3, mode, dtype, packed=packed, seed=len(mode)), TOL[dtype])


@needs_triton
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_activations(tiles, activation):
    triton_check(case(6, 4, 24, 12, 33, 2, "mean", torch.float32, activation, seed=3), TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_triton_other_dtypes(dtype):
    triton_check(case(5, 3, 20, 4, 18, 2, "attn", dtype, seed=4, bank_dtype=dtype if dtype == torch.float64
               else torch.float32), TOL[dtype])


@needs_triton
def test_triton_real_model_sizes():
    """SmolLM2's layer: d = 576, N = q 576 + v 192 + up 1536; r = 12."""
    triton_check(case(4, 3, 576, 12, 2304, 2, "last", torch.bfloat16, seed=5), TOL[torch.bfloat16])


@needs_triton
def test_triton_one_launch_and_one_ticket_per_program(monkeypatch):
    """The op is one kernel: neither the pool nor the generate kernels run; every program takes
    exactly one ticket and every row block's producers all report ready, in a counter buffer
    of the launch's own (zeroed per launch, so nothing carries over to the next one)."""
    launches, counters = [], []
    kernel, make_counters = tri._pool_generate_kernel, tri._counters

    class Counted:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tri, "_pool_generate_kernel", Counted())
    monkeypatch.setattr(tri, "_counters", lambda *a: counters.append(make_counters(*a)) or counters[-1])
    for name in ("pool", "generate"):
        monkeypatch.setattr(tri, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} kernel launched"),
                            raising=False)
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", SMALL)
    for seed in range(2):
        triton_check(case(35, 4, 40, 3, 50, 3, "max", torch.float32, seed=seed), TOL[torch.float32])
    assert len(launches) == 2 and len(counters) == 2 and counters[0] is not counters[1]
    n_blocks = math.ceil(35 / SMALL["block_b"])
    producers = SMALL["block_b"] * math.ceil(40 / SMALL["block_d"])
    for grid, sync in zip(launches, counters):
        assert int(sync[0]) == grid[0] == n_blocks * (producers + SMALL["consumers"])
        assert sync[1:].tolist() == [producers] * n_blocks


@pytest.fixture
def reversed_dispatch(monkeypatch):
    """The interpreter starts a 1-D grid's programs in decreasing id order (CUDA promises no
    order at all), with a watchdog: a consumer that waits on a producer that never starts would
    spin forever."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    set_idx = builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_idx(builder.grid_dim[0] - 1 - x, y, z))

    def deadlock(*_):
        raise TimeoutError("pool_generate waited on a program that had not started")

    previous = signal.signal(signal.SIGALRM, deadlock)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="reorders the interpreter's dispatch")
@pytest.mark.parametrize("mode", ["mean", "attn"])
def test_triton_programs_started_out_of_order(reversed_dispatch, monkeypatch, mode):
    """Roles come from tickets taken at start, not from program ids: with the grid started
    last program first, the consumers still wait only on producers that are running."""
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", SMALL)
    triton_check(case(35, 4, 40, 3, 50, 3, mode, torch.float32, seed=11), TOL[torch.float32])


@needs_triton
@pytest.mark.parametrize("layout", ["strided", "offset"])
def test_triton_strided_prompt_ranges(monkeypatch, layout):
    """prompt_start / prompt_end as non-contiguous views (columns of a [B, 2] table) or views at
    an offset: the kernels read them as ptr + b, so the launcher must pass contiguous copies."""
    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", SMALL)
    args = list(case(9, 6, 24, 4, 20, 2, "mean", torch.float32, seed=12))
    start, end = args[1], args[2]
    if layout == "strided":
        table = torch.stack([start, end], 1)
        args[1], args[2] = table[:, 0], table[:, 1]
    else:
        args[1], args[2] = torch.cat([end[:3], start])[3:], torch.cat([start[:5], end])[5:]
    assert not args[1].is_contiguous() or args[1].storage_offset() > 0
    triton_check(args, TOL[torch.float32])


@needs_triton
def test_triton_every_output_element_is_written(monkeypatch):
    monkeypatch.setattr(tri, "empty_buffer", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                               dtype=dtype, device=device))
    for override in (None, SMALL):
        monkeypatch.setattr(tri, "CONFIG_OVERRIDE", override)
        for mode in ("attn", "mean"):
            triton_check(case(21, 4, 33, 6, 35, 4, mode, torch.float32, seed=6), TOL[torch.float32])


@needs_triton
def test_triton_through_the_op_and_autograd():
    """The registered op runs this kernel under set_backend('triton'); its backward (pool and
    generate backward kernels) matches the oracle's autograd."""
    ops.set_backend("triton")
    try:
        args = case(7, 5, 24, 4, 30, 3, "attn", torch.float32, "silu", seed=7)
        assert ops.backend_for("pool_generate", torch.device(DEVICE)) == "triton"
        hidden, start, end, mode, w_sa, *bank, ids, act, _ = args
        leaves = [t.detach().requires_grad_() for t in (hidden, w_sa, *bank)]
        out = ops.pool_generate(leaves[0], start, end, mode, leaves[1], *leaves[2:], ids, act)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out)
        (out * g).sum().backward()
        leaves64 = [t.detach().double().cpu().requires_grad_() for t in leaves]
        ref = oracles.pool_generate(leaves64[0], start.cpu(), end.cpu(), mode, leaves64[1], *leaves64[2:],
                                    ids.cpu(), act)
        (ref * g.double().cpu()).sum().backward()
        assert rel_err(out, ref.detach(), floor=1e-3) <= 1e-5
        for t, t64 in zip(leaves, leaves64):
            assert rel_err(t.grad, t64.grad, floor=1e-3) <= 2e-5
    finally:
        ops.set_backend(None)


@st.composite
def cases(draw):
    B, T = draw(st.integers(1, 20)), draw(st.integers(1, 6))
    return dict(B=B, T=T, d=draw(st.integers(1, 40)), r=draw(st.integers(1, 20)), N=draw(st.integers(1, 40)),
                A=draw(st.integers(1, 4)), mode=draw(st.sampled_from(ops.POOL_MODES)),
                packed=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                tiles=draw(st.sampled_from([None, SMALL, dict(SMALL, splits=1, consumers=3, block_b=32)])))


@needs_triton
@settings(max_examples=20, deadline=None)
@given(cases())
def test_triton_property_matches_oracle(c):
    tri.CONFIG_OVERRIDE = c.pop("tiles")  # not a fixture: hypothesis re-runs the body per example
    try:
        triton_check(case(c["B"], c["T"], c["d"], c["r"], c["N"], c["A"], c["mode"], torch.float32, packed=c["packed"],
                   seed=c["seed"]), TOL[torch.float32])
    finally:
        tri.CONFIG_OVERRIDE = None


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,mode", [(1, "last"), (32, "mean"), (200, "attn")])
def test_triton_cuda_graph_replay(B, mode):
    """LLaMA-2-7B sizes (d 4096, N = 4096 + 4096 + 11008): warm up on the capture stream, then
    capture and replay with new tenants; the launch needs no host sync."""
    args = list(case(B, 64, 4096, 12, 19200, 8, mode, torch.bfloat16, seed=9))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        tri.pool_generate(*args)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tri.pool_generate(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = tri.pool_generate(*args)
        ids = args[9]
        ids.copy_(torch.randint(-1, 8, (B,), generator=torch.Generator().manual_seed(10)))
        graph.replay()
        graph.replay()  # the graph zeroes its own counters at each replay
    torch.cuda.synchronize()
    expected = oracles.pool_generate(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    assert rel_err(out, expected, floor=1e-3) <= TOL[torch.bfloat16]
    assert torch.all(out[ids < 0] == 1)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_two_graphs_replayed_at_once():
    """Two captures of the op own their counters: replayed concurrently on two streams, with the
    second captured cold (no eager warm-up of its shape), both give their own answers."""
    args = [list(case(B, 16, 4096, 12, 19200, 8, "mean", torch.bfloat16, seed=20 + B)) for B in (24, 40)]
    tri.pool_generate(*args[0])  # warm-up of the first shape only, on the default stream
    torch.cuda.synchronize()
    graphs, outs, streams = [], [], [torch.cuda.Stream(), torch.cuda.Stream()]
    for a, stream in zip(args, streams):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs.append(tri.pool_generate(*a))
        graphs.append(graph)
    for _ in range(3):
        for graph, stream in zip(graphs, streams):
            with torch.cuda.stream(stream):
                graph.replay()
    torch.cuda.synchronize()
    for a, out in zip(args, outs):
        expected = oracles.pool_generate(*[x.cpu() if isinstance(x, torch.Tensor) else x for x in a])
        assert rel_err(out, expected, floor=1e-3) <= TOL[torch.bfloat16]
