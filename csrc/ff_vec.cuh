// Storage types of the kernels (fp32, fp16, bf16 as bit patterns) and their 128-bit vectors.
#pragma once
#include "ff_common.cuh"

namespace ff {

struct LoadF32 {
  typedef float T;
  static const int VEC = 4;
  static FF_HD float load(T v) { return v; }
  static FF_HD T store(float v) { return v; }
};
struct LoadF16 {
  typedef u16 T;
  static const int VEC = 8;
  static FF_HD float load(T v) { return f16_to_f32(v); }
  static FF_HD T store(float v) { return f32_to_f16(v); }
};
struct LoadBF16 {
  typedef u16 T;
  static const int VEC = 8;
  static FF_HD float load(T v) { return bf16_to_f32(v); }
  static FF_HD T store(float v) { return f32_to_bf16(v); }
};

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

struct alignas(16) Vec16 {
  u32 w[4];
};

template <class L>
__device__ __forceinline__ void unpack(const Vec16& v, float* out) {
  const typename L::T* e = reinterpret_cast<const typename L::T*>(v.w);
#pragma unroll
  for (int i = 0; i < L::VEC; ++i) out[i] = L::load(e[i]);
}

#endif  // device code

}  // namespace ff
