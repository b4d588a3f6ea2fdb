// FP8 (e4m3) quantization of activations per token: amax, scale and cast in one kernel.
//
// x [M, K] fp32 / fp16 / bf16 -> q [M, K] e4m3 codes, scale [M] fp32 with x ~= q * scale:
// amax = max |x_row| (at least 1e-12), scale = amax / 448 and inv = 448 / amax (IEEE divisions),
// q = e4m3(clamp(x * inv, -448, 448)) rounded to nearest even: fastflow.ops.reference.fp8_quantize_ref.
// NaN and Inf propagate as there: the amax is a NaN-propagating max (fmaxf would drop a NaN and give
// the row a finite scale), so a row holding NaN gets a NaN scale and NaN codes; an Inf gives
// scale Inf and codes 0 (x * 0) or NaN (Inf * 0). The clamp keeps NaN (its comparisons are false).
// One block of 256 threads per row: the amax pass reads the row with 128-bit loads, the cast pass
// reads it again (from L1 / L2) and stores 4 or 8 codes per thread per vector.
// Requirements (checked by the caller): K a multiple of the vector width, x 16-byte aligned.
#pragma once
#include "ff_common.cuh"
#include "ff_vec.cuh"

namespace ff {

// max(a, |v|) keeping NaN from either side, as torch's amax / clamp do.
FF_HD float fp8_amax_step(float a, float v) {
  v = fabsf(v);
  return a != a ? a : ((v > a || v != v) ? v : a);
}
FF_HD float fp8_amax_floor(float amax) { return amax < 1e-12f ? 1e-12f : amax; }  // NaN stays NaN
FF_HD float fp8_inv_scale(float amax) { return 448.0f / fp8_amax_floor(amax); }
FF_HD float fp8_scale(float amax) { return fp8_amax_floor(amax) / 448.0f; }
FF_HD u8 fp8_code(float x, float inv) {
  float v = x * inv;
  v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v);
  return f32_to_e4m3(v);
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

template <class L>
__device__ void fp8_quantize_row(const typename L::T* __restrict__ x, u8* __restrict__ q, float* __restrict__ scale,
                                 i64 k) {
  const i64 row = blockIdx.x;
  const typename L::T* in = x + row * k;
  u8* out = q + row * k;
  const i64 vectors = k / L::VEC;
  float amax = 0.f;
  for (i64 i = threadIdx.x; i < vectors; i += blockDim.x) {
    Vec16 raw = *reinterpret_cast<const Vec16*>(in + i * L::VEC);  // 128-bit load
    float vals[L::VEC];
    unpack<L>(raw, vals);
#pragma unroll
    for (int j = 0; j < L::VEC; ++j) amax = fp8_amax_step(amax, vals[j]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fp8_amax_step(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  __shared__ float warps[8];
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warps[0];
  for (int w = 1; w < (int)(blockDim.x / 32); ++w) amax = fp8_amax_step(amax, warps[w]);
  const float inv = fp8_inv_scale(amax);
  if (threadIdx.x == 0) scale[row] = fp8_scale(amax);
  for (i64 i = threadIdx.x; i < vectors; i += blockDim.x) {
    Vec16 raw = *reinterpret_cast<const Vec16*>(in + i * L::VEC);
    float vals[L::VEC];
    unpack<L>(raw, vals);
    u32 packed[L::VEC / 4];
#pragma unroll
    for (int j = 0; j < L::VEC / 4; ++j)
      packed[j] = (u32)fp8_code(vals[4 * j], inv) | ((u32)fp8_code(vals[4 * j + 1], inv) << 8) |
                  ((u32)fp8_code(vals[4 * j + 2], inv) << 16) | ((u32)fp8_code(vals[4 * j + 3], inv) << 24);
#pragma unroll
    for (int j = 0; j < L::VEC / 4; ++j) reinterpret_cast<u32*>(out + i * L::VEC)[j] = packed[j];
  }
}

#endif  // device code

}  // namespace ff

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FF_FP8_KERNEL(SUFFIX, LOADER)                                                                            \
  extern "C" __global__ void __launch_bounds__(256)                                                              \
      ff_fp8_quantize_per_token_##SUFFIX(const LOADER::T* x, ff::u8* q, float* scale, ff::i64 k) {              \
    ff::fp8_quantize_row<LOADER>(x, q, scale, k);                                                                \
  }
FF_FP8_KERNEL(f32, ff::LoadF32)
FF_FP8_KERNEL(f16, ff::LoadF16)
FF_FP8_KERNEL(bf16, ff::LoadBF16)
#endif
