// C-ABI launcher of the per-token FP8 quantization (kernels: fp8_quantize.cuh).
#include "ff_launch.h"
#include "fp8_quantize.cuh"

extern "C" int ff_fp8_quantize_per_token(int dtype, const void* x, void* q, float* scale, long long m, long long k,
                                         void* stream) {
  const int vec = dtype == ff::F32 ? 4 : 8;
  if (m <= 0 || k <= 0 || k % vec || m > 2147483647LL) return FF_BAD_ARGUMENT;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  ff::u8* codes = static_cast<ff::u8*>(q);
  switch (dtype) {
    case ff::F32:
      ff_fp8_quantize_per_token_f32<<<(unsigned)m, 256, 0, s>>>(static_cast<const float*>(x), codes, scale, k);
      break;
    case ff::F16:
      ff_fp8_quantize_per_token_f16<<<(unsigned)m, 256, 0, s>>>(static_cast<const ff::u16*>(x), codes, scale, k);
      break;
    case ff::BF16:
      ff_fp8_quantize_per_token_bf16<<<(unsigned)m, 256, 0, s>>>(static_cast<const ff::u16*>(x), codes, scale, k);
      break;
    default:
      return FF_BAD_ARGUMENT;
  }
  return (int)cudaGetLastError();
}
