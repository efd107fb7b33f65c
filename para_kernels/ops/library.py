"""Schemas of the ``para::`` ops, with fake (meta) implementations and autograd.

Each op's real implementation checks its arguments, then calls the backend chosen by
``dispatch``; backward is itself a ``para::*_backward`` op, so kernels can replace it and
``torch.compile`` sees opaque, shape-known nodes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, dispatch


def _impl(op: str, device: torch.device):
    return dispatch.implementation(op, device)


# ---------------------------------------------------------------- pool
@torch.library.custom_op("para::pool", mutates_args=())
def pool(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
         w_sa: Optional[Tensor] = None) -> Tensor:
    checks.pool_shapes(hidden, prompt_start, prompt_end, mode, w_sa)
    checks.pool_values(hidden, prompt_start, prompt_end)
    return _impl("pool", hidden.device)(hidden, prompt_start, prompt_end, mode, w_sa)


@pool.register_fake
def _(hidden, prompt_start, prompt_end, mode, w_sa=None):
    checks.pool_shapes(hidden, prompt_start, prompt_end, mode, w_sa)
    return hidden.new_empty(prompt_start.shape[0], hidden.shape[-1])


@torch.library.custom_op("para::pool_backward", mutates_args=())
def pool_backward(grad: Tensor, hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
                  w_sa: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _impl("pool_backward", hidden.device)(grad, hidden, prompt_start, prompt_end, mode, w_sa)


@pool_backward.register_fake
def _(grad, hidden, prompt_start, prompt_end, mode, w_sa):
    return torch.empty_like(hidden), (hidden.new_empty(0) if w_sa is None else torch.empty_like(w_sa))


def _pool_setup(ctx, inputs, output):
    hidden, prompt_start, prompt_end, mode, w_sa = inputs
    ctx.mode = mode
    ctx.has_w = w_sa is not None
    ctx.save_for_backward(hidden, prompt_start, prompt_end, w_sa)


def _pool_grad(ctx, grad):
    hidden, prompt_start, prompt_end, w_sa = ctx.saved_tensors
    g_hidden, g_w = pool_backward(grad.contiguous(), hidden, prompt_start, prompt_end, ctx.mode, w_sa)
    return g_hidden, None, None, None, (g_w if ctx.has_w else None)


pool.register_autograd(_pool_grad, setup_context=_pool_setup)


# ---------------------------------------------------------------- generate
@torch.library.custom_op("para::generate", mutates_args=())
def generate(pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
             adapter_ids: Tensor, activation: str, act_params: Optional[Tensor] = None) -> Tensor:
    checks.generate_shapes(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)
    checks.generate_values(w_down, adapter_ids)
    return _impl("generate", pooled.device)(pooled, w_down, b_down, w_up, b_up, adapter_ids,
                                             activation, act_params)


@generate.register_fake
def _(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params=None):
    checks.generate_shapes(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)
    return pooled.new_empty(pooled.shape[0], w_up.shape[2])


@torch.library.custom_op("para::generate_backward", mutates_args=())
def generate_backward(grad: Tensor, pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor,
                      b_up: Tensor, adapter_ids: Tensor, activation: str,
                      act_params: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl("generate_backward", pooled.device)(grad, pooled, w_down, b_down, w_up, b_up,
                                                      adapter_ids, activation, act_params)


@generate_backward.register_fake
def _(grad, pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params):
    g_params = pooled.new_empty(0) if act_params is None else torch.empty_like(act_params)
    return (torch.empty_like(pooled), torch.empty_like(w_down), torch.empty_like(b_down),
            torch.empty_like(w_up), torch.empty_like(b_up), g_params)


def _generate_setup(ctx, inputs, output):
    *tensors, activation, act_params = inputs
    ctx.activation = activation
    ctx.has_params = act_params is not None
    ctx.save_for_backward(*tensors, act_params)


def _generate_grad(ctx, grad):
    pooled, w_down, b_down, w_up, b_up, adapter_ids, act_params = ctx.saved_tensors
    grads = generate_backward(grad.contiguous(), pooled, w_down, b_down, w_up, b_up, adapter_ids,
                              ctx.activation, act_params)
    return (*grads[:5], None, None, grads[5] if ctx.has_params else None)


generate.register_autograd(_generate_grad, setup_context=_generate_setup)


# ---------------------------------------------------------------- scale
@torch.library.custom_op("para::scale", mutates_args=())
def scale(x: Tensor, v: Tensor, token_rows: Optional[Tensor] = None) -> Tensor:
    checks.scale_shapes(x, v, token_rows)
    checks.scale_values(v, token_rows)
    return _impl("scale", x.device)(x, v, token_rows)


@scale.register_fake
def _(x, v, token_rows=None):
    checks.scale_shapes(x, v, token_rows)
    return torch.empty_like(x)


@torch.library.custom_op("para::scale_backward", mutates_args=())
def scale_backward(grad: Tensor, x: Tensor, v: Tensor,
                   token_rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _impl("scale_backward", x.device)(grad, x, v, token_rows)


@scale_backward.register_fake
def _(grad, x, v, token_rows):
    return torch.empty_like(x), torch.empty_like(v)


def _scale_setup(ctx, inputs, output):
    x, v, token_rows = inputs
    ctx.save_for_backward(x, v, token_rows)


def _scale_grad(ctx, grad):
    x, v, token_rows = ctx.saved_tensors
    g_x, g_v = scale_backward(grad.contiguous(), x, v, token_rows)
    return g_x, g_v, None


scale.register_autograd(_scale_grad, setup_context=_scale_setup)
