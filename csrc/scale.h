// scale.h: host launchers of the scale kernels (scale.cu); raw pointers, no torch.
//
//   x, out, grad, grad_x  viewed as [R, L, n] with strides in elements (any): padded
//                         x [B, ..., n] has R = B, L = product of the middle dims; packed
//                         x [total, n] has R = 1, L = total
//   v, grad_v             [B, n] (grad_v contiguous), x's dtype
//   rows                  packed only: token_rows [L], int32 or int64 (guarded in kernels:
//                         a token whose row is outside [0, B) gets 0 and adds nothing)
// Math in fp32 (fp64 for fp64), one rounding per output. Grids depend on shapes only.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtypes.cuh"

namespace para {

struct ScaleArgs {
  ScalarKind kind;
  const void* x;
  std::int64_t R, L, n;
  std::int64_t sx_r, sx_t, sx_f;
  const void* v;
  std::int64_t B, sv_b, sv_f;
  const void* rows = nullptr;  // packed when set
  bool rows64 = false;
};

// out[r, t, f] = x[r, t, f] * v[row, f]; out strides so_*.
cudaError_t scale_forward(const ScaleArgs& a, void* out, std::int64_t so_r, std::int64_t so_t, std::int64_t so_f,
                          cudaStream_t stream);

struct ScaleGrads {
  const void* grad;
  std::int64_t sg_r, sg_t, sg_f;
  void* grad_x;
  std::int64_t so_r, so_t, so_f;
  void* grad_v;  // [B, n] contiguous, v's dtype
  // Accumulation-dtype work buffer of scale_backward_work(...) elements (may be null when 0):
  // padded, per-chunk partial sums (no init needed); packed, a zeroed [B, n] buffer of
  // atomic adds, which may be grad_v itself when v's dtype is the accumulation dtype.
  void* work = nullptr;
};

// Elements of ScaleGrads::work the backward needs for these shapes on a device with
// `num_sms` multiprocessors (padded: 0 when each row is one chunk, so no second pass).
std::int64_t scale_backward_work(const ScaleArgs& a, int num_sms);

// grad_x = grad * v[row]; grad_v[b] = sum over b's tokens of grad * x. Padded: deterministic
// (fixed-order sums, no atomics); packed: atomic adds, order may vary between runs.
cudaError_t scale_backward(const ScaleArgs& a, const ScaleGrads& g, int num_sms, cudaStream_t stream);

}  // namespace para
