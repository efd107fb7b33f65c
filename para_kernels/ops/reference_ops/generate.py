"""generate: the per-row vectors v = 1 + g(p W_down[a] + b_down[a]) W_up[a] + b_up[a].

pooled [B, d], bank w_down [A, d, r], b_down [A, r], w_up [A, r, N], b_up [A, N],
adapter_ids [B] (-1: no adjustment, v = 1), act_params [A, 10] ('rational' only) -> [B, N].
Rows are grouped by adapter so each adapter's weights are read once (as BGMV kernels do).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..activations import activation_backward, activation_forward
from .common import acc_dtype


def _groups(adapter_ids: Tensor):
    """(adapter index, its rows) for every adapter used in the batch."""
    ids = adapter_ids.long()
    for a in torch.unique(ids).tolist():
        if a >= 0:
            yield a, (ids == a).nonzero().squeeze(1)


def _bank(acc, a, w_down, b_down, w_up, b_up, act_params):
    params = None if act_params is None else act_params[a].to(acc)
    return w_down[a].to(acc), b_down[a].to(acc), w_up[a].to(acc), b_up[a].to(acc), params


def generate(pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
             adapter_ids: Tensor, activation: str, act_params: Tensor | None = None) -> Tensor:
    acc = acc_dtype(pooled.dtype)
    out = torch.ones(pooled.shape[0], w_up.shape[2], dtype=acc, device=pooled.device)
    for a, rows in _groups(adapter_ids):
        wd, bd, wu, bu, params = _bank(acc, a, w_down, b_down, w_up, b_up, act_params)
        z = activation_forward(pooled[rows].to(acc) @ wd + bd, activation, params)
        out[rows] = 1.0 + z @ wu + bu
    return out.to(pooled.dtype)


def generate_backward(grad: Tensor, pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor,
                      b_up: Tensor, adapter_ids: Tensor, activation: str,
                      act_params: Tensor | None) -> tuple[Tensor, ...]:
    """-> gradients of (pooled, w_down, b_down, w_up, b_up, act_params), each like its input
    (act_params' is empty [0] when it is None). Rows with id -1 get and give zero gradient."""
    acc = acc_dtype(pooled.dtype)
    g_pooled = torch.zeros(pooled.shape, dtype=acc, device=pooled.device)
    g_wd, g_bd = torch.zeros_like(w_down, dtype=acc), torch.zeros_like(b_down, dtype=acc)
    g_wu, g_bu = torch.zeros_like(w_up, dtype=acc), torch.zeros_like(b_up, dtype=acc)
    g_params = None if act_params is None else torch.zeros_like(act_params, dtype=acc)
    for a, rows in _groups(adapter_ids):
        wd, bd, wu, bu, params = _bank(acc, a, w_down, b_down, w_up, b_up, act_params)
        p = pooled[rows].to(acc)
        dv = grad[rows].to(acc)
        h = p @ wd + bd
        z = activation_forward(h, activation, params)
        g_wu[a] = z.T @ dv
        g_bu[a] = dv.sum(0)
        dh, dparams = activation_backward(h, activation, params, dv @ wu.T)
        g_wd[a] = p.T @ dh
        g_bd[a] = dh.sum(0)
        g_pooled[rows] = dh @ wd.T
        if g_params is not None:
            g_params[a] = dparams
    g_params = pooled.new_empty(0) if g_params is None else g_params.to(act_params.dtype)
    return (g_pooled.to(pooled.dtype), g_wd.to(w_down.dtype), g_bd.to(b_down.dtype),
            g_wu.to(w_up.dtype), g_bu.to(b_up.dtype), g_params)
