"""Triton kernels of the fused consumers of the scale (PARA_SPEC §3): ``scaled_glu`` and
``scaled_linear`` with their backwards. Semantics, signatures and dtypes are those of
``torch_ops.fused`` (the spec); every kernel loads in the input dtype, computes in fp32 (fp64
for fp64 inputs) and stores in the output dtype. Grids depend on shapes only.

scaled_glu (gate, up [B, ..., n], v [B, n]): an elementwise SwiGLU-style kernel with one more
multiply. gate/up are viewed as [B, L, n] (L = product of the middle dims; no copy for any
strides whose middle dims merge, e.g. the two halves of a fused gate_up projection) and tiled in
3-D [rows, tokens, features] blocks: v is loaded once per tile row and broadcast over its tokens,
and decode (L = 1) stacks many rows into one tile rather than one token per program.
Backward is one fused pass that writes grad_gate, grad_up and reduces grad ⊙ act(gate) ⊙ up over
each row's tokens inside the tile (long rows: in fixed-order chunks; no atomics: deterministic).

scaled_linear (x [B, ..., k], weight [n, k], bias [n], v [B, n]): one tiled matmul (tl.dot, fp32
accumulation; fp32 inputs use input_precision="ieee" so TF32 never applies) whose epilogue adds
the bias and multiplies by v[token // L]: the scale costs no pass over memory. Decode (M = B·T
<= 64 rows) is a weight-streaming problem, so all rows share one M block and K is split across
programs until the device is full; the fp32 partial sums [S, M, n] are then summed in split order
by a small kernel that also applies the epilogue (deterministic, no atomics). The split S is
chosen from shapes on the host; the tile sizes are autotuned on GPUs (a shape first seen inside
a CUDA-graph capture runs the first config left after pruning, untimed: utils.capture_safe).

scaled_linear backward. dv[b] = Σ_t dy ⊙ (x Wᵀ + b) needs the unscaled output, which the op's
autograd does not save (it saves x, weight, bias, v; saving y would cost an [M, n] activation per
layer and a different schema), so kernel 1 recomputes y tile by tile (a forward-sized matmul, with
fixed per-shape tiles so the backward is deterministic) and, in its epilogue, reads dy once and
writes (a) dY' = dy ⊙ v[row] in the input dtype, (b) per-M-block column sums of dY' (-> grad_bias)
and (c) per-M-block, per-row sums of dy ⊙ y (-> grad_v): masked column sums when a tile touches
<= 4 rows (training), else a one-hot [rows, BM] x [BM, BN] tl.dot (decode: up to BM rows per tile).
Small kernels sum the partials in fixed order (no atomics). dx = dY' W and dW = dY'ᵀ x are then
plain GEMMs with nothing left to fuse, so they go to torch.mm (cuBLAS on GPUs: TMA and
warp-specialised Hopper kernels tuned per shape; the Triton GEMM first tried for dW, whose A
operand dY'ᵀ is M-major, compiled for sm_90 without software pipelining). They use
torch's fp32 matmul precision setting, as nn.Linear's own backward does (IEEE unless the user
enabled TF32). dY' in the input dtype costs one [M, n] write and lets both GEMMs use tensor
cores; its rounding (2^-8 relative for bf16) is what torch's own bf16 linear backward has.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import interpreting
from .utils import capture_safe, launch_guard, num_sms

_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_A = tl.constexpr(0.044715)
_MAX_BLOCK_T = 64   # tokens per tile
_MAX_BLOCK_R = 256  # rows per tile (decode: one token per row)


def _np2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def _device_sms(device: torch.device) -> int:
    return 4 if interpreting() else num_sms(device)


def _view3(t: Tensor, rows: int) -> Tensor | None:
    """t [B, ..., n] as a [B, L, n] view (no copy), or None when its middle dims cannot merge."""
    try:
        return t.view(rows, -1, t.shape[-1])
    except RuntimeError:
        return None


def _s3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


# ====================================================================== scaled_glu
@triton.jit
def _act_fwd(x, ACT: tl.constexpr):
    """act(x) for ACT 0 silu, 1 gelu (erf), 2 gelu_tanh; x in fp32/fp64."""
    if ACT == 0:
        return x / (1.0 + tl.exp(-x))
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT2))
    else:
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u): no tanh needed, no cancellation for u << 0
        u = _SQRT_2_OVER_PI * (x + _GELU_TANH_A * x * x * x)
        return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _act_bwd(x, ACT: tl.constexpr):
    """d act / dx, the same closed forms as torch_ops.fused._glu_act_grad."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
        return cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT2PI
    else:
        u = _SQRT_2_OVER_PI * (x + _GELU_TANH_A * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))  # = 0.5 (1 + tanh u); 1 - tanh² = 4 s (1 - s)
        return s + 2.0 * x * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_A * x * x)


def _glu_configs() -> list:
    # N_CAP caps the feature block, TILE is elements per program (split over rows and tokens).
    if interpreting():  # each program costs tens of ms there: few, large tiles
        return [triton.Config({"N_CAP": 4096, "TILE": 16384}, num_warps=4)]
    return [triton.Config({"N_CAP": c, "TILE": t}, num_warps=w) for c, t, w in (
        (256, 2048, 4), (512, 4096, 4), (1024, 4096, 4), (1024, 8192, 8), (2048, 8192, 8))]


def _glu_tile(tile: int, n_cap: int, R: int, L: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, BLOCK_N) of a [rows, tokens, features] tile of about `tile` elements.
    Short rows (decode: L = 1) are stacked BLOCK_R to a tile, so a program is never one token."""
    bn = min(_np2(n), n_cap)
    bt = max(1, min(tile // bn, _np2(L), _MAX_BLOCK_T))
    br = max(1, min(tile // (bn * bt), _np2(R), _MAX_BLOCK_R))
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
                    sg_r, sg_t, sg_f, su_r, su_t, su_f, so_r, so_t, so_f, sv_b, sv_f,
                    L_KEY, R_KEY, BIG,  # autotune key only
                    ACT: tl.constexpr, F64: tl.constexpr, N_CAP: tl.constexpr, TILE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, token block, feature block): out = act(gate) ⊙ up ⊙ v[row]."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(L, BLOCK_T)
    pr = pid // t_blocks
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    t = (pid - pr * t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rf_ok = (r < R)[:, None] & (f < n)[None, :]
    mask = rf_ok[:, None, :] & (t < L)[None, :, None]
    r64 = r.to(tl.int64)  # >2 GiB tensors overflow int32 offsets
    r3 = r64[:, None, None]
    t3 = t.to(tl.int64)[None, :, None]
    f3 = f[None, None, :]
    gate = tl.load(g_ptr + r3 * sg_r + t3 * sg_t + f3 * sg_f, mask=mask, eviction_policy="evict_first").to(ACC)
    up = tl.load(u_ptr + r3 * su_r + t3 * su_t + f3 * su_f, mask=mask, eviction_policy="evict_first").to(ACC)
    vv = tl.load(v_ptr + r64[:, None] * sv_b + f[None, :] * sv_f, mask=rf_ok, eviction_policy="evict_last")
    out = _act_fwd(gate, ACT) * up * vv.to(ACC)[:, None, :]  # one v row per tile row, broadcast over tokens
    tl.store(o_ptr + r3 * so_r + t3 * so_t + f3 * so_f, out.to(o_ptr.dtype.element_ty), mask=mask,
             eviction_policy="evict_first")


@triton.jit
def _glu_bwd_kernel(dy_ptr, g_ptr, u_ptr, v_ptr, gg_ptr, gu_ptr, gv_ptr, part_ptr, R, L, n, chunk, n_chunks,
                    sd_r, sd_t, sd_f, sg_r, sg_t, sg_f, su_r, su_t, su_f,
                    sgg_r, sgg_t, sgg_f, sgu_r, sgu_t, sgu_f, sv_b, sv_f, sgv_b, sgv_f,
                    ACT: tl.constexpr, DIRECT: tl.constexpr, F64: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (row block, chunk c, feature block), over tokens [c·chunk, (c+1)·chunk) of its rows:
    grad_gate = dy ⊙ up ⊙ v ⊙ act'(gate), grad_up = dy ⊙ act(gate) ⊙ v, and Σ_t dy ⊙ act(gate) ⊙ up
    into gv[row] (DIRECT: one chunk per row) or part[row, c] (fp32/fp64)."""
    ACC: tl.constexpr = tl.float64 if F64 else tl.float32
    pid = tl.program_id(0)
    pr = pid // n_chunks
    c = pid - pr * n_chunks
    r = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = f < n
    rf_ok = (r < R)[:, None] & f_ok[None, :]
    r64 = r.to(tl.int64)
    r3 = r64[:, None, None]
    f3 = f[None, None, :]
    vv = tl.load(v_ptr + r64[:, None] * sv_b + f[None, :] * sv_f, mask=rf_ok).to(ACC)[:, None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_T, BLOCK_N], dtype=ACC)
    t_end = tl.minimum(c * chunk + chunk, L)
    for t0 in range(c * chunk, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = rf_ok[:, None, :] & (t < t_end)[None, :, None]
        t3 = t.to(tl.int64)[None, :, None]
        dy = tl.load(dy_ptr + r3 * sd_r + t3 * sd_t + f3 * sd_f, mask=mask, other=0.0,
                     eviction_policy="evict_first").to(ACC)
        gate = tl.load(g_ptr + r3 * sg_r + t3 * sg_t + f3 * sg_f, mask=mask, other=0.0,
                       eviction_policy="evict_first").to(ACC)
        up = tl.load(u_ptr + r3 * su_r + t3 * su_t + f3 * su_f, mask=mask, other=0.0,
                     eviction_policy="evict_first").to(ACC)
        a = _act_fwd(gate, ACT)
        dyv = dy * vv
        tl.store(gg_ptr + r3 * sgg_r + t3 * sgg_t + f3 * sgg_f,
                 (dyv * up * _act_bwd(gate, ACT)).to(gg_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + r3 * sgu_r + t3 * sgu_t + f3 * sgu_f, (dyv * a).to(gu_ptr.dtype.element_ty), mask=mask)
        acc += dy * a * up  # masked lanes loaded dy = 0: they add nothing
    total = tl.sum(acc, axis=1)
    if DIRECT:
        tl.store(gv_ptr + r64[:, None] * sgv_b + f[None, :] * sgv_f, total.to(gv_ptr.dtype.element_ty), mask=rf_ok)
    else:
        tl.store(part_ptr + (r64[:, None] * n_chunks + c) * n + f[None, :], total, mask=rf_ok)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, n, n_chunks, so_b, so_f, BLOCK_N: tl.constexpr):
    """out[r, f] = Σ_c part[r, c, f] in chunk order (deterministic), cast to out's dtype."""
    r = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    f_ok = f < n
    acc = tl.zeros([BLOCK_N], dtype=part_ptr.dtype.element_ty)
    for c in range(n_chunks):
        acc += tl.load(part_ptr + (r * n_chunks + c) * n + f, mask=f_ok, other=0.0)
    tl.store(out_ptr + r * so_b + f * so_f, acc.to(out_ptr.dtype.element_ty), mask=f_ok)


def scaled_glu(gate: Tensor, up: Tensor, v: Tensor, activation: str = "silu") -> Tensor:
    """gate, up [B, ..., n], v [B, n] -> act(gate) ⊙ up ⊙ v[b] [B, ..., n], in gate's dtype."""
    out = torch.empty_like(gate)  # the fake impl's layout
    if out.numel() == 0:
        return out
    rows = gate.shape[0]
    g3, u3, o3 = _view3(gate, rows), _view3(up, rows), _view3(out, rows)
    if g3 is None or u3 is None or o3 is None:  # middle dims that do not merge: one copy
        return out.copy_(scaled_glu(gate.contiguous(), up.contiguous(), v, activation))
    R, L, n = g3.shape
    big = int(R * L * n >= 1 << 22)

    def grid(meta):
        return triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(L, meta["BLOCK_T"]), triton.cdiv(n, meta["BLOCK_N"])

    with launch_guard(gate.device):
        _glu_fwd_kernel[grid](g3, u3, v, o3, R, L, n, *_s3(g3), *_s3(u3), *_s3(o3), v.stride(0), v.stride(1),
                              min(_np2(L), _MAX_BLOCK_T), min(_np2(R), _MAX_BLOCK_R), big,
                              ACT=_ACT[activation], F64=gate.dtype == torch.float64)
    return out


def scaled_glu_backward(grad: Tensor, gate: Tensor, up: Tensor, v: Tensor,
                        activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """grad, gate, up [B, ..., n], v [B, n] -> (grad_gate like gate, grad_up like up,
    grad_v [B, n] = Σ over b's tokens of grad ⊙ act(gate) ⊙ up, in v's dtype)."""
    g_gate, g_up, g_v = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(v)
    if g_v.numel() == 0 or gate.numel() == 0:
        return g_gate, g_up, g_v.zero_()
    rows = gate.shape[0]
    views = [_view3(t, rows) for t in (grad, gate, up, g_gate, g_up)]
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
        target, min_chunk = (4, 8) if interpreting() else (8 * _device_sms(gate.device), 64)
        n_chunks = max(1, min(triton.cdiv(target, triton.cdiv(R, br) * f_blocks), triton.cdiv(L, min_chunk)))
    chunk = triton.cdiv(L, n_chunks)
    n_chunks = triton.cdiv(L, chunk)
    direct = n_chunks == 1
    part = g_v if direct else torch.empty(R, n_chunks, n, dtype=torch.float64 if f64 else torch.float32,
                                          device=gate.device)
    with launch_guard(gate.device):
        _glu_bwd_kernel[(triton.cdiv(R, br) * n_chunks, f_blocks)](
            d3, g3, u3, v, gg3, gu3, g_v, part, R, L, n, chunk, n_chunks, *_s3(d3), *_s3(g3), *_s3(u3),
            *_s3(gg3), *_s3(gu3), v.stride(0), v.stride(1), g_v.stride(0), g_v.stride(1),
            ACT=_ACT[activation], DIRECT=direct, F64=f64, BLOCK_R=br, BLOCK_T=bt, BLOCK_N=bn, num_warps=4)
        if not direct:
            _sum_chunks_kernel[(R, f_blocks)](part, g_v, n, n_chunks, g_v.stride(0), g_v.stride(1),
                                              BLOCK_N=bn, num_warps=4)
    return g_gate, g_up, g_v


# ====================================================================== scaled_linear
# Epilogues of the matmul kernel.
_EPI_SCALE = 1    # c = (a @ b + bias) ⊙ v[m // L]
_EPI_PARTIAL = 2  # ws[split] = a @ b over this split's K range (fp32/fp64)
_EPI_BWD = 3      # y = a @ b + bias; c = dy ⊙ v[m // L]; partial Σ_m c and per-row Σ dy ⊙ y


@triton.jit
def _mma(a, b, acc, F64: tl.constexpr, PREC: tl.constexpr):
    if F64:  # fp64 tl.dot is not in every Triton release: FMA on a broadcast (small tiles)
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, v_ptr, dy_ptr, dvp_ptr, dbp_ptr,
               M, N, K, L, k_split,
               s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_bias, s_vb, s_vn, s_dm, s_dn,
               M_KEY, n_split,  # autotune key only
               EPI: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, F64: tl.constexpr,
               PREC: tl.constexpr, R_T: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] (any strides) with the epilogue EPI; program (tile, split)."""
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
    a_ptrs = a_ptr + am[:, None] * s_am + (k_lo + rk).to(tl.int64)[None, :] * s_ak
    b_ptrs = b_ptr + (k_lo + rk).to(tl.int64)[:, None] * s_bk + bn[None, :] * s_bn
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(k_lo, k_hi, BK):
        k_ok = k0 + rk < k_hi
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # fp32/fp64 math (the interpreter gets 16-bit arithmetic wrong)
            a = a.to(ACC)
            b = b.to(ACC)
        acc = _mma(a, b, acc, F64, PREC)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk

    mask = m_ok[:, None] & n_ok[None, :]
    rm64 = rm.to(tl.int64)
    if EPI == 2:
        ws = c_ptr + (tl.program_id(1) * M + rm64)[:, None] * N + rn[None, :]
        tl.store(ws, acc, mask=mask)
    else:
        y = acc
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn * s_bias, mask=n_ok, other=0.0).to(ACC)[None, :]
        row = (rm // L).to(tl.int64)
        vv = tl.load(v_ptr + row[:, None] * s_vb + rn[None, :] * s_vn, mask=mask, other=0.0).to(ACC)
        if EPI == 1:
            out = y * vv
        else:
            dy = tl.load(dy_ptr + rm64[:, None] * s_dm + rn[None, :] * s_dn, mask=mask, other=0.0).to(ACC)
            out = dy * vv  # dY', the gradient of the unscaled output (0 where masked)
            tl.store(dbp_ptr + pid_m.to(tl.int64) * N + rn, tl.sum(out, axis=0), mask=n_ok)
            # Σ of dy ⊙ y over each row's tokens in this tile, into slot j = m // L - (first row)
            # of this M-block's R_T partial rows.
            prod = dy * y
            r0 = (pid_m * BM) // L
            j = tl.where(m_ok, rm // L - r0, -1)
            n_rows = (tl.minimum(pid_m * BM + BM, M) - 1) // L - r0 + 1
            dv_base = dvp_ptr + pid_m.to(tl.int64) * R_T * N
            if R_T <= 4:  # long rows (training): a tile touches <= 2 rows, masked column sums
                for jj in tl.static_range(R_T):
                    part = tl.sum(tl.where((j == jj)[:, None], prod, 0.0), axis=0)
                    tl.store(dv_base + jj * N + rn, part, mask=n_ok & (jj < n_rows))
            else:  # short rows (up to BM per tile): one-hot [R_T, BM] @ [BM, BN]
                jr = tl.arange(0, R_T)
                sel = (jr[:, None] == j[None, :]).to(ACC)
                part = _mma(sel, prod, tl.zeros((R_T, BN), dtype=ACC), F64, "ieee")
                tl.store(dv_base + jr.to(tl.int64)[:, None] * N + rn[None, :], part,
                         mask=(jr < n_rows)[:, None] & n_ok[None, :])
        tl.store(c_ptr + rm64[:, None] * s_cm + rn[None, :] * s_cn, out.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _split_epilogue_kernel(ws_ptr, c_ptr, bias_ptr, v_ptr, M, N, L, n_split, s_cm, s_cn, s_bias, s_vb, s_vn,
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
        acc += tl.load(bias_ptr + rn * s_bias, mask=rn < N, other=0.0).to(acc.dtype)[None, :]
    row = (rm // L).to(tl.int64)
    acc *= tl.load(v_ptr + row[:, None] * s_vb + rn[None, :] * s_vn, mask=mask, other=0.0).to(acc.dtype)
    tl.store(c_ptr + rm64[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dv_reduce_kernel(dvp_ptr, gv_ptr, B, N, L, max_blocks, s_gb, s_gn, BM: tl.constexpr, R_T: tl.constexpr,
                      BLOCK_B: tl.constexpr, BN: tl.constexpr):
    """gv[b] = Σ over the M-blocks holding row b's tokens of their partial for b, in block order."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    b_ok = b < B
    n_ok = rn < N
    first = (b * L) // BM
    last = (b * L + L - 1) // BM
    acc = tl.zeros((BLOCK_B, BN), dtype=dvp_ptr.dtype.element_ty)
    for s in range(max_blocks):
        i = first + s
        j = b - (i * BM) // L  # b's slot among the rows of block i
        ok = b_ok & (i <= last)
        acc += tl.load(dvp_ptr + (i * R_T + j).to(tl.int64)[:, None] * N + rn[None, :],
                       mask=ok[:, None] & n_ok[None, :], other=0.0)
    tl.store(gv_ptr + b.to(tl.int64)[:, None] * s_gb + rn[None, :] * s_gn, acc.to(gv_ptr.dtype.element_ty),
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


_mm_tuned = capture_safe(triton.autotune(configs=_mm_configs(), key=["M_KEY", "N", "K", "n_split", "EPI"],
                                         prune_configs_by={"early_config_prune": _mm_prune})(_mm_kernel))


def _m_key(M: int) -> int:
    return max(16, _np2(M)) if M <= 64 else min(_np2(M), 8192)


def _fixed_tiles(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tiles of the untuned launches (interpreter, fp64, the backward's recompute): fixed per
    shape, so the backward is deterministic."""
    if interpreting():  # few, large tiles (each program costs tens of ms there)
        return dict(BM=min(max(16, _np2(M)), 64), BN=min(max(16, _np2(N)), 256), BK=min(max(16, _np2(K)), 128),
                    GROUP_M=1, num_warps=4, num_stages=1)
    if dtype == torch.float64:
        return dict(BM=32, BN=32, BK=8, GROUP_M=8, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # IEEE fp32 runs on the FMA units: modest tiles, BK <= 32
        return dict(BM=max(16, _np2(M)) if M <= 64 else 64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3)
    if M <= 64:
        return dict(BM=max(16, _np2(M)), BN=64, BK=128, GROUP_M=1, num_warps=4, num_stages=4)
    # dy, v, y and dy ⊙ y live beside the accumulator in the epilogue: a 128 x 64 tile
    return dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def _k_splits(M: int, N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(S, K per split): split K only for decode-sized M, until ~2 waves of programs are out."""
    min_k = 256 if interpreting() else 512
    if M > 64 or K < 2 * min_k:
        return 1, max(K, 1)
    tiles = triton.cdiv(M, max(16, _np2(M))) * triton.cdiv(N, 64)
    s = min(triton.cdiv(2 * _device_sms(device), tiles), K // min_k)
    if s <= 1:
        return 1, K
    k_split = triton.cdiv(triton.cdiv(K, s), 256) * 256  # a multiple of every BK: no ragged middle tiles
    return triton.cdiv(K, k_split), k_split


def _matmul(x2: Tensor, weight: Tensor, c: Tensor, c_strides, M: int, N: int, K: int, *, epi: int,
            bias: Tensor | None = None, v: Tensor | None = None, L: int = 1, dy: Tensor | None = None,
            dvp: Tensor | None = None, dbp: Tensor | None = None, n_split: int = 1, k_split: int | None = None,
            tiles: dict | None = None, r_t: int = 1) -> None:
    """Launch _mm_kernel on x2 [M, K] @ weightᵀ [K, N]: autotuned on GPUs when tiles is None."""
    dtype = x2.dtype
    f64 = dtype == torch.float64
    upcast = interpreting() or dtype in (torch.float32, torch.float64)
    prec = "ieee" if upcast else "tf32"  # never TF32 for fp32; 16-bit operands ignore it
    dummy = c
    v_s = (v.stride(0), v.stride(1)) if v is not None else (0, 0)
    dy_s = (dy.stride(0), dy.stride(1)) if dy is not None else (0, 0)
    args = (x2, weight, c, bias if bias is not None else dummy, v if v is not None else dummy,
            dy if dy is not None else dummy, dvp if dvp is not None else dummy, dbp if dbp is not None else dummy,
            M, N, K, L, k_split or max(K, 1), x2.stride(0), x2.stride(1), weight.stride(1), weight.stride(0),
            *c_strides, bias.stride(0) if bias is not None else 0, *v_s, *dy_s, _m_key(M), n_split)
    consts = dict(EPI=epi, HAS_BIAS=bias is not None, UPCAST=upcast, F64=f64, PREC=prec, R_T=r_t)
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
        return min(_np2(M), 64), min(_np2(N), 1024)
    return min(_np2(M), 16), min(_np2(N), 256)


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
        _matmul(x2, weight, o2, o2.stride(), M, n, k, epi=_EPI_SCALE, bias=bias, v=v, L=L)
        return out
    ws = torch.empty(S, M, n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    _matmul(x2, weight, ws, (n, 1), M, n, k, epi=_EPI_PARTIAL, n_split=S, k_split=k_split)
    bm, bn = _epilogue_tiles(M, n)
    with launch_guard(x.device):
        _split_epilogue_kernel[(triton.cdiv(M, bm), triton.cdiv(n, bn))](
            ws, o2, bias if bias is not None else ws, v, M, n, L, S, o2.stride(0), o2.stride(1),
            bias.stride(0) if bias is not None else 0, v.stride(0), v.stride(1), HAS_BIAS=bias is not None,
            BM=bm, BN=bn, num_warps=4)
    return out


def _rows_bound(bm: int, L: int) -> int:
    """R_T, the partial-row slots per M-block: the most rows BM consecutive tokens can touch,
    exact when <= 4 (masked sums), else a power of two >= 16 (one-hot tl.dot)."""
    rows = min(bm, (L + bm - 2) // L + 1)
    return rows if rows <= 4 else max(16, _np2(rows))


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
    r_t = _rows_bound(bm, L)
    m_blocks = triton.cdiv(M, bm)
    dyp = torch.empty(M, n, dtype=x.dtype, device=dev)
    dvp = torch.empty(m_blocks * r_t, n, dtype=acc, device=dev)
    dbp = torch.empty(m_blocks, n, dtype=acc, device=dev)
    _matmul(x2, weight, dyp, dyp.stride(), M, n, k, epi=_EPI_BWD, bias=bias, v=v, L=L, dy=dy2, dvp=dvp, dbp=dbp,
            tiles=tiles, r_t=r_t)
    rbb, rbn = _epilogue_tiles(B, n)
    with launch_guard(dev):
        _dv_reduce_kernel[(triton.cdiv(B, rbb), triton.cdiv(n, rbn))](
            dvp, g_v, B, n, L, (L + bm - 2) // bm + 1, g_v.stride(0), g_v.stride(1), BM=bm, R_T=r_t,
            BLOCK_B=rbb, BN=rbn, num_warps=4)
        if bias is not None:
            _sum_chunks_kernel[(1, triton.cdiv(n, rbn))](dbp, g_b, n, m_blocks, 0, g_b.stride(0),
                                                         BLOCK_N=rbn, num_warps=4)
    if k == 0:
        return g_x, g_w, g_b, g_v
    # 2) dx = dY' W and dW = dY'ᵀ x: plain GEMMs with nothing left to fuse -> cuBLAS (see the
    # module docstring), fp32 accumulation, written straight into the fake impl's layouts.
    if g_x.is_contiguous():
        torch.mm(dyp, weight, out=g_x.view(M, k))
    else:
        g_x.copy_(torch.mm(dyp, weight).view(x.shape))
    if g_w.is_contiguous():
        torch.mm(dyp.t(), x2, out=g_w)
    else:
        g_w.copy_(torch.mm(dyp.t(), x2))
    return g_x, g_w, g_b, g_v
