// SiLU(GroupNorm(x)) for channels-last (NHWC) activations: the VAE's and the SDXL UNet's hot op.
//
// x [N, HW, C] (NHWC), G groups of C / G adjacent channels, weight / bias fp32 [C]. Three kernels:
//   stats    grid (splits, N * G): each block reduces a slice of the pixels of one (n, g) to a Welford
//            partial (count, mean, M2) in fp32, 128-bit loads (8 bf16 / fp16 or 4 fp32 per load);
//   finalize one thread per (n, g) merges its partials (Chan) into (mean, 1 / std);
//   apply    one thread per 128-bit vector: normalize, affine, SiLU, one rounding, 128-bit store.
// Large images (a 1024x1024 decode: a million pixels per group) use many splits, so every SM has work
// in the statistics pass: the "two-pass" variant; small ones use a single split.
// Requirements (checked by the caller): C / G and C multiples of the vector width, x / y 16-byte aligned.
#pragma once
#include "ff_vec.cuh"

namespace ff {

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

__device__ __forceinline__ Welford warp_merge(Welford w) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford o = {__shfl_down_sync(0xffffffffu, w.n, off), __shfl_down_sync(0xffffffffu, w.mean, off),
                 __shfl_down_sync(0xffffffffu, w.m2, off)};
    w = welford_merge(w, o);
  }
  return w;
}

// blockDim.x == 256
template <class L>
__device__ void groupnorm_stats(const typename L::T* __restrict__ x, float* __restrict__ partial, i64 hw, i64 c,
                                i64 groups, i64 splits) {
  const i64 ng = blockIdx.y, n = ng / groups, g = ng % groups, split = blockIdx.x;
  const i64 cpg = c / groups, per_pixel = cpg / L::VEC;
  const i64 pixels = (hw + splits - 1) / splits, p0 = split * pixels;
  const i64 p1 = p0 + pixels < hw ? p0 + pixels : hw;
  const typename L::T* base = x + (n * hw) * c + g * cpg;
  Welford acc = {0.f, 0.f, 0.f};
  for (i64 i = threadIdx.x; i < (p1 - p0) * per_pixel; i += blockDim.x) {
    const i64 p = p0 + i / per_pixel, v = i % per_pixel;
    Vec16 raw = *reinterpret_cast<const Vec16*>(base + p * c + v * L::VEC);  // 128-bit load
    float vals[L::VEC];
    unpack<L>(raw, vals);
    acc = welford_merge(acc, welford_of(vals, L::VEC));
  }
  __shared__ float sh[3][8];
  acc = warp_merge(acc);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sh[0][warp] = acc.n;
    sh[1][warp] = acc.mean;
    sh[2][warp] = acc.m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford total = {0.f, 0.f, 0.f};
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) total = welford_merge(total, Welford{sh[0][w], sh[1][w], sh[2][w]});
    float* out = partial + (ng * splits + split) * 3;
    out[0] = total.n;
    out[1] = total.mean;
    out[2] = total.m2;
  }
}

__device__ void groupnorm_finalize(const float* __restrict__ partial, float* __restrict__ stats, i64 rows, i64 splits,
                                   float eps) {
  const i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  Welford acc = {0.f, 0.f, 0.f};
  for (i64 s = 0; s < splits; ++s) {
    const float* p = partial + (row * splits + s) * 3;
    acc = welford_merge(acc, Welford{p[0], p[1], p[2]});
  }
  stats[row * 2] = acc.mean;
  stats[row * 2 + 1] = inv_std(acc, eps);
}

template <class L>
__device__ void groupnorm_apply(const typename L::T* __restrict__ x, typename L::T* __restrict__ y,
                                const float* __restrict__ weight, const float* __restrict__ bias,
                                const float* __restrict__ stats, i64 hw, i64 c, i64 groups) {
  const i64 vectors = hw * c / L::VEC;  // per image
  const i64 n = blockIdx.y;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += (i64)gridDim.x * blockDim.x) {
    const i64 offset = n * hw * c + i * L::VEC, c0 = (i * L::VEC) % c, g = c0 / (c / groups);
    const float mean = stats[(n * groups + g) * 2], rstd = stats[(n * groups + g) * 2 + 1];
    Vec16 raw = *reinterpret_cast<const Vec16*>(x + offset);  // 128-bit load
    float vals[L::VEC];
    unpack<L>(raw, vals);
    Vec16 out;
    typename L::T* o = reinterpret_cast<typename L::T*>(out.w);
#pragma unroll
    for (int k = 0; k < L::VEC; ++k) o[k] = L::store(silu((vals[k] - mean) * rstd * weight[c0 + k] + bias[c0 + k]));
    *reinterpret_cast<Vec16*>(y + offset) = out;  // 128-bit store
  }
}

#endif  // device code

}  // namespace ff

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// C entry points (NVRTC looks kernels up by these names; the launcher calls them directly).
#define FF_GROUPNORM_KERNELS(SUFFIX, LOADER)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) ff_groupnorm_stats_##SUFFIX(                                  \
      const LOADER::T* x, float* partial, ff::i64 hw, ff::i64 c, ff::i64 groups, ff::i64 splits) {               \
    ff::groupnorm_stats<LOADER>(x, partial, hw, c, groups, splits);                                               \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(256) ff_groupnorm_apply_##SUFFIX(                                  \
      const LOADER::T* x, LOADER::T* y, const float* weight, const float* bias, const float* stats, ff::i64 hw,   \
      ff::i64 c, ff::i64 groups) {                                                                                \
    ff::groupnorm_apply<LOADER>(x, y, weight, bias, stats, hw, c, groups);                                       \
  }

FF_GROUPNORM_KERNELS(f32, ff::LoadF32)
FF_GROUPNORM_KERNELS(f16, ff::LoadF16)
FF_GROUPNORM_KERNELS(bf16, ff::LoadBF16)

extern "C" __global__ void __launch_bounds__(256)
    ff_groupnorm_finalize(const float* partial, float* stats, ff::i64 rows, ff::i64 splits, float eps) {
  ff::groupnorm_finalize(partial, stats, rows, splits, eps);
}
#endif
