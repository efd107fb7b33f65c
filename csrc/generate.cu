// generate.cu: the generate op, forward and backward (shapes and dtypes: generate.h).
//
//   v[b] = 1 + g(pooled[b] W_down[a_b] + b_down[a_b]) W_up[a_b] + b_up[a_b]     (1 when a_b = -1)
//
// Row blocks are 32 rows: one warp lists the distinct adapters of the block (__match_any_sync,
// in order of first appearance) with a bitmask of their rows, so each adapter's weight tile is
// read once per block and applied to all of its rows there (the BGMV idea, without sorting
// rows or a host sync). r is handled in chunks of kRC = 16 columns (any r works).
//
// Forward, two launches:
//  1. gather_gemm  grid (B/32, S):   h partials [S, B, r] = pooled[:, d-slice s] @ W_down[a].
//     Per 64-wide k chunk the block stages pooled[rows, chunk] in shared memory once, then the
//     W_down chunks [64, rc] of its distinct adapters, 8 at a time (one memory round trip per
//     group, not per adapter); threads own (row, column, k-phase) items and use their row's
//     adapter's chunk; phases are reduced in a fixed order at the end. S > 1 only when row
//     blocks are too few to fill the SMs (decode batches).
//  2. up           grid (N/128, B/32): z = g(sum of partials + b_down[a]) for the block's rows
//     (shared memory), then each thread owns one column n: per distinct adapter it loads that
//     adapter's W_up[a][:, n] chunk into registers once and applies it to every row of the
//     adapter; writes 1 + z W_up + b_up (exactly 1 for -1 rows).
// Fusing (1) into (2) would re-read pooled and W_down once per N tile (150x at N = 19200).
//
// Backward, five launches, deterministic (no atomics; every sum runs in a fixed order):
//  1. gather_gemm on pooled, W_down: h partials, as in the forward.
//  2. gather_gemm on grad, W_up^T (same kernel, other strides): dz partials [S2, B, r].
//  3. mid          one thread per row: x = h + b_down, z = g(x), dh = dz g'(x), and for
//                  'rational' the row's coefficient gradient [B, 10].
//  4. bwd_up       grid (N/128, A): thread = column n of adapter a; loops over all rows in order:
//                  g_w_up[a][:, n] = sum z^T dv, g_b_up[a][n] = sum dv (zeros if a is unused).
//  5. bwd_down     grid (d/128, A+1): thread = k of adapter a: g_w_down[a][k] = sum p_k dh,
//                  g_pooled[row][k] = dh W_down[a][k]^T; the first d tile also sums g_b_down and
//                  g_act_params; slot A writes the zero g_pooled of -1 rows.
// Accumulation is in AccT<pooled> (fp32; fp64 for fp64); erf/exp/tanh are the accurate ones.
#include "generate.h"

#include <cuda_runtime.h>

#include "launch.h"

namespace para {
namespace {

constexpr int kRows = 32;  // rows per block: one warp's ballot
constexpr int kRC = 16;    // r columns per pass
constexpr int kDC = 64;    // k chunk staged by gather_gemm
constexpr int kGemmThreads = 256;
constexpr int kGemmItems = kRows * kRC / kGemmThreads;  // (row, column, k-phase) items per thread
constexpr int kColThreads = 128;                        // up / bwd kernels: one output column per thread
constexpr int kMaxSplits = 32;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kGemmItems * kGemmThreads == kRows * kRC, "items must tile the output block");
static_assert(kColThreads >= kRC && kColThreads >= kRationalParams, "bias sums use one thread per column");

// ---------------------------------------------------------------- helpers

// Adapter of a row; -1 beyond B or outside [0, A) (ids are range-checked in Python, but a
// kernel never reads out of bounds).
PARA_DEV int load_id(const void* ids, bool ids64, std::int64_t row, std::int64_t B, std::int64_t A) {
  if (row >= B) return -1;
  const std::int64_t v =
      ids64 ? static_cast<const std::int64_t*>(ids)[row] : static_cast<const std::int32_t*>(ids)[row];
  return (v >= 0 && v < A) ? static_cast<int>(v) : -1;
}

// The distinct adapters of a 32-row block (list, in order of first appearance), the bitmask of
// each one's rows, and each row's position in the list (slot; -1 without adapter).
struct RowBlock {
  int ids[kRows];
  int slot[kRows];
  int list[kRows];
  unsigned mask[kRows];
  int count;
};

// Filled by warp 0, then a block barrier.
PARA_DEV void load_row_block(RowBlock& rb, const void* ids, bool ids64, std::int64_t row0, std::int64_t B,
                             std::int64_t A) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const int id = load_id(ids, ids64, row0 + lane, B, A);
    rb.ids[lane] = id;
    const unsigned same = __match_any_sync(kFull, id);
    const bool leader = id >= 0 && (__ffs(same) - 1) == lane;
    const unsigned leaders = __ballot_sync(kFull, leader);
    const int pos = __popc(leaders & ((1u << lane) - 1u));  // meaningful on leaders
    const int row_pos = __shfl_sync(kFull, pos, __ffs(same) - 1);
    rb.slot[lane] = id >= 0 ? row_pos : -1;
    if (leader) {
      rb.list[pos] = id;
      rb.mask[pos] = same;
    }
    if (lane == 0) rb.count = __popc(leaders);
  }
  __syncthreads();
}

template <class T> struct Math;
template <> struct Math<float> {
  static PARA_DEV float erf_(float x) { return erff(x); }
  static PARA_DEV float exp_(float x) { return expf(x); }
  static PARA_DEV float tanh_(float x) { return tanhf(x); }
};
template <> struct Math<double> {
  static PARA_DEV double erf_(double x) { return erf(x); }
  static PARA_DEV double exp_(double x) { return exp(x); }
  static PARA_DEV double tanh_(double x) { return tanh(x); }
};

template <class TA> PARA_DEV TA sgn(TA x) { return x > TA(0) ? TA(1) : (x < TA(0) ? TA(-1) : TA(0)); }

// The 10 rational coefficients of one adapter.
template <class TA> struct Rational {
  TA a[6], b[4];  // b holds |b_k|
  template <class TW> PARA_DEV void load(const TW* p) {
#pragma unroll
    for (int j = 0; j < 6; ++j) a[j] = to_acc(p[j]);
#pragma unroll
    for (int k = 0; k < 4; ++k) b[k] = fabs(to_acc(p[6 + k]));
  }
  PARA_DEV TA num(TA x) const { return a[0] + x * (a[1] + x * (a[2] + x * (a[3] + x * (a[4] + x * a[5])))); }
  PARA_DEV TA den(TA ax) const { return TA(1) + ax * (b[0] + ax * (b[1] + ax * (b[2] + ax * b[3]))); }
};

// g(x); prm: the adapter's 10 coefficients ('rational' only).
template <class TA, class TW> PARA_DEV TA act_fwd(TA x, GenAct act, const TW* prm) {
  using M = Math<TA>;
  switch (act) {
    case GenAct::relu: return x < TA(0) ? TA(0) : x;  // NaN propagates, as in torch.relu
    case GenAct::gelu: return TA(0.5) * x * (TA(1) + M::erf_(x * TA(0.70710678118654752440)));
    case GenAct::silu: return x / (TA(1) + M::exp_(-x));
    case GenAct::tanh: return M::tanh_(x);
    case GenAct::rational: {
      Rational<TA> q;
      q.load(prm);
      return q.num(x) / q.den(fabs(x));
    }
    default: return x;
  }
}

// g'(x) for the parameter-free activations (identity: 1).
template <class TA> PARA_DEV TA act_deriv(TA x, GenAct act) {
  using M = Math<TA>;
  switch (act) {
    case GenAct::relu: return x > TA(0) ? TA(1) : TA(0);
    case GenAct::gelu:
      return TA(0.5) * (TA(1) + M::erf_(x * TA(0.70710678118654752440))) +
             x * M::exp_(TA(-0.5) * x * x) * TA(0.39894228040143267794);
    case GenAct::silu: {
      const TA s = TA(1) / (TA(1) + M::exp_(-x));
      return s * (TA(1) + x * (TA(1) - s));
    }
    case GenAct::tanh: {
      const TA t = M::tanh_(x);
      return TA(1) - t * t;
    }
    default: return TA(1);
  }
}

// ---------------------------------------------------------------- kernels

// out[s, b, c] = sum_{k in slice s} X[b, k] W[a_b](k, c), 0 for rows without adapter, where
// W(a, k, c) = W[a w_sa + k w_sk + c w_sc] with w_sc == 1 (W_down) or w_sk == 1 (W_up^T).
// X [B, K] contiguous. grid (B/32, S), kGemmThreads threads.
template <class TX, class TW, class TA>
__global__ void __launch_bounds__(kGemmThreads, 2)  // a min-blocks hint: ptxas spilled without it
    gather_gemm_kernel(const TX* __restrict__ X, const TW* __restrict__ W, std::int64_t w_sa, std::int64_t w_sk,
                       std::int64_t w_sc, const void* __restrict__ ids, bool ids64, std::int64_t A,
                       TA* __restrict__ out, std::int64_t B, std::int64_t K, std::int64_t r, std::int64_t k_per_split) {
  constexpr int G = sizeof(TA) == 8 ? 2 : 8;  // adapters staged at once (shared memory < 48 KB)
  __shared__ RowBlock rb;
  __shared__ TA sX[kRows][kDC + 1];
  __shared__ TA sW[G][kDC][kRC + 1];
  __shared__ TA sRed[kRows * kRC];
  const int tid = threadIdx.x;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.x) * kRows;
  const std::int64_t k_lo = static_cast<std::int64_t>(blockIdx.y) * k_per_split;
  const std::int64_t k_hi = k_lo + k_per_split < K ? k_lo + k_per_split : K;
  load_row_block(rb, ids, ids64, row0, B, A);
  const bool k_major = w_sc == 1;  // W_down: a row of r columns is contiguous

  for (std::int64_t c0 = 0; c0 < r; c0 += kRC) {
    const int rc = static_cast<int>(r - c0 < kRC ? r - c0 : kRC);
    const int slots = kRows * rc;                                         // (row, column) outputs
    const int phases = slots >= kGemmThreads ? 1 : kGemmThreads / slots;  // k split across threads
    const int items = slots * phases;                                     // <= kRows * kRC
    TA acc[kGemmItems];
#pragma unroll
    for (int q = 0; q < kGemmItems; ++q) acc[q] = TA(0);

    for (std::int64_t k0 = k_lo; rb.count > 0 && k0 < k_hi; k0 += kDC) {
      const int kc = static_cast<int>(k_hi - k0 < kDC ? k_hi - k0 : kDC);
      for (int e = tid; e < kRows * kDC; e += kGemmThreads) {  // X once per chunk, all rows
        const int i = e / kDC, kk = e % kDC;
        sX[i][kk] = (kk < kc && rb.ids[i] >= 0) ? to_acc(X[(row0 + i) * K + k0 + kk]) : TA(0);
      }
      // W chunks of up to G adapters per round trip: one barrier pair per group, not per adapter
      for (int g0 = 0; g0 < rb.count; g0 += G) {
        const int gn = rb.count - g0 < G ? rb.count - g0 : G;
        const int tile = kDC * rc;
        for (int e = tid; e < gn * tile; e += kGemmThreads) {  // coalesced along the unit stride
          const int g = e / tile, f = e % tile;
          const int kk = k_major ? f / rc : f % kDC;
          const int c = k_major ? f % rc : f / kDC;
          const TW* w = W + rb.list[g0 + g] * w_sa + (k0 + kk) * w_sk + (c0 + c) * w_sc;
          sW[g][kk][c] = kk < kc ? to_acc(*w) : TA(0);
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kGemmItems; ++q) {
          const int it = tid + q * kGemmThreads;
          if (it < items) {
            const int slot = it % slots, phase = it / slots;
            const int i = slot / rc, c = slot % rc;
            const int g = rb.slot[i] - g0;
            if (g >= 0 && g < G) {  // the row's adapter is in this group
              TA s = acc[q];
              for (int kk = phase; kk < kc; kk += phases) s += sX[i][kk] * sW[g][kk][c];
              acc[q] = s;
            }
          }
        }
        __syncthreads();
      }
    }
    // Sum the k phases of each output in phase order.
#pragma unroll
    for (int q = 0; q < kGemmItems; ++q) {
      const int it = tid + q * kGemmThreads;
      if (it < items) sRed[it] = acc[q];
    }
    __syncthreads();
    for (int slot = tid; slot < slots; slot += kGemmThreads) {
      const int i = slot / rc, c = slot % rc;
      TA s = TA(0);
      for (int p = 0; p < phases; ++p) s += sRed[p * slots + slot];
      if (row0 + i < B) out[(static_cast<std::int64_t>(blockIdx.y) * B + row0 + i) * r + c0 + c] = s;
    }
    __syncthreads();
  }
}

// w[c] = p[c * stride] for c < n, 0 beyond (kRC registers).
template <class TW, class TA> PARA_DEV void load_column(TA (&w)[kRC], const TW* p, std::int64_t stride, int n) {
#pragma unroll
  for (int c = 0; c < kRC; ++c) w[c] = c < n ? to_acc(p[c * stride]) : TA(0);
}

// v = 1 + g(h + b_down[a]) W_up[a] + b_up[a] for a 32-row block and 128 columns.
// grid (N/128, B/32), kColThreads threads.
template <class TP, class TW, class TA>
__global__ void __launch_bounds__(kColThreads)
    up_kernel(const TA* __restrict__ hpart, int S, const TW* __restrict__ b_down, const TW* __restrict__ w_up,
              const TW* __restrict__ b_up, const TW* __restrict__ prm, GenAct act, const void* __restrict__ ids,
              bool ids64, std::int64_t A, TP* __restrict__ out, std::int64_t B, std::int64_t r, std::int64_t N) {
  __shared__ RowBlock rb;
  __shared__ TA sZ[kRows][kRC];
  __shared__ TA sAcc[kRows][kColThreads];  // each thread owns its column: no barrier needed
  const int tid = threadIdx.x;
  const std::int64_t row0 = static_cast<std::int64_t>(blockIdx.y) * kRows;
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * kColThreads + tid;
  load_row_block(rb, ids, ids64, row0, B, A);

  for (std::int64_t c0 = 0; rb.count > 0 && c0 < r; c0 += kRC) {
    const int rc = static_cast<int>(r - c0 < kRC ? r - c0 : kRC);
    for (int e = tid; e < kRows * kRC; e += kColThreads) {  // z, zero-padded to kRC columns
      const int i = e / kRC, c = e % kRC;
      const int a = rb.ids[i];
      TA z = TA(0);
      if (a >= 0 && c < rc) {
        TA h = TA(0);
        for (int s = 0; s < S; ++s) h += hpart[(static_cast<std::int64_t>(s) * B + row0 + i) * r + c0 + c];
        z = act_fwd(h + to_acc(b_down[a * r + c0 + c]), act, prm + a * kRationalParams);
      }
      sZ[i][c] = z;
    }
    __syncthreads();
    if (n < N) {
      // One W_up read per adapter and column, shared by the adapter's rows; the next adapter's
      // column is loaded before this one's rows are done (two adapters' loads in flight).
      TA w[kRC], w_next[kRC];
      load_column(w, w_up + (rb.list[0] * r + c0) * N + n, N, rc);
      for (int j = 0; j < rb.count; ++j) {
        if (j + 1 < rb.count) load_column(w_next, w_up + (rb.list[j + 1] * r + c0) * N + n, N, rc);
        for (unsigned m = rb.mask[j]; m; m &= m - 1u) {
          const int i = __ffs(m) - 1;
          TA s = TA(0);
#pragma unroll
          for (int c = 0; c < kRC; ++c) s += sZ[i][c] * w[c];
          sAcc[i][tid] = c0 == 0 ? s : sAcc[i][tid] + s;
        }
#pragma unroll
        for (int c = 0; c < kRC; ++c) w[c] = w_next[c];
      }
    }
    __syncthreads();  // sZ is rewritten by the next chunk
  }
  if (n >= N) return;
  for (int i = 0; i < kRows && row0 + i < B; ++i) {
    const int a = rb.ids[i];
    TA v = TA(1);
    if (a >= 0) v = (r > 0 ? TA(1) + sAcc[i][tid] : TA(1)) + to_acc(b_up[a * N + n]);
    out[(row0 + i) * N + n] = from_acc<TP>(v);
  }
}

// Per row: x = h + b_down[a], z = g(x), dh = dz g'(x) (zeros for -1 rows); 'rational' also
// dprm[row] = the row's gradient of its adapter's 10 coefficients. One thread per row.
template <class TW, class TA>
__global__ void mid_kernel(const TA* __restrict__ hpart, int S, const TA* __restrict__ dzpart, int S2,
                           const TW* __restrict__ b_down, const TW* __restrict__ prm, GenAct act,
                           const void* __restrict__ ids, bool ids64, std::int64_t A, TA* __restrict__ z,
                           TA* __restrict__ dh, TA* __restrict__ dprm, std::int64_t B, std::int64_t r) {
  const std::int64_t b = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int a = load_id(ids, ids64, b, B, A);
  const bool rational = act == GenAct::rational;
  Rational<TA> q;
  TA sb[4] = {};
  if (rational && a >= 0) {
    q.load(prm + a * kRationalParams);
#pragma unroll
    for (int k = 0; k < 4; ++k) sb[k] = sgn(to_acc(prm[a * kRationalParams + 6 + k]));
  }
  TA ga[6] = {}, gb[4] = {};
  for (std::int64_t c = 0; c < r; ++c) {
    TA zc = TA(0), dhc = TA(0);
    if (a >= 0) {
      TA x = TA(0), dz = TA(0);
      for (int s = 0; s < S; ++s) x += hpart[(s * B + b) * r + c];
      for (int s = 0; s < S2; ++s) dz += dzpart[(s * B + b) * r + c];
      x += to_acc(b_down[a * r + c]);
      if (rational) {
        const TA ax = fabs(x), num = q.num(x), den = q.den(ax);
        const TA dnum =
            q.a[1] + x * (TA(2) * q.a[2] + x * (TA(3) * q.a[3] + x * (TA(4) * q.a[4] + x * TA(5) * q.a[5])));
        const TA dden = (q.b[0] + ax * (TA(2) * q.b[1] + ax * (TA(3) * q.b[2] + ax * TA(4) * q.b[3]))) * sgn(x);
        const TA inv = TA(1) / den;
        zc = num * inv;
        dhc = dz * (dnum * den - num * dden) * inv * inv;
        TA p = dz * inv;  // d/da_j = dz x^j / den
        for (int j = 0; j < 6; ++j, p *= x) ga[j] += p;
        TA pb = -dz * num * inv * inv;  // d/db_k = -dz num / den^2 |x|^k sign(b_k)
        for (int k = 0; k < 4; ++k) {
          pb *= ax;
          gb[k] += pb;
        }
      } else {
        zc = act_fwd(x, act, prm);
        dhc = dz * act_deriv(x, act);
      }
    }
    z[b * r + c] = zc;
    dh[b * r + c] = dhc;
  }
  if (rational) {
    for (int j = 0; j < 6; ++j) dprm[b * kRationalParams + j] = ga[j];
    for (int k = 0; k < 4; ++k) dprm[b * kRationalParams + 6 + k] = a >= 0 ? gb[k] * sb[k] : TA(0);
  }
}

// g_w_up[a][:, n] = sum over a's rows of z^T dv, g_b_up[a][n] = sum dv, rows in order.
// grid (N/128, A), kColThreads threads.
template <class TP, class TW, class TA>
__global__ void __launch_bounds__(kColThreads)
    bwd_up_kernel(const TP* __restrict__ grad, const TA* __restrict__ z, const void* __restrict__ ids, bool ids64,
                  std::int64_t A, TW* __restrict__ g_w_up, TW* __restrict__ g_b_up, std::int64_t B, std::int64_t r,
                  std::int64_t N) {
  const int a = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const std::int64_t n = static_cast<std::int64_t>(blockIdx.x) * kColThreads + threadIdx.x;
  const std::int64_t chunks = r > 0 ? (r + kRC - 1) / kRC : 1;  // one pass even for r == 0: g_b_up
  for (std::int64_t ch = 0; ch < chunks; ++ch) {
    const std::int64_t c0 = ch * kRC;
    const int rc = static_cast<int>(r - c0 < kRC ? r - c0 : kRC);
    TA gw[kRC];
#pragma unroll
    for (int c = 0; c < kRC; ++c) gw[c] = TA(0);
    TA gb = TA(0);
    for (std::int64_t row0 = 0; row0 < B; row0 += kRows) {
      const unsigned mask = __ballot_sync(kFull, load_id(ids, ids64, row0 + lane, B, A) == a);
      if (n >= N) continue;
      for (unsigned m = mask; m; m &= m - 1u) {
        const std::int64_t row = row0 + __ffs(m) - 1;
        const TA dv = to_acc(grad[row * N + n]);
        const TA* zr = z + row * r + c0;
        gb += dv;
#pragma unroll
        for (int c = 0; c < kRC; ++c)
          if (c < rc) gw[c] += zr[c] * dv;
      }
    }
    if (n >= N) continue;
#pragma unroll
    for (int c = 0; c < kRC; ++c)
      if (c < rc) g_w_up[(a * r + c0 + c) * N + n] = from_acc<TW>(gw[c]);
    if (ch == 0) g_b_up[a * N + n] = from_acc<TW>(gb);
  }
}

// For adapter a and 128 values of k: g_w_down[a][k] = sum p_k dh, g_pooled[row][k] = dh W_down[a][k]^T;
// the first d tile also writes g_b_down[a] and g_act_params[a]; slot a == A zeroes g_pooled of -1 rows.
// grid (max(1, d/128), A + 1), kColThreads threads.
template <class TP, class TW, class TA>
__global__ void __launch_bounds__(kColThreads, 4)  // <= 128 registers, no spills
    bwd_down_kernel(const TP* __restrict__ pooled, const TW* __restrict__ w_down, const TA* __restrict__ dh,
                    const TA* __restrict__ dprm, const void* __restrict__ ids, bool ids64, std::int64_t A,
                    TP* __restrict__ g_pooled, TW* __restrict__ g_w_down, TW* __restrict__ g_b_down,
                    TW* __restrict__ g_prm, std::int64_t B, std::int64_t d, std::int64_t r) {
  const int a = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31;
  const std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * kColThreads + tid;
  if (a == A) {  // rows without adapter: zero gradient
    for (std::int64_t row0 = 0; row0 < B; row0 += kRows) {
      const std::int64_t row = row0 + lane;
      const unsigned mask = __ballot_sync(kFull, row < B && load_id(ids, ids64, row, B, A) < 0);
      if (k < d)
        for (unsigned m = mask; m; m &= m - 1u) g_pooled[(row0 + __ffs(m) - 1) * d + k] = from_acc<TP>(TA(0));
    }
    return;
  }
  const bool first_tile = blockIdx.x == 0;
  const TW* wk = w_down + (a * d + k) * r;                      // W_down[a][k][:]
  const std::int64_t chunks = r > 0 ? (r + kRC - 1) / kRC : 1;  // one pass even for r == 0: g_pooled
  for (std::int64_t ch = 0; ch < chunks; ++ch) {
    const std::int64_t c0 = ch * kRC;
    const int rc = static_cast<int>(r - c0 < kRC ? r - c0 : kRC);
    TA w[kRC], gw[kRC];
#pragma unroll
    for (int c = 0; c < kRC; ++c) {
      w[c] = (k < d && c < rc) ? to_acc(wk[c0 + c]) : TA(0);
      gw[c] = TA(0);
    }
    TA gb = TA(0), gp = TA(0);
    for (std::int64_t row0 = 0; row0 < B; row0 += kRows) {
      const unsigned mask = __ballot_sync(kFull, load_id(ids, ids64, row0 + lane, B, A) == a);
      for (unsigned m = mask; m; m &= m - 1u) {
        const std::int64_t row = row0 + __ffs(m) - 1;
        const TA* dr = dh + row * r;
        if (first_tile) {  // bias and coefficient sums: one thread per column, rows in order
          if (tid < rc) gb += dr[c0 + tid];
          if (ch == 0 && g_prm != nullptr && tid < kRationalParams) gp += dprm[row * kRationalParams + tid];
        }
        if (k >= d) continue;
        const TA p = to_acc(pooled[row * d + k]);
        TA s = TA(0);
#pragma unroll
        for (int c = 0; c < kRC; ++c)
          if (c < rc) {
            gw[c] += p * dr[c0 + c];
            s += dr[c0 + c] * w[c];
          }
        if (ch == 0) {  // g_pooled needs all r columns: the rest straight from memory
          for (std::int64_t c = kRC; c < r; ++c) s += dr[c] * to_acc(wk[c]);
          g_pooled[row * d + k] = from_acc<TP>(s);
        }
      }
    }
    if (k < d) {
#pragma unroll
      for (int c = 0; c < kRC; ++c)
        if (c < rc) g_w_down[(a * d + k) * r + c0 + c] = from_acc<TW>(gw[c]);
    }
    if (first_tile) {
      if (tid < rc) g_b_down[a * r + c0 + tid] = from_acc<TW>(gb);
      if (ch == 0 && g_prm != nullptr && tid < kRationalParams) g_prm[a * kRationalParams + tid] = from_acc<TW>(gp);
    }
  }
}

// ---------------------------------------------------------------- host side

template <class T> struct Tag {
  using type = T;
};

// Calls f(Tag<P>, Tag<W>) for the supported (pooled, bank) pairs.
template <class F> cudaError_t dispatch_pair(ScalarKind p, ScalarKind w, F&& f) {
  if (p == w) {
    PARA_DISPATCH_FLOATING(p, T, return f(Tag<T>{}, Tag<T>{});)
  } else if (w == ScalarKind::f32) {
    if (p == ScalarKind::f16) return f(Tag<__half>{}, Tag<float>{});
    if (p == ScalarKind::bf16) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
  }
  return cudaErrorInvalidValue;
}

// Split a K-long reduction over S blocks per row block when there are too few row blocks to
// fill the SMs; each split covers whole kDC chunks.
void split(std::int64_t K, std::int64_t row_blocks, int num_sms, std::int64_t& S, std::int64_t& k_per_split) {
  std::int64_t s = num_sms / (row_blocks > 0 ? row_blocks : 1);
  s = s < kMaxSplits ? s : kMaxSplits;
  const std::int64_t by_size = ceil_div(K, 4 * kDC);  // at least 4 chunks a split
  s = s < by_size ? s : by_size;
  s = s > 1 ? s : 1;
  k_per_split = ceil_div(ceil_div(K, s), kDC) * kDC;
  if (k_per_split == 0) k_per_split = kDC;
  S = ceil_div(K, k_per_split);
  S = S > 1 ? S : 1;
}

std::size_t take(std::size_t& top, std::size_t bytes) {
  const std::size_t at = top;
  top += (bytes + 255) / 256 * 256;
  return at;
}

std::size_t acc_size(ScalarKind p) { return p == ScalarKind::f64 ? sizeof(double) : sizeof(float); }

}  // namespace

bool generate_supported(ScalarKind pooled, ScalarKind bank) {
  return pooled == bank || (bank == ScalarKind::f32 && (pooled == ScalarKind::f16 || pooled == ScalarKind::bf16));
}

GeneratePlan generate_plan(const GenerateArgs& g, int num_sms, bool backward) {
  GeneratePlan plan;
  const std::int64_t row_blocks = ceil_div(g.B, kRows);
  split(g.d, row_blocks, num_sms, plan.down_splits, plan.down_k_per_split);
  const std::size_t acc = acc_size(g.pooled_kind);
  const std::size_t rows_r = static_cast<std::size_t>(g.B * g.r) * acc;
  std::size_t top = 0;
  plan.off_hpart = take(top, plan.down_splits * rows_r);
  if (backward) {
    split(g.N, row_blocks, num_sms, plan.dz_splits, plan.dz_k_per_split);
    plan.off_dzpart = take(top, plan.dz_splits * rows_r);
    plan.off_z = take(top, rows_r);
    plan.off_dh = take(top, rows_r);
    plan.off_dprm = take(top, g.act == GenAct::rational ? static_cast<std::size_t>(g.B) * kRationalParams * acc : 0);
  }
  plan.scratch_bytes = top;
  return plan;
}

cudaError_t generate_forward(const GenerateArgs& g, const GeneratePlan& plan, void* out, void* scratch,
                             cudaStream_t stream) {
  return dispatch_pair(g.pooled_kind, g.bank_kind, [&](auto tp, auto tw) -> cudaError_t {
    using TP = typename decltype(tp)::type;
    using TW = typename decltype(tw)::type;
    using TA = AccT<TP>;
    if (g.B == 0 || g.N == 0) return cudaSuccess;
    TA* hpart = reinterpret_cast<TA*>(static_cast<char*>(scratch) + plan.off_hpart);
    const auto row_blocks = static_cast<unsigned>(ceil_div(g.B, kRows));
    const auto* wd = static_cast<const TW*>(g.w_down);
    const auto* prm = static_cast<const TW*>(g.act_params);
    if (g.r > 0)
      gather_gemm_kernel<TP, TW, TA>
          <<<dim3(row_blocks, static_cast<unsigned>(plan.down_splits)), kGemmThreads, 0, stream>>>(
              static_cast<const TP*>(g.pooled), wd, g.d * g.r, g.r, 1, g.ids, g.ids64, g.A, hpart, g.B, g.d, g.r,
              plan.down_k_per_split);
    up_kernel<TP, TW, TA>
        <<<dim3(static_cast<unsigned>(ceil_div(g.N, kColThreads)), row_blocks), kColThreads, 0, stream>>>(
            hpart, static_cast<int>(plan.down_splits), static_cast<const TW*>(g.b_down), static_cast<const TW*>(g.w_up),
            static_cast<const TW*>(g.b_up), prm, g.act, g.ids, g.ids64, g.A, static_cast<TP*>(out), g.B, g.r, g.N);
    return cudaGetLastError();
  });
}

cudaError_t generate_backward(const GenerateArgs& g, const GeneratePlan& plan, const GenerateGrads& gr, void* scratch,
                              cudaStream_t stream) {
  return dispatch_pair(g.pooled_kind, g.bank_kind, [&](auto tp, auto tw) -> cudaError_t {
    using TP = typename decltype(tp)::type;
    using TW = typename decltype(tw)::type;
    using TA = AccT<TP>;
    char* base = static_cast<char*>(scratch);
    TA* hpart = reinterpret_cast<TA*>(base + plan.off_hpart);
    TA* dzpart = reinterpret_cast<TA*>(base + plan.off_dzpart);
    TA* z = reinterpret_cast<TA*>(base + plan.off_z);
    TA* dh = reinterpret_cast<TA*>(base + plan.off_dh);
    const bool rational = g.act == GenAct::rational;
    TA* dprm = rational ? reinterpret_cast<TA*>(base + plan.off_dprm) : nullptr;
    const auto* wd = static_cast<const TW*>(g.w_down);
    const auto* wu = static_cast<const TW*>(g.w_up);
    const auto* bd = static_cast<const TW*>(g.b_down);
    const auto* prm = static_cast<const TW*>(g.act_params);
    const auto row_blocks = static_cast<unsigned>(ceil_div(g.B, kRows));
    if (g.B > 0 && g.r > 0) {
      gather_gemm_kernel<TP, TW, TA>
          <<<dim3(row_blocks, static_cast<unsigned>(plan.down_splits)), kGemmThreads, 0, stream>>>(
              static_cast<const TP*>(g.pooled), wd, g.d * g.r, g.r, 1, g.ids, g.ids64, g.A, hpart, g.B, g.d, g.r,
              plan.down_k_per_split);
      gather_gemm_kernel<TP, TW, TA>
          <<<dim3(row_blocks, static_cast<unsigned>(plan.dz_splits)), kGemmThreads, 0, stream>>>(
              static_cast<const TP*>(gr.grad), wu, g.r * g.N, 1, g.N, g.ids, g.ids64, g.A, dzpart, g.B, g.N, g.r,
              plan.dz_k_per_split);
    }
    if (g.B > 0 && (g.r > 0 || rational))
      mid_kernel<TW, TA><<<static_cast<unsigned>(ceil_div(g.B, 128)), 128, 0, stream>>>(
          hpart, static_cast<int>(plan.down_splits), dzpart, static_cast<int>(plan.dz_splits), bd, prm, g.act, g.ids,
          g.ids64, g.A, z, dh, dprm, g.B, g.r);
    if (g.A > 0 && g.N > 0)
      bwd_up_kernel<TP, TW, TA><<<dim3(static_cast<unsigned>(ceil_div(g.N, kColThreads)), static_cast<unsigned>(g.A)),
                                  kColThreads, 0, stream>>>(static_cast<const TP*>(gr.grad), z, g.ids, g.ids64, g.A,
                                                            static_cast<TW*>(gr.g_w_up), static_cast<TW*>(gr.g_b_up),
                                                            g.B, g.r, g.N);
    const std::int64_t d_tiles = g.d > 0 ? ceil_div(g.d, kColThreads) : 1;  // one tile even for d == 0: g_b_down
    bwd_down_kernel<TP, TW, TA>
        <<<dim3(static_cast<unsigned>(d_tiles), static_cast<unsigned>(g.A + 1)), kColThreads, 0, stream>>>(
            static_cast<const TP*>(g.pooled), wd, dh, dprm, g.ids, g.ids64, g.A, static_cast<TP*>(gr.g_pooled),
            static_cast<TW*>(gr.g_w_down), static_cast<TW*>(gr.g_b_down),
            rational ? static_cast<TW*>(gr.g_act_params) : nullptr, g.B, g.d, g.r);
    return cudaGetLastError();
  });
}

}  // namespace para
