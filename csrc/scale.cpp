// scale.cpp: torch-facing wrappers of the scale kernels, registered as the CUDA kernels of
// para_cuda::scale and para_cuda::scale_backward (schemas defined in library.cpp).
//
//   x [B, ..., n] with v [B, n], or packed x [total, n] with token_rows [total] (int32 or
//   int64); grad like x. scale -> x * v[row] (x's shape, strides of empty_like(x));
//   scale_backward -> (grad_x like x, grad_v like v). Any strides: x is viewed as [R, L, n]
//   without a copy when its middle dims merge, else copied once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "scale.h"
#include "torch_utils.h"

namespace para {
namespace {

struct View3 {
  bool ok;
  int64_t s_r, s_t, s_f;
};

// t [R, ..., n] as [R, L, n] strides (packed: R = 1), or ok = false when the middle dims
// cannot be merged into one strided axis.
View3 view3(const at::Tensor& t, bool packed) {
  if (packed) return {true, 0, t.stride(0), t.stride(1)};
  const int64_t D = t.dim(), n = t.size(D - 1);
  int64_t s_t = n, inner = -1;  // inner: index of the last merged middle dim of size > 1
  for (int64_t k = D - 2; k >= 1; --k) {
    if (t.size(k) == 1) continue;
    if (inner < 0)
      s_t = t.stride(k);
    else if (t.stride(k) != t.stride(inner) * t.size(inner))
      return {false, 0, 0, 0};
    inner = k;
  }
  return {true, t.stride(0), s_t, t.stride(D - 1)};
}

// Checks everything but values; fills the launcher's view of x (strides from x3).
ScaleArgs scale_args(const at::Tensor& x, const at::Tensor& v, const std::optional<at::Tensor>& token_rows,
                     at::Tensor& rows_c) {
  check_cuda(x, "x");
  ScaleArgs a{};
  a.kind = scalar_kind(x, "x");
  check_like(v, "v", x, "x", true);
  TORCH_CHECK(v.dim() == 2, "v must be [B, n], got ", v.sizes());
  TORCH_CHECK(x.dim() >= 2 && x.size(-1) == v.size(1), "x must end in n = ", v.size(1), " features to match v ",
              v.sizes(), ", got ", x.sizes());
  const bool packed = token_rows.has_value();
  if (packed) {
    TORCH_CHECK(x.dim() == 2, "x must be packed [total, n] when token_rows is given, got ", x.sizes());
    check_index(*token_rows, "token_rows", x.size(0));
    check_like(*token_rows, "token_rows", x, "x", false);
    rows_c = token_rows->contiguous();
    a.rows = rows_c.data_ptr();
    a.rows64 = rows_c.scalar_type() == at::kLong;
  } else {
    TORCH_CHECK(x.size(0) == v.size(0), "x must be [B, ..., n] with B = ", v.size(0), " rows to match v, got ",
                x.sizes());
  }
  a.n = x.size(-1);
  a.R = packed ? 1 : x.size(0);
  a.L = a.n == 0 || a.R == 0 ? 0 : x.numel() / (a.R * a.n);
  a.v = v.data_ptr();
  a.B = v.size(0);
  a.sv_b = v.stride(0);
  a.sv_f = v.stride(1);
  return a;
}

void set_x(ScaleArgs& a, const at::Tensor& x, const View3& s) {
  a.x = x.data_ptr();
  a.sx_r = s.s_r;
  a.sx_t = s.s_t;
  a.sx_f = s.s_f;
}

at::Tensor scale_cuda(const at::Tensor& x, const at::Tensor& v, const std::optional<at::Tensor>& token_rows) {
  at::Tensor rows_c;
  ScaleArgs a = scale_args(x, v, token_rows, rows_c);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);  // the fake's layout
  if (a.R * a.L == 0 || a.n == 0) return out;
  const bool packed = token_rows.has_value();
  View3 xs = view3(x, packed), os = view3(out, packed);
  at::Tensor xc = x, oc = out;
  if (!xs.ok || !os.ok) {  // middle dims that do not merge: one copy, then the common path
    xc = x.contiguous();
    oc = at::empty(x.sizes(), x.options());
    xs = view3(xc, packed);
    os = view3(oc, packed);
  }
  set_x(a, xc, xs);
  check_launch(scale_forward(a, oc.data_ptr(), os.s_r, os.s_t, os.s_f, c10::cuda::getCurrentCUDAStream().stream()),
               "para_cuda::scale");
  if (!oc.is_same(out)) out.copy_(oc);
  return out;
}

int num_sms(const at::Tensor& t) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: a guess only changes the chunking
    sms = 132;
  }
  return sms;
}

std::tuple<at::Tensor, at::Tensor> scale_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& token_rows) {
  at::Tensor rows_c;
  ScaleArgs a = scale_args(x, v, token_rows, rows_c);
  check_like(grad, "grad", x, "x", true);
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(), ", got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x), grad_v = at::empty_like(v);
  if (a.R * a.L == 0 || a.n == 0 || a.B == 0) return {grad_x, grad_v.zero_()};
  const bool packed = token_rows.has_value();
  View3 gs = view3(grad, packed), xs = view3(x, packed), os = view3(grad_x, packed);
  at::Tensor gc = grad, xc = x, oc = grad_x;
  if (!gs.ok || !xs.ok || !os.ok) {
    gc = grad.contiguous();
    xc = x.contiguous();
    oc = at::empty(x.sizes(), x.options());
    gs = view3(gc, packed);
    xs = view3(xc, packed);
    os = view3(oc, packed);
  }
  set_x(a, xc, xs);
  at::Tensor gv = grad_v.is_contiguous() ? grad_v : at::empty(v.sizes(), v.options());
  ScaleGrads g{gc.data_ptr(), gs.s_r, gs.s_t, gs.s_f, oc.data_ptr(), os.s_r, os.s_t, os.s_f, gv.data_ptr(), nullptr};
  const int sms = num_sms(x);
  const int64_t work_elems = scale_backward_work(a, sms);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor work;
  if (packed) {  // atomics: a zeroed buffer, grad_v itself when it is in the accumulation dtype
    work = acc == v.scalar_type() ? gv.zero_() : at::zeros({a.B, a.n}, v.options().dtype(acc));
  } else if (work_elems > 0) {
    work = at::empty({work_elems}, v.options().dtype(acc));
  }
  g.work = work.defined() ? work.data_ptr() : nullptr;
  check_launch(scale_backward(a, g, sms, c10::cuda::getCurrentCUDAStream().stream()), "para_cuda::scale_backward");
  if (!oc.is_same(grad_x)) grad_x.copy_(oc);
  if (!gv.is_same(grad_v)) grad_v.copy_(gv);
  return {grad_x, grad_v};
}

}  // namespace
}  // namespace para

TORCH_LIBRARY_IMPL(para_cuda, CUDA, m) {
  m.impl("scale", &para::scale_cuda);
  m.impl("scale_backward", &para::scale_backward_cuda);
}
