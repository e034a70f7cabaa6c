// pad_shift_mask.h: the per-element math of pyseqpack.pad_shift_mask, shared by every native backend.
//
// Plain C++17, no torch or Python headers. Every function is PSM_HD: `__host__ __device__` under nvcc,
// plain `inline` otherwise, so the C++ CPU kernel (csrc/pad_shift_mask_cpu.cpp, tested in CI) and the CUDA
// kernel compile the very same lines. The Triton kernel (kernels/pad_shift_mask.py) mirrors them.
//
// ---------------------------------------------------------------------------------------------------------
// THE ROW PLAN (the contract between the Python planner and every kernel)
//
// Python computes, once per batch, an int64 array plan[B][kPlanStride] (C-contiguous), one row per example:
//
//   [kTokSrc]    index, in the token buffer, of the first KEPT token (after truncation)
//   [kTokKept]   number of kept tokens (0 <= kept <= L)
//   [kTokCol]    output column of the first kept token: 0 for right padding, L - kept for left padding
//   [kLabelFrom] derived labels: kept index from which labels keep their token; kept indices below it
//                (the prompt, after truncation) become label_pad_token_id.  = clamp(prompt_len - cut, 0, kept)
//   [kLossFrom]  verl loss_mask: kept index from which the mask may be 1.  = clamp(prompt_len - 1 - cut, 0, kept)
//   [kLabSrc]    separate labels: index, in the label buffer, of the first kept label
//   [kLabKept]   separate labels: number of kept labels (0 <= lab_kept <= Ll)
//   [kLabCol]    separate labels: output column of the first kept label (0, or Ll - lab_kept)
//
// where `cut` is the number of tokens truncation removed from the LEFT of the example (0 for right
// truncation), so "kept index" k = original index - cut. With derived labels (labels = input_ids) the kLab*
// fields repeat the kTok* ones and are unused.
//
// Buffers, all 1-D and indexed with int64:
//   tokens      the token ids; example b's kept tokens are tokens[kTokSrc .. kTokSrc + kTokKept)
//   loss_masks  optional, aligned with tokens (same indices): 0 drops a token from the derived labels
//   extras      optional, aligned with tokens: padded exactly like input_ids, each with its own pad value
//   labels      optional separate labels, with their own indices (kLabSrc, kLabKept, kLabCol)
// Every kernel takes row pointers `buffer + plan[b][kTokSrc]` (or kLabSrc) and reads element k only for
// 0 <= k < kept, so it never reads the tokens that truncation dropped. A device kernel that cannot trust
// its plan (offsets that live on the device are not value-checked, that would need a host sync) must also
// mask each load with 0 <= src + k < buffer length; the Triton kernel does.
//
// Outputs, C-contiguous: [B, L] input_ids, attention_mask, position_ids, loss_mask, extras; [B, Ll] labels,
// shift_labels, decoder_input_ids (Ll = L for derived labels). Element (b, j) of each is a closed-form
// function of plan[b] and the buffers, below: one thread (or one SIMD lane) per element, no scan, no sync.
//
// Modes: kPadded is the only mode built. kPacked is reserved for padding-free packing (one output row,
// cu_seqlens, position ids restarting per example): there the plan keeps its layout, kTokCol becomes the
// example's start column in the single row and position_id's clamp bounds become per-example.
// ---------------------------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PSM_HD __host__ __device__ __forceinline__
#else
#define PSM_HD inline
#endif

namespace psm {

enum Mode : int32_t { kPadded = 0, kPacked = 1 /* reserved, not built */ };

// What the "labels" output is made of.
enum LabelsKind : int32_t { kNoLabels = 0, kDerivedLabels = 1, kGivenLabels = 2 };

enum PlanField : int32_t {
  kTokSrc = 0,
  kTokKept = 1,
  kTokCol = 2,
  kLabelFrom = 3,
  kLossFrom = 4,
  kLabSrc = 5,
  kLabKept = 6,
  kLabCol = 7,
  kPlanStride = 8,
};

// The value transformers' decoder shift replaces by pad_token_id (a literal -100, whatever
// label_pad_token_id is: that is what T5/BART's shift does).
constexpr int64_t kIgnoreLabel = -100;

struct Row {
  int64_t tok_src, tok_kept, tok_col, label_from, loss_from, lab_src, lab_kept, lab_col;
};

PSM_HD Row load_row(const int64_t* plan, int64_t b) {
  const int64_t* p = plan + b * kPlanStride;
  return Row{p[kTokSrc], p[kTokKept], p[kTokCol], p[kLabelFrom], p[kLossFrom], p[kLabSrc], p[kLabKept], p[kLabCol]};
}

// Column j holds kept token k = j - col when 0 <= k < kept; any other column is padding.
PSM_HD bool is_kept(int64_t k, int64_t kept) { return k >= 0 && k < kept; }

// ---- [B, L] outputs ---------------------------------------------------------------------------------------
// `tok`, `mask`, `extra` are row pointers: buffer + row.tok_src, indexed by the kept index.

template <typename T>
PSM_HD int64_t input_id(int64_t j, const Row& r, const T* tok, int64_t pad_token_id) {
  const int64_t k = j - r.tok_col;
  return is_kept(k, r.tok_kept) ? static_cast<int64_t>(tok[k]) : pad_token_id;
}

PSM_HD int64_t attention(int64_t j, const Row& r) { return is_kept(j - r.tok_col, r.tok_kept) ? 1 : 0; }

// clip(cumsum(attention_mask) - 1, min=0) in closed form: the cumsum is 0 on left pads, k + 1 on kept token k,
// and kept on right pads, so the position is clamp(j - col, 0, max(kept - 1, 0)).
PSM_HD int64_t position_id(int64_t j, const Row& r) {
  const int64_t last = r.tok_kept > 0 ? r.tok_kept - 1 : 0;
  const int64_t k = j - r.tok_col;
  return k < 0 ? 0 : (k > last ? last : k);
}

// verl: attention_mask with the tokens of original index < prompt_len - 1 and the last kept token zeroed.
PSM_HD int64_t loss_mask(int64_t j, const Row& r) {
  const int64_t k = j - r.tok_col;
  return (is_kept(k, r.tok_kept) && k >= r.loss_from && k != r.tok_kept - 1) ? 1 : 0;
}

// An extra field (token_type_ids, special_tokens_mask, ...): placed exactly like input_ids.
template <typename T>
PSM_HD int64_t extra(int64_t j, const Row& r, const T* ex, int64_t pad_value) {
  return input_id(j, r, ex, pad_value);
}

// ---- [B, Ll] outputs --------------------------------------------------------------------------------------

// Labels derived from input_ids: the token, unless it is padding, lies in the prompt (k < label_from) or
// its loss mask is 0. `mask` may be nullptr (no loss masks).
template <typename T, typename M>
PSM_HD int64_t derived_label(int64_t j, const Row& r, const T* tok, const M* mask, int64_t label_pad) {
  const int64_t k = j - r.tok_col;
  if (!is_kept(k, r.tok_kept) || k < r.label_from) return label_pad;
  if (mask != nullptr && mask[k] == 0) return label_pad;
  return static_cast<int64_t>(tok[k]);
}

// Separate labels: padded on their own (lab_* fields), values kept as given. `lab` = labels + row.lab_src.
template <typename L>
PSM_HD int64_t given_label(int64_t j, const Row& r, const L* lab, int64_t label_pad) {
  const int64_t k = j - r.lab_col;
  return is_kept(k, r.lab_kept) ? static_cast<int64_t>(lab[k]) : label_pad;
}

// The padded label at column j (0 <= j < Ll), whichever kind the labels are.
template <typename T, typename M, typename L>
PSM_HD int64_t label(int64_t j, const Row& r, int32_t kind, const T* tok, const M* mask, const L* lab,
                     int64_t label_pad) {
  return kind == kGivenLabels ? given_label(j, r, lab, label_pad) : derived_label(j, r, tok, mask, label_pad);
}

// shift_labels[b, j] = labels[b, j + 1]; the last column has no successor.
template <typename T, typename M, typename L>
PSM_HD int64_t shift_label(int64_t j, int64_t Ll, const Row& r, int32_t kind, const T* tok, const M* mask,
                           const L* lab, int64_t label_pad) {
  return j + 1 < Ll ? label(j + 1, r, kind, tok, mask, lab, label_pad) : label_pad;
}

// decoder_input_ids (T5/BART `shift_tokens_right` on the padded labels): column 0 is the start token,
// column j takes labels[b, j - 1]; then every -100 (the start token included) becomes pad_token_id.
template <typename T, typename M, typename L>
PSM_HD int64_t decoder_input_id(int64_t j, const Row& r, int32_t kind, const T* tok, const M* mask,
                                const L* lab, int64_t label_pad, int64_t decoder_start, int64_t pad_token_id) {
  const int64_t v = j == 0 ? decoder_start : label(j - 1, r, kind, tok, mask, lab, label_pad);
  return v == kIgnoreLabel ? pad_token_id : v;
}

}  // namespace psm
