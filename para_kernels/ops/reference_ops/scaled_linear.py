"""scaled_linear: (x Wᵀ + b) ⊙ v[row], a q / v projection with the scale as its epilogue, so
the rescale costs no extra pass over memory (docs/spec.md §3). x [B, ..., k] with v [B, n]: every
token of row b uses v[b]."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .common import acc_dtype, broadcast_rows


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor) -> Tensor:
    """x [B, ..., k], weight [n, k], bias [n], v [B, n] -> (x Wᵀ + b) ⊙ v[b], in x's dtype."""
    acc = acc_dtype(x.dtype)
    y = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return (y * broadcast_rows(v, y, None).to(acc)).to(x.dtype)


def scaled_linear_backward(grad, x, weight, bias, v) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> gradients of (x, weight, bias or empty, v)."""
    acc = acc_dtype(x.dtype)
    xs, w = x.to(acc), weight.to(acc)
    y = F.linear(xs, w, None if bias is None else bias.to(acc))
    gy = grad.to(acc) * broadcast_rows(v, y, None).to(acc)  # gradient of the unscaled output
    g_x = gy @ w
    g_w = gy.reshape(-1, w.shape[0]).T @ xs.reshape(-1, w.shape[1])
    g_b = x.new_empty(0) if bias is None else gy.reshape(-1, w.shape[0]).sum(0).to(bias.dtype)
    g_v = (grad.to(acc) * y).reshape(v.shape[0], -1, v.shape[1]).sum(1)
    return g_x.to(x.dtype), g_w.to(weight.dtype), g_b, g_v.to(v.dtype)
