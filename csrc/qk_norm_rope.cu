// C-ABI launcher of the q / k RMSNorm + RoPE split of a fused qkv projection (kernels: qk_norm_rope.cuh).
#include "ff_launch.h"
#include "qk_norm_rope.cuh"

extern "C" int ff_qk_norm_rope(int dtype, const void* qkv, void* q, void* k, void* v, const float* q_scale,
                               const float* k_scale, const float* cos, const float* sin, long long batch,
                               long long tokens, long long heads, long long head_dim, float eps, void* stream) {
  if (batch <= 0 || tokens <= 0 || heads <= 0 || (q_scale == nullptr) != (k_scale == nullptr)) return FF_BAD_ARGUMENT;
  if ((cos == nullptr) != (sin == nullptr)) return FF_BAD_ARGUMENT;
  const long long warps = batch * tokens * heads;
  const dim3 grid((unsigned)((warps * 32 + 255) / 256), 3);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define FF_LAUNCH(SUFFIX, T, E)                                                                                     \
  ff_qk_norm_rope_##SUFFIX##_d##E<<<grid, 256, 0, s>>>(static_cast<const T*>(qkv), static_cast<T*>(q),            \
                                                       static_cast<T*>(k), static_cast<T*>(v), q_scale, k_scale,   \
                                                       cos, sin, batch, tokens, heads, eps)
#define FF_DTYPES(E)                       \
  switch (dtype) {                         \
    case ff::F32:                          \
      FF_LAUNCH(f32, float, E);            \
      break;                               \
    case ff::F16:                          \
      FF_LAUNCH(f16, ff::u16, E);          \
      break;                               \
    case ff::BF16:                         \
      FF_LAUNCH(bf16, ff::u16, E);         \
      break;                               \
    default:                               \
      return FF_BAD_ARGUMENT;              \
  }
  switch (head_dim) {
    case 64:
      FF_DTYPES(2) break;
    case 128:
      FF_DTYPES(4) break;
    case 256:
      FF_DTYPES(8) break;
    default:
      return FF_BAD_ARGUMENT;
  }
#undef FF_DTYPES
#undef FF_LAUNCH
  return (int)cudaGetLastError();
}
