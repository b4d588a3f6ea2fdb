// fastflow CUDA C++: math shared by the kernels and the host tests.
//
// Every helper is FF_HD: __host__ __device__ under nvcc / NVRTC, plain inline C++ elsewhere, so a host
// test library (tests/csrc) runs the very code the kernels run and compares it with torch on a CPU.
// No CUDA or C++ standard headers are needed (NVRTC compiles these sources without include paths):
// half-precision, bfloat16 and float8 values are handled as bit patterns here.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#include <math.h>
#endif

namespace ff {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// dtype codes of the C ABI (fastflow/ops/cuda_cpp.py passes them)
enum DType { F32 = 0, F16 = 1, BF16 = 2 };

FF_HD u32 f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  union { float f; u32 u; } v;
  v.f = x;
  return v.u;
#endif
}

FF_HD float bits_f32(u32 u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  union { u32 u; float f; } v;
  v.u = u;
  return v.f;
#endif
}

// bfloat16: the top half of an fp32; rounding to nearest even, NaN kept quiet.
FF_HD float bf16_to_f32(u16 h) { return bits_f32((u32)h << 16); }

FF_HD u16 f32_to_bf16(float x) {
  u32 u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

// IEEE half: decoded exactly (subnormals included); encoded with rounding to nearest even, overflow to inf.
FF_HD float f16_to_f32(u16 h) {
  u32 sign = (u32)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {                                                       // zero / subnormal: man * 2^-24
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

FF_HD u16 f32_to_f16(float x) {
  u32 u = f32_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (u16)(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return (u16)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                // below 2^-14: a subnormal half (or zero)
    if (a < 0x33000000u) return (u16)sign;              // below 2^-25: rounds to zero
    u32 man = (a & 0x7fffffu) | 0x800000u, shift = 126u - (a >> 23);  // value = man * 2^(e-150)
    u32 q = man >> shift, rest = man & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += (rest > half || (rest == half && (q & 1u))) ? 1u : 0u;
    return (u16)(sign | q);
  }
  u32 r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias the exponent, round to nearest even
  return (u16)(sign | (r >> 13));
}

// float8 e4m3fn (no inf; max 448; NaN = 0x7f): encoded with rounding to nearest even from a value
// already clamped to [-448, 448] (as the quantizer clamps); NaN stays NaN.
FF_HD u8 f32_to_e4m3(float x) {
  u32 u = f32_bits(x), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (u8)(sign | 0x7fu);
  if (a >= 0x43e00000u) return (u8)(sign | 0x7eu);  // >= 448: the largest finite
  if (a < 0x3c800000u) {                            // below 2^-6: subnormal, multiples of 2^-9
    float v = bits_f32(a) * 512.0f;                 // exact: v in [0, 8)
    u32 q = (u32)v;
    float rest = v - (float)q;
    q += (rest > 0.5f || (rest == 0.5f && (q & 1u))) ? 1u : 0u;
    return (u8)(sign | q);
  }
  u32 r = a + 0x7ffffu + ((a >> 20) & 1u) - 0x3c000000u;  // exponent bias 127 -> 7, 3 mantissa bits
  return (u8)(sign | (r >> 20));
}

FF_HD float e4m3_to_f32(u8 q) {
  u32 sign = (u32)(q & 0x80u) << 24, exp = (q >> 3) & 0xfu, man = q & 0x7u;
  if (exp == 0xf && man == 0x7) return bits_f32(sign | 0x7fc00000u);
  if (exp == 0) {
    float v = (float)man * 0.001953125f;  // man * 2^-9
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 120u) << 23) | (man << 20));
}

// Welford / Chan: count, mean and the sum of squared deviations of a set, merged pairwise without
// the cancellation of sum(x^2) - n mean^2.
struct Welford {
  float n, mean, m2;
};

FF_HD Welford welford_of(const float* v, int count) {  // a small chunk: two passes in registers
  float s = 0.f;
  for (int i = 0; i < count; ++i) s += v[i];
  float mean = s / (float)count, m2 = 0.f;
  for (int i = 0; i < count; ++i) m2 += (v[i] - mean) * (v[i] - mean);
  Welford w = {(float)count, mean, m2};
  return w;
}

FF_HD Welford welford_merge(Welford a, Welford b) {
  float n = a.n + b.n;
  if (n == 0.f) return a;
  float d = b.mean - a.mean, fb = b.n / n;
  Welford r = {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
  return r;
}

// 1 / sqrt(variance + eps) with IEEE sqrt and division (no rsqrt approximation), as torch computes it.
FF_HD float inv_std(Welford w, float eps) { return 1.0f / sqrtf(w.m2 / w.n + eps); }

FF_HD float silu(float x) { return x / (1.0f + expf(-x)); }

// Products and sums rounded one at a time: a * b + c * d never contracted into an FMA, so the GPU
// gives the bits of the references (torch evaluates each product and the sum separately).
FF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// FLUX RoPE of the interleaved pair (x0, x1) by the angle of (c, s): (x0 c - x1 s, x1 c + x0 s).
FF_HD void rope_pair(float x0, float x1, float c, float s, float* y0, float* y1) {
  *y0 = add_rn(mul_rn(x0, c), mul_rn(x1, -s));
  *y1 = add_rn(mul_rn(x1, c), mul_rn(x0, s));
}

// RMSNorm's factor 1 / sqrt(mean(x^2) + eps) from the sum of squares of d values.
FF_HD float rms_factor(float sum_squares, int d, float eps) { return 1.0f / sqrtf(sum_squares / (float)d + eps); }

}  // namespace ff
