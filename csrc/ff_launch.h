// What every C-ABI launcher shares: the error codes it returns besides cudaError_t values.
#pragma once
#include <cuda_runtime.h>

#define FF_BAD_ARGUMENT (-1)  // a size or dtype the kernel does not take (the Python side checks first)
