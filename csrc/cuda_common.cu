// Library-wide entry points of pyseqpack._cuda (error strings).
#include "cuda_common.cuh"

PYSEQPACK_API const char* pyseqpack_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
