// C wrappers over csrc/'s __host__ __device__ helpers, compiled for the host (g++, or nvcc as CUDA)
// and loaded with ctypes by test_host_helpers.py, which compares them with torch on the CPU.
#include "fp8_quantize.cuh"
#include "groupnorm_silu.cuh"

using namespace ff;

extern "C" {

void t_f32_to_bf16(const float* x, u16* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}
void t_bf16_to_f32(const u16* x, float* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = bf16_to_f32(x[i]);
}
void t_f32_to_f16(const float* x, u16* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = f32_to_f16(x[i]);
}
void t_f16_to_f32(const u16* x, float* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = f16_to_f32(x[i]);
}
void t_f32_to_e4m3(const float* x, u8* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = f32_to_e4m3(x[i]);
}
void t_e4m3_to_f32(const u8* x, float* out, i64 n) {
  for (i64 i = 0; i < n; ++i) out[i] = e4m3_to_f32(x[i]);
}

// Statistics as the kernel forms them: Welford of VEC-wide chunks, merged in a stride-`threads`
// pattern per thread, then across threads (pairwise, like the shuffle tree), then across splits.
void t_welford(const float* x, i64 n, int vec, int threads, int splits, float* mean_var) {
  const i64 per_split = (n / vec + splits - 1) / splits;
  Welford total = {0.f, 0.f, 0.f};
  for (int s = 0; s < splits; ++s) {
    const i64 c0 = s * per_split, c1 = (c0 + per_split) * vec > n ? n / vec : c0 + per_split;
    Welford lanes[1024];
    for (int t = 0; t < threads; ++t) lanes[t] = Welford{0.f, 0.f, 0.f};
    for (i64 c = c0; c < c1; ++c) {
      Welford& w = lanes[(c - c0) % threads];
      w = welford_merge(w, welford_of(x + c * vec, vec));
    }
    for (int width = threads / 2; width > 0; width /= 2)
      for (int t = 0; t < width; ++t) lanes[t] = welford_merge(lanes[t], lanes[t + width]);
    total = welford_merge(total, lanes[0]);
  }
  mean_var[0] = total.mean;
  mean_var[1] = total.m2 / total.n;
  mean_var[2] = inv_std(total, 1e-6f);
}

// The apply pass's per-element math: SiLU((x - mean) * rstd * w + b), rounded as the kernel stores it.
void t_norm_silu(int dtype, const float* x, const float* wb, float mean, float rstd, i64 n, float* out) {
  for (i64 i = 0; i < n; ++i) {
    float y = silu((x[i] - mean) * rstd * wb[0] + wb[1]);
    out[i] = dtype == BF16 ? bf16_to_f32(f32_to_bf16(y)) : dtype == F16 ? f16_to_f32(f32_to_f16(y)) : y;
  }
}

// The per-token quantizer's row math: amax, (inv, scale), codes; x [m, k] fp32 values.
void t_fp8_quantize(const float* x, i64 m, i64 k, u8* q, float* scale) {
  for (i64 r = 0; r < m; ++r) {
    float amax = 0.f;
    for (i64 i = 0; i < k; ++i) amax = fp8_amax_step(amax, x[r * k + i]);
    const float inv = fp8_inv_scale(amax);
    scale[r] = fp8_scale(amax);
    for (i64 i = 0; i < k; ++i) q[r * k + i] = fp8_code(x[r * k + i], inv);
  }
}

// RoPE of interleaved pairs and the RMSNorm factor, as the qk_norm_rope kernel applies them.
void t_rope(const float* x, const float* cos, const float* sin, i64 pairs, float* out) {
  for (i64 j = 0; j < pairs; ++j) rope_pair(x[2 * j], x[2 * j + 1], cos[j], sin[j], &out[2 * j], &out[2 * j + 1]);
}
void t_rms_norm(const float* x, const float* scale, int d, i64 rows, float eps, float* out) {
  for (i64 r = 0; r < rows; ++r) {
    float ss = 0.f;
    for (int i = 0; i < d; ++i) ss += x[r * d + i] * x[r * d + i];
    const float f = rms_factor(ss, d, eps);
    for (int i = 0; i < d; ++i) out[r * d + i] = mul_rn(mul_rn(x[r * d + i], f), scale[i]);
  }
}
}
