// scale.cu: CUDA kernels of para::scale and para::scale_backward (spec: para_kernels/ops/reference_ops/scale.py).
//
//   x, out, grad, grad_x [R, L, n] views (any strides); v, grad_v [B, n]; token_rows [L]
//   (packed, R = 1); work: see scale.h.
//
// Design. A block is (fx feature lanes x ty token lanes) = 256 threads, fx the power of two
// covering n in 16-byte packs (at most 256), so short rows still fill a block with tokens.
// Each thread owns one pack of features; a warp reads whole contiguous runs of a token.
// - forward: each thread handles U tokens (strided by ty) with all loads issued first;
//   padded rows come from one division per token (32-bit when the sizes allow).
// - backward padded: block = (row, chunk of that row's tokens, feature block); it writes
//   grad_x and sums grad * x over its tokens, then its token lanes in shared memory in a
//   fixed order: straight into grad_v when a row is one chunk, else into fp32 partials
//   [R, C, n] summed in order by a second kernel. No atomics: deterministic per shape.
// - backward packed: each thread walks a run of 16 consecutive tokens and flushes its sum
//   with one atomic add per feature whenever the row changes (packed rows come in runs).
#include "dtypes.cuh"
#include "launch.h"
#include "scale.h"

namespace para {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;      // tokens in flight per thread
constexpr int kRun = 16;        // consecutive tokens per thread in the packed backward
constexpr int kMaxChunks = 64;  // chunks per row in the padded backward
constexpr std::int64_t kMinChunk = 64;

template <class T> PARA_DEV int n_valid(std::int64_t f0, std::int64_t n) {
  const std::int64_t k = n - f0;
  return k <= 0 ? 0 : (k >= kPack<T> ? kPack<T> : static_cast<int>(k));
}

// Token t of the [R, L] token grid -> (r, j); 32-bit division when R * L < 2^32.
PARA_DEV void split_token(std::int64_t t, std::int64_t L, bool small, std::int64_t& r, std::int64_t& j) {
  if (small) {
    const std::uint32_t q = static_cast<std::uint32_t>(t) / static_cast<std::uint32_t>(L);
    r = q;
  } else {
    r = t / L;
  }
  j = t - r * L;
}

template <class T, class I> struct View {
  const T* x;
  std::int64_t R, L, n, sx_r, sx_t, sx_f;
  const T* v;
  std::int64_t B, sv_b, sv_f;
  const I* rows;
};

template <class T, class I> View<T, I> make_view(const ScaleArgs& a) {
  return {static_cast<const T*>(a.x),
          a.R,
          a.L,
          a.n,
          a.sx_r,
          a.sx_t,
          a.sx_f,
          static_cast<const T*>(a.v),
          a.B,
          a.sv_b,
          a.sv_f,
          static_cast<const I*>(a.rows)};
}

template <class T, class I>
PARA_DEV AccPack<T> v_pack(const View<T, I>& a, std::int64_t row, std::int64_t f0, int nf, bool& ok) {
  ok = row >= 0 && row < a.B;
  return ok ? widen(load_group(a.v + row * a.sv_b + f0 * a.sv_f, a.sv_f, nf)) : AccPack<T>{};
}

// ------------------------------------------------------------------ forward
template <class T, class I, bool PACKED, int U>
__global__ void __launch_bounds__(kThreads)
    scale_fwd(View<T, I> a, T* __restrict__ out, std::int64_t so_r, std::int64_t so_t, std::int64_t so_f, bool small) {
  constexpr int P = kPack<T>;
  const std::int64_t f0 = (static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * P;
  const int nf = n_valid<T>(f0, a.n);
  if (nf == 0) return;
  const std::int64_t tokens = a.R * a.L;
  const std::int64_t t0 = static_cast<std::int64_t>(blockIdx.x) * blockDim.y * U + threadIdx.y;
  Pack<T> x[U];
  std::int64_t row[U], o_off[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const std::int64_t t = t0 + static_cast<std::int64_t>(u) * blockDim.y;
    if (t >= tokens) break;
    std::int64_t r = 0, j = t;
    if (PACKED)
      row[u] = static_cast<std::int64_t>(a.rows[t]);
    else {
      split_token(t, a.L, small, r, j);
      row[u] = r;
    }
    x[u] = load_group(a.x + r * a.sx_r + j * a.sx_t + f0 * a.sx_f, a.sx_f, nf);
    o_off[u] = r * so_r + j * so_t + f0 * so_f;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (t0 + static_cast<std::int64_t>(u) * blockDim.y >= tokens) break;
    bool ok;
    const AccPack<T> vp = v_pack(a, row[u], f0, nf, ok);
    AccPack<T> y;
#pragma unroll
    for (int i = 0; i < P; ++i) y.v[i] = ok ? to_acc(x[u].v[i]) * vp.v[i] : AccT<T>(0);
    store_group(out + o_off[u], so_f, narrow<T>(y), nf);
  }
}

// ------------------------------------------------------------------ backward
template <class T> struct GView {
  const T* g;
  std::int64_t sg_r, sg_t, sg_f;
  T* gx;
  std::int64_t so_r, so_t, so_f;
};

template <class T> GView<T> make_gview(const ScaleGrads& g) {
  return {static_cast<const T*>(g.grad), g.sg_r, g.sg_t, g.sg_f, static_cast<T*>(g.grad_x), g.so_r, g.so_t, g.so_f};
}

// Block (row r, chunk c, feature block): grad_x of tokens [c * len, (c + 1) * len) of row r,
// and their sum of grad * x into grad_v (chunks == 1) or part[r, c] (accumulation dtype).
template <class T>
__global__ void __launch_bounds__(kThreads)  // no min-blocks hint: ptxas spills with one
    scale_bwd_padded(View<T, std::int32_t> a, GView<T> g, T* __restrict__ grad_v, AccT<T>* __restrict__ part,
                     std::int64_t chunks, std::int64_t chunk_len) {
  using A = AccT<T>;
  constexpr int P = kPack<T>;
  __shared__ AccPack<T> red[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, fx = blockDim.x, nty = blockDim.y;
  const std::int64_t r = blockIdx.x / chunks, c = blockIdx.x - r * chunks;
  const std::int64_t f0 = (static_cast<std::int64_t>(blockIdx.y) * fx + tx) * P;
  const int nf = n_valid<T>(f0, a.n);
  const std::int64_t j_end = (c + 1) * chunk_len < a.L ? (c + 1) * chunk_len : a.L;
  AccPack<T> acc{};
  if (nf > 0) {
    bool ok;
    const AccPack<T> vp = v_pack(a, r, f0, nf, ok);
    const T* gb = g.g + r * g.sg_r + f0 * g.sg_f;
    const T* xb = a.x + r * a.sx_r + f0 * a.sx_f;
    T* ob = g.gx + r * g.so_r + f0 * g.so_f;
    for (std::int64_t j = c * chunk_len + ty; j < j_end; j += static_cast<std::int64_t>(nty) * kUnroll) {
      Pack<T> gp[kUnroll], xp[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::int64_t jj = j + static_cast<std::int64_t>(u) * nty;
        if (jj >= j_end) break;
        gp[u] = load_group(gb + jj * g.sg_t, g.sg_f, nf);
        xp[u] = load_group(xb + jj * a.sx_t, a.sx_f, nf);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const std::int64_t jj = j + static_cast<std::int64_t>(u) * nty;
        if (jj >= j_end) break;
        AccPack<T> dx;
#pragma unroll
        for (int i = 0; i < P; ++i) {
          const A gi = to_acc(gp[u].v[i]);
          dx.v[i] = gi * vp.v[i];
          acc.v[i] += gi * to_acc(xp[u].v[i]);
        }
        store_group(ob + jj * g.so_t, g.so_f, narrow<T>(dx), nf);
      }
    }
  }
  red[ty * fx + tx] = acc;
  __syncthreads();
  if (ty != 0 || nf == 0) return;
  for (int k = 1; k < nty; ++k) {
#pragma unroll
    for (int i = 0; i < P; ++i) acc.v[i] += red[k * fx + tx].v[i];
  }
  if (chunks == 1) {
    for (int i = 0; i < nf; ++i) grad_v[r * a.n + f0 + i] = from_acc<T>(acc.v[i]);
  } else {
    for (int i = 0; i < nf; ++i) part[(r * chunks + c) * a.n + f0 + i] = acc.v[i];
  }
}

// out[k] = sum_c x[(r * C + c) * n + f] for k = r * n + f, c in increasing order, cast to T.
template <class T>
__global__ void sum_chunks(const AccT<T>* __restrict__ x, T* __restrict__ out, std::int64_t R, std::int64_t C,
                           std::int64_t n) {
  for (std::int64_t k = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; k < R * n;
       k += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t r = k / n, f = k - r * n;
    AccT<T> acc = 0;
    for (std::int64_t c = 0; c < C; ++c) acc += x[(r * C + c) * n + f];
    out[k] = from_acc<T>(acc);
  }
}

PARA_DEV void atomic_add_acc(float* p, float x) { atomicAdd(p, x); }
PARA_DEV void atomic_add_acc(double* p, double x) { atomicAdd(p, x); }

template <class T, class I>
__global__ void __launch_bounds__(kThreads)  // no min-blocks hint: ptxas spills with one
    scale_bwd_packed(View<T, I> a, GView<T> g, AccT<T>* __restrict__ gv) {
  constexpr int P = kPack<T>;
  const std::int64_t f0 = (static_cast<std::int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * P;
  const int nf = n_valid<T>(f0, a.n);
  if (nf == 0) return;
  const std::int64_t t_begin = (static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kRun;
  AccPack<T> acc{};
  std::int64_t cur = -1;
  auto flush = [&]() {
    if (cur >= 0 && cur < a.B)
      for (int i = 0; i < nf; ++i) atomic_add_acc(gv + cur * a.n + f0 + i, acc.v[i]);
  };
  for (int k0 = 0; k0 < kRun; k0 += kUnroll) {
    Pack<T> gp[kUnroll], xp[kUnroll];
    std::int64_t row[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t t = t_begin + k0 + u;
      if (t >= a.L) break;
      row[u] = static_cast<std::int64_t>(a.rows[t]);
      gp[u] = load_group(g.g + t * g.sg_t + f0 * g.sg_f, g.sg_f, nf);
      xp[u] = load_group(a.x + t * a.sx_t + f0 * a.sx_f, a.sx_f, nf);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const std::int64_t t = t_begin + k0 + u;
      if (t >= a.L) break;
      bool ok;
      const AccPack<T> vp = v_pack(a, row[u], f0, nf, ok);
      if (row[u] != cur) {
        flush();
        cur = row[u];
        acc = AccPack<T>{};
      }
      AccPack<T> dx;
#pragma unroll
      for (int i = 0; i < P; ++i) {
        const AccT<T> gi = to_acc(gp[u].v[i]);
        dx.v[i] = ok ? gi * vp.v[i] : AccT<T>(0);
        acc.v[i] += gi * to_acc(xp[u].v[i]);
      }
      store_group(g.gx + t * g.so_t + f0 * g.so_f, g.so_f, narrow<T>(dx), nf);
    }
  }
  flush();
}

template <class T> __global__ void cast_acc(const AccT<T>* __restrict__ x, T* __restrict__ out, std::int64_t n) {
  for (std::int64_t k = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    out[k] = from_acc<T>(x[k]);
}

// ------------------------------------------------------------------ host side
struct Tile {
  int fx, ty;
  std::int64_t fblocks;
};

template <class T> Tile tile_for(std::int64_t n) {
  const std::int64_t packs = ceil_div(n, kPack<T>);
  int fx = 1;
  while (fx < packs && fx < kThreads) fx <<= 1;
  return {fx, kThreads / fx, ceil_div(packs, fx)};
}

struct Plan {
  Tile tile;
  std::int64_t chunks, chunk_len;
};

// Padded backward: cut rows into chunks until there are ~8 blocks per SM (shape-only).
template <class T> Plan plan_padded(const ScaleArgs& a, int num_sms) {
  const Tile tl = tile_for<T>(a.n);
  const std::int64_t step = static_cast<std::int64_t>(tl.ty) * kUnroll;
  const std::int64_t target = 8 * static_cast<std::int64_t>(num_sms > 0 ? num_sms : 132);
  std::int64_t c = ceil_div(target, a.R * tl.fblocks);
  const std::int64_t by_len = ceil_div(a.L, step > kMinChunk ? step : kMinChunk);
  c = c < by_len ? c : by_len;
  c = c < kMaxChunks ? c : kMaxChunks;
  c = c < 1 ? 1 : c;
  const std::int64_t len = ceil_div(ceil_div(a.L, c), step) * step;  // whole token steps
  return {tl, ceil_div(a.L, len), len};
}

template <class T, class I>
cudaError_t forward_t(const ScaleArgs& a, void* out, std::int64_t so_r, std::int64_t so_t, std::int64_t so_f,
                      cudaStream_t st) {
  const Tile tl = tile_for<T>(a.n);
  const std::int64_t tokens = a.R * a.L;
  const bool packed = a.rows != nullptr;
  // 4 tokens per thread once there is enough work to fill the GPU that way
  const bool big = tokens * tl.fblocks >= (std::int64_t(1) << 16);
  const int U = big ? kUnroll : 1;
  const std::int64_t gx = ceil_div(tokens, static_cast<std::int64_t>(tl.ty) * U);
  if (gx > kMaxGridX || tl.fblocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(tl.fblocks)), block(tl.fx, tl.ty);
  const bool small = tokens < (std::int64_t(1) << 32);
  const View<T, I> v = make_view<T, I>(a);
  T* o = static_cast<T*>(out);
  if (packed) {
    if (big)
      scale_fwd<T, I, true, kUnroll><<<grid, block, 0, st>>>(v, o, so_r, so_t, so_f, small);
    else
      scale_fwd<T, I, true, 1><<<grid, block, 0, st>>>(v, o, so_r, so_t, so_f, small);
  } else {
    if (big)
      scale_fwd<T, I, false, kUnroll><<<grid, block, 0, st>>>(v, o, so_r, so_t, so_f, small);
    else
      scale_fwd<T, I, false, 1><<<grid, block, 0, st>>>(v, o, so_r, so_t, so_f, small);
  }
  return cudaGetLastError();
}

template <class T> cudaError_t backward_padded(const ScaleArgs& a, const ScaleGrads& g, int num_sms, cudaStream_t st) {
  const Plan p = plan_padded<T>(a, num_sms);
  if (a.R * p.chunks > kMaxGridX || p.tile.fblocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (p.chunks > 1 && g.work == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.R * p.chunks), static_cast<unsigned>(p.tile.fblocks));
  auto* part = static_cast<AccT<T>*>(g.work);
  auto* gv = static_cast<T*>(g.grad_v);
  scale_bwd_padded<T><<<grid, dim3(p.tile.fx, p.tile.ty), 0, st>>>(make_view<T, std::int32_t>(a), make_gview<T>(g), gv,
                                                                   part, p.chunks, p.chunk_len);
  if (p.chunks > 1) sum_chunks<T><<<grid_for(a.R * a.n, 256), 256, 0, st>>>(part, gv, a.R, p.chunks, a.n);
  return cudaGetLastError();
}

template <class T, class I> cudaError_t backward_packed(const ScaleArgs& a, const ScaleGrads& g, cudaStream_t st) {
  if (g.work == nullptr) return cudaErrorInvalidValue;
  const Tile tl = tile_for<T>(a.n);
  const std::int64_t gx = ceil_div(a.L, static_cast<std::int64_t>(tl.ty) * kRun);
  if (gx > kMaxGridX || tl.fblocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  auto* acc = static_cast<AccT<T>*>(g.work);
  scale_bwd_packed<T, I>
      <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(tl.fblocks)), dim3(tl.fx, tl.ty), 0, st>>>(
          make_view<T, I>(a), make_gview<T>(g), acc);
  if (g.work != g.grad_v)
    cast_acc<T><<<grid_for(a.B * a.n, 256), 256, 0, st>>>(acc, static_cast<T*>(g.grad_v), a.B * a.n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t scale_forward(const ScaleArgs& a, void* out, std::int64_t so_r, std::int64_t so_t, std::int64_t so_f,
                          cudaStream_t stream) {
  if (a.R * a.L == 0 || a.n == 0) return cudaSuccess;
  PARA_DISPATCH_FLOATING(a.kind, T,
                         return a.rows64 ? forward_t<T, std::int64_t>(a, out, so_r, so_t, so_f, stream)
                                         : forward_t<T, std::int32_t>(a, out, so_r, so_t, so_f, stream);)
  return cudaErrorInvalidValue;
}

std::int64_t scale_backward_work(const ScaleArgs& a, int num_sms) {
  if (a.rows != nullptr) return a.B * a.n;
  if (a.R * a.L == 0 || a.n == 0) return 0;
  PARA_DISPATCH_FLOATING(a.kind, T, const Plan p = plan_padded<T>(a, num_sms);
                         return p.chunks > 1 ? a.R * p.chunks * a.n : 0;)
  return 0;
}

cudaError_t scale_backward(const ScaleArgs& a, const ScaleGrads& g, int num_sms, cudaStream_t stream) {
  if (a.B * a.n == 0) return cudaSuccess;  // nothing to write (an empty x leaves grad_v to the caller)
  if (a.R * a.L == 0) return cudaSuccess;
  PARA_DISPATCH_FLOATING(a.kind, T, if (a.rows == nullptr) return backward_padded<T>(a, g, num_sms, stream);
                         return a.rows64 ? backward_packed<T, std::int64_t>(a, g, stream)
                                         : backward_packed<T, std::int32_t>(a, g, stream);)
  return cudaErrorInvalidValue;
}

}  // namespace para
