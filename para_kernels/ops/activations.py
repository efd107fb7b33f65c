"""Generator activations ``g`` (docs/spec.md §1), forward and derivative, in plain PyTorch.

The derivative is written out, not taken by autograd, so that every backend's backward
has the same closed form to match. All functions work on fp32/fp64 tensors; callers upcast.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity", "rational")

# Safe Padé activation unit (Molina et al., 2020), the learnable activation of the sibling
# papers:  R(x) = (a0 + a1 x + ... + a5 x^5) / (1 + |b1||x| + |b2||x|^2 + |b3||x|^3 + |b4||x|^4).
# The denominator is >= 1, so R has no poles. Coefficients are stored as [a0..a5, b1..b4].
RATIONAL_NUM_DEGREE = 5
RATIONAL_DEN_DEGREE = 4
RATIONAL_NUM_PARAMS = RATIONAL_NUM_DEGREE + 1 + RATIONAL_DEN_DEGREE
# Least-squares fit of GELU on [-5, 5] (max abs error 5.9e-3) with b4 held at 1e-6: off
# zero, so that its gradient (through |b4|) is not stuck at zero.
RATIONAL_GELU_INIT = (
    -0.0035193548, 0.5122449, 0.42842115, 0.12446376, 0.014169024, 0.00045658033,
    0.053988685, 0.21172605, 0.0099900678, 1e-6,
)

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str, params: Tensor | None) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    if (name == "rational") != (params is not None):
        raise ValueError(
            "act_params must be given exactly when activation == 'rational' "
            f"(activation={name!r}, act_params={'given' if params is not None else 'None'})"
        )


def _rational_parts(x: Tensor, params: Tensor):
    """params: [..., 10] broadcastable against x[..., None]."""
    a = params[..., : RATIONAL_NUM_DEGREE + 1]
    b = params[..., RATIONAL_NUM_DEGREE + 1 :]
    xp = torch.stack([x**j for j in range(RATIONAL_NUM_DEGREE + 1)], dim=-1)  # [..., 6]
    ax = x.abs()
    axp = torch.stack([ax ** (k + 1) for k in range(RATIONAL_DEN_DEGREE)], dim=-1)  # [..., 4]
    num = (a * xp).sum(-1)
    den = 1.0 + (b.abs() * axp).sum(-1)
    return a, b, xp, axp, num, den


def activation_forward(x: Tensor, name: str, params: Tensor | None = None) -> Tensor:
    """g(x). x: [rows, r]; params: the 10 coefficients of one adapter for 'rational'."""
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "identity":
        return x
    if name == "rational":
        *_, num, den = _rational_parts(x, params)
        return num / den
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_backward(
    x: Tensor, name: str, params: Tensor | None, grad: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(dL/dx, dL/dparams) given dL/dg(x) = grad; dL/dparams is [10], summed over x."""
    if name == "relu":
        return grad * (x > 0).to(grad.dtype), None
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT2))
        pdf = torch.exp(-0.5 * x * x) * _INV_SQRT2PI
        return grad * (cdf + x * pdf), None
    if name == "silu":
        s = torch.sigmoid(x)
        return grad * (s * (1.0 + x * (1.0 - s))), None
    if name == "tanh":
        t = torch.tanh(x)
        return grad * (1.0 - t * t), None
    if name == "identity":
        return grad, None
    if name == "rational":
        a, b, xp, axp, num, den = _rational_parts(x, params)
        j = torch.arange(1, RATIONAL_NUM_DEGREE + 1, dtype=x.dtype, device=x.device)
        k = torch.arange(1, RATIONAL_DEN_DEGREE + 1, dtype=x.dtype, device=x.device)
        dnum = (a[..., 1:] * j * xp[..., :-1]).sum(-1)
        # d/dx |x|^k = k |x|^(k-1) sign(x)
        axpm1 = torch.cat([torch.ones_like(x)[..., None], axp[..., :-1]], dim=-1)
        dden = (b.abs() * k * axpm1).sum(-1) * torch.sign(x)
        gx = grad * (dnum * den - num * dden) / (den * den)
        ga = (grad / den)[..., None] * xp  # [..., r, 6]
        gb = (-grad * num / (den * den))[..., None] * axp * torch.sign(b)  # [..., r, 4]
        return gx, torch.cat([ga, gb], dim=-1).reshape(-1, RATIONAL_NUM_PARAMS).sum(0)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
