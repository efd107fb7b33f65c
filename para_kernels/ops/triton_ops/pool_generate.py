"""pool_generate on the Triton backend: the pool kernel, then the generate kernels.

Three launches per layer at prefill (pool, down-projection, up-projection); the single-launch
fusion is future work. The pooled vector is written in the hidden states' dtype in between.
"""
from __future__ import annotations

from .generate import generate, generate_backward
from .pool import pool, pool_backward


def pool_generate(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up, adapter_ids,
                  activation, act_params=None):
    """hidden [B,T,d] | [total,d] -> v [B,N] in the bank's dtype."""
    pooled = pool(hidden, prompt_start, prompt_end, mode, w_sa)
    return generate(pooled.to(w_down.dtype), w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)


def pool_generate_backward(grad, hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up,
                           adapter_ids, activation, act_params):
    """-> gradients of (hidden, w_sa or empty, w_down, b_down, w_up, b_up, act_params or empty)."""
    pooled = pool(hidden, prompt_start, prompt_end, mode, w_sa).to(w_down.dtype)
    g_pooled, *g_bank = generate_backward(grad, pooled, w_down, b_down, w_up, b_up, adapter_ids, activation,
                                          act_params)
    g_hidden, g_w = pool_backward(g_pooled.to(hidden.dtype), hidden, prompt_start, prompt_end, mode, w_sa)
    return (g_hidden, g_w, *g_bank)
