// Attention inputs from a fused projection: per-head RMSNorm of q and k (learnable scale) and FLUX's
// interleaved-pair RoPE, in fp32 with one rounding: fastflow.ops.reference.qk_norm_rope_ref.
//
// qkv [B, L, 3 H D] (all of q, then k, then v) -> q, k, v [B, H, L, D] contiguous. One warp per
// (token, head, which of q / k / v): each lane holds D / 32 adjacent values (a pair-aligned
// vector: 64-bit loads for D = 128 in bf16), the sum of squares is a warp reduction, and the RoPE
// pairs never cross lanes. Scales fp32 [D] (null: no norm), cos / sin fp32 [L, D / 2] (null: no RoPE).
// Requirements (checked by the caller): D in {64, 128, 256}, 16-byte aligned tensors.
#pragma once
#include "ff_vec.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
namespace ff {

// E values of T as one aligned vector (E * sizeof(T) bytes: 64-bit for 4 bf16, 128-bit for 8)
template <class T, int E>
struct alignas(E * sizeof(T) < 16 ? E * sizeof(T) : 16) Pack {
  T v[E];
};

template <class L, int E>  // E = D / 32 values per lane
__device__ void qk_norm_rope_warp(const typename L::T* __restrict__ qkv, typename L::T* __restrict__ q_out,
                                  typename L::T* __restrict__ k_out, typename L::T* __restrict__ v_out,
                                  const float* __restrict__ q_scale, const float* __restrict__ k_scale,
                                  const float* __restrict__ cos, const float* __restrict__ sin, i64 batch, i64 tokens,
                                  i64 heads, float eps) {
  const int d = 32 * E, lane = threadIdx.x % 32;
  const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;  // over (b, l, h)
  const int which = blockIdx.y;                                        // 0 q, 1 k, 2 v
  if (warp >= batch * tokens * heads) return;
  const i64 h = warp % heads, l = (warp / heads) % tokens, b = warp / (heads * tokens);
  const typename L::T* in = qkv + (b * tokens + l) * 3 * heads * d + which * heads * d + h * d + lane * E;
  typename L::T* out = (which == 0 ? q_out : which == 1 ? k_out : v_out) + ((b * heads + h) * tokens + l) * d + lane * E;
  Pack<typename L::T, E> raw = *reinterpret_cast<const Pack<typename L::T, E>*>(in);  // one vector load
  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] = L::load(raw.v[i]);
  const float* scale = which == 0 ? q_scale : which == 1 ? k_scale : nullptr;
  if (scale != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) ss += x[i] * x[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const float r = rms_factor(ss, d, eps);
    const Pack<float, E> w = *reinterpret_cast<const Pack<float, E>*>(scale + lane * E);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = mul_rn(mul_rn(x[i], r), w.v[i]);
  }
  if (cos != nullptr && which < 2) {
    const Pack<float, E / 2> c = *reinterpret_cast<const Pack<float, E / 2>*>(cos + l * (d / 2) + lane * (E / 2));
    const Pack<float, E / 2> s = *reinterpret_cast<const Pack<float, E / 2>*>(sin + l * (d / 2) + lane * (E / 2));
#pragma unroll
    for (int j = 0; j < E / 2; ++j) rope_pair(x[2 * j], x[2 * j + 1], c.v[j], s.v[j], &x[2 * j], &x[2 * j + 1]);
  }
#pragma unroll
  for (int i = 0; i < E; ++i) raw.v[i] = L::store(x[i]);
  *reinterpret_cast<Pack<typename L::T, E>*>(out) = raw;  // one vector store
}

}  // namespace ff

#define FF_QK_KERNEL(SUFFIX, LOADER, E)                                                                          \
  extern "C" __global__ void __launch_bounds__(256) ff_qk_norm_rope_##SUFFIX##_d##E(                             \
      const LOADER::T* qkv, LOADER::T* q, LOADER::T* k, LOADER::T* v, const float* q_scale, const float* k_scale, \
      const float* cos, const float* sin, ff::i64 batch, ff::i64 tokens, ff::i64 heads, float eps) {             \
    ff::qk_norm_rope_warp<LOADER, E>(qkv, q, k, v, q_scale, k_scale, cos, sin, batch, tokens, heads, eps);       \
  }
#define FF_QK_KERNELS(E)                 \
  FF_QK_KERNEL(f32, ff::LoadF32, E)      \
  FF_QK_KERNEL(f16, ff::LoadF16, E)      \
  FF_QK_KERNEL(bf16, ff::LoadBF16, E)
FF_QK_KERNELS(2)
FF_QK_KERNELS(4)
FF_QK_KERNELS(8)
#endif
