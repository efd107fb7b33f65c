"""How the Triton launchers launch, whatever the kernels compute: every launch runs inside
``launch_guard`` for its tensors' device (Triton launches on the *current* device, so tensors on
``cuda:1`` under accelerate's device_map would otherwise run on cuda:0's stream), and a launch
inside a CUDA-graph capture never lets Triton's autotuner time configs (it synchronises, which
breaks the capture). Both are checked here on the CPU, under the interpreter, with every op's
forward and backward at small sizes. (On the GPU: scripts/gpu_check.sh captures and replays
each decode-path op with its warm-up on another stream.)"""
import importlib

import pytest
import torch

from para_kernels.ops import dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE != "cpu" or "triton" not in dispatch.available_backends(DEVICE),
                                reason="checks the launchers under the Triton interpreter")


def _modules():
    return {name: importlib.import_module(f"para_kernels.ops.triton_ops.{name}")
            for name in ("pool", "generate", "pool_generate", "scale", "scaled_glu", "scaled_linear", "utils")}


def every_op():
    """Forward and backward of every Triton op once, small and valid (every pooler, packed and
    padded, the chunked scale backward, decode and prefill linear)."""
    m = _modules()
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, T, d, r, N, A = 3, 4, 8, 4, 10, 2
    start, end = torch.tensor([0, 1, 3]), torch.tensor([4, 2, 4])
    h = rand(B, T, d)
    for mode in ("last", "mean", "max", "attn"):
        w = rand(B, d) if mode == "attn" else None
        m["pool"].pool(h, start, end, mode, w)
        m["pool"].pool_backward(rand(B, d), h, start, end, mode, w)
        m["pool"].pool_backward(rand(B, d), h.reshape(B * T, d), start + 4 * torch.arange(B),
                                end + 4 * torch.arange(B), mode, w)
    bank = (rand(A, d, r), rand(A, r), rand(A, r, N), rand(A, N))
    ids = torch.tensor([0, -1, 1])
    m["generate"].generate(rand(B, d), *bank, ids, "gelu")
    m["generate"].generate_backward(rand(B, N), rand(B, d), *bank, ids, "gelu", None)
    m["pool_generate"].pool_generate(h, start, end, "mean", None, *bank, ids, "gelu")
    x, v = rand(B, 40, N), rand(B, N)
    m["scale"].scale(x, v)
    m["scale"].scale_backward(x, x, v, None)
    rows = torch.tensor([0, 0, 1, 2, 2])
    m["scale"].scale(rand(5, N), v, rows)
    m["scale"].scale_backward(rand(5, N), rand(5, N), v, rows)
    m["scaled_glu"].scaled_glu(x, x, v, "silu")
    m["scaled_glu"].scaled_glu_backward(x, x, x, v, "silu")
    for L in (1, 6):
        xl, wt = rand(B, L, 600), rand(N, 600)
        m["scaled_linear"].scaled_linear(xl, wt, rand(N), v)
        m["scaled_linear"].scaled_linear_backward(rand(B, L, N), xl, wt, rand(N), v)


def test_every_launch_is_guarded_on_its_tensors_device(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    utils = _modules()["utils"]
    launches, unguarded = [], []
    run = InterpretedFunction.run

    def checked(self, *args, **kwargs):
        devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        launches.append(self.fn.__name__)
        if utils.guarded_device() is None or devices != {utils.guarded_device()}:
            unguarded.append(f"{self.fn.__name__} (guard {utils.guarded_device()}, tensors on {devices})")
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", checked)
    every_op()
    assert len(set(launches)) >= 15, sorted(set(launches))
    assert not unguarded, unguarded


@pytest.fixture
def capturing(monkeypatch):
    """Every launch looks like it is being captured into a CUDA graph, and the autotuner fails
    if it is asked to run (it would time configs and synchronise)."""
    from triton.runtime.autotuner import Autotuner
    utils = _modules()["utils"]
    monkeypatch.setattr(utils, "capturing", lambda device: True)
    tuned = []
    monkeypatch.setattr(Autotuner, "run", lambda self, *a, **k: tuned.append(self.base_fn.__name__) or
                        pytest.fail(f"autotuner ran inside a capture: {self.base_fn.__name__}"))
    for tuner in utils.CaptureSafeAutotuner.registry:  # nothing tuned before the capture
        monkeypatch.setattr(tuner, "chosen", {})
    return tuned


def test_capture_never_runs_the_autotuner(capturing):
    every_op()
    assert capturing == []


def test_capture_reuses_the_config_tuned_eagerly(monkeypatch):
    """An eager call tunes (the tuner's choice is remembered); inside a capture the same key runs
    that config without the tuner, and a new key runs the first config left after pruning."""
    m = _modules()
    tuner = m["scale"]._scale_fwd_kernel
    x, v = torch.randn(3, 5, 16), torch.randn(3, 16)
    monkeypatch.setattr(tuner, "chosen", {})
    m["scale"].scale(x, v)
    assert len(tuner.chosen) == 1
    (key, config), = tuner.chosen.items()
    from triton.runtime.autotuner import Autotuner
    monkeypatch.setattr(Autotuner, "run", lambda *a, **k: pytest.fail("autotuner ran inside a capture"))
    monkeypatch.setattr(m["utils"], "capturing", lambda device: True)
    ran = []
    fn_run = type(tuner.tuner.fn).run
    monkeypatch.setattr(type(tuner.tuner.fn), "run", lambda self, *a, **k: ran.append(k) or fn_run(self, *a, **k))
    out = m["scale"].scale(x, v)
    assert torch.allclose(out, x * v[:, None, :])
    assert ran and all(ran[0][name] == value for name, value in config.all_kwargs().items())
    m["scale"].scale(torch.randn(2, 7, 32), torch.randn(2, 32))  # a key never tuned
    assert len(tuner.chosen) == 1, "a capture must not record a choice it did not time"
