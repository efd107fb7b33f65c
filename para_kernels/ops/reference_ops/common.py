"""Helpers every reference op shares."""
from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def broadcast_rows(v: Tensor, x: Tensor, token_rows: Tensor | None) -> Tensor:
    """v [B, n] laid out to broadcast against x: v[token_rows] for packed x [total, n], else
    v reshaped to [B, 1, ..., 1, n] for x [B, ..., n]."""
    if token_rows is not None:
        return v.index_select(0, token_rows)  # about twice as fast as v[token_rows] on the CPU
    return v.reshape(v.shape[0], *([1] * (x.dim() - 2)), v.shape[1])
