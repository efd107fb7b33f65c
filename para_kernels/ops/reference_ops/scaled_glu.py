"""scaled_glu: act(gate) ⊙ (up ⊙ v[row]), a gated FFN's product with l_u folded in, so the
rescale costs no extra pass over memory (docs/spec.md §3). gate, up [B, ..., n] with v [B, n]:
every token of row b uses v[b]."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import activation_backward
from .common import acc_dtype, broadcast_rows


def glu_activation(gate: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none")


def glu_activation_grad(gate: Tensor, activation: str) -> Tensor:
    """d act / d gate, written out (autograd is off inside an op's implementation)."""
    if activation == "gelu_tanh":  # 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (gate + 0.044715 * gate**3))
        return 0.5 * (1 + t) + 0.5 * gate * (1 - t * t) * c * (1 + 3 * 0.044715 * gate * gate)
    return activation_backward(gate, activation, None, torch.ones_like(gate))[0]


def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """gate, up [B, ..., n], v [B, n] -> act(gate) ⊙ up ⊙ v[b], in gate's dtype."""
    acc = acc_dtype(gate.dtype)
    out = glu_activation(gate.to(acc), activation) * up.to(acc) * broadcast_rows(v, gate, None).to(acc)
    return out.to(gate.dtype)


def scaled_glu_backward(grad, gate, up, v, activation) -> tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(gate.dtype)
    g, gt, u, vr = grad.to(acc), gate.to(acc), up.to(acc), broadcast_rows(v, gate, None).to(acc)
    a = glu_activation(gt, activation)
    g_gate = g * u * vr * glu_activation_grad(gt, activation)
    g_up = g * a * vr
    g_v = (g * a * u).reshape(v.shape[0], -1, v.shape[1]).sum(1)
    return g_gate.to(gate.dtype), g_up.to(up.dtype), g_v.to(v.dtype)
