"""pool_generate: pool then generate in one op (one launch per layer at prefill); the pooled
vector stays in fp32 (docs/spec.md §3)."""
from __future__ import annotations

from torch import Tensor

from .common import acc_dtype
from .generate import generate, generate_backward
from .pool import pool, pool_backward


def pool_generate(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up,
                  adapter_ids, activation, act_params=None) -> Tensor:
    """hidden [B,T,d] | [total,d] -> v [B,N] in the bank's dtype (pooled kept in fp32)."""
    pooled = pool(hidden.to(acc_dtype(hidden.dtype)), prompt_start, prompt_end, mode,
                  None if w_sa is None else w_sa.to(acc_dtype(hidden.dtype)))
    return generate(pooled.to(w_down.dtype), w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)


def pool_generate_backward(grad, hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up,
                           b_up, adapter_ids, activation, act_params) -> tuple[Tensor, ...]:
    """-> gradients of (hidden, w_sa or empty, w_down, b_down, w_up, b_up, act_params or empty)."""
    acc = acc_dtype(hidden.dtype)
    h32 = hidden.to(acc)
    w32 = None if w_sa is None else w_sa.to(acc)
    pooled = pool(h32, prompt_start, prompt_end, mode, w32).to(w_down.dtype)
    g_pooled, *g_bank = generate_backward(grad, pooled, w_down, b_down, w_up, b_up, adapter_ids,
                                          activation, act_params)
    g_hidden, g_w = pool_backward(g_pooled.to(acc), h32, prompt_start, prompt_end, mode, w32)
    g_w = g_w if w_sa is None else g_w.to(w_sa.dtype)
    return (g_hidden.to(hidden.dtype), g_w, *g_bank)
