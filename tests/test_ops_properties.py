"""Property test: pool and scale against the oracle over random shapes and prompt ranges."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import oracles
from para_kernels import ops


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


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(1, 33), st.integers(0, 2**31 - 1))
def test_scale_property(B, T, n, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n, generator=gen)
    v = torch.randn(B, n, generator=gen)
    torch.testing.assert_close(ops.scale(x, v).double(), oracles.scale(x, v), rtol=1e-6, atol=1e-7)
