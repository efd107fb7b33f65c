// launch.h: host-side helpers shared by the kernel launchers (no torch headers).
//
// Launchers take raw pointers, sizes, strides (in elements), a ScalarKind and a
// cudaStream_t, and return a cudaError_t: cudaGetLastError() after the launch, or
// cudaErrorInvalidValue for an unsupported ScalarKind. Grids depend on shapes only (never
// on index values held on the device), so every launch can be captured in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

namespace para {

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Grid dimension limits: x up to 2^31 - 1, y and z up to 65535.
constexpr std::int64_t kMaxGridX = 2147483647;
constexpr std::int64_t kMaxGridYZ = 65535;

// Blocks to keep every SM busy for a grid-stride loop: capped, shape-only.
inline unsigned grid_for(std::int64_t work_items, int per_block, std::int64_t cap = 65535) {
  std::int64_t g = ceil_div(work_items, per_block);
  if (g < 1) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

}  // namespace para
