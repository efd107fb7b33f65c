// generate.cpp: torch-facing wrappers of the generate kernels (generate.cu), registered as the
// CUDA kernels of para_cuda::generate and para_cuda::generate_backward (schemas: library.cpp).
//
//   pooled [B, d]; w_down [A, d, r], b_down [A, r], w_up [A, r, N], b_up [A, N] and act_params
//   [A, 10] ('rational' only) share one dtype, pooled's or (for fp16 / bf16 pooled) fp32;
//   adapter_ids [B] int32 / int64; grad [B, N] in pooled's dtype.
//   generate -> v [B, N] (pooled's dtype); generate_backward -> (g_pooled, g_w_down, g_b_down,
//   g_w_up, g_b_up, g_act_params or empty [0]), each like its input.
// Id values are range-checked by the Python layer; the kernels treat ids outside [0, A) as -1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "generate.h"
#include "launch.h"
#include "torch_utils.h"

namespace para {
namespace {

GenAct parse_activation(c10::string_view name) {
  if (name == "relu") return GenAct::relu;
  if (name == "gelu") return GenAct::gelu;
  if (name == "silu") return GenAct::silu;
  if (name == "tanh") return GenAct::tanh;
  if (name == "identity") return GenAct::identity;
  if (name == "rational") return GenAct::rational;
  TORCH_CHECK(false, "activation must be one of 'relu', 'gelu', 'silu', 'tanh', 'identity', 'rational', got '",
              std::string(name), "'");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", meaning, " = ", expected, ", got ", t.sizes());
}

int num_sms(c10::DeviceIndex device) {
  static int cache[256] = {};  // per device; the attribute never changes
  int& n = cache[static_cast<std::uint8_t>(device)];
  if (n == 0) {
    int v = 0;
    check_launch(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device), "para_cuda::generate");
    n = v > 0 ? v : 1;
  }
  return n;
}

// Checks shapes, dtypes and devices, makes the inputs contiguous (kept alive in `keep`) and
// fills the launcher's arguments.
GenerateArgs generate_args(const at::Tensor& pooled, const at::Tensor& w_down, const at::Tensor& b_down,
                           const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& adapter_ids,
                           c10::string_view activation, const std::optional<at::Tensor>& act_params,
                           std::vector<at::Tensor>& keep) {
  check_cuda(pooled, "pooled");
  GenerateArgs a{};
  a.pooled_kind = scalar_kind(pooled, "pooled");
  TORCH_CHECK(pooled.dim() == 2, "pooled must be [B, d], got ", pooled.sizes());
  a.B = pooled.size(0);
  a.d = pooled.size(1);
  TORCH_CHECK(w_down.dim() == 3, "w_down must be [A, d, r], got ", w_down.sizes());
  a.A = w_down.size(0);
  a.r = w_down.size(2);
  check_shape(w_down, "w_down", {a.A, a.d, a.r}, "[A, d, r]");
  TORCH_CHECK(w_up.dim() == 3, "w_up must be [A, r, N], got ", w_up.sizes());
  a.N = w_up.size(2);
  check_shape(w_up, "w_up", {a.A, a.r, a.N}, "[A, r, N]");
  check_shape(b_down, "b_down", {a.A, a.r}, "[A, r]");
  check_shape(b_up, "b_up", {a.A, a.N}, "[A, N]");
  check_like(w_down, "w_down", pooled, "pooled", false);
  a.bank_kind = scalar_kind(w_down, "w_down");
  TORCH_CHECK(generate_supported(a.pooled_kind, a.bank_kind), "w_down has dtype ", w_down.scalar_type(),
              " but pooled has ", pooled.scalar_type(),
              "; the bank must have pooled's dtype, or float32 when pooled is float16 / bfloat16");
  check_like(b_down, "b_down", w_down, "w_down", true);
  check_like(w_up, "w_up", w_down, "w_down", true);
  check_like(b_up, "b_up", w_down, "w_down", true);
  check_index(adapter_ids, "adapter_ids", a.B);
  check_like(adapter_ids, "adapter_ids", pooled, "pooled", false);
  a.act = parse_activation(activation);
  TORCH_CHECK((a.act == GenAct::rational) == act_params.has_value(),
              "act_params must be given exactly when activation == 'rational' (activation='", std::string(activation),
              "', act_params=", act_params.has_value() ? "given" : "None", ")");
  if (act_params.has_value()) {
    check_shape(*act_params, "act_params", {a.A, kRationalParams}, "[A, n_params]");
    check_like(*act_params, "act_params", w_down, "w_down", true);
  }
  // Grid limits: row blocks and adapters are grid y dimensions.
  TORCH_CHECK(ceil_div(a.B, 32) <= kMaxGridYZ, "pooled has too many rows (B = ", a.B, ")");
  TORCH_CHECK(a.A + 1 <= kMaxGridYZ, "w_down has too many adapters (A = ", a.A, ")");

  auto c = [&](const at::Tensor& t) -> const void* {
    keep.push_back(t.contiguous());
    return keep.back().data_ptr();
  };
  keep.reserve(7);
  a.pooled = c(pooled);
  a.w_down = c(w_down);
  a.b_down = c(b_down);
  a.w_up = c(w_up);
  a.b_up = c(b_up);
  a.ids = c(adapter_ids);
  a.ids64 = adapter_ids.scalar_type() == at::kLong;
  a.act_params = act_params.has_value() ? c(*act_params) : nullptr;
  return a;
}

at::Tensor scratch_for(const GeneratePlan& plan, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(plan.scratch_bytes > 0 ? plan.scratch_bytes : 1)},
                   like.options().dtype(at::kByte));
}

at::Tensor generate_cuda(const at::Tensor& pooled, const at::Tensor& w_down, const at::Tensor& b_down,
                         const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& adapter_ids,
                         c10::string_view activation, const std::optional<at::Tensor>& act_params) {
  std::vector<at::Tensor> keep;
  const GenerateArgs a = generate_args(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params, keep);
  const c10::cuda::CUDAGuard guard(pooled.device());
  at::Tensor out = at::empty({a.B, a.N}, pooled.options());
  if (out.numel() == 0) return out;
  const GeneratePlan plan = generate_plan(a, num_sms(pooled.device().index()), false);
  at::Tensor scratch = scratch_for(plan, pooled);
  check_launch(
      generate_forward(a, plan, out.data_ptr(), scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
      "para_cuda::generate");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> generate_backward_cuda(
    const at::Tensor& grad, const at::Tensor& pooled, const at::Tensor& w_down, const at::Tensor& b_down,
    const at::Tensor& w_up, const at::Tensor& b_up, const at::Tensor& adapter_ids, c10::string_view activation,
    const std::optional<at::Tensor>& act_params) {
  std::vector<at::Tensor> keep;
  const GenerateArgs a = generate_args(pooled, w_down, b_down, w_up, b_up, adapter_ids, activation, act_params, keep);
  check_like(grad, "grad", pooled, "pooled", true);
  check_shape(grad, "grad", {a.B, a.N}, "[B, N]");
  const at::Tensor grad_c = grad.contiguous();
  const c10::cuda::CUDAGuard guard(pooled.device());
  // Every element of every gradient is written by the kernels.
  at::Tensor g_pooled = at::empty({a.B, a.d}, pooled.options());
  at::Tensor g_w_down = at::empty({a.A, a.d, a.r}, w_down.options());
  at::Tensor g_b_down = at::empty({a.A, a.r}, w_down.options());
  at::Tensor g_w_up = at::empty({a.A, a.r, a.N}, w_down.options());
  at::Tensor g_b_up = at::empty({a.A, a.N}, w_down.options());
  at::Tensor g_params =
      act_params.has_value() ? at::empty({a.A, kRationalParams}, w_down.options()) : at::empty({0}, pooled.options());
  GenerateGrads g{};
  g.grad = grad_c.data_ptr();
  g.g_pooled = g_pooled.data_ptr();
  g.g_w_down = g_w_down.data_ptr();
  g.g_b_down = g_b_down.data_ptr();
  g.g_w_up = g_w_up.data_ptr();
  g.g_b_up = g_b_up.data_ptr();
  g.g_act_params = act_params.has_value() ? g_params.data_ptr() : nullptr;
  const GeneratePlan plan = generate_plan(a, num_sms(pooled.device().index()), true);
  at::Tensor scratch = scratch_for(plan, pooled);
  check_launch(generate_backward(a, plan, g, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "para_cuda::generate_backward");
  return {g_pooled, g_w_down, g_b_down, g_w_up, g_b_up, g_params};
}

}  // namespace
}  // namespace para

TORCH_LIBRARY_IMPL(para_cuda, CUDA, m) {
  m.impl("generate", &para::generate_cuda);
  m.impl("generate_backward", &para::generate_backward_cuda);
}
