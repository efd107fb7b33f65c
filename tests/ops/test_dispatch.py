"""The dispatch point: backend selection (set_backend, the environment variable, the fallback when
a backend cannot run), the registry the custom ops go through, and the ops traced by torch.compile."""
import warnings

import pytest
import torch

# para_kernels internals
import para_kernels
from para_kernels import ops
from para_kernels.ops import dispatch

P = torch.randn(2, 4)
WD, BD, WU, BU = torch.randn(3, 4, 2), torch.randn(3, 2), torch.randn(3, 2, 6), torch.randn(3, 6)
IDS = torch.tensor([0, -1])
X, V = torch.randn(2, 5, 6), torch.randn(2, 6)


def test_set_backend_validates_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        para_kernels.set_backend("tpu")


def test_reference_is_always_available():
    assert "reference" in para_kernels.available_backends("cpu")
    assert ops.backend_for("scale", torch.device("cpu")) in para_kernels.available_backends("cpu")


@pytest.mark.skipif("cuda" in dispatch.available_backends("cpu"), reason="the CUDA backend runs on this CPU")
def test_unavailable_backend_warns_once_and_falls_back():
    para_kernels.set_backend("cuda")  # never runs on CPU tensors
    try:
        with pytest.warns(RuntimeWarning, match="'cuda' was requested"):
            out = ops.scale(X, V)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops.scale(X, V)  # the second call is silent
        torch.testing.assert_close(out, X * V[:, None])
        assert ops.backend_for("scale", torch.device("cpu")) == "reference"
    finally:
        para_kernels.set_backend(None)


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv("PARA_KERNELS_BACKEND", "reference")
    assert para_kernels.get_backend() == "reference"
    monkeypatch.setenv("PARA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="PARA_KERNELS_BACKEND must be one of"):
        para_kernels.get_backend()
    para_kernels.set_backend("reference")  # the explicit call wins over the environment
    try:
        assert para_kernels.get_backend() == "reference"
    finally:
        para_kernels.set_backend(None)


def test_backend_registry_is_used(monkeypatch):
    """The custom ops really go through the dispatch point."""
    calls = []
    backend = dispatch._backends["reference"]
    original = backend.impls["generate"]
    monkeypatch.setitem(backend.impls, "generate", lambda *a: calls.append(1) or original(*a))
    ops.generate(P, WD, BD, WU, BU, IDS)
    assert calls == [1]


# ------------------------------------------------------------------ torch.compile
def test_ops_compile_fullgraph_with_backward():
    """pool -> generate -> scale traces into one graph (fake impls, autograd) and matches eager."""
    B, T, d, r, N, A = 3, 6, 8, 4, 10, 2
    hidden = torch.randn(B, T, d)
    start, end = torch.tensor([0, 1, 5]), torch.tensor([6, 4, 6])
    x = torch.randn(B, T, N)
    weights = [torch.randn(A, d, r) / 3, torch.randn(A, r), torch.randn(A, r, N) / 2, torch.randn(A, N)]
    w_sa = torch.randn(d)
    ids = torch.tensor([1, -1, 0])

    def layer(hidden, x, w_sa, wd, bd, wu, bu):
        pooled = ops.pool(hidden, start, end, "attn", w_sa)
        v = ops.generate(pooled, wd, bd, wu, bu, ids, "silu")
        return ops.scale(x, v).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        inputs = [t.clone().requires_grad_() for t in (hidden, x, w_sa, *weights)]
        loss = fn(*inputs)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in inputs]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
