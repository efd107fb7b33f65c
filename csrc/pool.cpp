// pool.cpp: torch-facing wrappers of the pool kernels, registered as the CUDA kernels of
// para_cuda::pool and para_cuda::pool_backward (schemas defined in library.cpp).
//
//   hidden [B, T, d] (padded) or [total, d] (packed), any strides; prompt_start / prompt_end
//   [B] int32 or int64; w_sa [d] or [B, d] (attn only), hidden's dtype; grad [B, d].
//   pool -> [B, d]; pool_backward -> (grad_hidden: hidden's shape, contiguous, hidden's
//   dtype; grad_w_sa: w_sa's shape and dtype, or empty [0] when w_sa is None).
// Range values are checked by the Python layer; the kernels clamp them, never reading out
// of bounds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "pool.h"
#include "torch_utils.h"

namespace para {
namespace {

PoolMode parse_mode(c10::string_view mode) {
  if (mode == "last") return PoolMode::last;
  if (mode == "mean") return PoolMode::mean;
  if (mode == "max") return PoolMode::max;
  if (mode == "attn") return PoolMode::attn;
  TORCH_CHECK(false, "mode must be one of 'last', 'mean', 'max', 'attn', got '", std::string(mode), "'");
  return PoolMode::last;  // unreachable
}

// Checks everything but values, and fills the launcher's arguments. start_c / end_c keep
// contiguous ranges alive, prompt_end in prompt_start's dtype (the kernels read one type).
PoolArgs pool_args(const at::Tensor& hidden, const at::Tensor& start, const at::Tensor& end, c10::string_view mode_name,
                   const std::optional<at::Tensor>& w_sa, at::Tensor& start_c, at::Tensor& end_c) {
  check_cuda(hidden, "hidden");
  PoolArgs a{};
  a.kind = scalar_kind(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2 || hidden.dim() == 3, "hidden must be [B, T, d] (padded) or [total, d] (packed), got ",
              hidden.sizes());
  TORCH_CHECK(start.dim() == 1, "prompt_start must be a 1-D tensor [B], got ", start.sizes());
  const int64_t B = start.size(0);
  a.packed = hidden.dim() == 2;
  TORCH_CHECK(a.packed || hidden.size(0) == B, "prompt_start must have shape [B] = [", hidden.size(0), "] for hidden ",
              hidden.sizes(), ", got ", start.sizes());
  check_index(start, "prompt_start", B);
  check_index(end, "prompt_end", B);
  check_like(start, "prompt_start", hidden, "hidden", false);
  check_like(end, "prompt_end", hidden, "hidden", false);
  a.mode = parse_mode(mode_name);
  TORCH_CHECK((a.mode == PoolMode::attn) == w_sa.has_value(), "w_sa must be given exactly when mode == 'attn' (mode='",
              std::string(mode_name), "')");
  a.hidden = hidden.data_ptr();
  a.B = B;
  a.d = hidden.size(-1);
  if (a.packed) {
    a.T = hidden.size(0);
    a.s_b = 0;
    a.s_t = hidden.stride(0);
    a.s_d = hidden.stride(1);
  } else {
    a.T = hidden.size(1);
    a.s_b = hidden.stride(0);
    a.s_t = hidden.stride(1);
    a.s_d = hidden.stride(2);
  }
  start_c = start.contiguous();
  end_c = end.scalar_type() == start.scalar_type() ? end.contiguous() : end.to(start.scalar_type()).contiguous();
  a.start = start_c.data_ptr();
  a.end = end_c.data_ptr();
  a.idx64 = start.scalar_type() == at::kLong;
  if (w_sa.has_value()) {
    const at::Tensor& w = *w_sa;
    check_like(w, "w_sa", hidden, "hidden", true);
    TORCH_CHECK((w.dim() == 1 && w.size(0) == a.d) || (w.dim() == 2 && w.size(0) == B && w.size(1) == a.d),
                "w_sa must have shape [d] = [", a.d, "] or [B, d] = [", B, ", ", a.d, "], got ", w.sizes());
    a.w = w.data_ptr();
    a.w_per_row = w.dim() == 2;  // not w_sb != 0: an expanded [B, d] has row stride 0
    a.w_sb = a.w_per_row ? w.stride(0) : 0;
    a.w_sd = w.stride(-1);
  }
  return a;
}

at::Tensor pool_cuda(const at::Tensor& hidden, const at::Tensor& prompt_start, const at::Tensor& prompt_end,
                     c10::string_view mode, const std::optional<at::Tensor>& w_sa) {
  at::Tensor start_c, end_c;
  const PoolArgs a = pool_args(hidden, prompt_start, prompt_end, mode, w_sa, start_c, end_c);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({a.B, a.d}, hidden.options());
  if (a.B == 0 || a.d == 0) return out;
  at::Tensor scratch;
  if (a.mode == PoolMode::attn) scratch = at::empty({a.B, a.d}, hidden.options().dtype(acc_type(hidden.scalar_type())));
  check_launch(pool_forward(a, out.data_ptr(), scratch.defined() ? scratch.data_ptr() : nullptr,
                            c10::cuda::getCurrentCUDAStream().stream()),
               "para_cuda::pool");
  return out;
}

std::tuple<at::Tensor, at::Tensor> pool_backward_cuda(const at::Tensor& grad, const at::Tensor& hidden,
                                                      const at::Tensor& prompt_start, const at::Tensor& prompt_end,
                                                      c10::string_view mode, const std::optional<at::Tensor>& w_sa) {
  at::Tensor start_c, end_c;
  const PoolArgs a = pool_args(hidden, prompt_start, prompt_end, mode, w_sa, start_c, end_c);
  check_like(grad, "grad", hidden, "hidden", true);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == a.B && grad.size(1) == a.d, "grad must have shape [B, d] = [", a.B,
              ", ", a.d, "], got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto acc_opts = hidden.options().dtype(acc_type(hidden.scalar_type()));
  at::Tensor grad_w = w_sa.has_value() ? at::empty(w_sa->sizes(), w_sa->options()) : at::empty({0}, hidden.options());
  if (a.B == 0 || a.d == 0) {
    grad_w.zero_();
    return {at::zeros(hidden.sizes(), hidden.options()), grad_w};
  }
  PoolGrads g{};
  g.grad = grad.data_ptr();
  g.g_sb = grad.stride(0);
  g.g_sd = grad.stride(1);
  at::Tensor grad_hidden, buf, dw_rows;
  if (a.packed) {  // atomics into a zeroed accumulation buffer; cast when the dtypes differ
    buf = at::zeros(hidden.sizes(), acc_opts);
    grad_hidden = buf.scalar_type() == hidden.scalar_type() ? buf : at::empty(hidden.sizes(), hidden.options());
    g.grad_hidden = buf.data_ptr();
    g.grad_hidden_cast = grad_hidden.is_same(buf) ? nullptr : grad_hidden.data_ptr();
  } else {  // written in full by the kernels
    grad_hidden = at::empty(hidden.sizes(), hidden.options());
    g.grad_hidden = grad_hidden.data_ptr();
  }
  if (a.mode == PoolMode::attn) {
    dw_rows = at::empty({a.B, a.d}, acc_opts);
    g.dw_rows = dw_rows.data_ptr();
    g.grad_w = grad_w.data_ptr();
  }
  check_launch(pool_backward(a, g, c10::cuda::getCurrentCUDAStream().stream()), "para_cuda::pool_backward");
  return {grad_hidden, grad_w};
}

}  // namespace
}  // namespace para

TORCH_LIBRARY_IMPL(para_cuda, CUDA, m) {
  m.impl("pool", &para::pool_cuda);
  m.impl("pool_backward", &para::pool_backward_cuda);
}
