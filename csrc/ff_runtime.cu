// Runtime facts the Python side asks the compiled module: error strings, the CUDA runtime version,
// the device count (0, with an error code, on a machine without a GPU).
#include "ff_launch.h"

extern "C" const char* ff_error_string(int code) {
  if (code == FF_BAD_ARGUMENT) return "fastflow: a size, dtype or layout the CUDA C++ kernel does not take";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

extern "C" int ff_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

extern "C" int ff_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
