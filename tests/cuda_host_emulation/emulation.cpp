// State of the host CUDA emulation (cuda_runtime.h beside), and its C ABI for the test.
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#define EMU_API extern "C" __attribute__((visibility("default")))

thread_local uint3 blockIdx{0, 0, 0}, threadIdx{0, 0, 0};
thread_local dim3 blockDim, gridDim;

namespace {

thread_local cudaError_t last_error = cudaSuccess;
thread_local bool reverse = false;
thread_local std::string violation;  // why the last refused launch was refused
thread_local int64_t launches = 0;   // admitted launches since the last reset
thread_local int64_t threads_run = 0;
thread_local int64_t last_launch[8] = {};  // grid x y z, block x y z, shared bytes, launch bound

bool refuse(cudaError_t err, const char* what, dim3 grid, dim3 block) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s (grid (%u, %u, %u), block (%u, %u, %u))", what, grid.x, grid.y, grid.z,
                block.x, block.y, block.z);
  violation = buf;
  last_error = err;
  return false;
}

}  // namespace

namespace pyseqpack_emu {

bool admit(unsigned max_threads, dim3 grid, dim3 block, size_t shared_bytes) {
  // Hardware limits of compute capability 8.0 and 9.0 (the architectures setup.py builds for).
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
    return refuse(cudaErrorInvalidConfiguration, "hardware limit: a grid or block dimension is 0", grid, block);
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    return refuse(cudaErrorInvalidConfiguration, "hardware limit: grid dimensions above (2^31 - 1, 65535, 65535)",
                  grid, block);
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x > 1024u || block.y > 1024u || block.z > 64u || threads > 1024u)
    return refuse(cudaErrorInvalidConfiguration, "hardware limit: more than 1024 threads per block (or a block "
                  "dimension above (1024, 1024, 64))", grid, block);
  if (shared_bytes > 48u * 1024u)
    return refuse(cudaErrorInvalidValue, "hardware limit: more than 48 KiB of dynamic shared memory without opt-in",
                  grid, block);
  if (threads > max_threads)
    return refuse(cudaErrorLaunchOutOfResources, "the block has more threads than the kernel's __launch_bounds__",
                  grid, block);
  // pyseqpack's own rule: blocks are whole warps (a partial warp wastes lanes and breaks coalescing).
  if (threads % 32 != 0)
    return refuse(cudaErrorInvalidConfiguration, "pyseqpack rule: a block of a partial warp", grid, block);
  ++launches;
  const int64_t rec[8] = {grid.x, grid.y, grid.z, block.x, block.y, block.z, static_cast<int64_t>(shared_bytes),
                          max_threads};
  for (int i = 0; i < 8; ++i) last_launch[i] = rec[i];
  return true;
}

bool reverse_order() { return reverse; }

void count_threads(uint64_t n) { threads_run += static_cast<int64_t>(n); }

}  // namespace pyseqpack_emu

cudaError_t cudaGetLastError() {
  const cudaError_t err = last_error;
  last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {  // the real runtime's strings
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
  }
  return "unrecognized error code";
}

cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 0;
  return cudaSuccess;
}

// ---- C ABI for the test -------------------------------------------------------------------------------------

// Clears the counters, the last launch, the violation and the sticky error; `reverse_blocks`: run the blocks
// (and the threads of each block) of later launches in reverse order.
EMU_API void pyseqpack_emu_reset(int reverse_blocks) {
  reverse = reverse_blocks != 0;
  violation.clear();
  last_error = cudaSuccess;
  launches = threads_run = 0;
  for (int64_t& v : last_launch) v = 0;
}

// Admitted launches and threads run since the reset; out[0..7] = the last admitted launch's grid x y z, block
// x y z, dynamic shared bytes and launch bound.
EMU_API int64_t pyseqpack_emu_stats(int64_t* threads, int64_t* out) {
  *threads = threads_run;
  for (int i = 0; i < 8; ++i) out[i] = last_launch[i];
  return launches;
}

// Why the last refused launch was refused ("" if none was).
EMU_API const char* pyseqpack_emu_violation() { return violation.c_str(); }
