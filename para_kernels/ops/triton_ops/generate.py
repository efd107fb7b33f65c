"""Triton kernels of ``para::generate`` and ``para::generate_backward`` (docs/spec.md §3).

    generate(pooled [B,d], w_down [A,d,r], b_down [A,r], w_up [A,r,N], b_up [A,N],
             adapter_ids [B] (int32/int64, -1: v = 1), activation, act_params [A,10] | None) -> v [B,N]

v in pooled's dtype, as ``reference_ops.generate`` (the spec). Math in fp32 (fp64 for fp64
inputs); ``tl.dot`` in tf32 for fp16/bf16 inputs, IEEE for fp32/fp64. Grids depend on shapes only,
no host sync (graph capture). The backward is deterministic: no atomics, every sum in a fixed
order. Design (the two forward and four backward launches): docs/kernels.md, "generate".
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import ACTIVATIONS, RATIONAL_NUM_PARAMS
from .kernel_utils import ACTIVATION_IDS, RATIONAL, activation_grad, apply_activation, sign
from .utils import acc_dtypes, capture_safe, dot_precision, empty_buffer, interpreting, launch_guard, next_pow2, num_sms

NO_ADAPTER: tl.constexpr = tl.constexpr(2**31 - 1)  # "no adapter left" sentinel of the adapter loops
ACT_PARAMS_PAD: tl.constexpr = tl.constexpr(16)  # the 10 rational coefficients, padded to a power of 2
assert RATIONAL_NUM_PARAMS == 10
assert all(ACTIVATION_IDS[name] == i for i, name in enumerate(ACTIVATIONS))  # g's ids, in order


# ---------------------------------------------------------------------- activations
@triton.jit
def _rational_coeffs(act_params_ptr, a, ACC: tl.constexpr):
    base = act_params_ptr + a.to(tl.int64) * 10
    return (tl.load(base + 0).to(ACC), tl.load(base + 1).to(ACC), tl.load(base + 2).to(ACC),
            tl.load(base + 3).to(ACC), tl.load(base + 4).to(ACC), tl.load(base + 5).to(ACC),
            tl.load(base + 6).to(ACC), tl.load(base + 7).to(ACC), tl.load(base + 8).to(ACC),
            tl.load(base + 9).to(ACC))


@triton.jit
def _generator_activation(x, act_params_ptr, a, ACT: tl.constexpr):
    """g(x) for adapter a (its coefficients are only read for 'rational')."""
    if ACT == RATIONAL:
        a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _rational_coeffs(act_params_ptr, a, x.dtype)
        ax = tl.abs(x)
        num = a0 + x * (a1 + x * (a2 + x * (a3 + x * (a4 + x * a5))))
        den = 1.0 + ax * (tl.abs(b1) + ax * (tl.abs(b2) + ax * (tl.abs(b3) + ax * tl.abs(b4))))
        y = num / den
    else:
        y = apply_activation(x, ACT)
    return y


@triton.jit
def _next_adapter(ids, a):
    """Smallest adapter id in ids above a (NO_ADAPTER when none): the loop over the distinct
    adapters of a row block, in increasing order, without sorting or a host sync."""
    return tl.min(tl.where(ids > a, ids, NO_ADAPTER), axis=0)


# ---------------------------------------------------------------------- forward
@triton.jit
def _down_kernel(p_ptr, wd_ptr, ids_ptr, hpart_ptr, B, d, r, d_per_split,
                 ACC: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr):
    """hpart[s, rows, :R] = P[rows, d-slice s] @ W_down[ids[row], d-slice s, :] (0 for -1 rows,
    0 in the padding columns r..R)."""
    t = tl.program_id(0)
    s = tl.program_id(1)
    rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    cols = tl.arange(0, R)
    col_ok = cols < r
    d_lo = s * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, d)
    h = tl.zeros([BLOCK_B, R], ACC)
    a = _next_adapter(ids, -1)
    while a < NO_ADAPTER:
        m = ids == a
        w_base = wd_ptr + a.to(tl.int64) * d * r
        acc = tl.zeros([BLOCK_B, R], ACC)
        for k0 in range(d_lo, d_hi, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            k_ok = ks < d_hi
            # masked rows are not fetched: P is read once in all, whatever the adapter mix
            p = tl.load(p_ptr + rows64[:, None] * d + ks[None, :], mask=m[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None] * r + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(p.to(ACC), w.to(ACC), input_precision=PREC)
        h = tl.where(m[:, None], acc, h)
        a = _next_adapter(ids, a)
    tl.store(hpart_ptr + (s * B + rows64)[:, None] * R + cols[None, :], h, mask=row_ok[:, None])


@triton.jit
def _sum_partials(hpart_ptr, rows64, mask, B, S, R: tl.constexpr, BLOCK_B: tl.constexpr, ACC: tl.constexpr):
    cols = tl.arange(0, R)
    h = tl.zeros([BLOCK_B, R], ACC)
    for s in range(S):
        h += tl.load(hpart_ptr + (s * B + rows64)[:, None] * R + cols[None, :], mask=mask[:, None], other=0.0)
    return h


@triton.jit
def up_tile(hpart_ptr, bd_ptr, wu_ptr, bu_ptr, act_params_ptr, ids_ptr, out_ptr, B, r, N, S, t, nb,
             ACT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
             BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """out[rows of block t, tile nb] = 1 + g(h + b_down[a]) @ W_up[a][:, tile] + b_up[a][tile] per
    row's adapter a, exactly 1 for -1 rows; every element of the tile is stored once. Shared
    with the fused pool_generate kernel."""
    rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    cols = tl.arange(0, R)
    col_ok = cols < r
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    h = _sum_partials(hpart_ptr, rows64, ids >= 0, B, S, R, BLOCK_B, ACC)
    out = tl.full([BLOCK_B, BLOCK_N], 1.0, ACC)
    a = _next_adapter(ids, -1)
    while a < NO_ADAPTER:
        a64 = a.to(tl.int64)
        bd = tl.load(bd_ptr + a64 * r + cols, mask=col_ok, other=0.0).to(ACC)
        z = _generator_activation(h + bd[None, :], act_params_ptr, a, ACT)
        z = tl.where(col_ok[None, :], z, 0.0)  # g(0) != 0 for 'rational': clear the padding
        w = tl.load(wu_ptr + a64 * r * N + cols[:, None] * N + ns[None, :],
                    mask=col_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
        bu = tl.load(bu_ptr + a64 * N + ns, mask=n_ok, other=0.0).to(ACC)
        y = tl.dot(z, w, input_precision=PREC) + bu[None, :] + 1.0
        out = tl.where((ids == a)[:, None], y, out)
        a = _next_adapter(ids, a)
    tl.store(out_ptr + rows64[:, None] * N + ns[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _up_kernel(hpart_ptr, bd_ptr, wu_ptr, bu_ptr, act_params_ptr, ids_ptr, out_ptr, B, r, N, S,
               ACT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """grid (cdiv(B, BLOCK_B), cdiv(N, BLOCK_N)): one output tile each."""
    up_tile(hpart_ptr, bd_ptr, wu_ptr, bu_ptr, act_params_ptr, ids_ptr, out_ptr, B, r, N, S,
             tl.program_id(0), tl.program_id(1), ACT, ACC, PREC, BLOCK_B, BLOCK_N, R)


# ---------------------------------------------------------------------- backward
@triton.jit
def _bwd_up_kernel(dv_ptr, hpart_ptr, bd_ptr, wu_ptr, act_params_ptr, ids_ptr, gwu_ptr, gbu_ptr, dzpart_ptr,
                   B, r, N, S, n_row_blocks,
                   ACT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr):
    """For adapter a and N tile nb: g_w_up[a][:, tile] = sum_rows z^T dv, g_b_up[a][tile] = sum_rows dv,
    dzpart[nb, rows of a] = dv[:, tile] @ W_up[a][:, tile]^T. Unused adapters get zeros."""
    a = tl.program_id(0)
    nb = tl.program_id(1)
    a64 = a.to(tl.int64)
    cols = tl.arange(0, R)
    col_ok = cols < r
    ns = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    w = tl.load(wu_ptr + a64 * r * N + cols[:, None] * N + ns[None, :],
                mask=col_ok[:, None] & n_ok[None, :], other=0.0).to(ACC)
    bd = tl.load(bd_ptr + a64 * r + cols, mask=col_ok, other=0.0).to(ACC)
    gw = tl.zeros([R, BLOCK_N], ACC)
    gb = tl.zeros([BLOCK_N], ACC)
    for t in range(n_row_blocks):
        rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rows64 = rows.to(tl.int64)
        m = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32) == a
        if tl.max(m.to(tl.int32), axis=0) > 0:
            h = _sum_partials(hpart_ptr, rows64, m, B, S, R, BLOCK_B, ACC)
            z = _generator_activation(h + bd[None, :], act_params_ptr, a, ACT)
            z = tl.where(m[:, None] & col_ok[None, :], z, 0.0)
            dv = tl.load(dv_ptr + rows64[:, None] * N + ns[None, :], mask=m[:, None] & n_ok[None, :],
                         other=0.0).to(ACC)
            gw += tl.dot(tl.trans(z), dv, input_precision=PREC)
            gb += tl.sum(dv, axis=0)
            dz = tl.dot(dv, tl.trans(w), input_precision=PREC)
            tl.store(dzpart_ptr + (nb * B + rows64)[:, None] * R + cols[None, :], dz, mask=m[:, None])
    tl.store(gwu_ptr + a64 * r * N + cols[:, None] * N + ns[None, :], gw.to(gwu_ptr.dtype.element_ty),
             mask=col_ok[:, None] & n_ok[None, :])
    tl.store(gbu_ptr + a64 * N + ns, gb.to(gbu_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _bwd_mid_kernel(hpart_ptr, dzpart_ptr, bd_ptr, act_params_ptr, ids_ptr, dh_ptr, d_act_params_ptr, B, r, S, n_parts,
                    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, R: tl.constexpr):
    """dh[rows] = (sum of dz partials) * g'(h + b_down[a]) (0 for -1 rows and padding columns);
    for 'rational' also d_act_params[rows, :10], each row's gradient of its adapter's coefficients."""
    t = tl.program_id(0)
    rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32)
    cols = tl.arange(0, R)
    col_ok = cols < r
    valid = ids >= 0  # -1 rows have no dz partials (never written): never read them
    h = _sum_partials(hpart_ptr, rows64, valid, B, S, R, BLOCK_B, ACC)
    dz = _sum_partials(dzpart_ptr, rows64, valid, B, n_parts, R, BLOCK_B, ACC)
    dz = tl.where(col_ok[None, :], dz, 0.0)
    dh = tl.zeros([BLOCK_B, R], ACC)
    pc = tl.arange(0, ACT_PARAMS_PAD)
    d_act_params = tl.zeros([BLOCK_B, ACT_PARAMS_PAD], ACC)
    a = _next_adapter(ids, -1)
    while a < NO_ADAPTER:
        m = ids == a
        bd = tl.load(bd_ptr + a.to(tl.int64) * r + cols, mask=col_ok, other=0.0).to(ACC)
        x = h + bd[None, :]
        if ACT == RATIONAL:
            a0, a1, a2, a3, a4, a5, b1, b2, b3, b4 = _rational_coeffs(act_params_ptr, a, ACC)
            ax = tl.abs(x)
            sx = sign(x)
            num = a0 + x * (a1 + x * (a2 + x * (a3 + x * (a4 + x * a5))))
            den = 1.0 + ax * (tl.abs(b1) + ax * (tl.abs(b2) + ax * (tl.abs(b3) + ax * tl.abs(b4))))
            dnum = a1 + x * (2.0 * a2 + x * (3.0 * a3 + x * (4.0 * a4 + x * (5.0 * a5))))
            dden = (tl.abs(b1) + ax * (2.0 * tl.abs(b2) + ax * (3.0 * tl.abs(b3) + ax * (4.0 * tl.abs(b4))))) * sx
            inv = 1.0 / den
            gx = dz * (dnum * den - num * dden) * inv * inv
            q = dz * inv                    # d/da_j = q x^j
            qb = -dz * num * inv * inv      # d/db_k = qb |x|^k sign(b_k)
            x2 = x * x
            ax2 = ax * ax
            g = (tl.where(pc == 0, 1.0, 0.0)[None, :] * tl.sum(q, axis=1)[:, None]
                 + tl.where(pc == 1, 1.0, 0.0)[None, :] * tl.sum(q * x, axis=1)[:, None]
                 + tl.where(pc == 2, 1.0, 0.0)[None, :] * tl.sum(q * x2, axis=1)[:, None]
                 + tl.where(pc == 3, 1.0, 0.0)[None, :] * tl.sum(q * x2 * x, axis=1)[:, None]
                 + tl.where(pc == 4, 1.0, 0.0)[None, :] * tl.sum(q * x2 * x2, axis=1)[:, None]
                 + tl.where(pc == 5, 1.0, 0.0)[None, :] * tl.sum(q * x2 * x2 * x, axis=1)[:, None]
                 + tl.where(pc == 6, 1.0, 0.0)[None, :] * (tl.sum(qb * ax, axis=1) * sign(b1))[:, None]
                 + tl.where(pc == 7, 1.0, 0.0)[None, :] * (tl.sum(qb * ax2, axis=1) * sign(b2))[:, None]
                 + tl.where(pc == 8, 1.0, 0.0)[None, :] * (tl.sum(qb * ax2 * ax, axis=1) * sign(b3))[:, None]
                 + tl.where(pc == 9, 1.0, 0.0)[None, :] * (tl.sum(qb * ax2 * ax2, axis=1) * sign(b4))[:, None])
            d_act_params = tl.where(m[:, None], g.to(ACC), d_act_params)
        else:
            gx = dz * activation_grad(x, ACT)
        dh = tl.where(m[:, None] & col_ok[None, :], gx, dh)
        a = _next_adapter(ids, a)
    tl.store(dh_ptr + rows64[:, None] * R + cols[None, :], dh, mask=row_ok[:, None])
    if ACT == RATIONAL:
        tl.store(d_act_params_ptr + rows64[:, None] * ACT_PARAMS_PAD + pc[None, :], d_act_params, mask=row_ok[:, None])


@triton.jit
def _bwd_down_kernel(p_ptr, wd_ptr, ids_ptr, dh_ptr, d_act_params_ptr, gp_ptr, gwd_ptr, gbd_ptr, g_act_params_ptr,
                     B, d, r, A, n_row_blocks,
                     HAS_ACT_PARAMS: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, R: tl.constexpr):
    """For adapter a and d tile db: g_w_down[a][tile] = sum_rows P^T dh, g_pooled[rows of a][:, tile] =
    dh @ W_down[a][tile]^T; the db == 0 program also writes g_b_down[a] and g_act_params[a].
    Slot a == A writes the zero gradient of -1 rows."""
    a = tl.program_id(0)
    db = tl.program_id(1)
    a64 = a.to(tl.int64)
    ks = db * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = ks < d
    cols = tl.arange(0, R)
    col_ok = cols < r
    if a == A:
        for t in range(n_row_blocks):
            rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            m = row_ok & (tl.load(ids_ptr + rows, mask=row_ok, other=0) < 0)
            tl.store(gp_ptr + rows.to(tl.int64)[:, None] * d + ks[None, :],
                     tl.zeros([BLOCK_B, BLOCK_D], gp_ptr.dtype.element_ty), mask=m[:, None] & k_ok[None, :])
    else:
        w = tl.load(wd_ptr + a64 * d * r + ks[:, None] * r + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        gw = tl.zeros([BLOCK_D, R], ACC)
        gb = tl.zeros([R], ACC)
        pc = tl.arange(0, ACT_PARAMS_PAD)
        g_act_params = tl.zeros([ACT_PARAMS_PAD], ACC)
        for t in range(n_row_blocks):
            rows = t * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            rows64 = rows.to(tl.int64)
            m = tl.load(ids_ptr + rows, mask=row_ok, other=-1).to(tl.int32) == a
            if tl.max(m.to(tl.int32), axis=0) > 0:
                dh = tl.load(dh_ptr + rows64[:, None] * R + cols[None, :], mask=m[:, None], other=0.0)
                p = tl.load(p_ptr + rows64[:, None] * d + ks[None, :], mask=m[:, None] & k_ok[None, :],
                            other=0.0).to(ACC)
                gw += tl.dot(tl.trans(p), dh, input_precision=PREC)
                gp = tl.dot(dh, tl.trans(w), input_precision=PREC)
                tl.store(gp_ptr + rows64[:, None] * d + ks[None, :], gp.to(gp_ptr.dtype.element_ty),
                         mask=m[:, None] & k_ok[None, :])
                gb += tl.sum(dh, axis=0)
                if HAS_ACT_PARAMS:
                    d_params = tl.load(d_act_params_ptr + rows64[:, None] * ACT_PARAMS_PAD + pc[None, :],
                                       mask=m[:, None], other=0.0)
                    g_act_params += tl.sum(d_params, axis=0)
        tl.store(gwd_ptr + a64 * d * r + ks[:, None] * r + cols[None, :], gw.to(gwd_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & col_ok[None, :])
        if db == 0:
            tl.store(gbd_ptr + a64 * r + cols, gb.to(gbd_ptr.dtype.element_ty), mask=col_ok)
            if HAS_ACT_PARAMS:
                tl.store(g_act_params_ptr + a64 * 10 + pc, g_act_params.to(g_act_params_ptr.dtype.element_ty),
                         mask=pc < 10)


# ---------------------------------------------------------------------- launch configuration
@dataclass(frozen=True)
class GenerateTiles:
    """Tile sizes (all >= 16: tl.dot's minimum) and the d split of the down projection."""
    block_b_down: int
    block_d_down: int
    splits: int            # S: ways the down projection's d reduction is split
    block_b_up: int
    block_n_up: int | None  # None: autotuned (GPU)
    block_b_bwd: int
    block_n_bwd: int
    block_d_bwd: int


# Tests set this (e.g. to tiny tiles and several splits) to drive every loop and tail through
# the interpreter; a dict of Config fields that replace the chosen ones.
CONFIG_OVERRIDE: dict | None = None


def _generate_tiles(B: int, d: int, N: int, R: int, device: torch.device) -> GenerateTiles:
    if interpreting():  # ~0.5 ms per program instance: few, large tiles; numpy handles the width
        rows = next_pow2(B, lo=16, hi=128)
        features, outputs = next_pow2(d, lo=16, hi=4096), next_pow2(N, lo=16, hi=4096)
        cfg = GenerateTiles(block_b_down=rows, block_d_down=features, splits=1, block_b_up=rows, block_n_up=outputs,
                     block_b_bwd=rows, block_n_bwd=outputs, block_d_bwd=features)
    else:
        row_blocks = triton.cdiv(B, 16)
        # split d only while there are too few row blocks to occupy the SMs (decode batches);
        # each split costs every up-projection program one more [BB, R] partial read
        splits = max(1, min(16, triton.cdiv(d, 256), num_sms(device) // row_blocks))
        block_b_up = 16 if B <= 16 else (32 if B <= 32 else 64)
        # tiles shrink as R grows so that the [R, tile] operands and accumulators stay in
        # registers (sm_90 ptxas, R = 16 and 64: spills of at most a few hundred bytes, fp32)
        cfg = GenerateTiles(block_b_down=16, block_d_down=max(32, 2048 // R), splits=splits, block_b_up=block_b_up,
                     block_n_up=None, block_b_bwd=32, block_n_bwd=max(32, 1024 // R), block_d_bwd=max(16, 1024 // R))
    return cfg if CONFIG_OVERRIDE is None else replace(cfg, **CONFIG_OVERRIDE)


def _prune_up_configs(configs, named_args, **kwargs):
    R = kwargs.get("R", named_args.get("R", 16))
    return [c for c in configs if c.kwargs["BLOCK_N"] * R <= 4096] or configs[:1]


_UP_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8))]
# Several configs only on a GPU (autotuning benchmarks, which the interpreter cannot); keyed on
# the batch's row-block size, so a new batch size re-tunes at most once per bucket. A bucket
# first seen inside a CUDA-graph capture runs the first config, untimed (utils.capture_safe).
_up_kernel_tuned = capture_safe(triton.autotune(configs=_UP_CONFIGS, key=["N", "R", "BLOCK_B", "ACT"],
                                                prune_configs_by={"early_config_prune": _prune_up_configs})(_up_kernel))


def _down(pooled, w_down, ids, cfg: GenerateTiles, R: int) -> Tensor:
    """h partials [S, B, R] (acc dtype)."""
    B, d = pooled.shape
    r = w_down.shape[2]
    acc_tl, acc_torch = acc_dtypes(pooled.dtype)
    d_per_split = max(cfg.block_d_down, triton.cdiv(triton.cdiv(d, cfg.splits), cfg.block_d_down) * cfg.block_d_down)
    splits = max(1, triton.cdiv(d, d_per_split))
    hpart = empty_buffer((splits, B, R), acc_torch, pooled.device)
    grid = (triton.cdiv(B, cfg.block_b_down), splits)
    _down_kernel[grid](pooled, w_down, ids, hpart, B, d, r, d_per_split,
                       ACC=acc_tl, PREC=dot_precision(pooled.dtype),
                       BLOCK_B=cfg.block_b_down, BLOCK_D=cfg.block_d_down, R=R)
    return hpart


def _prepare(pooled, w_down, b_down, w_up, b_up, adapter_ids, act_params):
    tensors = [t.contiguous() for t in (pooled, w_down, b_down, w_up, b_up, adapter_ids)]
    params_arg = b_down if act_params is None else act_params  # a placeholder pointer when unused
    return tensors, params_arg.contiguous()


def generate(pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor,
             adapter_ids: Tensor, activation: str, act_params: Tensor | None = None) -> Tensor:
    """v [B, N] in pooled's dtype (docs/kernels.md, "generate"). Arguments are checked by the op."""
    B, d = pooled.shape
    r, N = w_up.shape[1], w_up.shape[2]
    out = empty_buffer((B, N), pooled.dtype, pooled.device)
    if out.numel() == 0:
        return out
    (pooled, w_down, b_down, w_up, b_up, ids), params_arg = _prepare(pooled, w_down, b_down, w_up, b_up,
                                                                     adapter_ids, act_params)
    R = next_pow2(r, lo=16)
    cfg = _generate_tiles(B, d, N, R, pooled.device)
    acc_tl, _ = acc_dtypes(pooled.dtype)
    with launch_guard(pooled.device):
        hpart = _down(pooled, w_down, ids, cfg, R)
        args = (hpart, b_down, w_up, b_up, params_arg, ids, out, B, r, N, hpart.shape[0])
        meta = dict(ACT=ACTIVATION_IDS[activation], ACC=acc_tl, PREC=dot_precision(pooled.dtype),
                    BLOCK_B=cfg.block_b_up, R=R)
        row_blocks = triton.cdiv(B, cfg.block_b_up)
        if cfg.block_n_up is None:
            _up_kernel_tuned[lambda m: (row_blocks, triton.cdiv(N, m["BLOCK_N"]))](*args, **meta)
        else:
            _up_kernel[(row_blocks, triton.cdiv(N, cfg.block_n_up))](*args, **meta, BLOCK_N=cfg.block_n_up)
    return out


def generate_backward(grad: Tensor, pooled: Tensor, w_down: Tensor, b_down: Tensor, w_up: Tensor,
                      b_up: Tensor, adapter_ids: Tensor, activation: str,
                      act_params: Tensor | None) -> tuple[Tensor, ...]:
    """grad [B, N] -> (g_pooled [B,d], g_w_down [A,d,r], g_b_down [A,r], g_w_up [A,r,N], g_b_up [A,N],
    g_act_params [A,10], or empty [0] when act_params is None), each in its input's dtype.
    Rows with id -1 get zero gradient and contribute none; unused adapters get zeros."""
    B, d = pooled.shape
    A, r, N = w_up.shape
    device, dtype = pooled.device, pooled.dtype
    g_pooled = empty_buffer((B, d), dtype, device)
    g_wd, g_bd = empty_buffer((A, d, r), w_down.dtype, device), empty_buffer((A, r), b_down.dtype, device)
    g_wu, g_bu = empty_buffer((A, r, N), w_up.dtype, device), empty_buffer((A, N), b_up.dtype, device)
    g_act_params = (pooled.new_empty(0) if act_params is None
                    else empty_buffer((A, RATIONAL_NUM_PARAMS), act_params.dtype, device))
    (pooled, w_down, b_down, w_up, b_up, ids), params_arg = _prepare(pooled, w_down, b_down, w_up, b_up,
                                                                     adapter_ids, act_params)
    grad = grad.contiguous()
    R = next_pow2(r, lo=16)
    cfg = _generate_tiles(B, d, N, R, device)
    acc_tl, acc_torch = acc_dtypes(dtype)
    prec = dot_precision(dtype)
    act = ACTIVATION_IDS[activation]
    has_act_params = act_params is not None
    with launch_guard(device):
        hpart = _down(pooled, w_down, ids, cfg, R) if B > 0 else empty_buffer((1, 0, R), acc_torch, device)
        S = hpart.shape[0]
        n_parts = max(1, triton.cdiv(N, cfg.block_n_bwd))  # >= 1 so that dz partials exist when N == 0
        dzpart = empty_buffer((n_parts, B, R), acc_torch, device)
        rb_bwd = triton.cdiv(B, cfg.block_b_bwd)
        if A > 0:
            _bwd_up_kernel[(A, n_parts)](grad, hpart, b_down, w_up, params_arg, ids, g_wu, g_bu, dzpart,
                                         B, r, N, S, rb_bwd, ACT=act, ACC=acc_tl, PREC=prec,
                                         BLOCK_B=cfg.block_b_bwd, BLOCK_N=cfg.block_n_bwd, R=R)
        dh = empty_buffer((B, R), acc_torch, device)
        d_act_params = empty_buffer((B, 16), acc_torch, device) if has_act_params else dh
        if B > 0:  # row blocks as small as the down projection's: this one is element-wise
            _bwd_mid_kernel[(triton.cdiv(B, cfg.block_b_down),)](
                hpart, dzpart, b_down, params_arg, ids, dh, d_act_params, B, r, S, n_parts, ACT=act, ACC=acc_tl,
                BLOCK_B=cfg.block_b_down, R=R)
        _bwd_down_kernel[(A + 1, max(1, triton.cdiv(d, cfg.block_d_bwd)))](
            pooled, w_down, ids, dh, d_act_params, g_pooled, g_wd, g_bd, g_act_params if has_act_params else g_bd,
            B, d, r, A, rb_bwd, HAS_ACT_PARAMS=has_act_params, ACC=acc_tl, PREC=prec,
            BLOCK_B=cfg.block_b_bwd, BLOCK_D=cfg.block_d_bwd, R=R)
    return g_pooled, g_wd, g_bd, g_wu, g_bu, g_act_params
