"""Triton backend of ``pyseqpack.pad_shift_mask``: every output of a batch in ONE launch.

The op turns ragged token sequences into padded [B, L] tensors. Nothing is planned before the launch: each
program derives the Row of its example (csrc/pad_shift_mask.h, THE ROW PLAN: where its kept tokens start in
the flat buffer, how many, which column they start at, where the prompt ends) from offsets[b], offsets[b + 1]
and the per-launch layout, mirroring psm::plan_row line for line. After that every output element (b, j) is
a closed-form function of the Row and the buffers, so the kernel is a pure gather-and-select with no scan and
no cross-program communication.

Grid: (B, cdiv(max(L, Ll), BLOCK)). Program (b, c) plans example b and writes columns
[c * BLOCK, (c + 1) * BLOCK) of every requested output of it.

Memory traffic. Per program: offsets[b] and offsets[b + 1] (two int64; offsets[b + 1] is the next example's
offsets[b], the same cache line), plus prompt_lengths[b] and label_offsets[b], [b + 1] when given: a few bytes
that every column block of the row reloads (from L2) instead of communicating. Per element: one token load for
input_ids, which the derived labels read again at the same addresses (cache hits) along with one loss-mask
load; labels at j + 1 (shift_labels) and j - 1 (decoder_input_ids) read neighbours of the same cache lines; one
load per extra and one store per output. Pads cost no load. From DRAM that is about one read of each kept
token, mask, label and extra, and one write of each output element.

Offsets live on the device and are not trusted (checking them would need a host sync). Every value of them
plans without overflow, and a row whose token window [tok_src, tok_src + tok_kept) is not inside the token
buffer is written as an EMPTY row (all padding), exactly as the CUDA kernel does; likewise a separate-labels
window outside the label buffer gives an empty label row. So every load is inside its buffer and both device
kernels agree on bad offsets. Index math is int64 throughout.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it). Uses only long-stable
tl APIs (Triton 3.6 .. 3.9).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _native
from ..pad_shift_mask.device import check_launch
from ..pad_shift_mask.plan import output_keys

# Largest column block; a block covers a whole row when L <= this.
MAX_BLOCK = 1024


# ---- psm::plan_row, mirrored ---------------------------------------------------------------------------------
# The same formulas as csrc/pad_shift_mask.h, in int64 scalars. tl.where evaluates both of its branches, so
# where C++ guards a subtraction with a branch, the operands themselves are chosen so that no lane overflows.

@triton.jit
def _span(start, end):
    """psm::span: end - start as a count, 0 when end <= start, saturated at INT64_MAX."""
    # end - start overflows exactly when end > INT64_MAX + start (only possible for start < 0); `room` is that
    # bound, with min(start, 0) <= 0 so the sum itself cannot overflow. end > room implies end > start.
    room = 9223372036854775807 + tl.minimum(start, 0)
    d = end - tl.where((end > start) & (end <= room), start, end)  # end - start, or end - end = 0
    return tl.where(end > room, 9223372036854775807, d)


@triton.jit
def _place(start, end, max_length, TRUNC_LEFT: tl.constexpr):
    """psm::span, psm::kept_count and the src half of psm::place for one field: (n, kept, src)."""
    n = _span(start, end)
    kept = tl.where((max_length >= 0) & (n > max_length), max_length, n)  # kept_count
    src = start
    if TRUNC_LEFT:
        src = start + (n - kept)  # <= start + n <= end: no overflow
    return n, kept, src


@triton.jit
def _inside(src, count, n):
    """window_inside of csrc/pad_shift_mask.cu: [src, src + count) lies in [0, n), for any int64 values. n - src
    is taken with src clamped into [0, n] (no overflow); when src is outside, the other terms are false."""
    return (src >= 0) & (count >= 0) & (src <= n) & (count <= n - tl.minimum(tl.maximum(src, 0), n))


# ---- per-element functions -----------------------------------------------------------------------------------

@triton.jit
def _label_at(j, tok_ptr, mask_ptr, lab_ptr, tok_src, kept, col, label_from, lab_src, lab_kept, lab_col,
              label_pad, LABELS: tl.constexpr, HAS_MASK: tl.constexpr):
    """The padded label at columns j (a block of int64 column indices, any of them may be out of range):
    psm::derived_label (LABELS == 1) or psm::given_label (LABELS == 2)."""
    if LABELS == 1:  # derived from the tokens: masked by the prompt and the loss masks
        k = j - col
        valid = (k >= 0) & (k < kept)
        src = tok_src + k
        value = tl.load(tok_ptr + src, mask=valid, other=0).to(tl.int64)
        keep = valid & (k >= label_from)
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + src, mask=valid, other=0) != 0)
    else:  # given separately: placed by the label fields of the Row
        k = j - lab_col
        keep = (k >= 0) & (k < lab_kept)
        value = tl.load(lab_ptr + lab_src + k, mask=keep, other=0).to(tl.int64)
    return tl.where(keep, value, label_pad)


@triton.jit(do_not_specialize=["n_tok", "n_lab", "B", "L", "Ll", "max_length", "pad_id", "label_pad",
                               "decoder_start"])
def _pad_shift_mask_kernel(
    offsets_ptr, tok_ptr, n_tok, mask_ptr, lab_ptr, lab_offsets_ptr, n_lab, prompt_ptr, ex_ptr, ex_pad_ptr,
    ids_ptr, attn_ptr, labels_ptr, dec_ptr, shift_ptr, pos_ptr, loss_ptr, ex_out_ptr,
    B, L, Ll, max_length, pad_id, label_pad, decoder_start,
    LABELS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_PROMPT: tl.constexpr, NUM_EXTRAS: tl.constexpr,
    TRUNC_LEFT: tl.constexpr, PAD_LEFT: tl.constexpr,
    WRITE_ATTN: tl.constexpr, WRITE_LABELS: tl.constexpr, WRITE_DEC: tl.constexpr, WRITE_SHIFT: tl.constexpr,
    WRITE_POS: tl.constexpr, WRITE_LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Plans example pid0 and writes columns [pid1 * BLOCK, +BLOCK) of every requested output of it.

    offsets_ptr     int64 [B + 1]   example b's tokens are tokens[offsets[b] : offsets[b + 1]] (untrusted)
    tok_ptr         int32/int64 [n_tok]   tokens; mask_ptr: loss masks aligned with them (HAS_MASK)
    lab_ptr         int32/int64 [n_lab]   separate labels, lab_offsets_ptr int64 [B + 1] (LABELS == 2)
    prompt_ptr      int64 [B]             prompt lengths, in original token indices (HAS_PROMPT)
    ex_ptr          [NUM_EXTRAS, n_tok]   extras aligned with the tokens; ex_pad_ptr int64 [NUM_EXTRAS]
    *_ptr outs      int32/int64, C-contiguous: ids/attn/pos/loss [B, L], labels/dec/shift [B, Ll], in the
                    output slot order of csrc/pad_shift_mask.h (psm::kOutputNames); ex_out [NUM_EXTRAS, B, L]
    max_length      truncation to it, -1 for none; TRUNC_LEFT / PAD_LEFT: the sides
    LABELS          0 none, 1 derived from tokens, 2 given;   WRITE_*: which outputs exist
    Unused pointers may alias any tensor: they are never dereferenced.
    """
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    n_tok = n_tok.to(tl.int64)
    n_lab = n_lab.to(tl.int64)
    L = L.to(tl.int64)
    Ll = Ll.to(tl.int64)
    max_length = max_length.to(tl.int64)

    # psm::plan_row(offsets[b], offsets[b + 1], label_offsets[b], label_offsets[b + 1], LABELS, HAS_PROMPT,
    # prompt_lengths[b], {L, Ll, max_length, TRUNC_LEFT, PAD_LEFT}).
    tok_start = tl.load(offsets_ptr + b)
    tok_end = tl.load(offsets_ptr + b + 1)
    n, kept, tok_src = _place(tok_start, tok_end, max_length, TRUNC_LEFT)
    label_from = 0
    loss_from = 0
    if HAS_PROMPT:
        # clamp(prompt_len - cut, 0, kept) and clamp(prompt_len - 1 - cut, 0, kept), without overflow:
        # max(prompt_len, cut) - cut is prompt_len - cut when that is positive, else 0 (cut >= 0).
        prompt_len = tl.load(prompt_ptr + b)
        cut = 0
        if TRUNC_LEFT:
            cut = n - kept
        p = tl.maximum(prompt_len, cut) - cut
        label_from = tl.minimum(p, kept)
        loss_from = tl.minimum(tl.maximum(p - 1, 0), kept)  # p - 1 >= -1
    # Untrusted offsets: a token window outside [0, n_tok) becomes the empty row, the Row plan_row gives for
    # an example with no tokens (checked_row in csrc/pad_shift_mask.cu, the same rule).
    inside = _inside(tok_src, kept, n_tok)
    tok_src = tl.where(inside, tok_src, 0)
    kept = tl.where(inside, kept, 0)
    if HAS_PROMPT:
        label_from = tl.where(inside, label_from, 0)
        loss_from = tl.where(inside, loss_from, 0)
    # psm::place's col, from the (possibly emptied) kept count: 0 for right padding, L - kept for left.
    col = 0
    if PAD_LEFT:
        col = L - kept
    if LABELS == 2:
        lab_start = tl.load(lab_offsets_ptr + b)
        lab_end = tl.load(lab_offsets_ptr + b + 1)
        _, lab_kept, lab_src = _place(lab_start, lab_end, max_length, TRUNC_LEFT)
        lab_inside = _inside(lab_src, lab_kept, n_lab)
        lab_src = tl.where(lab_inside, lab_src, 0)
        lab_kept = tl.where(lab_inside, lab_kept, 0)
        lab_col = 0
        if PAD_LEFT:
            lab_col = Ll - lab_kept
    else:  # derived labels (or none): the label fields repeat the token ones
        lab_src = tok_src
        lab_kept = kept
        lab_col = col

    # [B, L] outputs. Column j holds kept token k = j - col when 0 <= k < kept, else padding. The window check
    # above keeps tok_src + k inside [0, n_tok) for every kept k, so the loads need no other mask.
    in_row = cols < L
    k = cols - col
    is_tok = (k >= 0) & (k < kept)
    src = tok_src + k
    ok = is_tok & in_row
    out_off = b * L + cols
    tok = tl.load(tok_ptr + src, mask=ok, other=0).to(tl.int64)
    tl.store(ids_ptr + out_off, tl.where(is_tok, tok, pad_id), mask=in_row)
    if WRITE_ATTN:
        tl.store(attn_ptr + out_off, is_tok.to(tl.int64), mask=in_row)
    if WRITE_POS:
        # clip(cumsum(mask) - 1, 0) in closed form: clamp(k, 0, max(kept - 1, 0))
        last = tl.maximum(kept - 1, 0)
        tl.store(pos_ptr + out_off, tl.minimum(tl.maximum(k, 0), last), mask=in_row)
    if WRITE_LOSS:
        loss = is_tok & (k >= loss_from) & (k != kept - 1)
        tl.store(loss_ptr + out_off, loss.to(tl.int64), mask=in_row)
    for e in tl.static_range(NUM_EXTRAS):
        extra = tl.load(ex_ptr + e * n_tok + src, mask=ok, other=0).to(tl.int64)
        extra_pad = tl.load(ex_pad_ptr + e)
        tl.store(ex_out_ptr + (b + e * B) * L + cols, tl.where(is_tok, extra, extra_pad), mask=in_row)

    # [B, Ll] outputs.
    if LABELS != 0:
        in_lab = cols < Ll
        lab_off = b * Ll + cols
        if WRITE_LABELS:
            here = _label_at(cols, tok_ptr, mask_ptr, lab_ptr, tok_src, kept, col, label_from, lab_src, lab_kept,
                             lab_col, label_pad, LABELS, HAS_MASK)
            tl.store(labels_ptr + lab_off, here, mask=in_lab)
        if WRITE_SHIFT:  # shift_labels[j] = labels[j + 1]; the last column has no successor
            nxt = _label_at(cols + 1, tok_ptr, mask_ptr, lab_ptr, tok_src, kept, col, label_from, lab_src,
                            lab_kept, lab_col, label_pad, LABELS, HAS_MASK)
            tl.store(shift_ptr + lab_off, tl.where(cols + 1 < Ll, nxt, label_pad), mask=in_lab)
        if WRITE_DEC:  # T5/BART shift right: start token, then labels[j - 1]; -100 -> pad
            prev = _label_at(cols - 1, tok_ptr, mask_ptr, lab_ptr, tok_src, kept, col, label_from, lab_src,
                             lab_kept, lab_col, label_pad, LABELS, HAS_MASK)
            dec = tl.where(cols == 0, decoder_start, prev)
            tl.store(dec_ptr + lab_off, tl.where(dec == -100, pad_id, dec), mask=in_lab)


def launch(args) -> None:
    """Enqueues the kernel for a DeviceLaunch (pyseqpack/pad_shift_mask/device.py), no sync, after
    check_launch: ValueError naming a bad field, before anything is launched."""
    check_launch(args)
    out = args.outputs
    device = args.tokens.device
    B, L, Ll = args.offsets.shape[0] - 1, args.L, args.Ll
    n_tok = args.tokens.shape[0]
    n_lab = 0 if args.labels is None else args.labels.shape[0]
    n_extras = 0 if args.extras is None else args.extras.shape[0]
    width = max(L, Ll)
    if B <= 0 or width == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(width))
    any_tensor = args.tokens  # stands in for pointers the constexpr flags leave unused

    def ptr(t):
        return any_tensor if t is None else t

    grid = (B, triton.cdiv(width, block))
    keys = output_keys()  # the kernel's output pointers come in slot order
    with _native.device_guard(device):
        _pad_shift_mask_kernel[grid](
            args.offsets, args.tokens, n_tok, ptr(args.loss_masks),
            ptr(args.labels), ptr(args.label_offsets), n_lab,
            ptr(args.prompt_lengths), ptr(args.extras), ptr(args.extra_pads),
            *[ptr(out.get(k)) for k in keys], ptr(out.get("extras")),
            B, L, Ll, args.max_length, args.pad_token_id, args.label_pad_token_id, args.decoder_start_token_id,
            LABELS=args.labels_kind, HAS_MASK=args.loss_masks is not None, HAS_PROMPT=args.prompt_lengths is not None,
            NUM_EXTRAS=n_extras, TRUNC_LEFT=bool(args.truncate_left), PAD_LEFT=bool(args.pad_left),
            WRITE_ATTN="attention_mask" in out, WRITE_LABELS="labels" in out,
            WRITE_DEC="decoder_input_ids" in out, WRITE_SHIFT="shift_labels" in out,
            WRITE_POS="position_ids" in out, WRITE_LOSS="loss_mask" in out, BLOCK=block,
        )
