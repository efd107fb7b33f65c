"""Argument checks shared by every backend, run before any kernel launches.

``*_shapes`` checks only metadata (shape, dtype, device) and also runs on fake tensors
under ``torch.compile``; ``*_values`` reads index tensors (one host sync) and runs only
in eager execution.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .activations import RATIONAL_NUM_PARAMS, check_activation

POOL_MODES = ("last", "mean", "max", "attn")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _index(name: str, t: Tensor, n: int) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        _fail(f"{name} must have shape [{n}], got {list(t.shape)}")


def _like(name: str, t: Tensor, ref_name: str, ref: Tensor, dtype: bool = True) -> None:
    if t.device != ref.device:
        _fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def _shape(name: str, t: Tensor, expected: list[int], meaning: str) -> None:
    if list(t.shape) != expected:
        _fail(f"{name} must have shape {meaning} = {expected}, got {list(t.shape)}")


def pool_shapes(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
                w_sa: Tensor | None) -> None:
    _float("hidden", hidden)
    if hidden.dim() not in (2, 3):
        _fail(f"hidden must be [B, T, d] (padded) or [total, d] (packed), got {list(hidden.shape)}")
    if prompt_start.dim() != 1:
        _fail(f"prompt_start must be a 1-D tensor [B], got {list(prompt_start.shape)}")
    n = prompt_start.shape[0]
    if hidden.dim() == 3 and n != hidden.shape[0]:
        _fail(f"prompt_start must have shape [B] = [{hidden.shape[0]}] for hidden {list(hidden.shape)}, "
              f"got {list(prompt_start.shape)}")
    _index("prompt_start", prompt_start, n)
    _index("prompt_end", prompt_end, n)
    _like("prompt_start", prompt_start, "hidden", hidden, dtype=False)
    _like("prompt_end", prompt_end, "hidden", hidden, dtype=False)
    if mode not in POOL_MODES:
        _fail(f"mode must be one of {POOL_MODES}, got {mode!r}")
    if (mode == "attn") != (w_sa is not None):
        _fail(f"w_sa must be given exactly when mode == 'attn' (mode={mode!r})")
    if w_sa is not None:
        _like("w_sa", w_sa, "hidden", hidden)
        d = hidden.shape[-1]
        if list(w_sa.shape) not in ([d], [n, d]):
            _fail(f"w_sa must have shape [d] = [{d}] or [B, d] = [{n}, {d}], got {list(w_sa.shape)}")


def pool_values(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor) -> None:
    if prompt_start.numel() == 0:
        return
    rows = hidden.shape[1] if hidden.dim() == 3 else hidden.shape[0]
    lengths = prompt_end - prompt_start
    bad = (prompt_start < 0) | (prompt_end > rows) | (lengths < 1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        s, e = int(prompt_start[b]), int(prompt_end[b])
        where = "T" if hidden.dim() == 3 else "total"
        _fail(f"prompt of row {b} is [{s}, {e}) (prompt length {e - s}): prompt ranges need "
              f"0 <= start < end <= {where} = {rows}, so a prompt length from 1 to {where}")


def generate_shapes(pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                    adapter_ids: Tensor, activation: str, act_params: Tensor | None) -> None:
    _float("pooled", pooled)
    if pooled.dim() != 2:
        _fail(f"pooled must be [B, d], got {list(pooled.shape)}")
    B, d = pooled.shape
    if w_down.dim() != 3:
        _fail(f"w_down must be [A, d, r], got {list(w_down.shape)}")
    A, _, r = w_down.shape
    _shape("w_down", w_down, [A, d, r], "[A, d, r]")
    if w_up.dim() != 3:
        _fail(f"w_up must be [A, r, N], got {list(w_up.shape)}")
    N = w_up.shape[2]
    _shape("w_up", w_up, [A, r, N], "[A, r, N]")
    _shape("b_down", b_down, [A, r], "[A, r]")
    _shape("b_up", b_up, [A, N], "[A, N]")
    for name, t in (("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up)):
        _like(name, t, "pooled", pooled)
    _index("adapter_ids", adapter_ids, B)
    _like("adapter_ids", adapter_ids, "pooled", pooled, dtype=False)
    check_activation(activation, act_params)
    if act_params is not None:
        _shape("act_params", act_params, [A, RATIONAL_NUM_PARAMS], "[A, n_params]")
        _like("act_params", act_params, "pooled", pooled)


def generate_values(w_down: Tensor, adapter_ids: Tensor) -> None:
    if adapter_ids.numel() == 0:
        return
    A = w_down.shape[0]
    bad = (adapter_ids < -1) | (adapter_ids >= A)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        _fail(f"adapter_ids[{b}] = {int(adapter_ids[b])} is out of range: expected -1 (no adjustment) "
              f"or an adapter index in [0, {A})")


def scale_shapes(x: Tensor, v: Tensor, token_rows: Tensor | None) -> None:
    _float("x", x)
    _like("v", v, "x", x)
    if v.dim() != 2:
        _fail(f"v must be [B, n], got {list(v.shape)}")
    if x.dim() < 2 or x.shape[-1] != v.shape[1]:
        _fail(f"x must end in n = {v.shape[1]} features to match v {list(v.shape)}, got {list(x.shape)}")
    if token_rows is None:
        if x.shape[0] != v.shape[0]:
            _fail(f"x must be [B, ..., n] with B = {v.shape[0]} rows to match v, got {list(x.shape)}")
    else:
        if x.dim() != 2:
            _fail(f"x must be packed [total, n] when token_rows is given, got {list(x.shape)}")
        _index("token_rows", token_rows, x.shape[0])
        _like("token_rows", token_rows, "x", x, dtype=False)


def scale_values(v: Tensor, token_rows: Tensor | None) -> None:
    if token_rows is None or token_rows.numel() == 0:
        return
    bad = (token_rows < 0) | (token_rows >= v.shape[0])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _fail(f"token_rows[{i}] = {int(token_rows[i])} is out of range [0, B = {v.shape[0]})")


def pool_generate_shapes(hidden: Tensor, prompt_start: Tensor, prompt_end: Tensor, mode: str,
                         w_sa: Tensor | None, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
                         adapter_ids: Tensor, activation: str, act_params: Tensor | None) -> None:
    pool_shapes(hidden, prompt_start, prompt_end, mode, w_sa)
    _float("w_down", w_down)
    pooled = hidden.new_empty((prompt_start.shape[0], hidden.shape[-1]), dtype=w_down.dtype)
    generate_shapes(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params)


GLU_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")  # act of a gated FFN


def _row_scale(name: str, t: Tensor, v: Tensor) -> None:
    """t [B, ..., n] scaled by v [B, n]."""
    if v.dim() != 2:
        _fail(f"v must be [B, n], got {list(v.shape)}")
    if t.dim() < 2 or t.shape[0] != v.shape[0] or t.shape[-1] != v.shape[1]:
        _fail(f"{name} must be [B, ..., n] = [{v.shape[0]}, ..., {v.shape[1]}] to match v, got {list(t.shape)}")


def scaled_glu_shapes(gate: Tensor, up: Tensor, v: Tensor, activation: str) -> None:
    _float("gate", gate)
    _like("up", up, "gate", gate)
    _like("v", v, "gate", gate)
    if up.shape != gate.shape:
        _fail(f"up must have gate's shape {list(gate.shape)}, got {list(up.shape)}")
    _row_scale("gate", gate, v)
    if activation not in GLU_ACTIVATIONS:
        _fail(f"activation must be one of {GLU_ACTIVATIONS}, got {activation!r}")


def scaled_linear_shapes(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor) -> None:
    _float("x", x)
    _like("weight", weight, "x", x)
    _like("v", v, "x", x)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        _fail(f"weight must be [n, k] with k = {x.shape[-1]} (x's last dim), got {list(weight.shape)}")
    if bias is not None:
        _like("bias", bias, "x", x)
        _shape("bias", bias, [weight.shape[0]], "[n]")
    if v.dim() != 2 or list(v.shape) != [x.shape[0], weight.shape[0]]:
        _fail(f"v must be [B, n] = [{x.shape[0]}, {weight.shape[0]}], got {list(v.shape)}")
