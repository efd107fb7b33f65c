// pool.cu: CUDA kernels of para::pool and para::pool_backward (spec: para_kernels/ops/reference_ops/pool.py).
//
//   hidden [B, T, d] (padded) or [total, d] (packed), any strides; start / end [B] int32/int64
//   w [d] or [B, d] (attn); grad [B, d]; out [B, d]; shapes of the buffers: see pool.h.
//
// Design (grids depend on B and d only; ranges are read inside the kernels):
// - last / mean / max: block (32 feature lanes x 8 token lanes) per (row, 32 packs of d);
//   each thread owns one 16-byte pack of features, walks tokens with stride 8 (4 loads in
//   flight), and the 8 token lanes are combined in shared memory in a fixed order.
// - attn: one 256-thread block per row, flash-style. Per tile of 8 tokens each warp computes
//   one score s_t = X_t . w (warp shuffle sum), all threads update the online max / sum, then
//   each thread rescales and accumulates its own packs of the row's accumulator, kept in a
//   global scratch row (any d fits; a thread only touches its own packs, so no barrier).
// - backward padded: every grad_hidden element is written once (zeros outside the prompt),
//   no atomics. Packed: ranges may overlap, so atomic adds into a zeroed fp32/fp64 buffer.
// - max backward: the gradient goes to the first maximal token per feature (NaN counts as
//   the largest, as in torch.argmax); attn backward recomputes scores in two passes and sums
//   the rows' dw for a shared w in a fixed order (deterministic).
#include <cfloat>
#include <cmath>

#include "dtypes.cuh"
#include "launch.h"
#include "pool.h"

namespace para {
namespace {

constexpr int kLanesD = 32;  // feature lanes (one pack each) per tile block
constexpr int kLanesT = 8;   // token lanes per tile block
constexpr int kTileThreads = kLanesD * kLanesT;
constexpr int kUnroll = 4;  // tokens in flight per thread
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

template <class T, class I> struct View {
  const T* h;
  std::int64_t T_, d, s_b, s_t, s_d;
  const I* start;
  const I* end;
  const T* w;
  std::int64_t w_sb, w_sd;
};

template <class T, class I> View<T, I> make_view(const PoolArgs& a) {
  return {static_cast<const T*>(a.hidden),
          a.T,
          a.d,
          a.s_b,
          a.s_t,
          a.s_d,
          static_cast<const I*>(a.start),
          static_cast<const I*>(a.end),
          static_cast<const T*>(a.w),
          a.w_sb,
          a.w_sd};
}

// Row b's range, clamped into [0, T_] so a bad range never reads out of bounds.
template <class T, class I>
PARA_DEV void row_range(const View<T, I>& v, std::int64_t b, std::int64_t& s, std::int64_t& e) {
  s = static_cast<std::int64_t>(v.start[b]);
  e = static_cast<std::int64_t>(v.end[b]);
  s = s < 0 ? 0 : (s > v.T_ ? v.T_ : s);
  e = e < s ? s : (e > v.T_ ? v.T_ : e);
}

template <class A> PARA_DEV A neg_inf() { return -static_cast<A>(INFINITY); }
template <class A> PARA_DEV A nan_max(A acc, A x) { return (x > acc || x != x) ? x : acc; }
PARA_DEV float exp_acc(float x) { return expf(x); }
PARA_DEV double exp_acc(double x) { return exp(x); }

template <class A> PARA_DEV A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T> PARA_DEV int valid_in_pack(std::int64_t f0, std::int64_t d) {
  std::int64_t n = d - f0;
  return n <= 0 ? 0 : (n >= kPack<T> ? kPack<T> : static_cast<int>(n));
}

// ------------------------------------------------------------------ forward
template <class T, class I, int MODE>
__global__ void __launch_bounds__(kTileThreads, 3)  // >= 3 blocks per SM: loads in flight
    pool_tile_fwd(View<T, I> v, T* __restrict__ out) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  __shared__ AccPack<T> part[kLanesT][kLanesD];
  const std::int64_t b = blockIdx.x;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t f0 = (static_cast<std::int64_t>(blockIdx.y) * kLanesD + tx) * P;
  const int nf = valid_in_pack<T>(f0, v.d);
  std::int64_t s, e;
  row_range(v, b, s, e);
  const T* row = v.h + b * v.s_b + f0 * v.s_d;
  T* dst = out + b * v.d + f0;

  if (MODE == static_cast<int>(PoolMode::last)) {
    if (ty == 0 && nf > 0) {
      const Pack<T> x = e > s ? load_group(row + (e - 1) * v.s_t, v.s_d, nf) : narrow<T>(AccPack<T>{});
      store_group(dst, 1, x, nf);
    }
    return;
  }

  const A fill = MODE == static_cast<int>(PoolMode::mean) ? A(0) : neg_inf<A>();
  AccPack<T> acc;
#pragma unroll
  for (int i = 0; i < P; ++i) acc.v[i] = fill;
  if (nf > 0) {
    for (std::int64_t t = s + ty; t < e; t += kLanesT * kUnroll) {
      Pack<T> x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::int64_t tt = t + u * kLanesT;
        if (tt < e) x[u] = load_group(row + tt * v.s_t, v.s_d, nf);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (t + u * kLanesT >= e) break;
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const A xi = to_acc(x[u].v[i]);
          acc.v[i] = MODE == static_cast<int>(PoolMode::mean) ? acc.v[i] + xi : nan_max(acc.v[i], xi);
        }
      }
    }
  }
  part[ty][tx] = acc;
  __syncthreads();
  if (ty != 0 || nf == 0) return;
  for (int k = 1; k < kLanesT; ++k) {
#pragma unroll
    for (int i = 0; i < P; ++i)
      acc.v[i] =
          MODE == static_cast<int>(PoolMode::mean) ? acc.v[i] + part[k][tx].v[i] : nan_max(acc.v[i], part[k][tx].v[i]);
  }
  if (MODE == static_cast<int>(PoolMode::mean)) {
#pragma unroll  // a division, as the reference does
    for (int i = 0; i < P; ++i) acc.v[i] = e > s ? acc.v[i] / static_cast<A>(e - s) : A(0);
  } else if (e <= s) {
#pragma unroll
    for (int i = 0; i < P; ++i) acc.v[i] = A(0);
  }
  store_group(dst, 1, narrow<T>(acc), nf);
}

// Dot products of token t's hidden state with up to two [d] vectors, by one warp.
template <class T, bool TWO>
PARA_DEV void warp_dots(const T* x_row, std::int64_t s_d, std::int64_t d, const T* a, std::int64_t sa, const T* c,
                        std::int64_t sc, AccT<T>& da, AccT<T>& dc) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  const int lane = threadIdx.x & 31;
  A ra = 0, rc = 0;
  for (std::int64_t f0 = static_cast<std::int64_t>(lane) * P; f0 < d; f0 += 32 * P) {
    const int nf = valid_in_pack<T>(f0, d);
    const AccPack<T> x = widen(load_group(x_row + f0 * s_d, s_d, nf));
    const AccPack<T> wa = widen(load_group(a + f0 * sa, sa, nf));
#pragma unroll
    for (int i = 0; i < P; ++i) ra += x.v[i] * wa.v[i];
    if (TWO) {
      const AccPack<T> wc = widen(load_group(c + f0 * sc, sc, nf));
#pragma unroll
      for (int i = 0; i < P; ++i) rc += x.v[i] * wc.v[i];
    }
  }
  da = warp_sum(ra);
  if (TWO) dc = warp_sum(rc);
}

template <class T, class I>
__global__ void __launch_bounds__(kRowThreads)
    attn_fwd(View<T, I> v, T* __restrict__ out, AccT<T>* __restrict__ scratch) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  __shared__ A scores[kRowWarps];
  const std::int64_t b = blockIdx.x;
  const int warp = threadIdx.x >> 5;
  std::int64_t s, e;
  row_range(v, b, s, e);
  const T* row = v.h + b * v.s_b;
  const T* w = v.w + b * v.w_sb;
  A* acc = scratch + b * v.d;  // this row's accumulator; thread k owns packs k, k + 256, ...
  const std::int64_t step = static_cast<std::int64_t>(kRowThreads) * P;

  A m = neg_inf<A>(), l = A(0);
  for (std::int64_t t0 = s; t0 < e; t0 += kRowWarps) {
    const std::int64_t t = t0 + warp;
    A sc = neg_inf<A>(), unused = 0;
    if (t < e) warp_dots<T, false>(row + t * v.s_t, v.s_d, v.d, w, v.w_sd, w, 0, sc, unused);
    if ((threadIdx.x & 31) == 0) scores[warp] = sc;
    __syncthreads();
    A p[kRowWarps];
    A m_new = m;
#pragma unroll
    for (int k = 0; k < kRowWarps; ++k) {
      p[k] = scores[k];
      m_new = p[k] > m_new ? p[k] : m_new;
    }
    __syncthreads();                                        // scores is rewritten by the next tile
    const A rescale = t0 == s ? A(0) : exp_acc(m - m_new);  // 0 * garbage on the first tile
    A tile_sum = 0;
#pragma unroll
    for (int k = 0; k < kRowWarps; ++k) {
      p[k] = exp_acc(p[k] - m_new);
      tile_sum += p[k];
    }
    l = l * rescale + tile_sum;
    m = m_new;
    const int nt = e - t0 < kRowWarps ? static_cast<int>(e - t0) : kRowWarps;
    for (std::int64_t f0 = static_cast<std::int64_t>(threadIdx.x) * P; f0 < v.d; f0 += step) {
      const int nf = valid_in_pack<T>(f0, v.d);
      AccPack<T> a;
#pragma unroll
      for (int i = 0; i < P; ++i) a.v[i] = i < nf && t0 != s ? acc[f0 + i] * rescale : A(0);
#pragma unroll
      for (int k = 0; k < kRowWarps; ++k) {
        if (k >= nt) break;
        const AccPack<T> x = widen(load_group(row + (t0 + k) * v.s_t + f0 * v.s_d, v.s_d, nf));
#pragma unroll
        for (int i = 0; i < P; ++i) a.v[i] += p[k] * x.v[i];
      }
      for (int i = 0; i < nf; ++i) acc[f0 + i] = a.v[i];
    }
  }
  const A inv_l = l > A(0) ? A(1) / l : A(0);
  for (std::int64_t f0 = static_cast<std::int64_t>(threadIdx.x) * P; f0 < v.d; f0 += step) {
    const int nf = valid_in_pack<T>(f0, v.d);
    AccPack<T> a;
#pragma unroll
    for (int i = 0; i < P; ++i) a.v[i] = i < nf && e > s ? acc[f0 + i] * inv_l : A(0);
    store_group(out + b * v.d + f0, 1, narrow<T>(a), nf);
  }
}

// ------------------------------------------------------------------ backward
PARA_DEV void atomic_add_acc(float* p, float x) { atomicAdd(p, x); }
PARA_DEV void atomic_add_acc(double* p, double x) { atomicAdd(p, x); }

// last / mean / max. PACKED: gh is a zeroed [total, d] accumulator buffer (atomics);
// padded: gh is [B, T, d] in T's dtype, every element of row b written here.
template <class T, class I, int MODE, bool PACKED>
__global__ void __launch_bounds__(kTileThreads)
    pool_tile_bwd(View<T, I> v, const T* __restrict__ grad, std::int64_t g_sb, std::int64_t g_sd,
                  void* __restrict__ gh) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  __shared__ AccPack<T> best_sm[kLanesT][kLanesD];
  __shared__ std::int64_t arg_sm[kLanesT][kLanesD][P];
  const std::int64_t b = blockIdx.x;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t f0 = (static_cast<std::int64_t>(blockIdx.y) * kLanesD + tx) * P;
  const int nf = valid_in_pack<T>(f0, v.d);
  std::int64_t s, e;
  row_range(v, b, s, e);
  AccPack<T> g = widen(load_group(grad + b * g_sb + f0 * g_sd, g_sd, nf));
  if (MODE == static_cast<int>(PoolMode::mean)) {
#pragma unroll
    for (int i = 0; i < P; ++i) g.v[i] = e > s ? g.v[i] / static_cast<A>(e - s) : A(0);
  }
  std::int64_t arg[P];  // max: the token receiving each feature's gradient
  if (MODE == static_cast<int>(PoolMode::max)) {
    constexpr std::int64_t kNone = INT64_MAX;
    const T* row = v.h + b * v.s_b + f0 * v.s_d;
    AccPack<T> best;
#pragma unroll
    for (int i = 0; i < P; ++i) {
      best.v[i] = neg_inf<A>();
      arg[i] = kNone;
    }
    if (nf > 0) {  // tokens in increasing order per thread: strict > keeps the first
      for (std::int64_t t = s + ty; t < e; t += kLanesT) {
        const AccPack<T> x = widen(load_group(row + t * v.s_t, v.s_d, nf));
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const bool better = x.v[i] > best.v[i] || (x.v[i] != x.v[i] && best.v[i] == best.v[i]);
          if (better) {
            best.v[i] = x.v[i];
            arg[i] = t;
          }
        }
      }
    }
    best_sm[ty][tx] = best;
#pragma unroll
    for (int i = 0; i < P; ++i) arg_sm[ty][tx][i] = arg[i];
    __syncthreads();
    // every token lane combines the same candidates in the same order: same answer
    for (int k = 0; k < kLanesT; ++k) {
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const A x = best_sm[k][tx].v[i], cur = best.v[i];
        const std::int64_t tk = arg_sm[k][tx][i];
        const bool x_nan = x != x, c_nan = cur != cur;
        const bool better =
            (x_nan && !c_nan) || (!x_nan && !c_nan && x > cur) || ((x == cur || (x_nan && c_nan)) && tk < arg[i]);
        if (better) {
          best.v[i] = x;
          arg[i] = tk;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < P; ++i)
      if (arg[i] == kNone) arg[i] = s;  // all -inf: the first token
  }
  if (nf == 0) return;

  if (PACKED) {
    A* buf = static_cast<A*>(gh) + f0;
    if (MODE == static_cast<int>(PoolMode::mean)) {
      for (std::int64_t t = s + ty; t < e; t += kLanesT)
        for (int i = 0; i < nf; ++i) atomic_add_acc(buf + t * v.d + i, g.v[i]);
    } else if (ty == 0 && e > s) {
      for (int i = 0; i < nf; ++i) {
        const std::int64_t t = MODE == static_cast<int>(PoolMode::last) ? e - 1 : arg[i];
        atomic_add_acc(buf + t * v.d + i, g.v[i]);
      }
    }
  } else {
    T* out = static_cast<T*>(gh) + b * v.T_ * v.d + f0;
    for (std::int64_t t = ty; t < v.T_; t += kLanesT) {
      AccPack<T> val;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        bool hit;
        if (MODE == static_cast<int>(PoolMode::last))
          hit = t == e - 1 && e > s;
        else if (MODE == static_cast<int>(PoolMode::mean))
          hit = t >= s && t < e;
        else
          hit = t == arg[i] && e > s;
        val.v[i] = hit ? g.v[i] : A(0);
      }
      store_group(out + t * v.d, 1, narrow<T>(val), nf);
    }
  }
}

// attn backward, one block per row. Pass 1: softmax statistics m, l and
// c = sum_u alpha_u (g . X_u), online. Pass 2: per tile, alpha_t and ds_t = alpha_t (g.X_t - c),
// dX_t = alpha_t g + ds_t w, and this row's dw = sum_t ds_t X_t into dw_rows[b].
template <class T, class I, bool PACKED>
__global__ void __launch_bounds__(kRowThreads)
    attn_bwd(View<T, I> v, const T* __restrict__ grad, std::int64_t g_sb, std::int64_t g_sd, void* __restrict__ gh,
             AccT<T>* __restrict__ dw_rows, T* __restrict__ grad_w_rows) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  __shared__ A sc_sm[kRowWarps], gx_sm[kRowWarps];
  const std::int64_t b = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  std::int64_t s, e;
  row_range(v, b, s, e);
  const T* row = v.h + b * v.s_b;
  const T* w = v.w + b * v.w_sb;
  const T* g = grad + b * g_sb;
  A* dw = dw_rows + b * v.d;
  const std::int64_t step = static_cast<std::int64_t>(kRowThreads) * P;

  A m = neg_inf<A>(), l = 0, c = 0;
  for (std::int64_t t0 = s; t0 < e; t0 += kRowWarps) {
    const std::int64_t t = t0 + warp;
    A sc = neg_inf<A>(), gx = 0;
    if (t < e) warp_dots<T, true>(row + t * v.s_t, v.s_d, v.d, w, v.w_sd, g, g_sd, sc, gx);
    if (lane == 0) {
      sc_sm[warp] = sc;
      gx_sm[warp] = gx;
    }
    __syncthreads();
    A m_new = m;
#pragma unroll
    for (int k = 0; k < kRowWarps; ++k) m_new = sc_sm[k] > m_new ? sc_sm[k] : m_new;
    const A rescale = t0 == s ? A(0) : exp_acc(m - m_new);
    A ps = 0, pc = 0;
#pragma unroll
    for (int k = 0; k < kRowWarps; ++k) {
      const A p = exp_acc(sc_sm[k] - m_new);
      ps += p;
      pc += p * gx_sm[k];
    }
    __syncthreads();
    l = l * rescale + ps;
    c = c * rescale + pc;
    m = m_new;
  }
  const A inv_l = l > A(0) ? A(1) / l : A(0);
  c *= inv_l;

  for (std::int64_t f0 = static_cast<std::int64_t>(threadIdx.x) * P; f0 < v.d; f0 += step)
    for (int i = 0; i < valid_in_pack<T>(f0, v.d); ++i) dw[f0 + i] = A(0);
  for (std::int64_t t0 = s; t0 < e; t0 += kRowWarps) {
    const std::int64_t t = t0 + warp;
    A sc = neg_inf<A>(), gx = 0;
    if (t < e) warp_dots<T, true>(row + t * v.s_t, v.s_d, v.d, w, v.w_sd, g, g_sd, sc, gx);
    if (lane == 0) {
      sc_sm[warp] = sc;
      gx_sm[warp] = gx;
    }
    __syncthreads();
    A alpha[kRowWarps], ds[kRowWarps];
#pragma unroll
    for (int k = 0; k < kRowWarps; ++k) {
      alpha[k] = exp_acc(sc_sm[k] - m) * inv_l;
      ds[k] = alpha[k] * (gx_sm[k] - c);
    }
    __syncthreads();
    const int nt = e - t0 < kRowWarps ? static_cast<int>(e - t0) : kRowWarps;
    for (std::int64_t f0 = static_cast<std::int64_t>(threadIdx.x) * P; f0 < v.d; f0 += step) {
      const int nf = valid_in_pack<T>(f0, v.d);
      const AccPack<T> gp = widen(load_group(g + f0 * g_sd, g_sd, nf));
      const AccPack<T> wp = widen(load_group(w + f0 * v.w_sd, v.w_sd, nf));
      AccPack<T> dwp;
#pragma unroll
      for (int i = 0; i < P; ++i) dwp.v[i] = i < nf ? dw[f0 + i] : A(0);
#pragma unroll
      for (int k = 0; k < kRowWarps; ++k) {
        if (k >= nt) break;
        const std::int64_t tk = t0 + k;
        const AccPack<T> x = widen(load_group(row + tk * v.s_t + f0 * v.s_d, v.s_d, nf));
        AccPack<T> dx;
#pragma unroll
        for (int i = 0; i < P; ++i) {
          dx.v[i] = alpha[k] * gp.v[i] + ds[k] * wp.v[i];
          dwp.v[i] += ds[k] * x.v[i];
        }
        if (PACKED) {
          A* dst = static_cast<A*>(gh) + tk * v.d + f0;
          for (int i = 0; i < nf; ++i) atomic_add_acc(dst + i, dx.v[i]);
        } else {
          store_group(static_cast<T*>(gh) + (b * v.T_ + tk) * v.d + f0, 1, narrow<T>(dx), nf);
        }
      }
      for (int i = 0; i < nf; ++i) dw[f0 + i] = dwp.v[i];
    }
  }

  if (!PACKED) {  // zeros on the row's tokens outside the prompt
    T* out = static_cast<T*>(gh) + b * v.T_ * v.d;
    const std::int64_t packs = (v.d + P - 1) / P, n_out = s + (v.T_ - e);
    for (std::int64_t k = threadIdx.x; k < n_out * packs; k += kRowThreads) {
      const std::int64_t j = k / packs, f0 = (k - j * packs) * P;
      const std::int64_t t = j < s ? j : e + (j - s);
      store_group(out + t * v.d + f0, 1, narrow<T>(AccPack<T>{}), valid_in_pack<T>(f0, v.d));
    }
  }
  if (grad_w_rows != nullptr) {  // w is [B, d]: this row's dw, cast (same thread owns it)
    for (std::int64_t f0 = static_cast<std::int64_t>(threadIdx.x) * P; f0 < v.d; f0 += step)
      for (int i = 0; i < valid_in_pack<T>(f0, v.d); ++i) grad_w_rows[b * v.d + f0 + i] = from_acc<T>(dw[f0 + i]);
  }
}

// out[n] = sum_r x[r * N + n] over r < R in increasing r (deterministic), cast to T.
template <class T>
__global__ void sum_rows_cast(const AccT<T>* __restrict__ x, T* __restrict__ out, std::int64_t R, std::int64_t N) {
  for (std::int64_t n = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; n < N;
       n += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    AccT<T> acc = 0;
    for (std::int64_t r = 0; r < R; ++r) acc += x[r * N + n];
    out[n] = from_acc<T>(acc);
  }
}

// ------------------------------------------------------------------ host side
template <class T> dim3 tile_grid(const PoolArgs& a) {
  return dim3(static_cast<unsigned>(a.B),
              static_cast<unsigned>(ceil_div(a.d, static_cast<std::int64_t>(kLanesD) * kPack<T>)));
}

template <class T> bool grid_ok(const PoolArgs& a) {
  return a.B <= kMaxGridX && ceil_div(a.d, static_cast<std::int64_t>(kLanesD) * kPack<T>) <= kMaxGridYZ;
}

template <class T, class I> cudaError_t forward_t(const PoolArgs& a, void* out, void* scratch, cudaStream_t st) {
  if (!grid_ok<T>(a)) return cudaErrorInvalidConfiguration;
  const View<T, I> v = make_view<T, I>(a);
  T* o = static_cast<T*>(out);
  const dim3 tile(kLanesD, kLanesT);
  switch (a.mode) {
    case PoolMode::last: pool_tile_fwd<T, I, 0><<<tile_grid<T>(a), tile, 0, st>>>(v, o); break;
    case PoolMode::mean: pool_tile_fwd<T, I, 1><<<tile_grid<T>(a), tile, 0, st>>>(v, o); break;
    case PoolMode::max: pool_tile_fwd<T, I, 2><<<tile_grid<T>(a), tile, 0, st>>>(v, o); break;
    case PoolMode::attn:
      if (a.w == nullptr || scratch == nullptr) return cudaErrorInvalidValue;
      attn_fwd<T, I><<<static_cast<unsigned>(a.B), kRowThreads, 0, st>>>(v, o, static_cast<AccT<T>*>(scratch));
      break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <class T, class I, bool PACKED>
cudaError_t backward_tiles(const PoolArgs& a, const View<T, I>& v, const PoolGrads& g, cudaStream_t st) {
  const T* gr = static_cast<const T*>(g.grad);
  const dim3 tile(kLanesD, kLanesT), grid = tile_grid<T>(a);
  switch (a.mode) {
    case PoolMode::last:
      pool_tile_bwd<T, I, 0, PACKED><<<grid, tile, 0, st>>>(v, gr, g.g_sb, g.g_sd, g.grad_hidden);
      break;
    case PoolMode::mean:
      pool_tile_bwd<T, I, 1, PACKED><<<grid, tile, 0, st>>>(v, gr, g.g_sb, g.g_sd, g.grad_hidden);
      break;
    case PoolMode::max:
      pool_tile_bwd<T, I, 2, PACKED><<<grid, tile, 0, st>>>(v, gr, g.g_sb, g.g_sd, g.grad_hidden);
      break;
    case PoolMode::attn: {
      if (a.w == nullptr || g.dw_rows == nullptr || g.grad_w == nullptr) return cudaErrorInvalidValue;
      auto* dw = static_cast<AccT<T>*>(g.dw_rows);
      T* gw_rows = a.w_per_row ? static_cast<T*>(g.grad_w) : nullptr;
      attn_bwd<T, I, PACKED>
          <<<static_cast<unsigned>(a.B), kRowThreads, 0, st>>>(v, gr, g.g_sb, g.g_sd, g.grad_hidden, dw, gw_rows);
      if (!a.w_per_row)  // shared w [d]: sum the rows' dw in a fixed order
        sum_rows_cast<T><<<grid_for(a.d, 256, 4096), 256, 0, st>>>(dw, static_cast<T*>(g.grad_w), a.B, a.d);
      break;
    }
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <class T, class I> cudaError_t backward_t(const PoolArgs& a, const PoolGrads& g, cudaStream_t st) {
  if (!grid_ok<T>(a)) return cudaErrorInvalidConfiguration;
  const View<T, I> v = make_view<T, I>(a);
  cudaError_t err = a.packed ? backward_tiles<T, I, true>(a, v, g, st) : backward_tiles<T, I, false>(a, v, g, st);
  if (err != cudaSuccess) return err;
  if (a.packed && g.grad_hidden_cast != nullptr) {  // accumulation buffer -> hidden's dtype
    const std::int64_t n = a.T * a.d;
    sum_rows_cast<T><<<grid_for(n, 256), 256, 0, st>>>(static_cast<const AccT<T>*>(g.grad_hidden),
                                                       static_cast<T*>(g.grad_hidden_cast), 1, n);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t pool_forward(const PoolArgs& a, void* out, void* scratch, cudaStream_t stream) {
  if (a.B == 0 || a.d == 0) return cudaSuccess;
  PARA_DISPATCH_FLOATING(a.kind, T,
                         return a.idx64 ? forward_t<T, std::int64_t>(a, out, scratch, stream)
                                        : forward_t<T, std::int32_t>(a, out, scratch, stream);)
  return cudaErrorInvalidValue;
}

cudaError_t pool_backward(const PoolArgs& a, const PoolGrads& g, cudaStream_t stream) {
  if (a.B == 0 || a.d == 0) return cudaSuccess;
  PARA_DISPATCH_FLOATING(
      a.kind, T,
      return a.idx64 ? backward_t<T, std::int64_t>(a, g, stream) : backward_t<T, std::int32_t>(a, g, stream);)
  return cudaErrorInvalidValue;
}

}  // namespace para
