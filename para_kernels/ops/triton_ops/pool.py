"""Triton kernels of ``para::pool`` and ``para::pool_backward`` (docs/spec.md §3).

hidden [B, T, d] (padded: row b's ranges index its own T tokens) or [total, d] (packed: ranges
index total), prompt_start / prompt_end [B] int32/int64 (half-open), w_sa [d] or [B, d] for
``attn`` -> pooled [B, d] in hidden's dtype, as ``reference_ops.pool`` (the spec). Any strides
(nothing is copied); loads upcast to fp32 (fp64 for fp64 inputs) before any math. Every grid
depends on B and d only; the prompt ranges are read inside the kernels (graph capture).
Determinism: padded backward and a shared w_sa's gradient are deterministic; packed backward
uses fp32 atomics (ranges may overlap). Design: docs/kernels.md, "pool".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_dtypes, capture_safe, interpreting, launch_guard

# The kernels' MODE constexpr: _pool_fwd_kernel runs last / mean / max; attn has its own kernels
# here, and is MODE 3 of the fused pool_generate kernel.
POOL_MODE_IDS = {"last": 0, "mean": 1, "max": 2, "attn": 3}
ATTN_MODE: tl.constexpr = tl.constexpr(POOL_MODE_IDS["attn"])


def _configs(gpu: list[tuple[int, int, int]], interp: tuple[int, int]) -> list[triton.Config]:
    """(BLOCK_T, BLOCK_D, num_warps) configs; one small config under the interpreter, where
    every program instance is slow and autotune cannot time anything."""
    if interpreting():
        return [triton.Config({"BLOCK_T": interp[0], "BLOCK_D": interp[1]})]
    return [triton.Config({"BLOCK_T": t, "BLOCK_D": dd}, num_warps=w) for t, dd, w in gpu]


# Tiles of 2-8K elements: enough loads in flight per SM, 16-byte vectors along d.
_TILE_CONFIGS = [(8, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 8), (32, 128, 4), (2, 1024, 8)]
_ROW_CONFIGS = [(8, 256, 4), (16, 256, 8), (8, 512, 8), (4, 1024, 8), (16, 512, 8)]
_INTERP_TILE = (4, 256)


# ------------------------------------------------------------------ forward
@triton.jit
def _max_nan(x, axis: tl.constexpr):
    """tl.max that keeps NaN, as torch.amax does (tl.max drops it on the GPU). Two plain
    reductions: a custom tl.reduce combine is ~100x slower under the interpreter."""
    has_nan = tl.max((x != x).to(tl.int32), axis) > 0
    return tl.where(has_nan, float("nan"), tl.max(x, axis))


@triton.jit
def pool_slice(row, s, e, offs_d, d_mask, stride_t, stride_d, MODE: tl.constexpr, ACC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """last / mean / max of one row's prompt tokens [s, e) over the features offs_d -> [BLOCK_D]
    (ACC; 'last' in the input dtype). Shared with the fused pool_generate kernel."""
    col = offs_d.to(tl.int64) * stride_d
    if MODE == 0:  # last: a copy, no arithmetic
        res = tl.load(row + (e - 1) * stride_t + col, mask=d_mask)
    else:
        fill = 0.0 if MODE == 1 else float("-inf")
        acc = tl.full([BLOCK_T, BLOCK_D], fill, ACC)
        for t0 in range(s, e, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < e)[:, None] & d_mask[None, :]
            x = tl.load(row + offs_t[:, None] * stride_t + col[None, :], mask=mask, other=fill).to(ACC)
            if MODE == 1:
                acc += x
            else:
                acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)
        if MODE == 1:
            res = tl.sum(acc, 0) / (e - s).to(ACC)
        else:
            res = _max_nan(acc, 0)
    return res


@capture_safe
@triton.autotune(configs=_configs(_TILE_CONFIGS, _INTERP_TILE), key=["d", "MODE", "ROWS_CLASS"])
@triton.jit(do_not_specialize=["ROWS_CLASS"])
def _pool_fwd_kernel(h_ptr, start_ptr, end_ptr, out_ptr, d, stride_b, stride_t, stride_d,
                     ROWS_CLASS, MODE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """last / mean / max. grid (B, cdiv(d, BLOCK_D)); out [B, d] contiguous."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    s = tl.load(start_ptr + b).to(tl.int64)
    e = tl.load(end_ptr + b).to(tl.int64)
    res = pool_slice(h_ptr + b * stride_b, s, e, offs_d, d_mask, stride_t, stride_d, MODE, ACC, BLOCK_T, BLOCK_D)
    tl.store(out_ptr + b * d + offs_d, res, mask=d_mask)


@triton.jit
def attn_pool_row(row, s, e, w_row, acc_row, d, stride_t, stride_d, stride_wd,
                   ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash-style attn pooling of one row: leaves sum_t exp(s_t - m) X_t in acc_row (d ACC
    values of global scratch, so any d fits) and returns 1 / sum_t exp(s_t - m)."""
    ar_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        tl.store(acc_row + d0 + ar_d, tl.zeros([BLOCK_D], ACC), mask=d0 + ar_d < d)
    tl.debug_barrier()  # the zeros are read back below, maybe by other threads
    m = tl.full([], float("-inf"), ACC)
    denom = tl.zeros([], ACC)
    for t0 in range(s, e, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < e
        t_off = offs_t[:, None] * stride_t
        sc = tl.zeros([BLOCK_T, BLOCK_D], ACC)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + ar_d
            d_mask = offs_d < d
            col = offs_d.to(tl.int64) * stride_d
            x = tl.load(row + t_off + col[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(ACC)
            w = tl.load(w_row + offs_d * stride_wd, mask=d_mask, other=0.0).to(ACC)
            sc += x * w[None, :]
        score = tl.where(t_mask, tl.sum(sc, 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(score, 0))
        rescale = tl.exp(m - m_new)
        p = tl.exp(score - m_new)  # 0 on masked tokens
        denom = denom * rescale + tl.sum(p, 0)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + ar_d
            d_mask = offs_d < d
            col = offs_d.to(tl.int64) * stride_d
            x = tl.load(row + t_off + col[None, :], mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(ACC)
            a = tl.load(acc_row + offs_d, mask=d_mask, other=0.0)
            tl.store(acc_row + offs_d, a * rescale + tl.sum(p[:, None] * x, 0), mask=d_mask)
        # the next tile re-reads acc_row, possibly in another thread's registers
        tl.debug_barrier()
        m = m_new
    return 1.0 / denom


@capture_safe
@triton.autotune(configs=_configs(_ROW_CONFIGS, _INTERP_TILE), key=["d", "ROWS_CLASS"])
@triton.jit(do_not_specialize=["ROWS_CLASS"])
def _attn_fwd_kernel(h_ptr, start_ptr, end_ptr, w_ptr, out_ptr, acc_ptr, d,
                     stride_b, stride_t, stride_d, stride_wb, stride_wd, ROWS_CLASS,
                     ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """attn pooling, one program per row. acc_ptr: scratch [B, d] in ACC dtype."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(start_ptr + b).to(tl.int64)
    e = tl.load(end_ptr + b).to(tl.int64)
    acc_row = acc_ptr + b * d
    inv_denom = attn_pool_row(h_ptr + b * stride_b, s, e, w_ptr + b * stride_wb, acc_row, d,
                           stride_t, stride_d, stride_wd, ACC, BLOCK_T, BLOCK_D)
    ar_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + ar_d
        d_mask = offs_d < d
        a = tl.load(acc_row + offs_d, mask=d_mask, other=0.0)
        tl.store(out_ptr + b * d + offs_d, a * inv_denom, mask=d_mask)


# ------------------------------------------------------------------ backward
@capture_safe
@triton.autotune(configs=_configs(_TILE_CONFIGS, _INTERP_TILE), key=["d", "MODE", "PACKED", "ROWS_CLASS"],
                 reset_to_zero=["gh_ptr"])  # packed accumulates atomically: reset between timings
@triton.jit(do_not_specialize=["ROWS_CLASS"])
def _pool_bwd_kernel(g_ptr, h_ptr, start_ptr, end_ptr, gh_ptr, d, T,
                     stride_gb, stride_gd, stride_b, stride_t, stride_d,
                     stride_ob, stride_ot, ROWS_CLASS, MODE: tl.constexpr, PACKED: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """last / mean / max backward. grid (B, cdiv(d, BLOCK_D)). gh: padded, the contiguous
    grad [B, T, d], every element written here; packed, a zeroed [total, d] ACC buffer
    (stride_ob = 0) that receives atomic adds."""
    b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    s = tl.load(start_ptr + b).to(tl.int64)
    e = tl.load(end_ptr + b).to(tl.int64)
    g = tl.load(g_ptr + b * stride_gb + offs_d * stride_gd, mask=d_mask, other=0.0).to(ACC)
    out_row = gh_ptr + b * stride_ob
    if MODE == 1:
        g = g / (e - s).to(ACC)
    if MODE == 2:  # first maximal token per feature (strict > keeps the earliest per slot)
        row = h_ptr + b * stride_b
        col = offs_d.to(tl.int64) * stride_d
        best = tl.full([BLOCK_T, BLOCK_D], float("-inf"), ACC)
        best_t = tl.full([BLOCK_T, BLOCK_D], 2**62, tl.int64)
        # NaN counts as the largest value, as in torch.argmax
        for t0 in range(s, e, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask = (offs_t < e)[:, None] & d_mask[None, :]
            x = tl.load(row + offs_t[:, None] * stride_t + col[None, :], mask=mask,
                        other=float("-inf")).to(ACC)
            better = (x > best) | ((x != x) & (best == best))
            best = tl.where(better, x, best)
            best_t = tl.where(better, offs_t[:, None], best_t)
        top = _max_nan(best, 0)[None, :]
        is_top = (best == top) | ((best != best) & (top != top))
        arg = tl.min(tl.where(is_top, best_t, 2**62), 0)
        arg = tl.where(arg == 2**62, s, arg)  # all -inf: the reference's argmax picks the first
    if PACKED:
        if MODE == 0:
            tl.atomic_add(out_row + (e - 1) * stride_ot + offs_d, g, mask=d_mask, sem="relaxed")
        elif MODE == 1:
            for t0 in range(s, e, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                mask = (offs_t < e)[:, None] & d_mask[None, :]
                val = tl.zeros([BLOCK_T, BLOCK_D], ACC) + g[None, :]
                tl.atomic_add(out_row + offs_t[:, None] * stride_ot + offs_d[None, :], val, mask=mask,
                              sem="relaxed")
        else:
            tl.atomic_add(out_row + arg * stride_ot + offs_d, g, mask=d_mask, sem="relaxed")
    else:
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            if MODE == 0:
                hit = (offs_t == e - 1)[:, None] & d_mask[None, :]
            elif MODE == 1:
                hit = ((offs_t >= s) & (offs_t < e))[:, None] & d_mask[None, :]
            else:
                hit = offs_t[:, None] == arg[None, :]
            val = tl.where(hit, g[None, :], 0.0)
            mask = (offs_t < T)[:, None] & d_mask[None, :]
            tl.store(out_row + offs_t[:, None] * stride_ot + offs_d[None, :], val, mask=mask)


@triton.jit
def _scores_tile(row, w_row, g_row, t_off, t_mask, d, stride_d, stride_wd, stride_gd,
                 ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one token tile: s_t = X_t.w and gx_t = X_t.g, both [BLOCK_T], from one read of X."""
    sc = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    gx = tl.zeros([BLOCK_T, BLOCK_D], ACC)
    for d0 in range(0, d, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d
        x = tl.load(row + t_off + (offs_d.to(tl.int64) * stride_d)[None, :],
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(ACC)
        w = tl.load(w_row + offs_d * stride_wd, mask=d_mask, other=0.0).to(ACC)
        g = tl.load(g_row + offs_d * stride_gd, mask=d_mask, other=0.0).to(ACC)
        sc += x * w[None, :]
        gx += x * g[None, :]
    return tl.where(t_mask, tl.sum(sc, 1), float("-inf")), tl.where(t_mask, tl.sum(gx, 1), 0.0)


@capture_safe
@triton.autotune(configs=_configs(_ROW_CONFIGS, _INTERP_TILE), key=["d", "PACKED", "ROWS_CLASS"],
                 reset_to_zero=["gh_ptr"])
@triton.jit(do_not_specialize=["ROWS_CLASS"])
def _attn_bwd_kernel(g_ptr, h_ptr, start_ptr, end_ptr, w_ptr, gh_ptr, dw_ptr, d, T,
                     stride_gb, stride_gd, stride_b, stride_t, stride_d, stride_wb, stride_wd,
                     stride_ob, stride_ot, ROWS_CLASS, PACKED: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """attn backward, one program per row. gh as in _pool_bwd_kernel; dw_ptr: [B, d] ACC
    scratch that receives this row's dw = sum_t ds_t X_t."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.load(start_ptr + b).to(tl.int64)
    e = tl.load(end_ptr + b).to(tl.int64)
    row = h_ptr + b * stride_b
    w_row = w_ptr + b * stride_wb
    g_row = g_ptr + b * stride_gb
    out_row = gh_ptr + b * stride_ob
    dw_row = dw_ptr + b * d
    ar_d = tl.arange(0, BLOCK_D)
    # pass 1: m = max s, denom = sum exp(s - m), c = sum exp(s - m) gx, all online
    m = tl.full([], float("-inf"), ACC)
    denom = tl.zeros([], ACC)
    c = tl.zeros([], ACC)
    for t0 in range(s, e, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < e
        score, gx = _scores_tile(row, w_row, g_row, offs_t[:, None] * stride_t, t_mask, d,
                                 stride_d, stride_wd, stride_gd, ACC, BLOCK_T, BLOCK_D)
        m_new = tl.maximum(m, tl.max(score, 0))
        rescale = tl.exp(m - m_new)
        p = tl.exp(score - m_new)
        denom = denom * rescale + tl.sum(p, 0)
        c = c * rescale + tl.sum(p * gx, 0)
        m = m_new
    inv_denom = 1.0 / denom
    c = c * inv_denom  # sum_u a_u g.X_u
    for d0 in range(0, d, BLOCK_D):
        tl.store(dw_row + d0 + ar_d, tl.zeros([BLOCK_D], ACC), mask=d0 + ar_d < d)
    tl.debug_barrier()
    # pass 2: per tile, a_t and ds_t = a_t (g.X_t - c), then dX and dw over the d-blocks
    for t0 in range(s, e, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < e
        t_off = offs_t[:, None] * stride_t
        score, gx = _scores_tile(row, w_row, g_row, t_off, t_mask, d,
                                 stride_d, stride_wd, stride_gd, ACC, BLOCK_T, BLOCK_D)
        alpha = tl.exp(score - m) * inv_denom  # 0 on masked tokens
        ds = alpha * (gx - c)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + ar_d
            d_mask = offs_d < d
            mask = t_mask[:, None] & d_mask[None, :]
            x = tl.load(row + t_off + (offs_d.to(tl.int64) * stride_d)[None, :], mask=mask,
                        other=0.0).to(ACC)
            w = tl.load(w_row + offs_d * stride_wd, mask=d_mask, other=0.0).to(ACC)
            g = tl.load(g_row + offs_d * stride_gd, mask=d_mask, other=0.0).to(ACC)
            dx = alpha[:, None] * g[None, :] + ds[:, None] * w[None, :]
            dst = out_row + offs_t[:, None] * stride_ot + offs_d[None, :]
            if PACKED:
                tl.atomic_add(dst, dx, mask=mask, sem="relaxed")
            else:
                tl.store(dst, dx, mask=mask)
            dw = tl.load(dw_row + offs_d, mask=d_mask, other=0.0)
            tl.store(dw_row + offs_d, dw + tl.sum(ds[:, None] * x, 0), mask=d_mask)
        tl.debug_barrier()  # dw_row is re-read by the next tile, maybe by other threads
    if not PACKED:  # zeros on this row's tokens outside the prompt
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            outside = (offs_t < s) | ((offs_t >= e) & (offs_t < T))
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + ar_d
                tl.store(out_row + offs_t[:, None] * stride_ot + offs_d[None, :],
                         tl.zeros([BLOCK_T, BLOCK_D], ACC),
                         mask=outside[:, None] & (offs_d < d)[None, :])


@triton.jit
def _sum_rows_kernel(x_ptr, out_ptr, R, N, BLOCK: tl.constexpr):
    """out[n] = sum_r x[r, n] for contiguous x [R, N], in a fixed order (deterministic);
    with R = 1 it is the cast to out's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ptrs = x_ptr + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for _ in range(1, R):
        ptrs += N
        acc += tl.load(ptrs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


# ------------------------------------------------------------------ host side
def _rows_class(B: int) -> int:
    """Autotune bucket for the batch size: the best tile depends on how many programs run."""
    return min(triton.next_power_of_2(B), 256)


def hidden_strides(hidden: torch.Tensor):
    """(stride_b, stride_t, stride_d); packed rows share one token axis (stride_b = 0)."""
    if hidden.dim() == 3:
        return hidden.stride(0), hidden.stride(1), hidden.stride(2)
    return 0, hidden.stride(0), hidden.stride(1)


def w_sa_strides(w_sa: torch.Tensor):
    return (0, w_sa.stride(0)) if w_sa.dim() == 1 else (w_sa.stride(0), w_sa.stride(1))


def _sum_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (contiguous, N elements) = x.view(R, N).sum(0), cast to out's dtype."""
    N = out.numel()
    if N:
        BLOCK = 1024
        _sum_rows_kernel[(triton.cdiv(N, BLOCK),)](x, out, x.numel() // N, N, BLOCK=BLOCK)
    return out


def pool(hidden: torch.Tensor, prompt_start: torch.Tensor, prompt_end: torch.Tensor, mode: str,
         w_sa: torch.Tensor | None = None) -> torch.Tensor:
    """hidden [B, T, d] or [total, d], ranges [B] -> pooled [B, d] in hidden's dtype."""
    if mode not in POOL_MODE_IDS:
        raise ValueError(f"unknown pool mode {mode!r}")
    B, d = prompt_start.shape[0], hidden.shape[-1]
    out = torch.empty(B, d, dtype=hidden.dtype, device=hidden.device)
    if B == 0 or d == 0:
        return out
    acc_tl, acc_torch = acc_dtypes(hidden.dtype)
    sb, st, sd = hidden_strides(hidden)
    start, end = prompt_start.contiguous(), prompt_end.contiguous()
    with launch_guard(hidden.device):
        if mode == "attn":
            scratch = torch.empty(B, d, dtype=acc_torch, device=hidden.device)
            _attn_fwd_kernel[(B,)](hidden, start, end, w_sa, out, scratch, d, sb, st, sd,
                                   *w_sa_strides(w_sa), _rows_class(B), ACC=acc_tl)
        else:
            grid = lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
            _pool_fwd_kernel[grid](hidden, start, end, out, d, sb, st, sd, _rows_class(B),
                                   MODE=POOL_MODE_IDS[mode], ACC=acc_tl)
    return out


def pool_backward(grad: torch.Tensor, hidden: torch.Tensor, prompt_start: torch.Tensor,
                  prompt_end: torch.Tensor, mode: str,
                  w_sa: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """grad [B, d] -> (grad_hidden: contiguous, hidden's shape and dtype; grad_w_sa: w_sa's
    shape and dtype, or empty [0] when w_sa is None)."""
    if mode not in POOL_MODE_IDS:
        raise ValueError(f"unknown pool mode {mode!r}")
    B, d = prompt_start.shape[0], hidden.shape[-1]
    dev, dtype = hidden.device, hidden.dtype
    if B == 0 or d == 0:
        g_w = hidden.new_empty(0) if w_sa is None else torch.zeros_like(w_sa)
        return torch.zeros(hidden.shape, dtype=dtype, device=dev), g_w
    acc_tl, acc_torch = acc_dtypes(dtype)
    packed = hidden.dim() == 2
    if packed:  # atomics need a zeroed buffer in a dtype with fp32/fp64 atomics
        buf = torch.zeros(hidden.shape, dtype=acc_torch, device=dev)
        stride_ob, stride_ot, T = 0, buf.stride(0), 0
    else:  # written in full by the kernel
        buf = torch.empty(hidden.shape, dtype=dtype, device=dev)
        stride_ob, stride_ot, T = buf.stride(0), buf.stride(1), hidden.shape[1]
    sb, st, sd = hidden_strides(hidden)
    start, end = prompt_start.contiguous(), prompt_end.contiguous()
    g_w = hidden.new_empty(0)
    with launch_guard(dev):
        if mode == "attn":
            dw_rows = torch.empty(B, d, dtype=acc_torch, device=dev)
            _attn_bwd_kernel[(B,)](grad, hidden, start, end, w_sa, buf, dw_rows, d, T,
                                   grad.stride(0), grad.stride(1), sb, st, sd, *w_sa_strides(w_sa),
                                   stride_ob, stride_ot, _rows_class(B), PACKED=packed, ACC=acc_tl)
            # [d] w_sa: sum the rows' dw in a fixed order; [B, d] (also expanded, row stride 0): a cast
            g_w = _sum_rows(dw_rows, torch.empty(w_sa.shape, dtype=w_sa.dtype, device=dev))
        else:
            grid = lambda meta: (B, triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
            _pool_bwd_kernel[grid](grad, hidden, start, end, buf, d, T,
                                   grad.stride(0), grad.stride(1), sb, st, sd, stride_ob, stride_ot,
                                   _rows_class(B), MODE=POOL_MODE_IDS[mode], PACKED=packed, ACC=acc_tl)
        if packed and buf.dtype != dtype:
            buf = _sum_rows(buf, torch.empty(hidden.shape, dtype=dtype, device=dev))
    return buf, g_w
