"""Fused variants, so the rescale costs no extra pass over memory (PARA_SPEC §3).

pool_generate: pool then generate in one op (one launch per layer at prefill).
scaled_glu:    act(gate) ⊙ (up ⊙ v[row])  — a gated FFN's product with l_u folded in.
scaled_linear: (x Wᵀ + b) ⊙ v[row]         — a q / v projection with the scale as epilogue.
Rows: x-like inputs are [B, ..., n] with v [B, n] (every token of row b uses v[b]).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import activation_backward
from .common import acc_dtype
from .generate import generate, generate_backward
from .pool import pool, pool_backward
from .scale import _rows


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


def _glu_act(gate: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")


def _glu_act_grad(gate: Tensor, activation: str) -> Tensor:
    """d act / d gate, written out (autograd is off inside an op's implementation)."""
    if activation == "gelu_tanh":  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (gate + 0.044715 * gate**3))
        return 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * c * (1 + 3 * 0.044715 * gate * gate)
    return activation_backward(gate, activation, None, torch.ones_like(gate))[0]


def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """gate, up [B, ..., n], v [B, n] -> act(gate) ⊙ up ⊙ v[b], in gate's dtype."""
    acc = acc_dtype(gate.dtype)
    out = _glu_act(gate.to(acc), activation) * up.to(acc) * _rows(v, gate, None).to(acc)
    return out.to(gate.dtype)


def scaled_glu_backward(grad, gate, up, v, activation) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(gate.dtype)
    g, gt, u, vr = grad.to(acc), gate.to(acc), up.to(acc), _rows(v, gate, None).to(acc)
    a = _glu_act(gt, activation)
    g_gate = g * u * vr * _glu_act_grad(gt, activation)
    g_up = g * a * vr
    g_v = (g * a * u).reshape(v.shape[0], -1, v.shape[1]).sum(1)
    return g_gate.to(gate.dtype), g_up.to(up.dtype), g_v.to(v.dtype)


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor) -> Tensor:
    """x [B, ..., k], weight [n, k], bias [n], v [B, n] -> (x Wᵀ + b) ⊙ v[b], in x's dtype."""
    acc = acc_dtype(x.dtype)
    y = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return (y * _rows(v, y, None).to(acc)).to(x.dtype)


def scaled_linear_backward(grad, x, weight, bias, v) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of (x, weight, bias or empty, v)."""
    acc = acc_dtype(x.dtype)
    xs, w = x.to(acc), weight.to(acc)
    y = F.linear(xs, w, None if bias is None else bias.to(acc))
    gy = grad.to(acc) * _rows(v, y, None).to(acc)  # gradient of the unscaled output
    g_x = gy @ w
    g_w = gy.reshape(-1, w.shape[0]).T @ xs.reshape(-1, w.shape[1])
    g_b = x.new_empty(0) if bias is None else gy.reshape(-1, w.shape[0]).sum(0).to(bias.dtype)
    g_v = (grad.to(acc) * y).reshape(v.shape[0], -1, v.shape[1]).sum(1)
    return g_x.to(x.dtype), g_w.to(weight.dtype), g_b, g_v.to(v.dtype)
