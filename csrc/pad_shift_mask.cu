// CUDA backend of pyseqpack.pad_shift_mask: every padded output of a batch in one launch.
// pyseqpack/pad_shift_mask/cuda.py calls the C entry point at the bottom of this file through ctypes.
//
// Inputs, all on the device: int64 offsets [B + 1] into a flat token buffer [T]; optionally loss masks [T]
// and extra fields [E, T] aligned with the tokens (same indices); optionally separate labels [Tl] with their
// own int64 label_offsets [B + 1]; optionally int64 prompt_lengths [B]. Per launch, on the host: the
// psm::Layout (L, Ll, max_length, trunc_left, pad_left). Outputs: each requested [B, L] (input_ids,
// attention_mask, position_ids, loss_mask), [E, B, L] (extras) and [B, Ll] (labels, shift_labels,
// decoder_input_ids) tensor, all int32 or all int64, C-contiguous.
//
// Work split: block (b, t) owns row b, columns [t * blockDim, (t + 1) * blockDim); its thread j writes column j
// of every requested output of row b. Each thread plans row b itself with psm::plan_row (pad_shift_mask.h's
// THE ROW PLAN, the lines the CPU kernel runs too) and then computes each value with the per-element functions.
// Element (b, j) is a closed form of the row's offsets and the buffers: no scan, no shared memory, no
// __syncthreads.
//
// Memory traffic: a warp stores 32 consecutive elements of each output (128 B for int32, 256 B for int64:
// whole sectors, fully coalesced), so every output byte is written once, the floor for this op:
// n_outputs * B * L * sizeof(out) bytes. Its loads of tokens[src + j - col] are 32 consecutive elements too,
// only shifted by the row's column offset (2 to 3 sectors per warp). Each kept token, mask, extra and label is
// read from DRAM once: input_ids and the derived labels read the same token, and labels, shift_labels and
// decoder_input_ids read columns j, j + 1 and j - 1 of the same labels, all from sectors L1 already holds.
// The row plan costs 2 to 5 int64 loads per block: offsets[b] and offsets[b + 1] (one sector, or two when
// they straddle a 32-byte boundary), plus label_offsets[b], label_offsets[b + 1] for separate labels and
// prompt_lengths[b] when given. Every thread of the block loads the same addresses: one broadcast transaction
// per warp, served from L1 after the block's first warp.
//
// Element types: the token and output types are template parameters (4 kernels). The other buffers' types
// (masks uint8 / int32 / int64, labels and extras int32 / int64) are chosen by a branch that is uniform over
// the whole grid, inside the kernel, so their variants add code, not kernels.
//
// Safety without host syncs: offsets and prompt lengths on the device cannot be checked on the host without a
// sync. plan_row is total (no overflow for any int64 inputs, prompt lengths clamped), and each thread checks
// its row's windows: a token window [tok_src, tok_src + tok_kept) outside the token buffer makes an empty row
// (all padding), a label window outside the label buffer an empty label row, so no load ever leaves the
// buffers, whatever the offsets hold. All index math is int64: B * L passes 2^31 on large batches.

#include <algorithm>
#include <climits>
#include <cstdint>

#include "cuda_common.cuh"
#include "pad_shift_mask.h"

namespace {

// Output slots, in the order of the C ABI's `outs` array: psm::Out of pad_shift_mask.h.
using psm::kAttn, psm::kDecoder, psm::kIds, psm::kLabels, psm::kLoss, psm::kNumOut, psm::kPos, psm::kShift;

// Element type codes of the C ABI (pyseqpack/pad_shift_mask/cuda.py holds the same table).
enum TypeCode : int { kInt64 = 0, kInt32 = 1, kUInt8 = 2 };

// Threads per block, one column each: 256 threads x 8 blocks fill an SM. Rows narrower than that get a block
// rounded up to whole warps instead.
constexpr int kMaxThreads = 256;
// gridDim.y (column tiles) is limited to 65535 by the hardware.
constexpr int64_t kMaxTiles = 65535;

// Kernel arguments, passed by value in the parameter block. Pointers are untyped: the kernel's template
// parameters give the token type T and output type O, the *_code fields the other buffers' types.
//   offsets          [B + 1] int64: example b's tokens are tok[offsets[b] .. offsets[b + 1])
//   label_offsets    [B + 1] int64 (kind == kGivenLabels), else unused
//   prompt_lengths   [B] int64, or nullptr (no prompt)
//   lay              L, Ll, max_length, trunc_left, pad_left (psm::Layout)
//   tok, n_tok       [n_tok] T
//   mask, mask_code  [n_tok] uint8 / int32 / int64 loss masks, or nullptr
//   lab, lab_code    [n_lab] int32 / int64 separate labels (kind == kGivenLabels), else unused
//   out[i]           [B, L] or [B, Ll] O, nullptr when that output was not requested
//   extras           [n_extras, n_tok] int32 / int64 (extras_code); extra_pads [n_extras] int64;
//                    extras_out [n_extras, B, L] O
struct Args {
  const int64_t* offsets;
  const int64_t* label_offsets;
  const int64_t* prompt_lengths;
  int64_t B;
  psm::Layout lay;
  const void* tok;
  int64_t n_tok;
  const void* mask;
  int mask_code;
  int kind;
  const void* lab;
  int64_t n_lab;
  int lab_code;
  void* out[kNumOut];
  const void* extras;
  int64_t n_extras;
  int extras_code;
  const int64_t* extra_pads;
  void* extras_out;
  int64_t pad, label_pad, decoder_start;
};

// Whether [src, src + count) lies inside [0, n); written so that no sum can overflow for any int64 input.
__device__ __forceinline__ bool window_inside(int64_t src, int64_t count, int64_t n) {
  return src >= 0 && count >= 0 && src <= n && count <= n - src;
}

// Row b of the batch: psm::plan_row on its offsets, then every window outside its buffer emptied, so that
// the Row is what plan_row gives for an example with no tokens (or no labels) there.
__device__ __forceinline__ psm::Row checked_row(const Args& a, int64_t b) {
  const bool given = a.kind == psm::kGivenLabels;
  const bool has_prompt = a.prompt_lengths != nullptr;
  psm::Row r = psm::plan_row(__ldg(a.offsets + b), __ldg(a.offsets + b + 1), given ? __ldg(a.label_offsets + b) : 0,
                             given ? __ldg(a.label_offsets + b + 1) : 0, a.kind, has_prompt,
                             has_prompt ? __ldg(a.prompt_lengths + b) : 0, a.lay);
  if (!window_inside(r.tok_src, r.tok_kept, a.n_tok)) {
    // kept = 0: the first kept token would sit at column 0 (right padding) or L (left), the prompt bounds are 0.
    r.tok_src = r.tok_kept = r.label_from = r.loss_from = 0;
    r.tok_col = a.lay.pad_left ? a.lay.L : 0;
    if (!given) {  // derived labels repeat the token fields
      r.lab_src = r.tok_src;
      r.lab_kept = r.tok_kept;
      r.lab_col = r.tok_col;
    }
  }
  if (given && !window_inside(r.lab_src, r.lab_kept, a.n_lab)) {
    r.lab_src = r.lab_kept = 0;
    r.lab_col = a.lay.pad_left ? a.lay.Ll : 0;
  }
  return r;
}

// `base` + `src` as a P pointer (the row pointer pad_shift_mask.h expects), or nullptr for a missing buffer.
template <typename P>
__device__ __forceinline__ const P* row_ptr(const void* base, int64_t src) {
  return base != nullptr ? static_cast<const P*>(base) + src : nullptr;
}

// out[o] = v, in the output type O.
template <typename O>
__device__ __forceinline__ void put(void* out, int64_t o, int64_t v) {
  static_cast<O*>(out)[o] = static_cast<O>(v);
}

// Column j of the [B, Ll] outputs (flat index o), for one combination of mask and label types.
template <typename O, typename T, typename M, typename Lab>
__device__ __forceinline__ void label_columns(const Args& a, const psm::Row& r, int64_t j, int64_t o, const T* tok,
                                              const M* mask, const Lab* lab) {
  if (a.out[kLabels] != nullptr) put<O>(a.out[kLabels], o, psm::label(j, r, a.kind, tok, mask, lab, a.label_pad));
  if (a.out[kShift] != nullptr)
    put<O>(a.out[kShift], o, psm::shift_label(j, a.lay.Ll, r, a.kind, tok, mask, lab, a.label_pad));
  if (a.out[kDecoder] != nullptr)
    put<O>(a.out[kDecoder], o,
           psm::decoder_input_id(j, r, a.kind, tok, mask, lab, a.label_pad, a.decoder_start, a.pad));
}

// Grid (B, ceil(W / blockDim.x)), W the widest requested output.
template <typename O, typename T>
__global__ void __launch_bounds__(kMaxThreads) psm_kernel(const Args a) {
  const int64_t b = blockIdx.x;
  const psm::Row r = checked_row(a, b);
  const int64_t L = a.lay.L, Ll = a.lay.Ll;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const T* tok = row_ptr<T>(a.tok, r.tok_src);  // element k: the row's k-th kept token

  if (j < L) {
    const int64_t o = b * L + j;
    if (a.out[kIds] != nullptr) put<O>(a.out[kIds], o, psm::input_id(j, r, tok, a.pad));
    if (a.out[kAttn] != nullptr) put<O>(a.out[kAttn], o, psm::attention(j, r));
    if (a.out[kPos] != nullptr) put<O>(a.out[kPos], o, psm::position_id(j, r));
    if (a.out[kLoss] != nullptr) put<O>(a.out[kLoss], o, psm::loss_mask(j, r));
    for (int64_t e = 0; e < a.n_extras; ++e) {
      const int64_t src = e * a.n_tok + r.tok_src;  // row e of the [E, T] extras
      const int64_t pad = a.extra_pads[e];
      const int64_t v = a.extras_code == kInt32 ? psm::extra(j, r, row_ptr<int32_t>(a.extras, src), pad)
                                                : psm::extra(j, r, row_ptr<int64_t>(a.extras, src), pad);
      put<O>(a.extras_out, (e * a.B + b) * L + j, v);
    }
  }
  if (j < Ll && (a.out[kLabels] != nullptr || a.out[kShift] != nullptr || a.out[kDecoder] != nullptr)) {
    const int64_t o = b * Ll + j;
    const int64_t* no_lab = nullptr;
    if (a.kind == psm::kGivenLabels) {  // no mask: pad_shift_mask.h reads it for derived labels only
      const uint8_t* no_mask = nullptr;
      if (a.lab_code == kInt32)
        label_columns<O>(a, r, j, o, tok, no_mask, row_ptr<int32_t>(a.lab, r.lab_src));
      else
        label_columns<O>(a, r, j, o, tok, no_mask, row_ptr<int64_t>(a.lab, r.lab_src));
    } else if (a.mask_code == kUInt8) {
      label_columns<O>(a, r, j, o, tok, row_ptr<uint8_t>(a.mask, r.tok_src), no_lab);
    } else if (a.mask_code == kInt32) {
      label_columns<O>(a, r, j, o, tok, row_ptr<int32_t>(a.mask, r.tok_src), no_lab);
    } else {
      label_columns<O>(a, r, j, o, tok, row_ptr<int64_t>(a.mask, r.tok_src), no_lab);
    }
  }
}

// Enqueues the kernel for token type T and output type O; no launch when no output is requested.
template <typename O, typename T>
cudaError_t launch(const Args& a, cudaStream_t stream) {
  // The widest requested output sets the grid; threads past a narrower output's width skip it.
  const bool narrow = a.n_extras > 0 || a.out[kIds] || a.out[kAttn] || a.out[kPos] || a.out[kLoss];
  const bool wide = a.out[kLabels] || a.out[kShift] || a.out[kDecoder];
  const int64_t width = std::max(narrow ? a.lay.L : 0, wide ? a.lay.Ll : 0);
  if (width == 0) return cudaSuccess;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (width + 31) / 32 * 32));
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>((width + threads - 1) / threads));
  psm_kernel<O, T><<<grid, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

bool is_int_code(int code) { return code == kInt64 || code == kInt32; }

}  // namespace

// Writes every requested output of pad_shift_mask for one batch, enqueued on `stream`; no host sync.
//   offsets         [B + 1] int64 device pointer: example b's tokens are tokens[offsets[b] .. offsets[b + 1])
//   label_offsets   [B + 1] int64 device pointer into `labels` (labels_kind 2), else NULL (ignored)
//   prompt_lengths  [B] int64 device pointer (pad_shift_mask.h's prompt_len), or NULL: no prompt
//   B               examples
//   L, Ll           widths of the [B, L] and [B, Ll] outputs (Ll == L for derived labels)
//   max_length      truncation to max_length values per example; < 0: none
//   trunc_left      nonzero: truncation keeps the last max_length values (else the first)
//   pad_left        nonzero: padding goes on the left (else on the right)
//   tokens          [n_tokens] device pointer, type tokens_code (0 int64, 1 int32)
//   loss_masks      [n_tokens] device pointer, type mask_code (0 int64, 1 int32, 2 uint8), or NULL; read with
//                   derived labels only
//   labels_kind     0 none, 1 derived from tokens, 2 given in `labels`
//   labels          [n_labels] device pointer, type labels_code (0 int64, 1 int32); labels_kind 2 only
//   outs            host array of kNumOut device pointers in slot order (psm::kOutputNames), NULL = not
//                   requested; [B, Ll] for the label slots (psm::label_width), else [B, L]
//   extras          [n_extras, n_tokens] device pointer, type extras_code (0 int64, 1 int32), aligned with the
//                   tokens; extra_pads [n_extras] int64 device pointer; extras_out [n_extras, B, L] device pointer
//   pad_token_id, label_pad_token_id, decoder_start_token_id   as in pad_shift_mask.h
//   out_code        type of every output (0 int64, 1 int32); outputs are C-contiguous
//   stream          cudaStream_t (NULL: the legacy default stream)
// The offsets and prompt lengths are not trusted (see the file comment). Values are cast to the output type as
// they are (the caller checks int32 ranges).
// Returns a cudaError_t as int: cudaErrorInvalidValue for bad arguments (checked before any CUDA call),
// else the launch's error (cudaGetLastError()).
PYSEQPACK_API int pyseqpack_psm_fill(const int64_t* offsets, const int64_t* label_offsets,
                                     const int64_t* prompt_lengths, int64_t B, int64_t L, int64_t Ll,
                                     int64_t max_length, int trunc_left, int pad_left, const void* tokens,
                                     int64_t n_tokens, int tokens_code, const void* loss_masks, int mask_code,
                                     int labels_kind, const void* labels, int64_t n_labels, int labels_code,
                                     void* const* outs, const void* extras, int64_t n_extras, int extras_code,
                                     const int64_t* extra_pads, void* extras_out, int64_t pad_token_id,
                                     int64_t label_pad_token_id, int64_t decoder_start_token_id, int out_code,
                                     void* stream) {
  if (B < 0 || L < 0 || Ll < 0 || n_tokens < 0 || n_labels < 0 || n_extras < 0 || outs == nullptr ||
      labels_kind < psm::kNoLabels || labels_kind > psm::kGivenLabels || !is_int_code(tokens_code) ||
      !is_int_code(out_code) || (loss_masks != nullptr && !is_int_code(mask_code) && mask_code != kUInt8) ||
      (labels_kind == psm::kGivenLabels && !is_int_code(labels_code)) || (n_extras > 0 && !is_int_code(extras_code)))
    return cudaErrorInvalidValue;
  if (labels_kind == psm::kNoLabels && (outs[kLabels] || outs[kShift] || outs[kDecoder])) return cudaErrorInvalidValue;
  // Derived labels share the token row's columns (tok_col is computed for L).
  if (labels_kind == psm::kDerivedLabels && Ll != L) return cudaErrorInvalidValue;
  // Launch limits: B blocks along x, column tiles of kMaxThreads along y.
  if (B > INT_MAX || (std::max(L, Ll) + kMaxThreads - 1) / kMaxThreads > kMaxTiles) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;  // empty outputs (their data pointers may be NULL), no offsets read
  if (offsets == nullptr || (labels_kind == psm::kGivenLabels && label_offsets == nullptr) ||
      (n_tokens > 0 && tokens == nullptr) || (labels_kind == psm::kGivenLabels && n_labels > 0 && labels == nullptr) ||
      (n_extras > 0 && (extra_pads == nullptr || (n_tokens > 0 && extras == nullptr) ||
                        (L > 0 && extras_out == nullptr))))
    return cudaErrorInvalidValue;

  Args a{};
  a.offsets = offsets;
  a.label_offsets = label_offsets;
  a.prompt_lengths = prompt_lengths;
  a.B = B;
  a.lay = psm::Layout{L, Ll, max_length, trunc_left != 0, pad_left != 0};
  a.tok = tokens;
  a.n_tok = n_tokens;
  a.mask = loss_masks;
  a.mask_code = mask_code;
  a.kind = labels_kind;
  a.lab = labels;
  a.n_lab = n_labels;
  a.lab_code = labels_code;
  for (int i = 0; i < kNumOut; ++i) a.out[i] = outs[i];
  a.extras = extras;
  a.n_extras = n_extras;
  a.extras_code = extras_code;
  a.extra_pads = extra_pads;
  a.extras_out = extras_out;
  a.pad = pad_token_id;
  a.label_pad = label_pad_token_id;
  a.decoder_start = decoder_start_token_id;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (out_code == kInt32)
    return tokens_code == kInt32 ? launch<int32_t, int32_t>(a, s) : launch<int32_t, int64_t>(a, s);
  return tokens_code == kInt32 ? launch<int64_t, int32_t>(a, s) : launch<int64_t, int64_t>(a, s);
}
