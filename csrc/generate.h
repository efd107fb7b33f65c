// generate.h: host launchers of the generate kernels (generate.cu); raw pointers, no torch.
//
//   pooled      [B, d]      pooled kind P (fp32 / fp64 / fp16 / bf16)
//   w_down      [A, d, r]   bank kind W (W == P, or W = fp32 with P = fp16 / bf16)
//   b_down      [A, r]      W
//   w_up        [A, r, N]   W
//   b_up        [A, N]      W
//   act_params  [A, 10]     W; 'rational' only (nullptr otherwise)
//   adapter_ids [B]         int32 or int64; -1 (or any id outside [0, A)) = no adapter
//   v (out)     [B, N]      P:  v = 1 + g(pooled W_down[a] + b_down[a]) W_up[a] + b_up[a]; 1 for -1 rows
// Backward, with grad [B, N] in P, writes every element of
//   g_pooled [B, d] (P), g_w_down [A, d, r], g_b_down [A, r], g_w_up [A, r, N], g_b_up [A, N],
//   g_act_params [A, 10] (W, rational only); unused adapters and -1 rows get zeros.
// Every tensor is contiguous. Math is in AccT<P> (fp32, fp64 for fp64). Grids depend on the
// shapes and the SM count only (graph-capturable); scratch is sized by generate_plan and
// allocated by the caller. Deterministic: no atomics, every sum in a fixed order.
#pragma once

#include <cuda_runtime_api.h>
#include <cstddef>
#include <cstdint>

#include "dtypes.cuh"

namespace para {

// The order of para_kernels.ops.activations.ACTIVATIONS.
enum class GenAct : int { relu = 0, gelu = 1, silu = 2, tanh = 3, identity = 4, rational = 5 };
constexpr int kRationalParams = 10;  // a0..a5, b1..b4

// True for the (pooled, bank) dtype pairs the kernels are built for.
bool generate_supported(ScalarKind pooled, ScalarKind bank);

struct GenerateArgs {
  ScalarKind pooled_kind;  // pooled, v, grad, g_pooled
  ScalarKind bank_kind;    // the bank, act_params and their gradients
  GenAct act;
  const void* pooled;
  const void* w_down;
  const void* b_down;
  const void* w_up;
  const void* b_up;
  const void* act_params;  // nullptr unless act == rational
  const void* ids;
  bool ids64;  // adapter_ids is int64 (else int32)
  std::int64_t B, d, r, N, A;
};

struct GenerateGrads {
  const void* grad;  // [B, N]
  void* g_pooled;
  void* g_w_down;
  void* g_b_down;
  void* g_w_up;
  void* g_b_up;
  void* g_act_params;  // nullptr unless act == rational
};

// How the down projections are split, and where each scratch buffer lies (byte offsets).
struct GeneratePlan {
  std::int64_t down_splits = 1, down_k_per_split = 0;  // h partials [down_splits, B, r]
  std::int64_t dz_splits = 1, dz_k_per_split = 0;      // backward: dz partials [dz_splits, B, r]
  std::size_t off_hpart = 0, off_dzpart = 0, off_z = 0, off_dh = 0, off_dprm = 0;
  std::size_t scratch_bytes = 0;  // 0: nothing to allocate
};

// num_sms: the device's multiprocessor count (the d split fills it when row blocks are few).
GeneratePlan generate_plan(const GenerateArgs& a, int num_sms, bool backward);

// out [B, N] in P; scratch: plan.scratch_bytes, 256-byte aligned.
cudaError_t generate_forward(const GenerateArgs& a, const GeneratePlan& plan, void* out, void* scratch,
                             cudaStream_t stream);

cudaError_t generate_backward(const GenerateArgs& a, const GeneratePlan& plan, const GenerateGrads& g, void* scratch,
                              cudaStream_t stream);

}  // namespace para
