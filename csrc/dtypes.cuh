// dtypes.cuh: element types shared by the CUDA kernels (no torch headers).
//
//   ScalarKind                  host-side tag of a tensor's dtype (f32, f64, f16, bf16)
//   PARA_DISPATCH_FLOATING      switch on a ScalarKind binding `scalar_t` to the C++ type
//   AccT<T>                     accumulation type: float, or double for double inputs
//   to_acc(x) / from_acc<T>(a)  element <-> accumulator conversions (round to nearest even)
//   Pack<T>, load_group, ...    16-byte vector access (kPack = 16 / sizeof(T) elements) with
//                               an alignment test and a scalar path; AccPack, widen, narrow
//
// Usage of the dispatch macro (the body may `return`; an unknown kind falls through):
//   PARA_DISPATCH_FLOATING(kind, T, return launch<T>(args...););
//   return cudaErrorInvalidValue;
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#define PARA_HD  __host__ __device__ __forceinline__
#define PARA_DEV __device__ __forceinline__
#ifdef __CUDACC__  // host compilers (the torch-facing .cpp files) do not know the pragma
#define PARA_UNROLL _Pragma("unroll")
#else
#define PARA_UNROLL
#endif

namespace para {

enum class ScalarKind : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

#define PARA_DISPATCH_FLOATING(kind, scalar_t, ...) \
  switch (kind) {                                   \
    case ::para::ScalarKind::f32: {                 \
      using scalar_t = float;                       \
      __VA_ARGS__                                   \
    } break;                                        \
    case ::para::ScalarKind::f64: {                 \
      using scalar_t = double;                      \
      __VA_ARGS__                                   \
    } break;                                        \
    case ::para::ScalarKind::f16: {                 \
      using scalar_t = __half;                      \
      __VA_ARGS__                                   \
    } break;                                        \
    case ::para::ScalarKind::bf16: {                \
      using scalar_t = __nv_bfloat16;               \
      __VA_ARGS__                                   \
    } break;                                        \
    default: break;                                 \
  }

// ---- accumulation type and conversions --------------------------------------------------

template <class T> struct AccTrait {
  using type = float;
};
template <> struct AccTrait<double> {
  using type = double;
};
template <class T> using AccT = typename AccTrait<T>::type;

PARA_HD float to_acc(float x) { return x; }
PARA_HD double to_acc(double x) { return x; }
PARA_HD float to_acc(__half x) { return __half2float(x); }
PARA_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Cvt<T>::from rounds an accumulator (float or double) once, straight to T.
template <class T> struct Cvt;
template <> struct Cvt<float> {
  static PARA_HD float from(float x) { return x; }
  static PARA_HD float from(double x) { return static_cast<float>(x); }
};
template <> struct Cvt<double> {
  static PARA_HD double from(float x) { return x; }
  static PARA_HD double from(double x) { return x; }
};
template <> struct Cvt<__half> {
  static PARA_HD __half from(float x) { return __float2half_rn(x); }
  static PARA_HD __half from(double x) { return __double2half(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static PARA_HD __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  static PARA_HD __nv_bfloat16 from(double x) { return __double2bfloat16(x); }
};
template <class T, class A> PARA_HD T from_acc(A x) { return Cvt<T>::from(x); }

// ---- 16-byte vector access ------------------------------------------------------------

template <class T> struct alignas(16) Pack {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};
template <class T> constexpr int kPack = Pack<T>::kN;

PARA_HD bool is_aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// True when every row r of a [rows, n] view with row stride `row_stride` (elements) starts
// on a 16-byte boundary, so rows can be read in whole packs (the last one may be partial).
template <class T> PARA_HD bool rows_vectorisable(const T* base, std::int64_t row_stride) {
  return is_aligned16(base) && (row_stride * static_cast<std::int64_t>(sizeof(T))) % 16 == 0;
}

// Whole pack at p: p must be 16-byte aligned (check with is_aligned16 / rows_vectorisable).
template <class T> PARA_DEV Pack<T> load_pack(const T* p) {
  Pack<T> out;
  *reinterpret_cast<uint4*>(out.v) = *reinterpret_cast<const uint4*>(p);
  return out;
}
template <class T> PARA_DEV void store_pack(T* p, const Pack<T>& in) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(in.v);
}

// The `n` (clamped to kPack) elements p[0], p[stride], ... as a pack, zero beyond n: one
// 16-byte load when stride == 1, the pack is whole and p is aligned; scalar loads otherwise
// (misaligned views, strided features, the tail of a row). The test is per call, so any
// view is read correctly and aligned contiguous rows take the vector path.
template <class T> PARA_DEV Pack<T> load_group(const T* p, std::int64_t stride, int n) {
  if (stride == 1 && n >= kPack<T> && is_aligned16(p)) return load_pack(p);
  Pack<T> out;
  PARA_UNROLL
  for (int i = 0; i < kPack<T>; ++i) out.v[i] = i < n ? p[i * stride] : from_acc<T>(0.0f);
  return out;
}
template <class T> PARA_DEV void store_group(T* p, std::int64_t stride, const Pack<T>& in, int n) {
  if (stride == 1 && n >= kPack<T> && is_aligned16(p)) {
    store_pack(p, in);
    return;
  }
  PARA_UNROLL
  for (int i = 0; i < kPack<T>; ++i)
    if (i < n) p[i * stride] = in.v[i];
}

// A pack widened to the accumulator, and back (rounded once).
template <class T> struct AccPack {
  AccT<T> v[kPack<T>];
};
template <class T> PARA_DEV AccPack<T> widen(const Pack<T>& p) {
  AccPack<T> a;
  PARA_UNROLL
  for (int i = 0; i < kPack<T>; ++i) a.v[i] = to_acc(p.v[i]);
  return a;
}
template <class T> PARA_DEV Pack<T> narrow(const AccPack<T>& a) {
  Pack<T> p;
  PARA_UNROLL
  for (int i = 0; i < kPack<T>; ++i) p.v[i] = from_acc<T>(a.v[i]);
  return p;
}

}  // namespace para
