// Library-wide entry points of pyseqpack._cuda (version and error strings).
#include "cuda_common.cuh"

PYSEQPACK_API const char* pyseqpack_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

PYSEQPACK_API int pyseqpack_cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}
