"""Triton kernels of ``para::scaled_glu`` and ``para::scaled_glu_backward`` (docs/spec.md §3).

gate, up [B, ..., n] (any strides whose middle dims merge, e.g. the two halves of a fused
gate_up projection), v [B, n], activation 'silu' | 'gelu' | 'gelu_tanh' -> act(gate) ⊙ up ⊙ v[b]
in gate's dtype, as ``reference_ops.scaled_glu`` (the spec). Math in fp32 (fp64 for fp64 inputs);
grids depend on shapes only (graph capture). The backward is deterministic: fixed tiles, no
atomics, chunk partials summed in order. Design: docs/kernels.md, "scaled_glu".
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel_utils import ACTIVATION_IDS, activation_grad, apply_activation, sum_chunks_kernel
from .utils import capture_safe, interpreting, launch_guard, next_pow2, num_sms, view_rows

_MAX_BLOCK_T = 64   # tokens per tile
_MAX_BLOCK_R = 256  # rows per tile (decode: one token per row)


def _glu_configs() -> list:
    # N_CAP caps the feature block, TILE is elements per program (split over rows and tokens).
    if interpreting():  # each program costs tens of ms there: few, large tiles
        return [triton.Config({"N_CAP": 4096, "TILE": 16384}, num_warps=4)]
    return [triton.Config({"N_CAP": c, "TILE": t}, num_warps=w) for c, t, w in (
        (256, 2048, 4), (512, 4096, 4), (1024, 4096, 4), (1024, 8192, 8), (2048, 8192, 8))]


def _glu_tile(tile: int, n_cap: int, R: int, L: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_N) of a [rows, tokens, features] tile of about `tile` elements.
    Short rows (decode: L = 1) are stacked BLOCK_R to a tile, so a program is never one token."""
    bn = min(next_pow2(n), n_cap)
    bt = max(1, min(tile // bn, next_pow2(L), _MAX_BLOCK_T))
    br = max(1, min(tile // (bn * bt), next_pow2(R), _MAX_BLOCK_R))
    return br, bt, bn


def _glu_heuristic(a, i):
    return _glu_tile(a["TILE"], a["N_CAP"], a["R"], a["L"], a["n"])[i]


def _glu_prune(configs, named_args, **kwargs):
    """Drop configs that collapse to the same tile for this shape (small n, short rows)."""
    seen, keep = set(), []
    for c in configs:
        tile = (_glu_tile(c.kwargs["TILE"], c.kwargs["N_CAP"], named_args["R"], named_args["L"], named_args["n"]),
                c.num_warps)
        if tile not in seen:
            seen.add(tile)
            keep.append(c)
    return keep


@capture_safe
@triton.autotune(configs=_glu_configs(), key=["n", "L_KEY", "R_KEY", "BIG"],
                 prune_configs_by={"early_config_prune": _glu_prune})
@triton.heuristics({"BLOCK_R": lambda a: _glu_heuristic(a, 0), "BLOCK_T": lambda a: _glu_heuristic(a, 1),
                    "BLOCK_N": lambda a: _glu_heuristic(a, 2)})
@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, v_ptr, o_ptr, R, L, n,
                    gate_stride_row, gate_stride_token, gate_stride_feat,
                    up_stride_row, up_stride_token, up_stride_feat,
                    out_stride_row, out_stride_token, out_stride_feat, v_stride_row, v_stride_feat,
                    L_KEY, R_KEY, BIG,  # autotune key only
                    ACT: tl.constexpr, F64: tl.constexpr, N_CAP: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, token block, feature block): out = act(gate) ⊙ up ⊙ v[row]."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(L, BLOCK_T)
    row_block = pid // t_blocks
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    t = (pid - row_block * t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rf_ok = (r < R)[:, None] & (f < n)[None, :]
    mask = rf_ok[:, None, :] & (t < L)[None, :, None]
    r64 = r.to(tl.int64)  # >2 GiB tensors overflow int32 offsets
    r3 = r64[:, None, None]
    t3 = t.to(tl.int64)[None, :, None]
    f3 = f[None, None, :]
    # Each address is formed where it is used: an offset tile computed ahead stays live in
    # registers (the fp64 variants spill twice as much).
    gate = tl.load(g_ptr + r3 * gate_stride_row + t3 * gate_stride_token + f3 * gate_stride_feat, mask=mask,
                   eviction_policy="evict_first").to(ACC)
    up = tl.load(u_ptr + r3 * up_stride_row + t3 * up_stride_token + f3 * up_stride_feat, mask=mask,
                 eviction_policy="evict_first").to(ACC)
    vv = tl.load(v_ptr + r64[:, None] * v_stride_row + f[None, :] * v_stride_feat, mask=rf_ok,
                 eviction_policy="evict_last")
    out = apply_activation(gate, ACT) * up * vv.to(ACC)[:, None, :]  # one v row per tile row, broadcast over tokens
    tl.store(o_ptr + r3 * out_stride_row + t3 * out_stride_token + f3 * out_stride_feat,
             out.to(o_ptr.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _glu_bwd_kernel(dy_ptr, g_ptr, u_ptr, v_ptr, gg_ptr, gu_ptr, gv_ptr, part_ptr, R, L, n, chunk, n_chunks,
                    grad_stride_row, grad_stride_token, grad_stride_feat,
                    gate_stride_row, gate_stride_token, gate_stride_feat,
                    up_stride_row, up_stride_token, up_stride_feat,
                    gg_stride_row, gg_stride_token, gg_stride_feat,
                    gu_stride_row, gu_stride_token, gu_stride_feat,
                    v_stride_row, v_stride_feat, gv_stride_row, gv_stride_feat,
                    ACT: tl.constexpr, DIRECT: tl.constexpr, F64: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, chunk c, feature block), over tokens [c·chunk, (c+1)·chunk) of its rows:
    grad_gate = dy ⊙ up ⊙ v ⊙ act'(gate), grad_up = dy ⊙ act(gate) ⊙ v, and Σ_t dy ⊙ act(gate) ⊙ up
    into gv[row] (DIRECT: one chunk per row) or part[row, c] (fp32/fp64)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    row_block = pid // n_chunks
    c = pid - row_block * n_chunks
    r = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = f < n
    rf_ok = (r < R)[:, None] & f_ok[None, :]
    r64 = r.to(tl.int64)
    r3 = r64[:, None, None]
    f3 = f[None, None, :]
    vv = tl.load(v_ptr + r64[:, None] * v_stride_row + f[None, :] * v_stride_feat, mask=rf_ok).to(ACC)[:, None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_T, BLOCK_N], dtype=ACC)
    t_end = tl.minimum(c * chunk + chunk, L)
    for t0 in range(c * chunk, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = rf_ok[:, None, :] & (t < t_end)[None, :, None]
        t3 = t.to(tl.int64)[None, :, None]
        dy = tl.load(dy_ptr + r3 * grad_stride_row + t3 * grad_stride_token + f3 * grad_stride_feat, mask=mask,
                     other=0.0, eviction_policy="evict_first").to(ACC)
        gate = tl.load(g_ptr + r3 * gate_stride_row + t3 * gate_stride_token + f3 * gate_stride_feat, mask=mask,
                       other=0.0, eviction_policy="evict_first").to(ACC)
        up = tl.load(u_ptr + r3 * up_stride_row + t3 * up_stride_token + f3 * up_stride_feat, mask=mask,
                     other=0.0, eviction_policy="evict_first").to(ACC)
        a = apply_activation(gate, ACT)
        dyv = dy * vv
        tl.store(gg_ptr + r3 * gg_stride_row + t3 * gg_stride_token + f3 * gg_stride_feat,
                 (dyv * up * activation_grad(gate, ACT)).to(gg_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + r3 * gu_stride_row + t3 * gu_stride_token + f3 * gu_stride_feat,
                 (dyv * a).to(gu_ptr.dtype.element_ty), mask=mask)
        acc += dy * a * up  # masked lanes loaded dy = 0: they add nothing
    total = tl.sum(acc, axis=1)
    if DIRECT:
        tl.store(gv_ptr + r64[:, None] * gv_stride_row + f[None, :] * gv_stride_feat,
                 total.to(gv_ptr.dtype.element_ty), mask=rf_ok)
    else:
        tl.store(part_ptr + (r64[:, None] * n_chunks + c) * n + f[None, :], total, mask=rf_ok)


def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """gate, up [B, ..., n], v [B, n] -> act(gate) ⊙ up ⊙ v[b] [B, ..., n], in gate's dtype."""
    out = torch.empty_like(gate)  # the fake impl's layout
    if out.numel() == 0:
        return out
    rows = gate.shape[0]
    g3, u3, o3 = view_rows(gate, rows), view_rows(up, rows), view_rows(out, rows)
    if g3 is None or u3 is None or o3 is None:  # middle dims that do not merge: one copy
        return out.copy_(scaled_glu(gate.contiguous(), up.contiguous(), v, activation))
    R, L, n = g3.shape
    big = int(R * L * n >= 1 << 22)

    def grid(meta):
        return triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(L, meta["BLOCK_T"]), triton.cdiv(n, meta["BLOCK_N"])

    with launch_guard(gate.device):
        _glu_fwd_kernel[grid](g3, u3, v, o3, R, L, n, *g3.stride(), *u3.stride(), *o3.stride(), *v.stride(),
                              min(next_pow2(L), _MAX_BLOCK_T), min(next_pow2(R), _MAX_BLOCK_R), big,
                              ACT=ACTIVATION_IDS[activation], F64=gate.dtype == torch.float64)
    return out


def scaled_glu_backward(grad: Tensor, gate: Tensor, up: Tensor, v: Tensor,
                        activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """grad, gate, up [B, ..., n], v [B, n] -> (grad_gate like gate, grad_up like up,
    grad_v [B, n] = Σ over b's tokens of grad ⊙ act(gate) ⊙ up, in v's dtype)."""
    g_gate, g_up, g_v = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(v)
    if g_v.numel() == 0 or gate.numel() == 0:
        return g_gate, g_up, g_v.zero_()
    rows = gate.shape[0]
    views = [view_rows(t, rows) for t in (grad, gate, up, g_gate, g_up)]
    if any(t is None for t in views):
        gg, gu, gv = scaled_glu_backward(grad.contiguous(), gate.contiguous(), up.contiguous(), v, activation)
        return g_gate.copy_(gg), g_up.copy_(gu), gv
    d3, g3, u3, gg3, gu3 = views
    R, L, n = g3.shape
    f64 = gate.dtype == torch.float64
    # Fixed tiles per shape (never autotuned: grad_v is deterministic). 3 loads + 2 stores per
    # element: smaller tiles than the forward's.
    tile, n_cap = (16384, 4096) if interpreting() else (2048, 512)
    br, bt, bn = _glu_tile(tile, n_cap, R, L, n)
    f_blocks = triton.cdiv(n, bn)
    n_chunks = 1
    if bt < L:  # long rows: split each row's tokens into C chunks so that the programs fill the
        # device; the fp32 partials are then summed in chunk order
        target, min_chunk = (4, 8) if interpreting() else (8 * num_sms(gate.device), 64)
        n_chunks = max(1, min(triton.cdiv(target, triton.cdiv(R, br) * f_blocks), triton.cdiv(L, min_chunk)))
    chunk = triton.cdiv(L, n_chunks)
    n_chunks = triton.cdiv(L, chunk)
    direct = n_chunks == 1
    part = g_v if direct else torch.empty(R, n_chunks, n, dtype=torch.float64 if f64 else torch.float32,
                                          device=gate.device)
    with launch_guard(gate.device):
        _glu_bwd_kernel[(triton.cdiv(R, br) * n_chunks, f_blocks)](
            d3, g3, u3, v, gg3, gu3, g_v, part, R, L, n, chunk, n_chunks, *d3.stride(), *g3.stride(), *u3.stride(),
            *gg3.stride(), *gu3.stride(), v.stride(0), v.stride(1), g_v.stride(0), g_v.stride(1),
            ACT=ACTIVATION_IDS[activation], DIRECT=direct, F64=f64, BLOCK_R=br, BLOCK_T=bt, BLOCK_N=bn, num_warps=4)
        if not direct:
            sum_chunks_kernel[(R, f_blocks)](part, g_v, n, n_chunks, g_v.stride(0), g_v.stride(1),
                                             BLOCK_C=1, BLOCK_N=bn, num_warps=4)
    return g_gate, g_up, g_v
