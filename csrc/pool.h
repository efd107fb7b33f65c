// pool.h: host launchers of the pool kernels (pool.cu); raw pointers, no torch.
//
//   hidden  [B, T, d] padded (ranges index T; s_b = the stride of B) or [total, d] packed
//           (ranges index total; s_b = 0, T = total); any strides, in elements
//   start, end  [B] int32 or int64, half-open token ranges (clamped in the kernels)
//   w       [d] (w_sb = 0) or [B, d] (w_per_row; w_sb may be 0 too: one row expanded), hidden's
//           dtype; attn only
//   out     [B, d] contiguous, hidden's dtype
// Accumulation is in fp32 (fp64 for fp64). Every grid depends on B and d only.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtypes.cuh"

namespace para {

enum class PoolMode : int { last = 0, mean = 1, max = 2, attn = 3 };

struct PoolArgs {
  ScalarKind kind;
  PoolMode mode;
  const void* hidden;
  std::int64_t B, T, d;        // T: tokens per row (padded) or total (packed)
  std::int64_t s_b, s_t, s_d;  // hidden strides; s_b = 0 when packed
  bool packed;
  const void* start;
  const void* end;
  bool idx64;               // start / end are int64 (else int32)
  const void* w = nullptr;  // attn only
  std::int64_t w_sb = 0, w_sd = 1;
  bool w_per_row = false;  // w is [B, d]: its gradient is [B, d], whatever w_sb is
};

// out [B, d] contiguous. scratch: attn only, [B, d] contiguous in the accumulation dtype.
cudaError_t pool_forward(const PoolArgs& a, void* out, void* scratch, cudaStream_t stream);

struct PoolGrads {
  const void* grad;  // [B, d], hidden's dtype, strides g_sb, g_sd
  std::int64_t g_sb, g_sd;
  // padded: [B, T, d] contiguous in hidden's dtype, every element written.
  // packed: [total, d] contiguous in the accumulation dtype, zeroed by the caller
  //         (receives atomic adds: ranges may overlap).
  void* grad_hidden;
  void* grad_hidden_cast = nullptr;  // packed 16-bit: [total, d] hidden dtype, cast of the above
  void* dw_rows = nullptr;           // attn: [B, d] accumulation-dtype scratch
  void* grad_w = nullptr;            // attn: w's shape ([d] or [B, d]) contiguous, w's dtype
};

cudaError_t pool_backward(const PoolArgs& a, const PoolGrads& g, cudaStream_t stream);

}  // namespace para
