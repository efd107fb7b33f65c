// torch_utils.h: argument checks and dtype mapping shared by the torch-facing wrappers
// (pool.cpp, scale.cpp). Messages name the argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include "dtypes.cuh"

namespace para {

inline ScalarKind scalar_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::f32;
    case at::kDouble: return ScalarKind::f64;
    case at::kHalf: return ScalarKind::f16;
    case at::kBFloat16: return ScalarKind::bf16;
    default: break;
  }
  TORCH_CHECK(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  return ScalarKind::f32;  // unreachable
}

// Accumulation dtype: fp32, or fp64 for fp64 inputs.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       bool same_dtype) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
              "; they must be on the same device");
  TORCH_CHECK(!same_dtype || t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type(), "; they must match");
}

// A 1-D int32 / int64 index tensor of n elements.
inline void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace para
