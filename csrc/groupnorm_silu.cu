// C-ABI launcher of SiLU(GroupNorm(x)) for NHWC activations (kernels: groupnorm_silu.cuh).
#include "ff_launch.h"
#include "groupnorm_silu.cuh"

extern "C" long long ff_groupnorm_silu_workspace_floats(long long n, long long groups, long long splits) {
  return n * groups * (splits * 3 + 2);  // partials, then (mean, 1 / std) per (n, g)
}

extern "C" int ff_groupnorm_silu_nhwc(int dtype, const void* x, void* y, const float* weight, const float* bias,
                                      long long n, long long hw, long long c, long long groups, long long splits,
                                      float eps, float* workspace, void* stream) {
  if (n <= 0 || hw <= 0 || c <= 0 || groups <= 0 || c % groups || splits <= 0) return FF_BAD_ARGUMENT;
  const int vec = dtype == ff::F32 ? 4 : 8;
  if ((c / groups) % vec) return FF_BAD_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* partial = workspace;
  float* stats = workspace + n * groups * splits * 3;
  const dim3 stats_grid((unsigned)splits, (unsigned)(n * groups));
  const long long vectors = hw * c / vec;
  const dim3 apply_grid((unsigned)((vectors + 255) / 256 < 65535 ? (vectors + 255) / 256 : 65535), (unsigned)n);
  const unsigned rows = (unsigned)((n * groups + 255) / 256);
  switch (dtype) {
#define FF_CASE(CODE, SUFFIX, T)                                                                                 \
  case CODE:                                                                                                      \
    ff_groupnorm_stats_##SUFFIX<<<stats_grid, 256, 0, s>>>(static_cast<const T*>(x), partial, hw, c, groups,     \
                                                           splits);                                              \
    ff_groupnorm_finalize<<<rows, 256, 0, s>>>(partial, stats, n * groups, splits, eps);                         \
    ff_groupnorm_apply_##SUFFIX<<<apply_grid, 256, 0, s>>>(static_cast<const T*>(x), static_cast<T*>(y), weight, \
                                                           bias, stats, hw, c, groups);                          \
    break;
    FF_CASE(ff::F32, f32, float)
    FF_CASE(ff::F16, f16, ff::u16)
    FF_CASE(ff::BF16, bf16, ff::u16)
#undef FF_CASE
    default:
      return FF_BAD_ARGUMENT;
  }
  return (int)cudaGetLastError();
}
