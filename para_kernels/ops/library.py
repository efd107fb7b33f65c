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


def _values_checkable(t: Tensor) -> bool:
    """Value checks read indices back to the host: not while a CUDA graph is being captured."""
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------- pool
@torch.library.custom_op("para::pool", mutates_args=())
def pool(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
         w_sa: Optional[Tensor] = None) -> Tensor:
    checks.pool_shapes(hidden, prompt_start, prompt_end, mode, w_sa)
    if _values_checkable(hidden):
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
    if _values_checkable(pooled):
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
    if _values_checkable(x):
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


# ---------------------------------------------------------------- pool_generate (fused)
@torch.library.custom_op("para::pool_generate", mutates_args=())
def pool_generate(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str, w_sa: Optional[Tensor],
                  w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, adapter_ids: Tensor,
                  activation: str, act_params: Optional[Tensor] = None) -> Tensor:
    args = (hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up, adapter_ids, activation,
            act_params)
    checks.pool_generate_shapes(*args)
    if _values_checkable(hidden):
        checks.pool_values(hidden, prompt_start, prompt_end)
        checks.generate_values(w_down, adapter_ids)
    return _impl("pool_generate", hidden.device)(*args)


@pool_generate.register_fake
def _(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up, adapter_ids, activation,
      act_params=None):
    checks.pool_generate_shapes(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up,
                                adapter_ids, activation, act_params)
    return w_down.new_empty(prompt_start.shape[0], w_up.shape[2])


@torch.library.custom_op("para::pool_generate_backward", mutates_args=())
def pool_generate_backward(grad: Tensor, hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
                           w_sa: Optional[Tensor], w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                           adapter_ids: Tensor, activation: str, act_params: Optional[Tensor]
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl("pool_generate_backward", hidden.device)(grad, hidden, prompt_start, prompt_end, mode, w_sa,
                                                           w_down, b_down, w_up, b_up, adapter_ids, activation,
                                                           act_params)


@pool_generate_backward.register_fake
def _(grad, hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up, adapter_ids, activation,
      act_params):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden), empty if w_sa is None else torch.empty_like(w_sa), torch.empty_like(w_down),
            torch.empty_like(b_down), torch.empty_like(w_up), torch.empty_like(b_up),
            empty if act_params is None else torch.empty_like(act_params))


def _pool_generate_setup(ctx, inputs, output):
    hidden, start, end, mode, w_sa, w_down, b_down, w_up, b_up, ids, activation, act_params = inputs
    ctx.mode, ctx.activation = mode, activation
    ctx.has_w, ctx.has_params = w_sa is not None, act_params is not None
    ctx.save_for_backward(hidden, start, end, w_sa, w_down, b_down, w_up, b_up, ids, act_params)


def _pool_generate_grad(ctx, grad):
    hidden, start, end, w_sa, w_down, b_down, w_up, b_up, ids, act_params = ctx.saved_tensors
    g_hidden, g_w, *g_bank, g_params = pool_generate_backward(
        grad.contiguous(), hidden, start, end, ctx.mode, w_sa, w_down, b_down, w_up, b_up, ids, ctx.activation,
        act_params)
    return (g_hidden, None, None, None, g_w if ctx.has_w else None, *g_bank, None, None,
            g_params if ctx.has_params else None)


pool_generate.register_autograd(_pool_generate_grad, setup_context=_pool_generate_setup)


# ---------------------------------------------------------------- scaled_glu (fused consumer)
@torch.library.custom_op("para::scaled_glu", mutates_args=())
def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    checks.scaled_glu_shapes(gate, up, v, activation)
    return _impl("scaled_glu", gate.device)(gate, up, v, activation)


@scaled_glu.register_fake
def _(gate, up, v, activation="silu"):
    checks.scaled_glu_shapes(gate, up, v, activation)
    return torch.empty_like(gate)


@torch.library.custom_op("para::scaled_glu_backward", mutates_args=())
def scaled_glu_backward(grad: Tensor, gate: Tensor, up: Tensor, v: Tensor,
                        activation: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("scaled_glu_backward", gate.device)(grad, gate, up, v, activation)


@scaled_glu_backward.register_fake
def _(grad, gate, up, v, activation):
    return torch.empty_like(gate), torch.empty_like(up), torch.empty_like(v)


def _scaled_glu_setup(ctx, inputs, output):
    gate, up, v, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate, up, v)


def _scaled_glu_grad(ctx, grad):
    gate, up, v = ctx.saved_tensors
    return (*scaled_glu_backward(grad.contiguous(), gate, up, v, ctx.activation), None)


scaled_glu.register_autograd(_scaled_glu_grad, setup_context=_scaled_glu_setup)


# ---------------------------------------------------------------- scaled_linear (fused consumer)
@torch.library.custom_op("para::scaled_linear", mutates_args=())
def scaled_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], v: Tensor) -> Tensor:
    checks.scaled_linear_shapes(x, weight, bias, v)
    return _impl("scaled_linear", x.device)(x, weight, bias, v)


@scaled_linear.register_fake
def _(x, weight, bias, v):
    checks.scaled_linear_shapes(x, weight, bias, v)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("para::scaled_linear_backward", mutates_args=())
def scaled_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl("scaled_linear_backward", x.device)(grad, x, weight, bias, v)


@scaled_linear_backward.register_fake
def _(grad, x, weight, bias, v):
    return (torch.empty_like(x), torch.empty_like(weight),
            x.new_empty(0) if bias is None else torch.empty_like(bias), torch.empty_like(v))


def _scaled_linear_setup(ctx, inputs, output):
    x, weight, bias, v = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, v)


def _scaled_linear_grad(ctx, grad):
    x, weight, bias, v = ctx.saved_tensors
    g_x, g_w, g_b, g_v = scaled_linear_backward(grad.contiguous(), x, weight, bias, v)
    return g_x, g_w, (g_b if ctx.has_bias else None), g_v


scaled_linear.register_autograd(_scaled_linear_grad, setup_context=_scaled_linear_setup)
