"""scale: per-row rescale of an activation, broadcast over that row's tokens.

x [B, ..., n] with v [B, n], or packed x [total, n] with token_rows [total] (the row of
each token) -> x ⊙ v[row], in x's dtype.
"""
from __future__ import annotations

from torch import Tensor

from .common import acc_dtype, broadcast_rows


def scale(x: Tensor, v: Tensor, token_rows: Tensor | None = None) -> Tensor:
    # One product rounded once: PyTorch already computes a 16-bit multiply in fp32, so no
    # explicit upcast (this runs per projection per decode token).
    return x * broadcast_rows(v, x, token_rows)


def scale_backward(grad: Tensor, x: Tensor, v: Tensor,
                   token_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """-> (grad_x = grad ⊙ v[row], grad_v[b] = Σ over b's tokens of grad ⊙ x)."""
    acc = acc_dtype(x.dtype)
    g = grad.to(acc)
    grad_x = (g * broadcast_rows(v, x, token_rows).to(acc)).to(x.dtype)
    gx = g * x.to(acc)
    if token_rows is not None:
        grad_v = gx.new_zeros(v.shape).index_add_(0, token_rows.long(), gx)
    else:
        grad_v = gx.reshape(v.shape[0], -1, v.shape[1]).sum(1)
    return grad_x, grad_v.to(v.dtype)
