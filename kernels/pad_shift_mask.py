"""Triton backend of ``pyseqpack.pad_shift_mask``: every output of a batch in ONE launch.

The op turns ragged token sequences into padded [B, L] tensors. Python plans each example once (the row plan
of csrc/pad_shift_mask.h: where its kept tokens start in the flat buffer, how many, which column they start
at, where the prompt ends); after that every output element (b, j) is a closed-form function of plan[b] and
the buffers, so the kernel is a pure gather-and-select with no scan and no cross-program communication.

Grid: (B, cdiv(max(L, Ll), BLOCK)). Program (b, c) loads plan row b (8 int64) and writes columns
[c * BLOCK, (c + 1) * BLOCK) of every requested output of example b. Memory traffic per element: one token
load for input_ids (shared with the derived labels), one more per label shift (shift_labels reads j + 1,
decoder_input_ids j - 1: neighbours of the same cache lines), and one store per output. Pads cost no load.

Every load is masked with 0 <= index < buffer length as well as by the plan, so a plan built from unchecked
device offsets can give wrong values but never reads out of bounds. Index math is int64 throughout.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it). Uses only long-stable
tl APIs (Triton 3.6 .. 3.9).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Largest column block; a block covers a whole row when L <= this.
MAX_BLOCK = 1024


@triton.jit
def _label_at(j, tok_ptr, n_tok, mask_ptr, lab_ptr, n_lab, tok_src, kept, col, label_from, lab_src, lab_kept,
              lab_col, label_pad, LABELS: tl.constexpr, HAS_MASK: tl.constexpr):
    """The padded label at columns j (a block of int64 column indices, any of them may be out of range)."""
    if LABELS == 1:  # derived from the tokens: masked by the prompt and the loss masks
        k = j - col
        valid = (k >= 0) & (k < kept)
        src = tok_src + k
        ok = valid & (src >= 0) & (src < n_tok)
        value = tl.load(tok_ptr + src, mask=ok, other=0).to(tl.int64)
        keep = valid & (k >= label_from)
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + src, mask=ok, other=0) != 0)
    else:  # given separately: placed by the label columns of the plan
        k = j - lab_col
        keep = (k >= 0) & (k < lab_kept)
        src = lab_src + k
        ok = keep & (src >= 0) & (src < n_lab)
        value = tl.load(lab_ptr + src, mask=ok, other=0).to(tl.int64)
    return tl.where(keep, value, label_pad)


@triton.jit(do_not_specialize=["n_tok", "n_lab", "B", "L", "Ll", "pad_id", "label_pad", "decoder_start"])
def _pad_shift_mask_kernel(
    plan_ptr, tok_ptr, n_tok, mask_ptr, lab_ptr, n_lab, ex_ptr, ex_pad_ptr,
    ids_ptr, attn_ptr, labels_ptr, dec_ptr, shift_ptr, pos_ptr, loss_ptr, ex_out_ptr,
    B, L, Ll, pad_id, label_pad, decoder_start,
    LABELS: tl.constexpr, HAS_MASK: tl.constexpr, NUM_EXTRAS: tl.constexpr,
    WRITE_ATTN: tl.constexpr, WRITE_LABELS: tl.constexpr, WRITE_DEC: tl.constexpr, WRITE_SHIFT: tl.constexpr,
    WRITE_POS: tl.constexpr, WRITE_LOSS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Writes columns [pid1 * BLOCK, +BLOCK) of example pid0 of every requested output.

    plan_ptr    int64 [B, 8]   row plan (csrc/pad_shift_mask.h)
    tok_ptr     int32/int64/uint8 [n_tok]   tokens; mask_ptr: loss masks aligned with them (HAS_MASK)
    lab_ptr     int32/int64 [n_lab]         separate labels (LABELS == 2)
    ex_ptr      [NUM_EXTRAS, n_tok]         extras aligned with the tokens; ex_pad_ptr int64 [NUM_EXTRAS]
    *_ptr outs  int32/int64, C-contiguous: ids/attn/pos/loss [B, L], labels/dec/shift [B, Ll],
                ex_out [NUM_EXTRAS, B, L]
    LABELS      0 none, 1 derived from tokens, 2 given;   WRITE_*: which outputs exist
    Unused pointers may alias any tensor: they are never dereferenced.
    """
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    n_tok = n_tok.to(tl.int64)
    L = L.to(tl.int64)
    Ll = Ll.to(tl.int64)

    row = plan_ptr + b * 8
    tok_src = tl.load(row + 0)
    kept = tl.load(row + 1)
    col = tl.load(row + 2)
    label_from = tl.load(row + 3)
    loss_from = tl.load(row + 4)
    lab_src = tl.load(row + 5)
    lab_kept = tl.load(row + 6)
    lab_col = tl.load(row + 7)

    # [B, L] outputs. Column j holds kept token k = j - col when 0 <= k < kept, else padding.
    in_row = cols < L
    k = cols - col
    is_tok = (k >= 0) & (k < kept)
    src = tok_src + k
    ok = is_tok & (src >= 0) & (src < n_tok) & in_row
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
            here = _label_at(cols, tok_ptr, n_tok, mask_ptr, lab_ptr, n_lab, tok_src, kept, col, label_from,
                             lab_src, lab_kept, lab_col, label_pad, LABELS, HAS_MASK)
            tl.store(labels_ptr + lab_off, here, mask=in_lab)
        if WRITE_SHIFT:  # shift_labels[j] = labels[j + 1]; the last column has no successor
            nxt = _label_at(cols + 1, tok_ptr, n_tok, mask_ptr, lab_ptr, n_lab, tok_src, kept, col, label_from,
                            lab_src, lab_kept, lab_col, label_pad, LABELS, HAS_MASK)
            tl.store(shift_ptr + lab_off, tl.where(cols + 1 < Ll, nxt, label_pad), mask=in_lab)
        if WRITE_DEC:  # T5/BART shift right: start token, then labels[j - 1]; -100 -> pad
            prev = _label_at(cols - 1, tok_ptr, n_tok, mask_ptr, lab_ptr, n_lab, tok_src, kept, col, label_from,
                             lab_src, lab_kept, lab_col, label_pad, LABELS, HAS_MASK)
            dec = tl.where(cols == 0, decoder_start, prev)
            tl.store(dec_ptr + lab_off, tl.where(dec == -100, pad_id, dec), mask=in_lab)


def launch(args) -> None:
    """Enqueues the kernel for a ``pyseqpack.pad_shift_mask.DeviceLaunch`` (no sync)."""
    if args.mode != 0:
        raise NotImplementedError("pad_shift_mask: only the padded mode (0) is built; packed mode is reserved")
    out = args.outputs
    ids = out["input_ids"]
    B, L, Ll = ids.shape[0], args.L, args.Ll
    width = max(L, Ll)
    if B == 0 or width == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(width))
    n_extras = 0 if args.extras is None else args.extras.shape[0]
    any_tensor = args.tokens  # stands in for pointers the constexpr flags leave unused

    def ptr(t):
        return any_tensor if t is None else t

    grid = (B, triton.cdiv(width, block))
    device = ids.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _pad_shift_mask_kernel[grid](
            args.plan, args.tokens, args.tokens.shape[0], ptr(args.loss_masks),
            ptr(args.labels), 0 if args.labels is None else args.labels.shape[0],
            ptr(args.extras), ptr(args.extra_pads),
            ids, ptr(out.get("attention_mask")), ptr(out.get("labels")), ptr(out.get("decoder_input_ids")),
            ptr(out.get("shift_labels")), ptr(out.get("position_ids")), ptr(out.get("loss_mask")),
            ptr(out.get("extras")),
            B, L, Ll, args.pad_token_id, args.label_pad_token_id, args.decoder_start_token_id,
            LABELS=args.labels_kind, HAS_MASK=args.loss_masks is not None, NUM_EXTRAS=n_extras,
            WRITE_ATTN="attention_mask" in out, WRITE_LABELS="labels" in out,
            WRITE_DEC="decoder_input_ids" in out, WRITE_SHIFT="shift_labels" in out,
            WRITE_POS="position_ids" in out, WRITE_LOSS="loss_mask" in out, BLOCK=block,
        )

