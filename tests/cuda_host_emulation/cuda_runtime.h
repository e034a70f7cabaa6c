// Host emulation of the few CUDA pieces pyseqpack's kernels use, for tests/test_pad_shift_mask_cuda_emulated.py.
//
// The test compiles csrc/pad_shift_mask.cu and csrc/cuda_common.cu with a host C++ compiler (g++ -x c++), this
// directory first on the include path, so `#include <cuda_runtime.h>` (csrc/cuda_common.cuh) lands here instead
// of the CUDA toolkit. The one construct no C++ compiler takes, a launch
// `kernel<<<grid, block, shared, stream>>>(args);`, is rewritten by the test (in a copy) into
//     pyseqpack_emu::launch(LAUNCH_BOUND, grid, block, shared, stream, [&] { kernel(args); });
// (LAUNCH_BOUND: the kernel's __launch_bounds__, 1024 without one; shared and stream may be left out)
// which checks the launch geometry against the hardware's limits (a launch the GPU would refuse records the
// error cudaGetLastError() then returns, as the real runtime does) and runs every thread of the grid, one after
// the other, on the calling thread. That is exact for kernels whose threads never talk to each other: no shared
// memory, no __syncthreads, no warp intrinsics, no atomics. This header declares none of those, so a kernel that
// starts using them no longer compiles here, instead of being emulated wrongly.
//
// emulation.cpp (compiled beside) holds the state below and exports it to the test with a C ABI.
#pragma once

#if defined(__CUDACC__)
#error "tests/cuda_host_emulation emulates CUDA on the host: compile with a host C++ compiler, not nvcc"
#endif

#include <cstddef>
#include <cstdint>

// ---- qualifiers: plain host C++ ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // the test passes the kernel's bound to pyseqpack_emu::launch instead

// ---- built-in types and variables ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// The running thread's coordinates, set by pyseqpack_emu::launch before each thread's body runs.
extern thread_local uint3 blockIdx, threadIdx;
extern thread_local dim3 blockDim, gridDim;

// Read-only data cache load: a plain load on the host.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// ---- runtime API ------------------------------------------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;

// The values of the real enum (driver_types.h), for the codes this emulation can produce.
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
};
typedef enum cudaError cudaError_t;

// The last launch error of the calling thread, then reset to cudaSuccess (as the real one).
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);
// Sets *version to 0: no CUDA runtime here.
cudaError_t cudaRuntimeGetVersion(int* version);

// ---- the emulated launch ------------------------------------------------------------------------------------
namespace pyseqpack_emu {

// Checks one launch's geometry against the hardware limits (compute capability 8.0 / 9.0) and the kernel's
// __launch_bounds__ (max_threads), and this project's rule of whole warps per block. Records the launch for the
// test. On a violation: records the error (cudaGetLastError) and why (pyseqpack_emu_violation), returns false.
bool admit(unsigned max_threads, dim3 grid, dim3 block, size_t shared_bytes);
// Whether blocks run in reverse order (set by the test): a result that depends on the order is a write race.
bool reverse_order();
// Adds to the count of threads run (pyseqpack_emu_stats).
void count_threads(uint64_t n);

template <typename Body>
void launch(unsigned max_threads, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t /*stream*/,
            Body&& body) {
  if (!admit(max_threads, grid, block, shared_bytes)) return;
  gridDim = grid;
  blockDim = block;
  const bool reverse = reverse_order();
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z, threads = uint64_t{block.x} * block.y * block.z;
  for (uint64_t nb = 0; nb < blocks; ++nb) {
    const uint64_t b = reverse ? blocks - 1 - nb : nb;
    blockIdx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                     static_cast<unsigned>(b / grid.x / grid.y)};
    for (uint64_t nt = 0; nt < threads; ++nt) {
      const uint64_t t = reverse ? threads - 1 - nt : nt;
      threadIdx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                        static_cast<unsigned>(t / block.x / block.y)};
      body();
    }
  }
  count_threads(blocks * threads);
}

// The shorter launch configurations: <<<grid, block>>> and <<<grid, block, shared>>>.
template <typename Body>
void launch(unsigned max_threads, dim3 grid, dim3 block, Body&& body) {
  launch(max_threads, grid, block, 0, nullptr, body);
}
template <typename Body>
void launch(unsigned max_threads, dim3 grid, dim3 block, size_t shared_bytes, Body&& body) {
  launch(max_threads, grid, block, shared_bytes, nullptr, body);
}

}  // namespace pyseqpack_emu
