"""The cases of the op microbenchmarks: one :class:`Case` per op, shape and variant of ``pool``,
``generate`` and ``scale`` (:func:`cases`) and of the fused ops ``pool_generate``,
``scaled_glu`` and ``scaled_linear`` where the package has them (:func:`fused_cases`), on the
hidden sizes of :data:`MODELS`.

A Case holds the forward (the public ``para_kernels.ops`` function) and backward (the
``para::*_backward`` op, as autograd calls it) callables, the bytes each must move (each input
read once, each output written once), their FLOPs, and the reference function with its
arguments (for the ``torch.compile`` rows).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from para_kernels import ops as para_ops
from para_kernels.ops import reference_ops

if TYPE_CHECKING:
    from .ops import OpsConfig

FUSED_OPS = ("pool_generate", "scaled_glu", "scaled_linear")


MODELS = {
    "SmolLM2-135M": {"d": 576, "n_q": 576, "n_v": 192, "n_u": 1536},
    "LLaMA-2-7B": {"d": 4096, "n_q": 4096, "n_v": 4096, "n_u": 11008},
    "LLaMA-2-13B": {"d": 5120, "n_q": 5120, "n_v": 5120, "n_u": 13824},
}


@dataclass
class Case:
    """One op at one shape: what is timed and what it must move."""
    meta: dict
    forward: Callable
    backward: Callable
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int
    flops_bwd: int
    reference: tuple = field(default=())  # (reference_ops function, its arguments): the compiled rows


def whole_prompt(B: int, T: int, device):
    start = torch.zeros(B, dtype=torch.long, device=device)
    return start, torch.full((B,), T, dtype=torch.long, device=device)


def seeded_random(device: torch.device, dtype: torch.dtype, seed: int):
    """rnd(*shape): seeded N(0, 1) data in ``dtype`` on ``device``. On a GPU it is drawn there
    (the --full shapes are tens of GB: drawing them on the host would take minutes); on the CPU
    from a CPU generator in fp32, as the CPU reports always were."""
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(seed)
        return lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def cases(cfg: OpsConfig, device: torch.device, dtype: torch.dtype):
    """Yield a :class:`Case` per op, shape and variant of pool, generate and scale."""
    es = torch.tensor([], dtype=dtype).element_size()
    rnd = seeded_random(device, dtype, cfg.seed)

    for model, B, T in itertools.product(cfg.models, cfg.batches, cfg.prompt_lens):
        sz = MODELS[model]
        d, N = sz["d"], sz["n_q"] + sz["n_v"] + sz["n_u"]
        base = {"model": model, "B": B, "T": T, "d": d}
        # ---- pool: hidden [B, T, d], whole row is the prompt
        hidden = rnd(B, T, d)
        start, end = whole_prompt(B, T, device)
        w_sa = rnd(d) / d ** 0.5
        grad_p = rnd(B, d)
        for mode in cfg.pool_modes:
            w = w_sa if mode == "attn" else None
            read_h = B * d if mode == "last" else B * T * d
            fwd_bytes = es * (read_h + B * d + (d if w is not None else 0)) + 2 * B * 8
            # backward reads grad (and hidden for max / attn), writes grad_hidden [B, T, d]
            bwd_bytes = es * (B * d + (B * T * d if mode in ("max", "attn") else 0) + B * T * d
                              + (2 * d if w is not None else 0)) + 2 * B * 8
            flops = 0 if mode in ("last", "max") else 2 * B * T * d * (2 if mode == "attn" else 1)
            yield Case({**base, "op": "pool", "variant": mode, "n": d},
                       (lambda h=hidden, w=w, m=mode, s=start, e=end: para_ops.pool(h, s, e, m, w)),
                       (lambda h=hidden, w=w, m=mode, s=start, e=end, gp=grad_p:
                        torch.ops.para.pool_backward(gp, h, s, e, m, w)),
                       fwd_bytes, bwd_bytes, flops, 2 * flops,
                       (reference_ops.pool, (hidden, start, end, mode, w)))
        # ---- generate: bank of `adapters`, rows spread over them
        A, r = cfg.adapters, cfg.r
        pooled = rnd(B, d)
        w_down, b_down = rnd(A, d, r) / d ** 0.5, rnd(A, r) * 0.1
        w_up, b_up = rnd(A, r, N) * 0.02, rnd(A, N) * 0.02
        ids = (torch.arange(B) % A).to(device)
        used = min(A, B)
        weights = used * (d * r + r + r * N + N)
        grad_v = rnd(B, N)
        gen_bytes = es * (B * d + weights + B * N) + B * 8
        gen_bwd_bytes = es * (B * N + B * d + weights + B * d + A * (d * r + r + r * N + N)) + B * 8
        gen_flops = 2 * B * (d * r + r * N)
        bank = (pooled, w_down, b_down, w_up, b_up, ids)
        yield Case({**base, "op": "generate", "variant": f"A={A} r={r} N={N}", "n": N},
                   (lambda a=bank: para_ops.generate(*a, cfg.activation)),
                   (lambda a=(grad_v, *bank): torch.ops.para.generate_backward(*a, cfg.activation, None)),
                   gen_bytes, gen_bwd_bytes, gen_flops, 2 * B * (3 * d * r + 2 * r * N),
                   (reference_ops.generate, (*bank, cfg.activation)))
        # ---- scale: the FFN up projection's output (the widest scaled activation),
        # at decode (1 token per row) and at prefill (T tokens per row)
        n = sz["n_u"]
        v = 1.0 + rnd(B, n) * 0.1
        for tokens, variant in ((1, "decode T=1"), (T, f"prefill T={T}")):
            x = rnd(B, tokens, n)
            grad_x = rnd(B, tokens, n)
            fwd_bytes = es * (2 * B * tokens * n + B * n)
            bwd_bytes = es * (3 * B * tokens * n + 2 * B * n)
            yield Case({**base, "op": "scale", "variant": variant, "n": n, "tokens": tokens},
                       (lambda x=x, v=v: para_ops.scale(x, v)),
                       (lambda x=x, gx=grad_x, v=v: torch.ops.para.scale_backward(gx, x, v, None)),
                       fwd_bytes, bwd_bytes, B * tokens * n, 2 * B * tokens * n,
                       (reference_ops.scale, (x, v)))


def fused_cases(cfg: OpsConfig, device: torch.device, dtype: torch.dtype):
    """The fused ops (pool_generate, scaled_glu, scaled_linear), where the package has them."""
    if not all(hasattr(para_ops, n) for n in FUSED_OPS):
        return
    es = torch.tensor([], dtype=dtype).element_size()
    rnd = seeded_random(device, dtype, cfg.seed + 1)

    for model, B, T in itertools.product(cfg.models, cfg.batches, cfg.prompt_lens):
        sz = MODELS[model]
        d, nq, nu, N = sz["d"], sz["n_q"], sz["n_u"], sz["n_q"] + sz["n_v"] + sz["n_u"]
        base = {"model": model, "B": B, "T": T, "d": d}
        A, r = cfg.adapters, cfg.r
        hidden = rnd(B, T, d)
        start, end = whole_prompt(B, T, device)
        bank = (rnd(A, d, r) / d ** 0.5, rnd(A, r) * 0.1, rnd(A, r, N) * 0.02, rnd(A, N) * 0.02)
        ids = (torch.arange(B) % A).to(device)
        weights = min(A, B) * (d * r + r + r * N + N)
        grad_v = rnd(B, N)
        args = (hidden, start, end, "last", None, *bank, ids)
        yield Case({**base, "op": "pool_generate", "variant": f"last A={A} r={r} N={N}", "n": N},
                   (lambda a=args: para_ops.pool_generate(*a, cfg.activation)),
                   (lambda a=(grad_v, *args): torch.ops.para.pool_generate_backward(*a, cfg.activation, None)),
                   es * (B * d + weights + B * N) + 3 * B * 8,
                   es * (B * N + B * d + weights + B * T * d + A * (d * r + r + r * N + N)) + 3 * B * 8,
                   2 * B * (d * r + r * N), 2 * B * (3 * d * r + 2 * r * N),
                   (reference_ops.pool_generate, (*args, cfg.activation)))
        for tokens, variant in ((1, "decode T=1"), (T, f"prefill T={T}")):
            gate, up = rnd(B, tokens, nu), rnd(B, tokens, nu)
            v = 1.0 + rnd(B, nu) * 0.1
            grad = rnd(B, tokens, nu)
            m = B * tokens * nu
            yield Case({**base, "op": "scaled_glu", "variant": f"silu {variant}", "n": nu, "tokens": tokens},
                       (lambda a=(gate, up, v): para_ops.scaled_glu(*a, "silu")),
                       (lambda a=(grad, gate, up, v): torch.ops.para.scaled_glu_backward(*a, "silu")),
                       es * (3 * m + B * nu), es * (5 * m + 2 * B * nu), 6 * m, 12 * m,
                       (reference_ops.scaled_glu, (gate, up, v, "silu")))
        # scaled_linear as the q projection, at decode only (prefill-sized matmuls take seconds on a CPU)
        x, w = rnd(B, 1, d), rnd(nq, d) / d ** 0.5
        v = 1.0 + rnd(B, nq) * 0.1
        grad = rnd(B, 1, nq)
        yield Case({**base, "op": "scaled_linear", "variant": "q_proj decode T=1", "n": nq, "tokens": 1},
                   (lambda a=(x, w, None, v): para_ops.scaled_linear(*a)),
                   (lambda a=(grad, x, w, None, v): torch.ops.para.scaled_linear_backward(*a)),
                   es * (B * d + nq * d + B * nq + B * nq), es * (2 * B * nq + 2 * B * d + 2 * nq * d + B * nq),
                   2 * B * d * nq, 4 * B * d * nq,
                   (reference_ops.scaled_linear, (x, w, None, v)))


def count_cases(cfg: OpsConfig) -> int:
    """How many cases :func:`cases` and :func:`fused_cases` yield (for the progress bar)."""
    fused = 4 if all(hasattr(para_ops, n) for n in FUSED_OPS) else 0
    return len(cfg.models) * len(cfg.batches) * len(cfg.prompt_lens) * (len(cfg.pool_modes) + 3 + fused)
