// pad_shift_mask.h: the per-element math of pyseqpack.pad_shift_mask, shared by every native backend.
//
// Plain C++17, no torch or Python headers. Every function is PSM_HD: `__host__ __device__` under nvcc,
// plain `inline` otherwise, so the C++ CPU kernel (csrc/pad_shift_mask_cpu.cpp, tested in CI) and the CUDA
// kernel compile the very same lines. The Triton kernel (kernels/pad_shift_mask.py) mirrors them.
//
// ---------------------------------------------------------------------------------------------------------
// THE ROW PLAN
//
// Every kernel derives, per example b, a Row (below) from where the example's values lie in their buffers
// and a few per-batch options, with plan_row(): the same lines on the CPU (csrc/pad_shift_mask_cpu.cpp, tested
// in CI) and on CUDA; the Triton kernel mirrors them. No plan array crosses the Python/kernel boundary, so a
// device launch needs no planning ops before it: only the offsets.
//
// Inputs of plan_row for example b:
//   tok_start, tok_end   its tokens are tokens[tok_start .. tok_end)   (offsets[b], offsets[b + 1]; a row
//                        sequence is its own buffer: 0, len(row))
//   lab_start, lab_end   separate labels (kGivenLabels): labels[lab_start .. lab_end)
//   prompt_len           has_prompt: tokens of ORIGINAL index < prompt_len are the prompt
//   Layout               L, Ll (output widths), max_length (< 0: no truncation), trunc_left, pad_left
//
// The Row it returns:
//   tok_src    index, in the token buffer, of the first KEPT token (after truncation)
//   tok_kept   number of kept tokens: min(n, max_length) under truncation, else n (n = tok_end - tok_start)
//   tok_col    output column of the first kept token: 0 for right padding, L - kept for left padding
//   label_from derived labels: kept index from which labels keep their token; kept indices below it (the
//              prompt, after truncation) become label_pad_token_id.  = clamp(prompt_len - cut, 0, kept)
//   loss_from  verl loss_mask: kept index from which the mask may be 1.  = clamp(prompt_len - 1 - cut, 0, kept)
//   lab_src, lab_kept, lab_col   the same three for separate labels (padded to Ll); with derived labels
//              they repeat the tok_* ones and are unused
// where `cut` is the number of tokens truncation removed from the LEFT of the example (0 for right
// truncation), so "kept index" k = original index - cut.
//
// Truncation is idempotent: a buffer that already holds only the kept values (what the host packs before a
// copy to the GPU) plans to the same Row with cut = 0, so only prompt_len must then be given as
// prompt_len - cut (the caller's job).
//
// Buffers, all 1-D and indexed with int64:
//   tokens      the token ids; example b's kept tokens are tokens[tok_src .. tok_src + tok_kept)
//   loss_masks  optional, aligned with tokens (same indices): 0 drops a token from the derived labels
//   extras      optional, aligned with tokens: padded exactly like input_ids, each with its own pad value
//   labels      optional separate labels, with their own offsets (lab_src, lab_kept, lab_col)
// Every kernel takes row pointers `buffer + row.tok_src` (or lab_src) and reads element k only for
// 0 <= k < kept, so it never reads the tokens that truncation dropped. plan_row() is total (any int64
// inputs, no overflow), but a device kernel cannot trust offsets that live on the device (checking them
// would need a host sync): it must also keep every load inside its buffer. Both device kernels write a row
// whose window leaves its buffer as an empty row (all padding), so CUDA and Triton agree on bad offsets.
//
// Outputs, C-contiguous: [B, L] input_ids, attention_mask, position_ids, loss_mask, extras; [B, Ll] labels,
// shift_labels, decoder_input_ids (Ll = L for derived labels). Element (b, j) of each is a closed-form
// function of the example's Row and the buffers, below: one thread (or one SIMD lane) per element, no
// scan, no sync.
//
// Modes: kPadded is the only mode built. kPacked is reserved for padding-free packing (one output row,
// cu_seqlens, position ids restarting per example): there Row keeps its fields, tok_col becomes the
// example's start column in the single row (the packed offsets) and position_id's clamp bounds become
// per-example.
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

// The outputs, in slot order. Every kernel numbers its outputs so (the `outs` array of the CUDA entry point, the
// `outs` tuple of psm_fill), and setup.py copies the names into pyseqpack/_build_info.py for Python, so this
// is the one place the order is written.
enum Out : int32_t { kIds, kAttn, kLabels, kDecoder, kShift, kPos, kLoss, kNumOut };
constexpr const char* kOutputNames[kNumOut] = {"input_ids",    "attention_mask", "labels",   "decoder_input_ids",
                                               "shift_labels", "position_ids",   "loss_mask"};

// Whether output slot `slot` is [B, Ll] (a labels width) rather than [B, L].
PSM_HD constexpr bool label_width(int32_t slot) { return slot == kLabels || slot == kDecoder || slot == kShift; }

// What the "labels" output is made of.
enum LabelsKind : int32_t { kNoLabels = 0, kDerivedLabels = 1, kGivenLabels = 2 };

// The value transformers' decoder shift replaces by pad_token_id (a literal -100, whatever
// label_pad_token_id is: that is what T5/BART's shift does).
constexpr int64_t kIgnoreLabel = -100;

struct Row {
  int64_t tok_src, tok_kept, tok_col, label_from, loss_from, lab_src, lab_kept, lab_col;
};

// Per-batch planning options.
struct Layout {
  int64_t L, Ll;        // widths of the [B, L] and [B, Ll] outputs
  int64_t max_length;   // < 0: no truncation
  int32_t trunc_left;   // truncation removes values from the left (keeps the last max_length)
  int32_t pad_left;     // padding goes on the left
};

// end - start as a count: 0 when end < start, saturated at INT64_MAX (never overflows, for any inputs).
PSM_HD int64_t span(int64_t start, int64_t end) {
  if (end <= start) return 0;
  const uint64_t d = static_cast<uint64_t>(end) - static_cast<uint64_t>(start);
  return d > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(d);
}

// Values kept of n under truncation to max_length (< 0: none).
PSM_HD int64_t kept_count(int64_t n, int64_t max_length) {
  return (max_length >= 0 && n > max_length) ? max_length : n;
}

// Where one field's kept values start (src) and which output column they start at (col), for `width` columns.
PSM_HD void place(int64_t start, int64_t n, int64_t kept, int64_t width, const Layout& lay, int64_t* src,
                  int64_t* col) {
  *src = start + (lay.trunc_left ? n - kept : 0);  // <= start + n: no overflow
  *col = lay.pad_left ? width - kept : 0;
}

// The Row of one example (see THE ROW PLAN above).
PSM_HD Row plan_row(int64_t tok_start, int64_t tok_end, int64_t lab_start, int64_t lab_end, int32_t kind,
                    bool has_prompt, int64_t prompt_len, const Layout& lay) {
  Row r{};
  const int64_t n = span(tok_start, tok_end);
  r.tok_kept = kept_count(n, lay.max_length);
  place(tok_start, n, r.tok_kept, lay.L, lay, &r.tok_src, &r.tok_col);
  if (has_prompt) {
    // clamp(prompt_len - cut, 0, kept) and clamp(prompt_len - 1 - cut, 0, kept), written without overflow.
    const int64_t cut = lay.trunc_left ? n - r.tok_kept : 0;
    const int64_t p = prompt_len > cut ? prompt_len - cut : 0;
    r.label_from = p < r.tok_kept ? p : r.tok_kept;
    r.loss_from = p > 1 ? (p - 1 < r.tok_kept ? p - 1 : r.tok_kept) : 0;
  }
  if (kind == kGivenLabels) {
    const int64_t m = span(lab_start, lab_end);
    r.lab_kept = kept_count(m, lay.max_length);
    place(lab_start, m, r.lab_kept, lay.Ll, lay, &r.lab_src, &r.lab_col);
  } else {
    r.lab_src = r.tok_src;
    r.lab_kept = r.tok_kept;
    r.lab_col = r.tok_col;
  }
  return r;
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
