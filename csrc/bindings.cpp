// fastflow._C: a pybind11 module over the C-ABI launchers. It includes no torch header and links no
// torch library: tensors arrive as integer addresses (tensor.data_ptr()), streams as the integer
// handle of torch.cuda.current_stream().cuda_stream, so one build serves every torch version.
#include <pybind11/pybind11.h>

#include <cstdint>

extern "C" {
long long ff_groupnorm_silu_workspace_floats(long long n, long long groups, long long splits);
int ff_groupnorm_silu_nhwc(int dtype, const void* x, void* y, const float* weight, const float* bias, long long n,
                           long long hw, long long c, long long groups, long long splits, float eps, float* workspace,
                           void* stream);
int ff_fp8_quantize_per_token(int dtype, const void* x, void* q, float* scale, long long m, long long k, void* stream);
int ff_qk_norm_rope(int dtype, const void* qkv, void* q, void* k, void* v, const float* q_scale, const float* k_scale,
                    const float* cos, const float* sin, long long batch, long long tokens, long long heads,
                    long long head_dim, float eps, void* stream);
const char* ff_error_string(int code);
int ff_runtime_version();
int ff_device_count();
}

namespace py = pybind11;

template <class T>
static T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastflow CUDA C++ kernels (C ABI; no torch headers or libraries)";
  m.attr("ARCHS") = FF_ARCHS;  // the FASTFLOW_CUDA_ARCHS it was built for
  m.def("error_string", &ff_error_string);
  m.def("runtime_version", &ff_runtime_version);
  m.def("device_count", &ff_device_count);
  m.def("groupnorm_silu_workspace_floats", &ff_groupnorm_silu_workspace_floats);
  m.def(
      "groupnorm_silu_nhwc",
      [](int dtype, std::uintptr_t x, std::uintptr_t y, std::uintptr_t weight, std::uintptr_t bias, long long n,
         long long hw, long long c, long long groups, long long splits, float eps, std::uintptr_t workspace,
         std::uintptr_t stream) {
        py::gil_scoped_release release;
        return ff_groupnorm_silu_nhwc(dtype, ptr<const void>(x), ptr<void>(y), ptr<const float>(weight),
                                      ptr<const float>(bias), n, hw, c, groups, splits, eps, ptr<float>(workspace),
                                      ptr<void>(stream));
      },
      "SiLU(GroupNorm(x)) of NHWC x; returns a cudaError_t code (0: launched)");
  m.def(
      "fp8_quantize_per_token",
      [](int dtype, std::uintptr_t x, std::uintptr_t q, std::uintptr_t scale, long long m, long long k,
         std::uintptr_t stream) {
        py::gil_scoped_release release;
        return ff_fp8_quantize_per_token(dtype, ptr<const void>(x), ptr<void>(q), ptr<float>(scale), m, k,
                                         ptr<void>(stream));
      },
      "e4m3 codes and per-row fp32 scales of x [M, K]; returns a cudaError_t code (0: launched)");
  m.def(
      "qk_norm_rope",
      [](int dtype, std::uintptr_t qkv, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t q_scale,
         std::uintptr_t k_scale, std::uintptr_t cos, std::uintptr_t sin, long long batch, long long tokens,
         long long heads, long long head_dim, float eps, std::uintptr_t stream) {
        py::gil_scoped_release release;
        return ff_qk_norm_rope(dtype, ptr<const void>(qkv), ptr<void>(q), ptr<void>(k), ptr<void>(v),
                               ptr<const float>(q_scale), ptr<const float>(k_scale), ptr<const float>(cos),
                               ptr<const float>(sin), batch, tokens, heads, head_dim, eps, ptr<void>(stream));
      },
      "q, k, v [B, H, L, D] of qkv [B, L, 3HD]: RMSNorm (null scales: none) + RoPE (null tables: none)");
}
