"""The three PARA ops: pool -> generate -> scale (docs/spec.md §3).

These functions are the public entry points; each calls the ``torch.ops.para.*`` custom op,
which checks its arguments and runs the backend chosen by :mod:`.dispatch`. Shapes:

    pool(hidden [B,T,d] | [total,d], prompt_start [B], prompt_end [B], mode, w_sa [d]|[B,d]) -> [B,d]
    generate(pooled [B,d], w_down [A,d,r], b_down [A,r], w_up [A,r,N], b_up [A,N],
             adapter_ids [B], activation, act_params [A,10]) -> v [B,N] (already 1 + ...)
    scale(x [B,...,n] | [total,n], v [B,n], token_rows [total]) -> x ⊙ v[row]

Fused variants, which remove the rescale's extra pass over memory:

    pool_generate(hidden, prompt_start, prompt_end, mode, w_sa, <generate's bank>) -> v [B,N]
    scaled_glu(gate [B,...,n], up [B,...,n], v [B,n], activation) -> act(gate) ⊙ up ⊙ v[row]
    scaled_linear(x [B,...,k], weight [n,k], bias [n], v [B,n]) -> (x Wᵀ + b) ⊙ v[row]
"""
from __future__ import annotations

import torch
from torch import Tensor

# Importing each backend package registers it with the dispatcher; library defines the custom ops.
from . import checks, cuda_ops, dispatch, library, reference_ops, triton_ops  # noqa: F401
from .activations import ACTIVATIONS, RATIONAL_GELU_INIT, RATIONAL_NUM_PARAMS
from .checks import POOL_MODES
from .dispatch import available_backends, backend_for, get_backend, set_backend

__all__ = [
    "pool", "generate", "scale", "pool_generate", "scaled_glu", "scaled_linear",
    "set_backend", "get_backend", "backend_for", "available_backends",
    "POOL_MODES", "ACTIVATIONS", "RATIONAL_GELU_INIT", "RATIONAL_NUM_PARAMS",
]


def pool(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str = "last",
         w_sa: Tensor | None = None) -> Tensor:
    """Pool each row's prompt ``[prompt_start[b], prompt_end[b])`` into one vector.

    hidden: [B, T, d] padded (ranges index T) or [total, d] packed (ranges index total).
    mode: 'last' | 'mean' | 'max' | 'attn' (softmax over s_t = H_t·w_sa, w_sa [d] or [B, d]).
    Returns [B, d] in hidden's dtype.
    """
    return torch.ops.para.pool(hidden, prompt_start, prompt_end, mode, w_sa)


def generate(pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
             adapter_ids: Tensor, activation: str = "gelu", act_params: Tensor | None = None) -> Tensor:
    """v[b] = 1 + g(pooled[b] W_down[a] + b_down[a]) W_up[a] + b_up[a] with a = adapter_ids[b];
    rows with a = -1 get all ones. Returns [B, N] in pooled's dtype."""
    return torch.ops.para.generate(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)


def scale(x: Tensor, v: Tensor, token_rows: Tensor | None = None) -> Tensor:
    """x ⊙ v broadcast over each row's tokens: x [B, ..., n] with v [B, n], or packed
    x [total, n] with token_rows [total]. The per-token hot path.

    In eager inference on the reference backend the custom-op machinery (autograd and fake
    tensors) has nothing to do, so the reference is called directly, saving its dispatch
    cost at every decode step.
    """
    if (not torch.is_grad_enabled() or not (x.requires_grad or v.requires_grad)) \
            and not torch.compiler.is_compiling() \
            and dispatch.backend_for("scale", x.device) == "reference":
        checks.scale_shapes(x, v, token_rows)
        checks.scale_values(v, token_rows)
        return reference_ops.scale(x, v, token_rows)
    return torch.ops.para.scale(x, v, token_rows)


def pool_generate(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str, w_sa: Tensor | None,
                  w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, adapter_ids: Tensor,
                  activation: str = "gelu", act_params: Tensor | None = None) -> Tensor:
    """generate(pool(hidden, ...), ...) as one op (one launch per layer at prefill); the pooled
    vector stays in fp32. hidden may be 16-bit while the bank is fp32. Returns [B, N] in the
    bank's dtype."""
    return torch.ops.para.pool_generate(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up,
                                        b_up, adapter_ids, activation, act_params)


def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """act(gate) ⊙ (up ⊙ v[row]): a gated FFN's product with PARA's l_u folded in.
    gate, up [B, ..., n]; v [B, n]; activation 'silu' | 'gelu' | 'gelu_tanh'."""
    return torch.ops.para.scaled_glu(gate, up, v, activation)


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor) -> Tensor:
    """(x Wᵀ + b) ⊙ v[row]: a projection with PARA's scale as its epilogue.
    x [B, ..., k]; weight [n, k]; bias [n] or None; v [B, n]."""
    return torch.ops.para.scaled_linear(x, weight, bias, v)
