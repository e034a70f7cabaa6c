// Fused cross-entropy on CUDA: per-row loss, log-sum-exp, token accuracy and (optionally) the gradient.
// The CUDA backend of pyseqpack.cross_entropy; pyseqpack/cross_entropy/cuda.py calls the two C entry points
// at the bottom of this file through ctypes. Semantics: docs/semantics.md, "Cross-entropy, as pyseqpack
// defines it".
//
// Math, for one row in fp32, with x the row after the optional softcap (x <- c * tanh(x_raw / c)):
//   lse     = log(sum_j exp(x_j))
//   loss    = (1 - eps) * (lse - x_y) + eps * (lse - mean(x)) + z * lse^2        (0 for an ignored row)
//   correct = valid(y) && argmax(x) == y, the first index winning ties (as torch.argmax)
//   grad_j  = scale * [(1 - eps) * (p_j - [j == y]) + eps * (p_j - 1/V) + 2 z lse p_j] * chain_j
//           = scale * [p_j * (1 + 2 z lse) - eps / V - (1 - eps) [j == y]] * chain_j
//   with p = softmax(x) = exp(x - lse) and chain_j = 1 - tanh^2(x_raw_j / c) (1 without softcap);
//   an ignored row (y == ignore_index, or y outside [0, V)) gets an all-zero gradient row.
//
// Two passes over each row of V elements of size s bytes:
//   pass 1: online max / sum-exp (a running max m and sum(exp(x - m)) per thread, rescaled when m grows),
//           the first argmax and sum(x), merged across threads with warp shuffles and shared memory.
//           Loss only (correct == NULL): the kernel is instantiated with ACC = false, whose statistics
//           have no argmax at all (no index compare per element, no index shuffles or merges); loss, lse and
//           grad come out the same.
//   pass 2: only with a gradient: writes grad (V s bytes) from the row kept in shared memory by pass 1.
// The DRAM floor of the op is one read of the logits and one write of the gradient, 2 V s bytes per row.
//
// ce_row_kernel: one CTA per row (grid N, 256 / 512 / 1024 threads). Pass 1 keeps the first `ncache` 16-byte
//   vectors of the row in the CTA's shared memory (as many as its share of the SM holds: ~226 KB of sm_90's
//   228 KB with one 1024-thread CTA per SM, the whole row up to ~115k bf16 / ~58k fp32 elements). A longer
//   row has its uncached rest re-read by pass 2, in reverse order, so the part pass 1 read last, the most likely to
//   still be in L2, comes first; the uncached loads of pass 1 use .cg (L2 only) so they stay in L2, the
//   cached ones and the gradient stores evict-first (.cs) so they do not push that rest out. Traffic per
//   row: V s read + V s written + the uncached rest, (V - 8 * ncache) s for bf16, re-read from L2 at best,
//   from DRAM at worst (bf16 V = 151936 on sm_90: a quarter of the row). With ~1 CTA per SM at large V, one
//   row's pass 2 (writes) does not overlap the next row's pass 1 (reads) on the same SM.
//
// Vector accesses are 16 bytes (8 bf16/fp16, 4 fp32). A row whose start is not 16-byte aligned (any row
// stride is allowed) is split into a scalar head up to the first 16-byte boundary, aligned vectors, and a
// scalar tail. The gradient is written with the same split, so the vector path needs grad rows to have the
// same address modulo 16 as the logits rows (true in place, and for same-strided tensors); otherwise the
// launcher picks the one-element-per-access instantiation of ce_row_kernel.
//
// All index math is int64 (N * V exceeds 2^31 in real runs); the kernels never read logits outside
// [row * stride, row * stride + V) and never sync with the host (grad_scale is read on the device).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

#include "cuda_common.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
// Accesses each thread issues back to back before using the first: 4 x 16 B per thread keeps ~64 KB per SM
// in flight at 1024 threads, enough to cover DRAM latency at full bandwidth.
constexpr int kUnroll = 4;
constexpr int kMaxBlock = 1024;
constexpr int kBlockSizes[3] = {256, 512, 1024};
constexpr int kScaleBlock = 256;
constexpr int kMaxDevices = 128;

// dtype codes of the C ABI (pyseqpack/cross_entropy/cuda.py holds the same table).
enum DTypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Storage word of each element type and its conversions to / from fp32 (round to nearest even).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = unsigned int;
  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static Bits from_float(float f) { return __float_as_uint(f); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
  // bf16 is the high half of an fp32 word, so widening is a shift.
  __device__ static float to_float(Bits b) { return __uint_as_float(static_cast<unsigned int>(b) << 16); }
  __device__ static Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// One memory access of VEC elements: a 16-byte uint4 on the vector path, a single element when VEC == 1.
template <typename T, int VEC>
struct Access {
  using Bits = typename Elem<T>::Bits;
  using Raw = std::conditional_t<VEC == 1, Bits, uint4>;
  static_assert(sizeof(Raw) == VEC * sizeof(Bits), "an access is VEC whole elements");

  __device__ static void unpack(const Raw& r, float (&x)[VEC]) {
    Bits b[VEC];
    memcpy(b, &r, sizeof(Raw));
#pragma unroll
    for (int k = 0; k < VEC; ++k) x[k] = Elem<T>::to_float(b[k]);
  }
  __device__ static Raw pack(const float (&x)[VEC]) {
    Bits b[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) b[k] = Elem<T>::from_float(x[k]);
    Raw r;
    memcpy(&r, b, sizeof(Raw));
    return r;
  }
};

// A row [0, V) as: `head` scalar elements before the first 16-byte boundary, `nvec` aligned accesses of VEC
// elements starting at element `head`, and the scalar tail [tail_start, V) (fewer than VEC elements).
struct RowSplit {
  int head;
  int64_t nvec;
  int64_t tail_start;
};

template <typename T, int VEC>
__device__ RowSplit split_row(const void* row, int64_t V) {
  RowSplit s;
  s.head = 0;
  if (VEC > 1) {
    // Torch storage is element-aligned, so the misalignment is a whole number of elements.
    const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(row) & 15u);
    s.head = static_cast<int>(min(V, static_cast<int64_t>(((16u - mis) & 15u) / sizeof(T))));
  }
  s.nvec = (V - s.head) / VEC;
  s.tail_start = s.head + s.nvec * VEC;
  return s;
}

// x after the optional softcap c * tanh(x / c); `inv_cap` = 1 / c.
__device__ __forceinline__ float soft_cap(float x, bool capped, float cap, float inv_cap) {
  return capped ? cap * tanhf(x * inv_cap) : x;
}

// Pass-1 statistics of a set of elements of the row (one thread's share, then merged). ACC: with the first
// argmax (token accuracy); RowStats<false> has no argmax field, so the loss-only kernels cannot spend anything
// on it.
template <bool ACC>
struct RowStats {
  float m;        // max of x over the set (-inf when empty)
  float s;        // sum of exp(x - m) over the set
  float sx;       // sum of x (for the label-smoothing term mean(x))
  long long arg;  // first index holding m; LLONG_MAX while no element above -inf was seen
};
template <>
struct RowStats<false> {
  float m, s, sx;  // as above
};

template <bool ACC>
__device__ __forceinline__ RowStats<ACC> stats_empty() {
  if constexpr (ACC) {
    return {-INFINITY, 0.f, 0.f, LLONG_MAX};
  } else {
    return {-INFINITY, 0.f, 0.f};
  }
}

// Adds N elements x[0..N) with indices first, first+1, ... Each thread visits its elements in increasing
// index order, so the strict `>` keeps the first index among equal maxima within a thread.
template <bool ACC, int N>
__device__ __forceinline__ void stats_add(RowStats<ACC>& st, const float (&x)[N], long long first) {
  float vmax = x[0];
#pragma unroll
  for (int k = 1; k < N; ++k) vmax = fmaxf(vmax, x[k]);
  if (vmax > st.m) {
    // The running max grows: sum(exp(x - m_old)) * exp(m_old - m_new) = sum(exp(x - m_new)).
    // m_old = -inf only while s == 0, where the factor exp(-inf) = 0 is harmless.
    st.s *= exp2f((st.m - vmax) * kLog2e);
    st.m = vmax;
    if constexpr (ACC) {
      int pos = N - 1;
#pragma unroll
      for (int k = N - 1; k >= 0; --k) pos = (x[k] == vmax) ? k : pos;
      st.arg = first + pos;
    }
  }
  // exp(x - m) = exp2(x log2e - m log2e): one FFMA and one MUFU.EX2 per element. While m is -inf every x so
  // far is -inf, and the offset 0 gives exp2(-inf) = 0 instead of NaN.
  const float off = st.m == -INFINITY ? 0.f : -st.m * kLog2e;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    st.s += exp2f(fmaf(x[k], kLog2e, off));
    st.sx += x[k];
  }
}

// Merge of two disjoint sets: the larger max, both sums rescaled to it, and on equal maxima the smaller
// index (so the merge order never changes the argmax: the first index wins, as in torch.argmax).
template <bool ACC>
__device__ __forceinline__ RowStats<ACC> stats_merge(const RowStats<ACC>& a, const RowStats<ACC>& b) {
  RowStats<ACC> r;
  r.m = fmaxf(a.m, b.m);
  const float fa = a.m == -INFINITY ? 0.f : exp2f((a.m - r.m) * kLog2e);
  const float fb = b.m == -INFINITY ? 0.f : exp2f((b.m - r.m) * kLog2e);
  r.s = a.s * fa + b.s * fb;
  r.sx = a.sx + b.sx;
  if constexpr (ACC) r.arg = (b.m > a.m || (b.m == a.m && b.arg < a.arg)) ? b.arg : a.arg;
  return r;
}

// Lane `src`'s statistics, for every lane of the (full) warp.
template <bool ACC>
__device__ __forceinline__ RowStats<ACC> shfl_stats(const RowStats<ACC>& v, int src) {
  RowStats<ACC> o;
  o.m = __shfl_sync(0xffffffffu, v.m, src);
  o.s = __shfl_sync(0xffffffffu, v.s, src);
  o.sx = __shfl_sync(0xffffffffu, v.sx, src);
  if constexpr (ACC) o.arg = __shfl_sync(0xffffffffu, v.arg, src);
  return o;
}

// Butterfly merge: after it every lane holds the warp's statistics.
template <bool ACC>
__device__ __forceinline__ RowStats<ACC> warp_merge(RowStats<ACC> v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = stats_merge(v, shfl_stats(v, lane ^ offset));
  return v;
}

// CTA-wide merge (blockDim.x a multiple of 32, at most 1024): every thread gets the row's statistics.
// Called once per CTA, so the shared slots need no extra barrier for reuse.
template <bool ACC>
__device__ RowStats<ACC> block_merge(RowStats<ACC> v, RowStats<ACC>* warp_slots /* [32] */,
                                     RowStats<ACC>* row_slot) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_merge(v);
  if (lane == 0) warp_slots[warp] = v;
  __syncthreads();
  if (warp == 0) {
    RowStats<ACC> w = lane < static_cast<int>(blockDim.x >> 5) ? warp_slots[lane] : stats_empty<ACC>();
    w = warp_merge(w);
    if (lane == 0) *row_slot = w;
  }
  __syncthreads();
  return *row_slot;
}

// Gradient of one element from its raw logit (see the math at the top of the file).
struct GradMath {
  float lse_off;  // -lse * log2e: p = exp2(x log2e - lse log2e)
  float p_coef;   // scale * (1 + 2 z lse)
  float uniform;  // scale * eps / V
  float hot;      // scale * (1 - eps), subtracted at j == y
  float cap, inv_cap;
  bool capped;
  long long y;

  __device__ __forceinline__ float operator()(float raw, long long j) const {
    float x = raw;
    float chain = 1.f;
    if (capped) {
      // d/dx_raw of c tanh(x_raw / c) = 1 - tanh^2.
      const float t = tanhf(raw * inv_cap);
      x = cap * t;
      chain = 1.f - t * t;
    }
    const float p = exp2f(fmaf(x, kLog2e, lse_off));
    float g = fmaf(p, p_coef, -uniform);
    if (j == y) g -= hot;
    return g * chain;
  }
};

// Arguments of the row kernel (passed by value in kernel parameter space).
struct CeArgs {
  const void* logits;         // [N, V] T, row stride logits_stride (elements), unit column stride
  int64_t logits_stride;
  const void* labels;         // [N] int64, or int32 when labels_is_int32
  int labels_is_int32;
  float* loss;                // [N] fp32 out
  float* lse;                 // [N] fp32 out
  int32_t* correct;           // [N] int32 out; nullptr (loss only) exactly in the ACC = false kernels
  void* grad;                 // [N, V] T out with row stride grad_stride, or nullptr (forward only)
  int64_t grad_stride;
  const float* grad_scale;    // [1] fp32 on the device (read only when grad != nullptr)
  int64_t V;
  int64_t ignore_index;
  float eps;                  // label smoothing
  float z;                    // z-loss coefficient
  float softcap;              // <= 0: off
  int64_t ncache;             // ce_row_kernel: accesses of each row kept in shared memory between the passes
};

__device__ __forceinline__ long long load_label(const CeArgs& a, int64_t row) {
  return a.labels_is_int32 ? static_cast<long long>(static_cast<const int32_t*>(a.labels)[row])
                           : static_cast<long long>(static_cast<const int64_t*>(a.labels)[row]);
}

// loss, lse and (ACC) correct of one row from its statistics rs (lse = rs.m + log(rs.s)) and x_label = x[y]
// after the softcap (read only when valid).
template <bool ACC>
__device__ __forceinline__ void write_row_outputs(const CeArgs& a, int64_t row, const RowStats<ACC>& rs, float lse,
                                                  bool valid, long long y, float x_label) {
  float loss = 0.f;
  if (valid) {
    loss = (1.f - a.eps) * (lse - x_label);
    // Guarded so that eps = 0 or z = 0 never turns an infinite mean(x) or lse into 0 * inf = NaN.
    if (a.eps != 0.f) loss += a.eps * (lse - rs.sx / static_cast<float>(a.V));
    if (a.z != 0.f) loss += a.z * lse * lse;
  }
  a.loss[row] = loss;
  a.lse[row] = lse;
  if constexpr (ACC) {
    const long long argmax = rs.arg == LLONG_MAX ? 0 : rs.arg;  // all -inf: torch.argmax gives 0
    a.correct[row] = valid && argmax == y;
  }
}

// The gradient coefficients of a valid row (grad != nullptr).
__device__ __forceinline__ GradMath grad_math(const CeArgs& a, float lse, long long y, float inv_cap) {
  const float scale = *a.grad_scale;
  GradMath gm;
  gm.lse_off = -lse * kLog2e;
  gm.p_coef = a.z != 0.f ? scale * (1.f + 2.f * a.z * lse) : scale;
  gm.uniform = scale * a.eps / static_cast<float>(a.V);
  gm.hot = scale * (1.f - a.eps);
  gm.cap = a.softcap;
  gm.inv_cap = inv_cap;
  gm.capped = a.softcap > 0.f;
  gm.y = y;
  return gm;
}

// One CTA per row: grid (N), block 256 / 512 / 1024 threads, dynamic shared memory ncache * sizeof(Raw).
//   T    float / __nv_bfloat16 / __half: the element type of logits and grad.
//   VEC  elements per access: 16 / sizeof(T) (vector path, rows split into head / vectors / tail) or 1.
//   ACC  track the first argmax and write a.correct (false: loss only, a.correct is nullptr).
template <typename T, int VEC, bool ACC>
__global__ void __launch_bounds__(kMaxBlock, 1) ce_row_kernel(const CeArgs a) {
  using Acc = Access<T, VEC>;
  using Bits = typename Acc::Bits;
  using Raw = typename Acc::Raw;
  extern __shared__ uint4 dynamic_smem[];  // uint4: 16-byte aligned for vector accesses
  Raw* cache = reinterpret_cast<Raw*>(dynamic_smem);
  __shared__ RowStats<ACC> warp_slots[32];
  __shared__ RowStats<ACC> row_slot;

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t row = blockIdx.x;
  const int64_t V = a.V;
  const Bits* x_row = static_cast<const Bits*>(a.logits) + row * a.logits_stride;

  const long long y = load_label(a, row);
  // Labels outside [0, V) are rejected by the caller in eager mode; here they count as ignored, so x[y] is
  // never read out of bounds.
  const bool valid = y != a.ignore_index && y >= 0 && y < V;
  const bool capped = a.softcap > 0.f;
  const float inv_cap = capped ? 1.f / a.softcap : 0.f;

  // x[y] for the loss, loaded by thread 0 now so the load overlaps pass 1.
  float x_label = 0.f;
  if (tid == 0 && valid) x_label = Elem<T>::to_float(x_row[y]);

  const RowSplit sp = split_row<T, VEC>(x_row, V);
  const Raw* x_vec = reinterpret_cast<const Raw*>(x_row + sp.head);
  const int64_t ncache = min(a.ncache, sp.nvec);
  const int64_t stride = static_cast<int64_t>(kUnroll) * nthreads;

  // ---- pass 1: statistics; thread t visits head element t, then accesses t, t + B, ..., then tail t.
  RowStats<ACC> st = stats_empty<ACC>();
  if (tid < sp.head) {
    float x[1] = {soft_cap(Elem<T>::to_float(x_row[tid]), capped, a.softcap, inv_cap)};
    stats_add(st, x, tid);
  }
  for (int64_t base = tid; base < sp.nvec; base += stride) {
    Raw r[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * nthreads;
      // The cached part is never read from global memory again: evict-first. The rest is re-read by pass 2
      // and should stay in L2 (.cg: cached in L2 only; L1 gains nothing on a streaming read).
      if (i < sp.nvec) r[u] = i < ncache ? __ldcs(x_vec + i) : __ldcg(x_vec + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * nthreads;
      if (i < sp.nvec) {
        if (i < ncache) cache[i] = r[u];
        float x[VEC];
        Acc::unpack(r[u], x);
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[k] = soft_cap(x[k], capped, a.softcap, inv_cap);
        stats_add(st, x, sp.head + i * VEC);
      }
    }
  }
  if (tid < V - sp.tail_start) {
    const int64_t j = sp.tail_start + tid;
    float x[1] = {soft_cap(Elem<T>::to_float(x_row[j]), capped, a.softcap, inv_cap)};
    stats_add(st, x, j);
  }
  // The barriers inside also publish pass 1's shared-memory cache to every thread of the CTA.
  const RowStats<ACC> rs = block_merge(st, warp_slots, &row_slot);
  const float lse = rs.m + logf(rs.s);  // -inf for an all -inf (or empty) row

  if (tid == 0) write_row_outputs(a, row, rs, lse, valid, y, soft_cap(x_label, capped, a.softcap, inv_cap));
  if (a.grad == nullptr) return;

  // ---- pass 2: the gradient, in the same split as the logits row (the launcher guarantees the same
  // address modulo 16, so head and vectors line up).
  Bits* g_row = static_cast<Bits*>(a.grad) + row * a.grad_stride;
  Raw* g_vec = reinterpret_cast<Raw*>(g_row + sp.head);

  if (!valid) {  // exact zeros, without reading the row again
    const Raw zero = {};
    for (int64_t i = tid; i < sp.nvec; i += nthreads) __stcs(g_vec + i, zero);
    if (tid < sp.head) g_row[tid] = 0;
    if (tid < V - sp.tail_start) g_row[sp.tail_start + tid] = 0;
    return;
  }

  const GradMath gm = grad_math(a, lse, y, inv_cap);

  // Accesses in reverse order: position p of the walk is access nvec - 1 - p. The uncached tail of the row
  // (read last by pass 1, so the likeliest to still be in L2) comes first, then the cached head from shared
  // memory. Each element is read and then written by the same thread, so grad may alias logits.
  for (int64_t base = tid; base < sp.nvec; base += stride) {
    Raw r[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + static_cast<int64_t>(u) * nthreads;
      const int64_t i = sp.nvec - 1 - p;
      if (p < sp.nvec) r[u] = i < ncache ? cache[i] : __ldcs(x_vec + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + static_cast<int64_t>(u) * nthreads;
      const int64_t i = sp.nvec - 1 - p;
      if (p < sp.nvec) {
        float x[VEC];
        Acc::unpack(r[u], x);
        const long long first = sp.head + i * VEC;
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[k] = gm(x[k], first + k);
        __stcs(g_vec + i, Acc::pack(x));
      }
    }
  }
  if (tid < sp.head) g_row[tid] = Elem<T>::from_float(gm(Elem<T>::to_float(x_row[tid]), tid));
  if (tid < V - sp.tail_start) {
    const int64_t j = sp.tail_start + tid;
    g_row[j] = Elem<T>::from_float(gm(Elem<T>::to_float(x_row[j]), j));
  }
}

// grad[r, :] *= factor[per_row ? r : 0], in place, in fp32 then rounded to T once.
//   grad    [N, V] T, row stride `stride` elements, unit column stride
//   factor  fp32 on the device: [1] (per_row == 0) or [N] (per_row != 0)
// Grid-stride over rows (grid <= N), block kScaleBlock threads, 16-byte accesses with a scalar head / tail.
// A factor of exactly 1.0 (loss.backward() on a scalar loss) is checked on the device: the block returns
// (or skips the row) before touching grad, so that backward costs one tiny launch and no host sync.
template <typename T>
__global__ void __launch_bounds__(kScaleBlock)
    scale_grad_kernel(void* grad, int64_t N, int64_t V, int64_t stride, const float* factor, int per_row) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  using Acc = Access<T, VEC>;
  using Bits = typename Acc::Bits;
  using Raw = typename Acc::Raw;
  if (!per_row && *factor == 1.0f) return;
  const int tid = threadIdx.x;
  const int64_t step = static_cast<int64_t>(kUnroll) * blockDim.x;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const float f = factor[per_row ? row : 0];
    if (f == 1.0f) continue;  // uniform across the block
    Bits* g_row = static_cast<Bits*>(grad) + row * stride;
    const RowSplit sp = split_row<T, VEC>(g_row, V);
    Raw* g_vec = reinterpret_cast<Raw*>(g_row + sp.head);
    for (int64_t base = tid; base < sp.nvec; base += step) {
      Raw r[kUnroll] = {};
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
        if (i < sp.nvec) r[u] = __ldcs(g_vec + i);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
        if (i < sp.nvec) {
          float g[VEC];
          Acc::unpack(r[u], g);
#pragma unroll
          for (int k = 0; k < VEC; ++k) g[k] *= f;
          __stcs(g_vec + i, Acc::pack(g));
        }
      }
    }
    if (tid < sp.head) g_row[tid] = Elem<T>::from_float(Elem<T>::to_float(g_row[tid]) * f);
    if (tid < V - sp.tail_start) {
      const int64_t j = sp.tail_start + tid;
      g_row[j] = Elem<T>::from_float(Elem<T>::to_float(g_row[j]) * f);
    }
  }
}

// ---- host side ----

int block_index(int64_t V, int vec) {
  const int64_t accesses = (V + vec - 1) / vec;
  if (accesses <= 1024) return 0;  // 256 threads, <= 4 accesses each
  if (accesses <= 4096) return 1;  // 512 threads, <= 8 accesses each
  return 2;                        // 1024 threads
}

template <typename T, int VEC>
const void* row_kernel_ptr(bool acc) {
  return acc ? reinterpret_cast<const void*>(&ce_row_kernel<T, VEC, true>)
             : reinterpret_cast<const void*>(&ce_row_kernel<T, VEC, false>);
}

const void* row_kernel(int dtype, bool vec, bool acc) {
  switch (dtype) {
    case kFloat32: return vec ? row_kernel_ptr<float, 4>(acc) : row_kernel_ptr<float, 1>(acc);
    case kBFloat16: return vec ? row_kernel_ptr<__nv_bfloat16, 8>(acc) : row_kernel_ptr<__nv_bfloat16, 1>(acc);
    default: return vec ? row_kernel_ptr<__half, 8>(acc) : row_kernel_ptr<__half, 1>(acc);
  }
}

// Per-device launch facts, computed once per device (thread-safe) on the first call.
struct DeviceState {
  cudaError_t error;
  int num_sms;
  // Bytes of dynamic shared memory one CTA of row_kernel(dtype, vec, acc) with kBlockSizes[b] threads may
  // take for its row cache without lowering the number of CTAs per SM that registers and threads allow;
  // indexed [acc][dtype][vec][b].
  int64_t cache_bytes[2][3][2][3];
};

DeviceState g_states[kMaxDevices];
std::once_flag g_once[kMaxDevices];

#define PYSEQPACK_TRY(expr)                 \
  do {                                      \
    const cudaError_t err_ = (expr);        \
    if (err_ != cudaSuccess) return err_;   \
  } while (0)

// Dynamic shared memory one of `resident` CTAs on an SM of `per_sm` bytes may take, beside the per-CTA reserve
// and its static shared memory. Shared memory is handed out in 128-byte units: with the static part rounded up
// and the result rounded down, static + dynamic never spill into a unit more than the share holds (which would
// cost a resident CTA).
int64_t dynamic_share(int64_t per_sm, int64_t resident, int64_t reserved, int64_t static_smem) {
  constexpr int64_t kUnit = 128;
  const int64_t share = per_sm / resident - reserved - (static_smem + kUnit - 1) / kUnit * kUnit;
  return std::max<int64_t>(0, share / kUnit * kUnit);
}

cudaError_t init_device(int dev, DeviceState& s) {
  int optin = 0, per_sm = 0, reserved = 0;
  PYSEQPACK_TRY(cudaDeviceGetAttribute(&s.num_sms, cudaDevAttrMultiProcessorCount, dev));
  PYSEQPACK_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  PYSEQPACK_TRY(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  PYSEQPACK_TRY(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
  for (int acc = 0; acc < 2; ++acc) {
    for (int dtype = 0; dtype < 3; ++dtype) {
      for (int vec = 0; vec < 2; ++vec) {
        const void* fn = row_kernel(dtype, vec != 0, acc != 0);
        cudaFuncAttributes attr;
        PYSEQPACK_TRY(cudaFuncGetAttributes(&attr, fn));
        const int64_t static_smem = static_cast<int64_t>(attr.sharedSizeBytes);
        const int64_t max_dynamic = std::max<int64_t>(0, optin - static_smem);
        // Above 48 KB, dynamic shared memory is opt-in per kernel; the carveout asks for the largest shared
        // memory / smallest L1 split (L1 does nothing for this streaming kernel).
        PYSEQPACK_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(max_dynamic)));
        PYSEQPACK_TRY(cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           cudaSharedmemCarveoutMaxShared));
        for (int b = 0; b < 3; ++b) {
          int resident = 0;
          PYSEQPACK_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, fn, kBlockSizes[b], 0));
          resident = std::max(resident, 1);
          s.cache_bytes[acc][dtype][vec][b] = std::min(max_dynamic, dynamic_share(per_sm, resident, reserved,
                                                                                   static_smem));
        }
      }
    }
  }
  return cudaSuccess;
}

cudaError_t device_state(const DeviceState** out) {
  int dev = 0;
  PYSEQPACK_TRY(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) return cudaErrorInvalidDevice;
  std::call_once(g_once[dev], [dev] { g_states[dev].error = init_device(dev, g_states[dev]); });
  *out = &g_states[dev];
  return g_states[dev].error;
}

// The ACC = true instantiation when a.correct is given, the loss-only one otherwise.
template <typename T, int VEC>
void launch_rows(const CeArgs& a, int64_t N, int block, size_t smem, cudaStream_t stream) {
  if (a.correct != nullptr) {
    ce_row_kernel<T, VEC, true><<<static_cast<unsigned>(N), block, smem, stream>>>(a);
  } else {
    ce_row_kernel<T, VEC, false><<<static_cast<unsigned>(N), block, smem, stream>>>(a);
  }
}

template <typename T>
void launch_scale(void* grad, int64_t N, int64_t V, int64_t stride, const float* factor, int per_row, int grid,
                  cudaStream_t stream) {
  scale_grad_kernel<T><<<grid, kScaleBlock, 0, stream>>>(grad, N, V, stride, factor, per_row);
}

}  // namespace

// Fused cross-entropy over the rows of `logits`, enqueued on `stream`; no host sync.
//   logits            [N, V] device pointer, dtype code `dtype` (0 float32, 1 bfloat16, 2 float16),
//                     row stride `logits_row_stride` elements, unit column stride
//   labels            [N] int64 (labels_is_int32 == 0) or int32 (!= 0), contiguous device pointer
//   loss, lse         [N] float32 out: per-row loss (0 for ignored rows, unscaled) and log-sum-exp (all rows)
//   correct           [N] int32 out: 1 where the label is valid and the first argmax equals it, or NULL (loss
//                     only: the kernels are instantiated without the argmax; loss, lse, grad are unchanged)
//   grad              [N, V] same dtype as logits, row stride `grad_row_stride`, unit column stride, or NULL
//                     (forward only); may equal logits (in-place gradient)
//   grad_scale        [1] float32 device pointer, required when grad != NULL: grad = grad_scale * dloss/dlogits
//   ignore_index      label value that counts for nothing (labels outside [0, V) are treated the same way)
//   label_smoothing   eps in [0, 1];  z_loss: z >= 0;  softcap: c > 0 enables x <- c tanh(x / c), <= 0 off
//   stream            cudaStream_t (NULL: legacy default stream)
// Returns a cudaError_t as int: cudaErrorInvalidValue for bad arguments (dtype code, N < 0 or N > 2^31 - 1,
// V < 0, a NULL pointer that is needed), else cudaGetLastError() after the launch.
PYSEQPACK_API int pyseqpack_ce_fwd_bwd(const void* logits, int dtype, int64_t N, int64_t V, int64_t logits_row_stride,
                                       const void* labels, int labels_is_int32, float* loss, float* lse,
                                       int32_t* correct, void* grad, int64_t grad_row_stride, const float* grad_scale,
                                       int64_t ignore_index, float label_smoothing, float z_loss, float softcap,
                                       void* stream) {
  if (dtype < kFloat32 || dtype > kFloat16 || N < 0 || N > INT_MAX || V < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  if (logits == nullptr || labels == nullptr || loss == nullptr || lse == nullptr ||
      (grad != nullptr && grad_scale == nullptr))
    return cudaErrorInvalidValue;
  const bool acc = correct != nullptr;
  const DeviceState* ds = nullptr;
  PYSEQPACK_TRY(device_state(&ds));

  const int64_t elem = dtype == kFloat32 ? 4 : 2;
  // The vector path writes grad with the logits row's head / vector split: it needs every grad row to sit
  // at the same address modulo 16 as its logits row.
  const bool vec = grad == nullptr ||
                   ((reinterpret_cast<uintptr_t>(grad) - reinterpret_cast<uintptr_t>(logits)) % 16 == 0 &&
                    ((grad_row_stride - logits_row_stride) * elem) % 16 == 0);
  const int per_access = vec ? static_cast<int>(16 / elem) : 1;
  const int b = block_index(V, per_access);

  CeArgs a;
  a.logits = logits;
  a.logits_stride = logits_row_stride;
  a.labels = labels;
  a.labels_is_int32 = labels_is_int32 != 0;
  a.loss = loss;
  a.lse = lse;
  a.correct = correct;
  a.grad = grad;
  a.grad_stride = grad_row_stride;
  a.grad_scale = grad_scale;
  a.V = V;
  a.ignore_index = ignore_index;
  a.eps = label_smoothing;
  a.z = z_loss;
  a.softcap = softcap;
  a.ncache = 0;
  size_t smem = 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (grad != nullptr) {
    // Cache as many accesses of the row as the per-CTA share of shared memory holds: with the whole row
    // cached (V <= ~115k bf16 on sm_90) the logits are read from DRAM exactly once.
    const int64_t access_bytes = vec ? 16 : elem;
    const int64_t accesses = (V + per_access - 1) / per_access;
    a.ncache = std::min(accesses, ds->cache_bytes[acc][dtype][vec ? 1 : 0][b] / access_bytes);
    smem = static_cast<size_t>(a.ncache * access_bytes);
  }
  const int block = kBlockSizes[b];
  switch (dtype) {
    case kFloat32:
      vec ? launch_rows<float, 4>(a, N, block, smem, s) : launch_rows<float, 1>(a, N, block, smem, s);
      break;
    case kBFloat16:
      vec ? launch_rows<__nv_bfloat16, 8>(a, N, block, smem, s) : launch_rows<__nv_bfloat16, 1>(a, N, block, smem, s);
      break;
    default:
      vec ? launch_rows<__half, 8>(a, N, block, smem, s) : launch_rows<__half, 1>(a, N, block, smem, s);
      break;
  }
  return cudaGetLastError();
}

// In place grad *= factor, enqueued on `stream`; no host sync.
//   grad        [N, V] device pointer, dtype code `dtype` (0 float32, 1 bfloat16, 2 float16), row stride
//               `row_stride` elements, unit column stride
//   factor      float32 device pointer: [1] when per_row == 0, [N] (one factor per row) otherwise. Rows
//               (or, for a single factor, the whole call) with a factor of exactly 1.0 are not touched.
//   stream      cudaStream_t (NULL: legacy default stream)
// Returns a cudaError_t as int: cudaErrorInvalidValue for bad arguments, else cudaGetLastError().
PYSEQPACK_API int pyseqpack_ce_scale_grad(void* grad, int dtype, int64_t N, int64_t V, int64_t row_stride,
                                          const float* factor, int per_row, void* stream) {
  if (dtype < kFloat32 || dtype > kFloat16 || N < 0 || V < 0) return cudaErrorInvalidValue;
  if (N == 0 || V == 0) return cudaSuccess;
  if (grad == nullptr || factor == nullptr) return cudaErrorInvalidValue;
  const DeviceState* ds = nullptr;
  PYSEQPACK_TRY(device_state(&ds));
  // Enough CTAs to fill the GPU (8 x 256 threads per SM); each walks rows with a grid stride.
  const int grid = static_cast<int>(std::min<int64_t>(N, static_cast<int64_t>(ds->num_sms) * 8));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32: launch_scale<float>(grad, N, V, row_stride, factor, per_row, grid, s); break;
    case kBFloat16: launch_scale<__nv_bfloat16>(grad, N, V, row_stride, factor, per_row, grid, s); break;
    default: launch_scale<__half>(grad, N, V, row_stride, factor, per_row, grid, s); break;
  }
  return cudaGetLastError();
}
