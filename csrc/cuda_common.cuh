// Shared helpers for pyseqpack's CUDA kernels. The library has a C ABI (loaded with ctypes): each entry
// point takes raw device pointers, sizes, strides and a cudaStream_t, and returns a cudaError_t as int
// (0 = success) so Python can raise a clear error; pyseqpack_cuda_error_string() turns it into text.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#define PYSEQPACK_API extern "C" __attribute__((visibility("default")))
