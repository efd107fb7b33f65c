"""Triton kernel of ``para::pool_generate``: pool -> down -> activation -> up in one launch.

    pool_generate(hidden [B,T,d] | [total,d], prompt_start [B], prompt_end [B], mode, w_sa,
                  w_down [A,d,r], b_down [A,r], w_up [A,r,N], b_up [A,N], adapter_ids [B],
                  activation, act_params) -> v [B, N] in the bank's dtype

As ``reference_ops.pool_generate`` (the spec): the pooled vector stays in fp32 (fp64 when hidden or
the bank is fp64); hidden may be 16-bit while the bank is fp32. The grid depends on shapes only;
the launch's counters are a fresh zeroed buffer from torch's caching allocator, so the op can be
graph-captured. Programs take their role from an atomic ticket (producers before consumers per
row block), which is why it cannot deadlock: docs/kernels.md, "pool_generate". The backward runs
the pool and generate backward kernels in turn (training, not the prefill hot path).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .generate import generate_backward, up_tile
from .kernel_utils import ACTIVATION_IDS
from .pool import ATTN_MODE, POOL_MODE_IDS, attn_pool_row, hidden_strides, pool, pool_backward, pool_slice, w_sa_strides
from .utils import acc_dtypes, dot_precision, empty_buffer, interpreting, launch_guard, next_pow2, num_sms


@triton.jit
def _producer(h_ptr, start_ptr, end_ptr, w_ptr, scratch_ptr, wd_ptr, ids_ptr, hpart_ptr, b, s,
              B, d, r, d_per_split, stride_b, stride_t, stride_d, stride_wb, stride_wd,
              MODE: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              R: tl.constexpr):
    """hpart[s, b, :R] = pool(row b)[slice s] @ W_down[a][slice s] (a = adapter_ids[b]; nothing
    for -1 rows, whose partials are never read)."""
    if b < B:
        a = tl.load(ids_ptr + b).to(tl.int64)
        if a >= 0:
            start = tl.load(start_ptr + b).to(tl.int64)
            end = tl.load(end_ptr + b).to(tl.int64)
            row = h_ptr + b * stride_b
            cols = tl.arange(0, R)
            col_ok = cols < r
            w_base = wd_ptr + a * d * r
            d_lo = s * d_per_split
            d_hi = tl.minimum(d_lo + d_per_split, d)
            h = tl.zeros([R], ACC)
            if MODE == ATTN_MODE:  # S == 1: the whole row
                acc_row = scratch_ptr + b * d
                inv_l = attn_pool_row(row, start, end, w_ptr + b * stride_wb, acc_row, d,
                                       stride_t, stride_d, stride_wd, ACC, BLOCK_T, BLOCK_D)
                tl.debug_barrier()  # acc_row was written by other threads
            for k0 in range(d_lo, d_hi, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                k_ok = ks < d_hi
                if MODE == ATTN_MODE:
                    p = tl.load(acc_row + ks, mask=k_ok, other=0.0) * inv_l
                else:
                    p = pool_slice(row, start, end, ks, k_ok, stride_t, stride_d, MODE, ACC, BLOCK_T, BLOCK_D)
                w = tl.load(w_base + ks[:, None] * r + cols[None, :], mask=k_ok[:, None] & col_ok[None, :],
                            other=0.0).to(ACC)
                h += tl.sum(tl.where(k_ok, p.to(ACC), 0.0)[:, None] * w, axis=0)
            tl.store(hpart_ptr + (s * B + b) * R + cols, h)


@triton.jit
def _pool_generate_kernel(h_ptr, start_ptr, end_ptr, w_ptr, scratch_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr,
                          act_params_ptr, ids_ptr, hpart_ptr, out_ptr, sync_ptr,
                          B, d, r, N, S, C, producers, d_per_split,
                          stride_b, stride_t, stride_d, stride_wb, stride_wd,
                          MODE: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr, R: tl.constexpr):
    """grid (row blocks * (producers + C),) with producers = min(BLOCK_B, B) * S; sync_ptr: int32
    [1 + row blocks] (the ticket, then each row block's ready count), zero on entry."""
    # the program's place in the layout: its ticket, not tl.program_id (docs/kernels.md, "pool_generate")
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    t = ticket // (producers + C)
    k = ticket % (producers + C)
    ready = sync_ptr + 1 + t
    if k < producers:
        _producer(h_ptr, start_ptr, end_ptr, w_ptr, scratch_ptr, wd_ptr, ids_ptr, hpart_ptr,
                  t.to(tl.int64) * BLOCK_B + k // S, k % S, B, d, r, d_per_split,
                  stride_b, stride_t, stride_d, stride_wb, stride_wd, MODE, ACC, BLOCK_T, BLOCK_D, R)
        tl.debug_barrier()  # every thread's partials are stored before the release below
        tl.atomic_add(ready, 1, sem="release")
    else:
        n_ready = tl.atomic_add(ready, 0, sem="acquire")
        while n_ready < producers:
            n_ready = tl.atomic_add(ready, 0, sem="acquire")
        for nb in range(k - producers, tl.cdiv(N, BLOCK_N), C):
            up_tile(hpart_ptr, bd_ptr, wu_ptr, bu_ptr, act_params_ptr, ids_ptr, out_ptr, B, r, N, S, t, nb,
                     ACT, ACC, PREC, BLOCK_B, BLOCK_N, R)


# ---------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class PoolGenerateTiles:
    block_b: int   # rows per block (>= 16: tl.dot's minimum)
    splits: int    # S: d-slices per row (1 for attn)
    consumers: int  # C: programs per row block writing output tiles
    block_n: int
    block_d: int
    block_t: int


# Tests set this (small tiles, several splits and consumers) to drive every loop under the interpreter.
CONFIG_OVERRIDE: dict | None = None


def _pool_generate_tiles(B: int, d: int, N: int, R: int, attn: bool, device: torch.device) -> PoolGenerateTiles:
    if interpreting():  # ~0.5 ms per program instance: few, wide programs
        cfg = PoolGenerateTiles(block_b=next_pow2(B, lo=16, hi=128), splits=1, consumers=1,
                     block_n=next_pow2(N, lo=16, hi=4096), block_d=next_pow2(d, lo=16, hi=4096), block_t=4)
    else:
        sms = num_sms(device)
        block_b = 16 if B <= 16 else (32 if B <= 32 else 64)
        block_d = 256
        # producers: about 2 per SM in all; consumers: enough tiles in flight to stream W_up
        splits = 1 if attn else max(1, min(triton.cdiv(d, block_d), triton.cdiv(2 * sms, B)))
        block_n = max(32, 2048 // R)
        n_blocks = triton.cdiv(B, block_b)
        consumers = max(1, min(triton.cdiv(N, block_n), triton.cdiv(2 * sms, n_blocks)))
        cfg = PoolGenerateTiles(block_b=block_b, splits=splits, consumers=consumers, block_n=block_n,
                     block_d=block_d, block_t=8)
    cfg = cfg if CONFIG_OVERRIDE is None else replace(cfg, **CONFIG_OVERRIDE)
    return replace(cfg, splits=1) if attn else cfg


def _counters(n_blocks: int, device: torch.device) -> torch.Tensor:
    """The launch's own zeroed int32 [ticket, ready per row block] (docs/kernels.md, "pool_generate")."""
    return torch.zeros(1 + n_blocks, dtype=torch.int32, device=device)


def pool_generate(hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up, adapter_ids,
                  activation, act_params=None):
    """hidden [B,T,d] | [total,d] -> v [B,N] in the bank's dtype (arguments checked by the op)."""
    B, d = prompt_start.shape[0], hidden.shape[-1]
    r, N = w_up.shape[1], w_up.shape[2]
    device = hidden.device
    out = empty_buffer((B, N), w_down.dtype, device)
    if out.numel() == 0:
        return out
    R = next_pow2(r, lo=16)
    attn = mode == "attn"
    cfg = _pool_generate_tiles(B, d, N, R, attn, device)
    n_blocks = triton.cdiv(B, cfg.block_b)
    acc_tl, acc_torch = acc_dtypes(torch.float64 if torch.float64 in (hidden.dtype, w_down.dtype) else w_down.dtype)
    start, end, w_down, b_down, w_up, b_up, ids = (
        t.contiguous() for t in (prompt_start, prompt_end, w_down, b_down, w_up, b_up, adapter_ids))
    params_arg = (b_down if act_params is None else act_params).contiguous()  # a placeholder when unused
    d_per_split = triton.cdiv(triton.cdiv(d, cfg.splits), cfg.block_d) * cfg.block_d
    splits = max(1, triton.cdiv(d, d_per_split))
    producers = min(cfg.block_b, B) * splits  # a batch smaller than a block has fewer
    grid = (n_blocks * (producers + cfg.consumers),)
    with launch_guard(device):
        sync = _counters(n_blocks, device)
        hpart = empty_buffer((splits, B, R), acc_torch, device)
        scratch = empty_buffer((B, d), acc_torch, device) if attn else hpart
        w = w_sa if attn else hpart  # a placeholder pointer when unused
        stride_wb, stride_wd = w_sa_strides(w_sa) if attn else (0, 0)
        _pool_generate_kernel[grid](
            hidden, start, end, w, scratch, w_down, b_down, w_up, b_up, params_arg, ids, hpart, out, sync,
            B, d, r, N, splits, cfg.consumers, producers, d_per_split, *hidden_strides(hidden),
            stride_wb, stride_wd, MODE=POOL_MODE_IDS[mode], ACT=ACTIVATION_IDS[activation], ACC=acc_tl,
            PREC=dot_precision(w_down.dtype), BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, BLOCK_D=cfg.block_d,
            BLOCK_N=cfg.block_n, R=R)
    return out


def pool_generate_backward(grad, hidden, prompt_start, prompt_end, mode, w_sa, w_down, b_down, w_up, b_up,
                           adapter_ids, activation, act_params):
    """-> gradients of (hidden, w_sa or empty, w_down, b_down, w_up, b_up, act_params or empty).
    Training, not the prefill hot path: the pool and generate backward kernels in turn."""
    pooled = pool(hidden, prompt_start, prompt_end, mode, w_sa).to(w_down.dtype)
    g_pooled, *g_bank = generate_backward(grad, pooled, w_down, b_down, w_up, b_up, adapter_ids, activation,
                                          act_params)
    g_hidden, g_w = pool_backward(g_pooled.to(hidden.dtype), hidden, prompt_start, prompt_end, mode, w_sa)
    return (g_hidden, g_w, *g_bank)
