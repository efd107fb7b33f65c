"""pool: one vector per row from the hidden states of that row's prompt.

hidden [B, T, d] (padded; ranges index T) or [total, d] (packed; ranges index total),
prompt_start / prompt_end [B] (half-open), w_sa [d] or [B, d] (``attn`` only) -> [B, d].
"""
from __future__ import annotations

import torch
from torch import Tensor

from .common import acc_dtype


def _flatten(hidden: Tensor, start: Tensor, end: Tensor):
    """Padded input as packed: [B*T, d] with ranges shifted by b*T."""
    start, end = start.long(), end.long()
    if hidden.dim() == 2:
        return hidden, start, end
    B, T, d = hidden.shape
    offset = torch.arange(B, device=hidden.device) * T
    return hidden.reshape(B * T, d), start + offset, end + offset


def _prompt_tokens(flat: Tensor, start: Tensor, end: Tensor):
    """Each row's prompt, right-padded: token indices [B, L] and validity mask [B, L]."""
    lengths = end - start
    L = int(lengths.max())
    j = torch.arange(L, device=flat.device)
    valid = j[None, :] < lengths[:, None]
    index = torch.where(valid, start[:, None] + j, start[:, None])
    return index, valid


def _attn_weights(x: Tensor, valid: Tensor, w: Tensor) -> Tensor:
    """Softmax over each row's prompt of s_t = H_t · w_sa.  x [B, L, d], w [d] or [B, d]."""
    w = w.expand(x.shape[0], -1)
    scores = torch.einsum("bld,bd->bl", x, w).masked_fill(~valid, float("-inf"))
    return torch.softmax(scores, dim=1)


def pool(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
         w_sa: Tensor | None = None) -> Tensor:
    d = hidden.shape[-1]
    if prompt_start.numel() == 0:
        return hidden.new_empty(0, d)
    acc = acc_dtype(hidden.dtype)
    flat, start, end = _flatten(hidden, prompt_start, prompt_end)
    if mode == "last":
        return flat[end - 1]
    index, valid = _prompt_tokens(flat, start, end)
    x = flat[index].to(acc)  # [B, L, d]
    if mode == "mean":
        out = (x * valid[..., None]).sum(1) / (end - start)[:, None].to(acc)
    elif mode == "max":
        out = x.masked_fill(~valid[..., None], float("-inf")).amax(1)
    elif mode == "attn":
        alpha = _attn_weights(x, valid, w_sa.to(acc))
        out = torch.einsum("bl,bld->bd", alpha, x)
    else:
        raise ValueError(f"unknown pool mode {mode!r}")
    return out.to(hidden.dtype)


def pool_backward(grad: Tensor, hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor,
                  mode: str, w_sa: Tensor | None) -> tuple[Tensor, Tensor]:
    """-> (grad_hidden like hidden, grad_w_sa like w_sa, or empty [0] when w_sa is None)."""
    acc = acc_dtype(hidden.dtype)
    flat, start, end = _flatten(hidden, prompt_start, prompt_end)
    grad_flat = torch.zeros(flat.shape, dtype=acc, device=flat.device)
    grad_w = None if w_sa is None else torch.zeros(w_sa.shape, dtype=acc, device=w_sa.device)
    if prompt_start.numel() > 0:
        g = grad.to(acc)
        if mode == "last":
            grad_flat.index_add_(0, end - 1, g)
        else:
            index, valid = _prompt_tokens(flat, start, end)
            x = flat[index].to(acc)
            if mode == "mean":
                per_token = (g / (end - start)[:, None].to(acc))[:, None, :].expand_as(x)
            elif mode == "max":
                # the gradient goes to the first maximal token of each feature
                arg = x.masked_fill(~valid[..., None], float("-inf")).argmax(1, keepdim=True)
                per_token = torch.zeros_like(x).scatter_(1, arg, g[:, None, :])
            elif mode == "attn":
                w = w_sa.to(acc)
                alpha = _attn_weights(x, valid, w)
                d_alpha = torch.einsum("bld,bd->bl", x, g)
                d_score = alpha * (d_alpha - (alpha * d_alpha).sum(1, keepdim=True))
                w_rows = w.expand(x.shape[0], -1)
                per_token = alpha[..., None] * g[:, None, :] + d_score[..., None] * w_rows[:, None, :]
                gw = torch.einsum("bl,bld->bd", d_score, x)
                grad_w = gw.sum(0) if w_sa.dim() == 1 else gw
            else:
                raise ValueError(f"unknown pool mode {mode!r}")
            grad_flat.index_add_(0, index[valid], per_token[valid])
    grad_hidden = grad_flat.reshape(hidden.shape).to(hidden.dtype)
    grad_w = hidden.new_empty(0) if grad_w is None else grad_w.to(w_sa.dtype)
    return grad_hidden, grad_w
