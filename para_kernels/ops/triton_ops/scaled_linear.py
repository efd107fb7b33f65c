"""Triton kernels of ``para::scaled_linear`` and ``para::scaled_linear_backward`` (docs/spec.md §3).

x [B, ..., k], weight [n, k], bias [n] or None, v [B, n] -> (x Wᵀ + b) ⊙ v[b] in x's dtype, as
``reference_ops.scaled_linear`` (the spec): one tiled matmul whose epilogue applies the bias and
the scale. fp32 accumulation; fp32 inputs never use TF32 in the kernels (the backward's dx / dW
GEMMs are torch.mm and follow torch's fp32 matmul precision, as nn.Linear's backward does). Grids
depend on shapes only (graph capture). Deterministic: split-K partials, grad_bias and grad_v are
summed in a fixed order, no atomics. Design: docs/kernels.md, "scaled_linear".
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel_utils import sum_chunks_kernel
from .utils import capture_safe, interpreting, launch_guard, next_pow2, num_sms

# Epilogues of the matmul kernel.
EPILOGUE_SCALE = 1     # c = (a @ b + bias) ⊙ v[m // L]
EPILOGUE_PARTIAL = 2   # ws[split] = a @ b over this split's K range (fp32/fp64)
EPILOGUE_BACKWARD = 3  # y = a @ b + bias; c = dy ⊙ v[m // L]; partial Σ_m c and per-row Σ dy ⊙ y


@triton.jit
def _mma(a, b, acc, F64: tl.constexpr, PREC: tl.constexpr):
    if F64:  # fp64 tl.dot is not in every Triton release: FMA on a broadcast (small tiles)
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, v_ptr, dy_ptr, dv_partials_ptr, db_partials_ptr,
               M, N, K, L, k_split,
               a_stride_m, a_stride_k, b_stride_k, b_stride_n, c_stride_m, c_stride_n, bias_stride,
               v_stride_row, v_stride_n, dy_stride_m, dy_stride_n,
               M_KEY, n_split,  # autotune key only
               EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr,
               PREC: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (any strides) with the epilogue EPILOGUE; program (tile, split)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n  # grouped order: GROUP_M M-blocks share B tiles in L2
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    # Out-of-range rows / columns read row 0 / column 0 (stores mask them): only K is masked
    # in the main loop.
    am = tl.where(m_ok, rm, 0).to(tl.int64)
    bn = tl.where(n_ok, rn, 0).to(tl.int64)
    k_lo = tl.program_id(1) * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + am[:, None] * a_stride_m + (k_lo + rk).to(tl.int64)[None, :] * a_stride_k
    b_ptrs = b_ptr + (k_lo + rk).to(tl.int64)[:, None] * b_stride_k + bn[None, :] * b_stride_n
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(k_lo, k_hi, BK):
        k_ok = k0 + rk < k_hi
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # fp32/fp64 math (the interpreter gets 16-bit arithmetic wrong)
            a = a.to(ACC)
            b = b.to(ACC)
        acc = _mma(a, b, acc, F64, PREC)
        a_ptrs += BK * a_stride_k
        b_ptrs += BK * b_stride_k

    mask = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)
    if EPILOGUE == 2:  # EPILOGUE_PARTIAL
        ws = c_ptr + (tl.program_id(1) * M + rm64)[:, None] * N + rn[None, :]
        tl.store(ws, acc, mask=mask)
    else:
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn * bias_stride, mask=n_ok, other=0.0).to(ACC)[None, :]
        row = (rm // L).to(tl.int64)
        vv = tl.load(v_ptr + row[:, None] * v_stride_row + rn[None, :] * v_stride_n, mask=mask, other=0.0).to(ACC)
        if EPILOGUE == 1:  # EPILOGUE_SCALE
            out = y * vv
        else:  # EPILOGUE_BACKWARD
            dy = tl.load(dy_ptr + rm64[:, None] * dy_stride_m + rn[None, :] * dy_stride_n, mask=mask, other=0.0).to(ACC)
            out = dy * vv  # dY', the gradient of the unscaled output (0 where masked)
            tl.store(db_partials_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(out, axis=0), mask=n_ok)
            # Σ of dy ⊙ y over each row's tokens in this tile, into slot j = m // L - (first row)
            # of this M-block's ROWS_PER_BLOCK partial rows.
            prod = dy * y
            r0 = (pid_m * BM) // L
            j = tl.where(m_ok, rm // L - r0, -1)
            n_rows = (tl.minimum(pid_m * BM + BM, M) - 1) // L - r0 + 1
            dv_base = dv_partials_ptr + pid_m.to(tl.int64) * ROWS_PER_BLOCK * N
            if ROWS_PER_BLOCK <= 4:  # long rows (training): a tile touches <= 2 rows, masked column sums
                for jj in tl.static_range(ROWS_PER_BLOCK):
                    part = tl.sum(tl.where((j == jj)[:, None], prod, 0.0), axis=0)
                    tl.store(dv_base + jj * N + rn, part, mask=n_ok & (jj < n_rows))
            else:  # short rows (up to BM per tile): one-hot [ROWS_PER_BLOCK, BM] @ [BM, BN]
                jr = tl.arange(0, ROWS_PER_BLOCK)
                sel = (jr[:, None] == j[None, :]).to(ACC)
                part = _mma(sel, prod, tl.zeros((ROWS_PER_BLOCK, BN), dtype=ACC), F64, "ieee")
                tl.store(dv_base + jr.to(tl.int64)[:, None] * N + rn[None, :], part,
                         mask=(jr < n_rows)[:, None] & n_ok[None, :])
        tl.store(c_ptr + rm64[:, None] * c_stride_m + rn[None, :] * c_stride_n, out.to(c_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _split_epilogue_kernel(ws_ptr, c_ptr, bias_ptr, v_ptr, M, N, L, n_split,
                           c_stride_m, c_stride_n, bias_stride, v_stride_row, v_stride_n,
                           HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """c = (Σ_s ws[s] + bias) ⊙ v[m // L], summing the splits in order (deterministic)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ws_ptr.dtype.element_ty)
    for s in range(n_split):
        acc += tl.load(ws_ptr + (s * M + rm64)[:, None] * N + rn[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * bias_stride, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    row = (rm // L).to(tl.int64)
    acc *= tl.load(v_ptr + row[:, None] * v_stride_row + rn[None, :] * v_stride_n, mask=mask, other=0.0).to(acc.dtype)
    tl.store(c_ptr + rm64[:, None] * c_stride_m + rn[None, :] * c_stride_n, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dv_reduce_kernel(dv_partials_ptr, gv_ptr, B, N, L, max_blocks, gv_stride_row, gv_stride_n,
                      BM: tl.constexpr, ROWS_PER_BLOCK: tl.constexpr,
                      BLOCK_B: tl.constexpr, BN: tl.constexpr):
    """gv[b] = Σ over the M-blocks holding row b's tokens of their partial for b, in block order."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    b_ok = b < B
    n_ok = rn < N
    first = (b * L) // BM
    last = (b * L + L - 1) // BM
    acc = tl.zeros((BLOCK_B, BN), dtype=dv_partials_ptr.dtype.element_ty)
    for s in range(max_blocks):
        i = first + s
        j = b - (i * BM) // L  # b's slot among the rows of block i
        ok = b_ok & (i <= last)
        acc += tl.load(dv_partials_ptr + (i * ROWS_PER_BLOCK + j).to(tl.int64)[:, None] * N + rn[None, :],
                       mask=ok[:, None] & n_ok[None, :], other=0.0)
    tl.store(gv_ptr + b.to(tl.int64)[:, None] * gv_stride_row + rn[None, :] * gv_stride_n,
             acc.to(gv_ptr.dtype.element_ty),
             mask=b_ok[:, None] & n_ok[None, :])


def _mm_configs() -> list:
    if interpreting():  # the tuned kernel is not used there
        return [triton.Config({"BM": 16, "BN": 64, "BK": 64, "GROUP_M": 1})]
    cfgs = []
    # Decode (M <= 64): one M block of all rows streams the weight (BM fixed by the prune).
    # 16-bit operands run on tensor cores with long K steps; IEEE fp32 runs tl.dot on the FMA
    # units, where BK > 32 spills registers (checked with ptxas for sm_90).
    for bm in (16, 32, 64):
        for bn, bk, w, s in ((32, 128, 4, 4), (32, 256, 4, 3), (64, 64, 4, 6), (64, 128, 4, 4),
                             (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 4),
                             (32, 32, 4, 4), (64, 32, 4, 3), (128, 32, 4, 3)):
            cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 1}, num_warps=w, num_stages=s))
    # Prefill / training: compute-bound tiles.
    for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                             (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                             (128, 128, 32, 8, 3), (64, 64, 32, 4, 3), (128, 64, 32, 8, 3)):
        cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s))
    return cfgs


_SMEM_LIMIT = 200 * 1024  # Hopper allows 227 KiB per block; leave room for the epilogue


def _mm_prune(configs, named_args, **kwargs):
    """Keep the configs of this M regime and dtype that fit in shared memory."""
    m_key = named_args["M_KEY"]
    size = named_args["a_ptr"].element_size()
    keep = []
    for c in configs:
        bm, bn, bk = c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]
        regime = (bm == m_key and c.kwargs["GROUP_M"] == 1) if m_key <= 64 else (
            c.kwargs["GROUP_M"] == 8 and bm <= m_key)
        fits = (bm * bk + bk * bn) * size * max(c.num_stages, 1) <= _SMEM_LIMIT
        if regime and fits and (bk <= 32 if size >= 4 else bk >= 64):
            keep.append(c)
    return keep or configs[-1:]


_mm_tuned = capture_safe(triton.autotune(configs=_mm_configs(), key=["M_KEY", "N", "K", "n_split", "EPILOGUE"],
                                         prune_configs_by={"early_config_prune": _mm_prune})(_mm_kernel))


def _m_key(M: int) -> int:
    return max(16, next_pow2(M)) if M <= 64 else min(next_pow2(M), 8192)


def _fixed_tiles(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tiles of the untuned launches (interpreter, fp64, the backward's recompute): fixed per
    shape, so the backward is deterministic."""
    if interpreting():  # few, large tiles (each program costs tens of ms there)
        return dict(BM=min(max(16, next_pow2(M)), 64), BN=min(max(16, next_pow2(N)), 256),
                    BK=min(max(16, next_pow2(K)), 128),
                    GROUP_M=1, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BM=32, BN=32, BK=8, GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # IEEE fp32 runs on the FMA units: modest tiles, BK <= 32
        return dict(BM=max(16, next_pow2(M)) if M <= 64 else 64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(BM=max(16, next_pow2(M)), BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    # dy, v, y and dy ⊙ y live beside the accumulator in the epilogue: a 128 x 64 tile
    return dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def _k_splits(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(S, K per split): split K only for decode-sized M, until ~2 waves of programs are out."""
    min_k = 256 if interpreting() else 512
    if M > 64 or K < 2 * min_k:
        return 1, max(K, 1)
    tiles = triton.cdiv(M, max(16, next_pow2(M))) * triton.cdiv(N, 64)
    s = min(triton.cdiv(2 * num_sms(device), tiles), K // min_k)
    if s <= 1:
        return 1, K
    k_split = triton.cdiv(triton.cdiv(K, s), 256) * 256  # a multiple of every BK: no ragged middle tiles
    return triton.cdiv(K, k_split), k_split


def _matmul(x2: Tensor, weight: Tensor, c: Tensor, c_strides, M: int, N: int, K: int, *, epilogue: int,
            bias: Tensor | None = None, v: Tensor | None = None, L: int = 1, dy: Tensor | None = None,
            dv_partials: Tensor | None = None, db_partials: Tensor | None = None, n_split: int = 1,
            k_split: int | None = None,
            tiles: dict | None = None, rows_per_block: int = 1) -> None:
    """Launch _mm_kernel on x2 [M, K] @ weightᵀ [K, N]: autotuned on GPUs when tiles is None."""
    dtype = x2.dtype
    f64 = dtype == torch.float64
    upcast = interpreting() or dtype in (torch.float32, torch.float64)
    prec = "ieee" if upcast else "tf32"  # never TF32 for fp32; 16-bit operands ignore it
    dummy = c
    v_s = (v.stride(0), v.stride(1)) if v is not None else (0, 0)
    dy_s = (dy.stride(0), dy.stride(1)) if dy is not None else (0, 0)
    args = (x2, weight, c, bias if bias is not None else dummy, v if v is not None else dummy,
            dy if dy is not None else dummy, dv_partials if dv_partials is not None else dummy,
            db_partials if db_partials is not None else dummy,
            M, N, K, L, k_split or max(K, 1), x2.stride(0), x2.stride(1), weight.stride(1), weight.stride(0),
            *c_strides, bias.stride(0) if bias is not None else 0, *v_s, *dy_s, _m_key(M), n_split)
    consts = dict(EPILOGUE=epilogue, HAS_BIAS=bias is not None, UPCAST=upcast, F64=f64, PREC=prec,
                  ROWS_PER_BLOCK=rows_per_block)
    if tiles is None and (interpreting() or f64):
        tiles = _fixed_tiles(M, N, K, dtype)
    with launch_guard(x2.device):
        if tiles is None:
            def grid(meta):
                return triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), n_split

            _mm_tuned[grid](*args, **consts)
        else:
            grid = (triton.cdiv(M, tiles["BM"]) * triton.cdiv(N, tiles["BN"]), n_split)
            _mm_kernel[grid](*args, **consts, **tiles)


def _epilogue_tiles(M: int, N: int) -> tuple[int, int]:
    if interpreting():
        return min(next_pow2(M), 64), min(next_pow2(N), 1024)
    return min(next_pow2(M), 16), min(next_pow2(N), 256)


def scaled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor) -> Tensor:
    """x [B, ..., k], weight [n, k], bias [n] or None, v [B, n] -> (x Wᵀ + b) ⊙ v[b] [B, ..., n],
    in x's dtype (fp32 accumulation)."""
    n, k = weight.shape
    lead = x.shape[:-1]
    M = math.prod(lead)
    out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    L = M // x.shape[0]
    x2 = x.reshape(M, k)  # a view unless the leading dims cannot merge (then one copy)
    o2 = out.view(M, n)
    S, k_split = _k_splits(M, n, k, x.device)
    if S == 1:
        _matmul(x2, weight, o2, o2.stride(), M, n, k, epilogue=EPILOGUE_SCALE, bias=bias, v=v, L=L)
        return out
    ws = torch.empty(S, M, n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    _matmul(x2, weight, ws, (n, 1), M, n, k, epilogue=EPILOGUE_PARTIAL, n_split=S, k_split=k_split)
    bm, bn = _epilogue_tiles(M, n)
    with launch_guard(x.device):
        _split_epilogue_kernel[(triton.cdiv(M, bm), triton.cdiv(n, bn))](
            ws, o2, bias if bias is not None else ws, v, M, n, L, S, o2.stride(0), o2.stride(1),
            bias.stride(0) if bias is not None else 0, v.stride(0), v.stride(1), HAS_BIAS=bias is not None,
            BM=bm, BN=bn, num_warps=4)
    return out


def _rows_bound(bm: int, L: int) -> int:
    """ROWS_PER_BLOCK, the partial-row slots per M-block: the most rows BM consecutive tokens can touch,
    exact when <= 4 (masked sums), else a power of two >= 16 (one-hot tl.dot)."""
    rows = min(bm, (L + bm - 2) // L + 1)
    return rows if rows <= 4 else max(16, next_pow2(rows))


def scaled_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                           v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad [B, ..., n], x [B, ..., k], weight [n, k], bias [n] or None, v [B, n] ->
    (grad_x like x, grad_weight like weight, grad_bias like bias or empty, grad_v like v)."""
    n, k = weight.shape
    g_x, g_w, g_v = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(v)
    g_b = torch.empty(0, dtype=x.dtype, device=x.device) if bias is None else torch.empty_like(bias)
    M = math.prod(x.shape[:-1])
    if M == 0 or n == 0:
        return g_x.zero_(), g_w.zero_(), g_b.zero_(), g_v.zero_()
    B = x.shape[0]
    L = M // B
    dev = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x2, dy2 = x.reshape(M, k), grad.reshape(M, n)
    # 1) recompute y = x Wᵀ + b; epilogue: dY' = dy ⊙ v[row], partial grad_bias and grad_v.
    tiles = _fixed_tiles(M, n, k, x.dtype)
    bm = tiles["BM"]
    rows_per_block = _rows_bound(bm, L)
    m_blocks = triton.cdiv(M, bm)
    dy_scaled = torch.empty(M, n, dtype=x.dtype, device=dev)
    dv_partials = torch.empty(m_blocks * rows_per_block, n, dtype=acc, device=dev)
    db_partials = torch.empty(m_blocks, n, dtype=acc, device=dev)
    _matmul(x2, weight, dy_scaled, dy_scaled.stride(), M, n, k, epilogue=EPILOGUE_BACKWARD, bias=bias, v=v, L=L, dy=dy2,
            dv_partials=dv_partials, db_partials=db_partials,
            tiles=tiles, rows_per_block=rows_per_block)
    rbb, rbn = _epilogue_tiles(B, n)
    with launch_guard(dev):
        _dv_reduce_kernel[(triton.cdiv(B, rbb), triton.cdiv(n, rbn))](
            dv_partials, g_v, B, n, L, (L + bm - 2) // bm + 1, g_v.stride(0), g_v.stride(1), BM=bm,
            ROWS_PER_BLOCK=rows_per_block,
            BLOCK_B=rbb, BN=rbn, num_warps=4)
        if bias is not None:
            sum_chunks_kernel[(1, triton.cdiv(n, rbn))](db_partials, g_b, n, m_blocks, 0, g_b.stride(0),
                                                        BLOCK_C=1, BLOCK_N=rbn, num_warps=4)
    if k == 0:
        return g_x, g_w, g_b, g_v
    # 2) dx = dY' W and dW = dY'ᵀ x: plain GEMMs with nothing left to fuse -> cuBLAS (docs/kernels.md,
    # "scaled_linear"), fp32 accumulation, written straight into the fake impl's layouts.
    if g_x.is_contiguous():
        torch.mm(dy_scaled, weight, out=g_x.view(M, k))
    else:
        g_x.copy_(torch.mm(dy_scaled, weight).view(x.shape))
    if g_w.is_contiguous():
        torch.mm(dy_scaled.t(), x2, out=g_w)
    else:
        g_w.copy_(torch.mm(dy_scaled.t(), x2))
    return g_x, g_w, g_b, g_v
