"""Triton kernels of ``para::scale`` and ``para::scale_backward`` (docs/spec.md §3).

Shapes (as in ``reference_ops.scale``, the spec): x [B, ..., n] with v [B, n] (padded), or packed
x [total, n] with token_rows [total] (int32 or int64, the row of each token) -> x ⊙ v[row] in x's
dtype; any strides. Math in fp32 (fp64 for fp64 inputs); grids depend on shapes only (graph
capture). Determinism: padded grad_v is bitwise run-to-run deterministic (fixed configs, chunks
summed in order); packed grad_v uses fp32 atomics and may differ in the last bits. Design:
docs/kernels.md, "scale".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel_utils import sum_chunks_kernel
from .utils import capture_safe, interpreting, launch_guard, next_pow2, num_sms, view_rows

_MAX_T = 64  # tokens per tile row, and rows per tile: bounds registers and the autotune key
_MAX_CHUNKS = 64  # token chunks per row in the padded backward
_SMALL = 1 << 22  # elements (8 MB of bf16, a few µs) under which the forward is not tuned


def _tile(n_cap: int, tile: int, n: int, R: int, L: int, packed: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, ROWS_PER_TILE) for about ``tile`` elements per program: features first
    (16-byte vectors, long contiguous runs), then tokens of one row, then whole short rows."""
    bn = min(next_pow2(n), n_cap)
    tokens = max(1, tile // bn)
    bt = min(next_pow2(L), tokens, _MAX_T)
    rows_per_tile = 1 if packed else min(max(1, tokens // bt), next_pow2(R), _MAX_T)
    return bn, bt, rows_per_tile


# ------------------------------------------------------------------ forward
def _fwd_configs() -> list:
    # N_CAP caps the feature block, TILE is the elements per program.
    if interpreting():  # each program costs milliseconds there: few, large tiles
        return [triton.Config({"N_CAP": 4096, "TILE": 16384}, num_warps=4)]
    # 16-byte vectors along n and 2K-16K elements per program: 16-64 bytes in flight per thread.
    return [triton.Config({"N_CAP": c, "TILE": t}, num_warps=w) for c, t, w in (
        (256, 2048, 4), (512, 4096, 4), (1024, 4096, 4), (1024, 8192, 8), (2048, 8192, 8),
        (4096, 16384, 8))]


def _fwd_tile(a: dict) -> tuple[int, int, int]:
    return _tile(a["N_CAP"], a["TILE"], a["n"], a["R"], a["L"], a["PACKED"])


def _fwd_prune(configs, named_args, **kwargs):
    """Drop configs that collapse to the same tile for this shape (small n, short rows). Small
    inputs (decode steps) are launch-bound: they get one fixed config and are never benchmarked,
    so a CUDA-graph capture of a decode step never triggers the tuner."""
    a = {**named_args, **kwargs}
    if a["R"] * a["L"] * a["n"] < _SMALL:
        return [configs[min(2, len(configs) - 1)]]
    seen, keep = set(), []
    for c in configs:
        key = (*_fwd_tile({**named_args, **kwargs, **c.kwargs}), c.num_warps)
        if key not in seen:
            seen.add(key)
            keep.append(c)
    return keep


@capture_safe
@triton.autotune(configs=_fwd_configs(), key=["n", "L_KEY", "SIZE_KEY"],
                 prune_configs_by={"early_config_prune": _fwd_prune})
@triton.heuristics({"BLOCK_N": lambda a: _fwd_tile(a)[0], "BLOCK_T": lambda a: _fwd_tile(a)[1],
                    "ROWS_PER_TILE": lambda a: _fwd_tile(a)[2]})
@triton.jit
def _scale_fwd_kernel(x_ptr, v_ptr, rows_ptr, out_ptr, n, R, L,
                      x_stride_row, x_stride_token, x_stride_feat,
                      out_stride_row, out_stride_token, out_stride_feat, v_stride_row, v_stride_feat,
                      L_KEY, SIZE_KEY,  # autotune key only
                      PACKED: tl.constexpr, F64: tl.constexpr, N_CAP: tl.constexpr, TILE: tl.constexpr,
                      ROWS_PER_TILE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[r, t, f] = x[r, t, f] · v[row, f]; row = r (padded) or token_rows[t] (packed, R = 1)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    tiles = (L + BLOCK_T - 1) // BLOCK_T
    row_group = pid // tiles  # the only division: once per program
    r = row_group * ROWS_PER_TILE + tl.arange(0, ROWS_PER_TILE)
    t = (pid - row_group * tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = (r < R)[:, None, None]
    f_ok = (f < n)[None, None, :]
    mask = r_ok & (t < L)[None, :, None] & f_ok
    r64 = r.to(tl.int64)[:, None, None]  # offsets of >2 GiB tensors overflow int32
    t64 = t.to(tl.int64)[None, :, None]
    fo = f[None, None, :]
    if PACKED:  # R = 1: no row term, so the row stride cannot spoil the alignment proof
        x_off = t64 * x_stride_token + fo * x_stride_feat
        o_off = t64 * out_stride_token + fo * out_stride_feat
        row = tl.load(rows_ptr + t, mask=t < L, other=0).to(tl.int64)[None, :, None]  # once per token
        vv = tl.load(v_ptr + row * v_stride_row + fo * v_stride_feat, mask=mask,
                     eviction_policy="evict_last").to(ACC)
    else:
        x_off = r64 * x_stride_row + t64 * x_stride_token + fo * x_stride_feat
        o_off = r64 * out_stride_row + t64 * out_stride_token + fo * out_stride_feat
        vv = tl.load(v_ptr + r64 * v_stride_row + fo * v_stride_feat, mask=r_ok & f_ok,
                     eviction_policy="evict_last").to(ACC)
    xv = tl.load(x_ptr + x_off, mask=mask, eviction_policy="evict_first").to(ACC)
    tl.store(out_ptr + o_off, (xv * vv).to(out_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


# ------------------------------------------------------------------ backward
@triton.jit
def _scale_bwd_padded_kernel(g_ptr, x_ptr, v_ptr, gx_ptr, gv_ptr, part_ptr, n, R, L, chunk, n_chunks,
                             grad_stride_row, grad_stride_token, grad_stride_feat,
                             x_stride_row, x_stride_token, x_stride_feat,
                             out_stride_row, out_stride_token, out_stride_feat, v_stride_row, v_stride_feat,
                             gv_stride_row, gv_stride_feat,
                             DIRECT: tl.constexpr, F64: tl.constexpr,
                             ROWS_PER_TILE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row group, chunk c, feature block): grad_x of tokens [c·chunk, (c+1)·chunk) of
    ROWS_PER_TILE rows, and their Σ grad ⊙ x into gv (DIRECT: one chunk per row) or part[r, c]
    (fp32)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    row_group = pid // n_chunks
    c = pid - row_group * n_chunks
    r = row_group * ROWS_PER_TILE + tl.arange(0, ROWS_PER_TILE)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok = (r < R)[:, None, None]
    f_ok = (f < n)[None, None, :]
    r64 = r.to(tl.int64)[:, None, None]
    fo = f[None, None, :]
    vv = tl.load(v_ptr + r64 * v_stride_row + fo * v_stride_feat, mask=r_ok & f_ok).to(ACC)
    g_base = g_ptr + r64 * grad_stride_row + fo * grad_stride_feat
    x_base = x_ptr + r64 * x_stride_row + fo * x_stride_feat
    o_base = gx_ptr + r64 * out_stride_row + fo * out_stride_feat
    acc = tl.zeros([ROWS_PER_TILE, BLOCK_T, BLOCK_N], dtype=ACC)
    t_end = tl.minimum(c * chunk + chunk, L)
    for t0 in range(c * chunk, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = r_ok & (t < t_end)[None, :, None] & f_ok
        t64 = t.to(tl.int64)[None, :, None]
        g = tl.load(g_base + t64 * grad_stride_token, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        xv = tl.load(x_base + t64 * x_stride_token, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        tl.store(o_base + t64 * out_stride_token, (g * vv).to(gx_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")
        acc += g * xv  # masked lanes loaded 0: they add nothing
    total = tl.sum(acc, axis=1)  # [ROWS_PER_TILE, BLOCK_N]: the tile never crosses a row
    r2 = r.to(tl.int64)[:, None]
    f2 = f[None, :]
    ok2 = (r < R)[:, None] & (f < n)[None, :]
    if DIRECT:
        tl.store(gv_ptr + r2 * gv_stride_row + f2 * gv_stride_feat, total.to(gv_ptr.dtype.element_ty), mask=ok2)
    else:
        tl.store(part_ptr + (r2 * n_chunks + c) * n + f2, total, mask=ok2)


@triton.jit
def _scale_bwd_packed_kernel(g_ptr, x_ptr, v_ptr, rows_ptr, gx_ptr, gv_ptr, n, L, B,
                             grad_stride_token, grad_stride_feat, x_stride_token, x_stride_feat,
                             out_stride_token, out_stride_feat, v_stride_row, v_stride_feat,
                             F64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (token block, feature block): grad_x of its tokens, and atomic adds of Σ grad ⊙ x
    per distinct row of the block into gv [B, n] (contiguous, fp32/fp64, zeroed)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < L
    f_ok = f < n
    mask = t_ok[:, None] & f_ok[None, :]
    t64 = t.to(tl.int64)[:, None]
    fo = f[None, :]
    row = tl.load(rows_ptr + t, mask=t_ok, other=0).to(tl.int64)
    g = tl.load(g_ptr + t64 * grad_stride_token + fo * grad_stride_feat, mask=mask, other=0.0,
                eviction_policy="evict_first").to(ACC)
    xv = tl.load(x_ptr + t64 * x_stride_token + fo * x_stride_feat, mask=mask, other=0.0,
                 eviction_policy="evict_first").to(ACC)
    vv = tl.load(v_ptr + row[:, None] * v_stride_row + fo * v_stride_feat, mask=mask, other=0.0,
                 eviction_policy="evict_last").to(ACC)
    tl.store(gx_ptr + t64 * out_stride_token + fo * out_stride_feat, (g * vv).to(gx_ptr.dtype.element_ty),
             mask=mask, eviction_policy="evict_first")
    prod = g * xv  # masked lanes are 0
    # Fold the tile per distinct row before touching memory (smallest pending row first).
    pending = t_ok
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        r0 = tl.min(tl.where(pending, row, B), axis=0)
        sel = pending & (row == r0)
        part = tl.sum(tl.where(sel[:, None], prod, 0.0), axis=0)
        tl.atomic_add(gv_ptr + r0 * n + f, part, mask=f_ok, sem="relaxed")
        pending = pending & (row != r0)


# ------------------------------------------------------------------ host side
def _bwd_config() -> tuple[int, int, int]:
    """(N_CAP, TILE, num_warps) of the backward kernels: fixed, never autotuned, so results do
    not depend on which config a tuner happened to pick."""
    return (4096, 16384, 4) if interpreting() else (512, 4096, 4)


def scale(x: Tensor, v: Tensor, token_rows: Tensor | None = None) -> Tensor:
    """x [B, ..., n] with v [B, n], or x [total, n] with token_rows [total] -> x ⊙ v[row], x's dtype."""
    out = torch.empty_like(x)  # the fake impl's layout: keep it, so compile sees true strides
    if out.numel() == 0:
        return out
    packed = token_rows is not None
    x3, o3 = view_rows(x, 1 if packed else x.shape[0]), view_rows(out, 1 if packed else x.shape[0])
    if x3 is None or o3 is None:  # middle dims that do not merge: one copy, then the common path
        return out.copy_(scale(x.contiguous(), v, token_rows))
    R, L, n = x3.shape
    rows = token_rows.contiguous() if packed else x3  # x3: placeholder, never read

    def grid(m):
        return triton.cdiv(R, m["ROWS_PER_TILE"]) * triton.cdiv(L, m["BLOCK_T"]), triton.cdiv(n, m["BLOCK_N"])

    size = R * L * n  # retune per 2x of size above _SMALL, not per shape; never below it
    size_key = 0 if size < _SMALL else min(size.bit_length() - _SMALL.bit_length() + 1, 10)
    with launch_guard(x.device):
        _scale_fwd_kernel[grid](x3, v, rows, o3, n, R, L, *x3.stride(), *o3.stride(), v.stride(0), v.stride(1),
                                min(next_pow2(L), _MAX_T), size_key, PACKED=packed, F64=x.dtype == torch.float64)
    return out


def scale_backward(grad: Tensor, x: Tensor, v: Tensor,
                   token_rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """grad, x [B, ..., n] (or [total, n] with token_rows [total]), v [B, n] ->
    (grad_x = grad ⊙ v[row] like x, grad_v [B, n] = Σ over b's tokens of grad ⊙ x, v's dtype)."""
    grad_x, grad_v = torch.empty_like(x), torch.empty_like(v)
    if grad_v.numel() == 0 or x.numel() == 0:
        return grad_x, grad_v.zero_()
    packed = token_rows is not None
    rows = 1 if packed else x.shape[0]
    g3, x3, o3 = view_rows(grad, rows), view_rows(x, rows), view_rows(grad_x, rows)
    if g3 is None or x3 is None or o3 is None:
        gx, gv = scale_backward(grad.contiguous(), x.contiguous(), v, token_rows)
        return grad_x.copy_(gx), gv
    R, L, n = x3.shape
    f64 = x.dtype == torch.float64
    acc = torch.float64 if f64 else torch.float32
    n_cap, tile, warps = _bwd_config()
    bn, bt, rows_per_tile = _tile(n_cap, tile, n, R, L, packed)
    f_blocks = triton.cdiv(n, bn)
    if packed:
        bt = min(bt, 32)  # the per-row fold loop is O(distinct rows · tile): keep tiles short
        gv = torch.zeros(v.shape, dtype=acc, device=x.device)
        with launch_guard(x.device):
            _scale_bwd_packed_kernel[(triton.cdiv(L, bt), f_blocks)](
                g3, x3, v, token_rows.contiguous(), o3, gv, n, L, v.shape[0],
                g3.stride(1), g3.stride(2), x3.stride(1), x3.stride(2), o3.stride(1), o3.stride(2),
                v.stride(0), v.stride(1), F64=f64, BLOCK_T=bt, BLOCK_N=bn, num_warps=warps)
        return grad_x, grad_v.copy_(gv)

    # Cut long rows into chunks so that the programs fill the device: many waves of them, so the
    # last, partial wave costs little; at most _MAX_CHUNKS so the partials stay a few % of traffic.
    groups = triton.cdiv(R, rows_per_tile)
    target, min_chunk = (4, 8) if interpreting() else (16 * num_sms(x.device), 64)
    n_chunks = max(1, min(triton.cdiv(target, groups * f_blocks), triton.cdiv(L, max(min_chunk, bt)),
                          _MAX_CHUNKS))
    chunk = triton.cdiv(triton.cdiv(L, n_chunks), bt) * bt  # whole tiles, so no ragged tile mid-row
    n_chunks = triton.cdiv(L, chunk)
    direct = n_chunks == 1
    part = grad_v if direct else torch.empty(R, n_chunks, n, dtype=acc, device=x.device)
    with launch_guard(x.device):
        _scale_bwd_padded_kernel[(groups * n_chunks, f_blocks)](
            g3, x3, v, o3, grad_v, part, n, R, L, chunk, n_chunks, *g3.stride(), *x3.stride(), *o3.stride(),
            v.stride(0), v.stride(1), grad_v.stride(0), grad_v.stride(1),
            DIRECT=direct, F64=f64, ROWS_PER_TILE=rows_per_tile, BLOCK_T=bt, BLOCK_N=bn, num_warps=warps)
        if not direct:
            sn = min(next_pow2(n), 128)
            sum_chunks_kernel[(R, triton.cdiv(n, sn))](part, grad_v, n, n_chunks, grad_v.stride(0),
                                                        grad_v.stride(1), BLOCK_C=16, BLOCK_N=sn, num_warps=4)
    return grad_x, grad_v
