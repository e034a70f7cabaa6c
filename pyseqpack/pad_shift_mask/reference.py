"""Backend "torch" of pad_shift_mask: the reference. Plain per-row torch code written from the definitions
(the package docstring, docs/semantics.md), independent of the row plan the native kernels share; every
backend is tested against it.
"""
from __future__ import annotations

import operator
from typing import Optional

import numpy as np
import torch

from .plan import INT64, LABELS_DERIVED, LABELS_GIVEN, LABELS_NONE, Call, Options, Seqs


def run(call: Call) -> dict:
    """The requested outputs on the call's device, in its dtype."""
    out = reference(call.src, call.kind, call.lab, call.prompt, call.masks, call.extras, call.opts, call.want)
    return {k: v.to(device=call.device, dtype=call.opts.dtype) for k, v in out.items()}


def row_values(obj, name: str, b: int, start: int, stop: int, value_range, is_mask: bool = False) -> torch.Tensor:
    """Values start..stop of one example as an int64 tensor, checked like the native backends check them."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if not isinstance(obj, (list, tuple, np.ndarray)):
        try:
            obj = np.asarray(memoryview(obj))
        except TypeError:
            # other sequences (range, deque, ...), as CPython's PySequence_Check sees them
            if isinstance(obj, (str, dict)) or not hasattr(type(obj), "__getitem__"):
                raise TypeError(f"{name}[{b}]: expected a sequence of ints (list, tuple, 1-D integer array), "
                                f"got {type(obj).__name__}") from None
            obj = list(obj)
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1:
            raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {obj.ndim}-D array")
        if obj.dtype.kind not in "iub":
            raise TypeError(f"{name}[{b}]: expected integer values, got a {obj.dtype} array")
        seg = obj[start:stop]
        if seg.dtype == np.uint64 and (seg > INT64[1]).any():
            i = int(np.flatnonzero(seg > INT64[1])[0])
            raise ValueError(f"{name}[{b}][{start + i}]: {seg[i]} is out of the int64 range")
        values = torch.from_numpy(seg.astype(np.int64))
    else:
        py = []
        for i in range(start, stop):
            try:
                v = operator.index(obj[i])
            except TypeError:
                raise TypeError(f"{name}[{b}][{i}]: expected an int, got {type(obj[i]).__name__}") from None
            if not INT64[0] <= v <= INT64[1]:
                raise ValueError(f"{name}[{b}][{i}]: {v!r} is out of the int64 range")
            py.append(v)
        values = torch.tensor(py, dtype=torch.int64)
    lo, hi = (0, 1) if is_mask else value_range
    bad = torch.nonzero((values < lo) | (values > hi)).flatten()
    if len(bad):
        i, v = int(bad[0]), int(values[bad[0]])
        what = f"expected 0 or 1, got {v}" if is_mask else f"{v} does not fit in the output dtype int32"
        raise ValueError(f"{name}[{b}][{start + i}]: {what}")
    return values


def kept_window(n: int, opts: Options):
    """[start, stop) of the values an example of length n keeps."""
    if opts.truncation and n > opts.max_length:
        return (0, opts.max_length) if opts.truncation_side == "right" else (n - opts.max_length, n)
    return 0, n


def _ref_pad(x: torch.Tensor, length: int, value, side: str) -> torch.Tensor:
    if len(x) == length:
        return x
    fill = torch.full((length - len(x),), value, dtype=torch.int64)
    return torch.cat([x, fill] if side == "right" else [fill, x])


def reference(src: Seqs, kind: int, lab: Optional[Seqs], prompt, masks: Optional[Seqs], extras, opts: Options,
               want: tuple) -> dict:
    """backend="torch": every output built row by row from the definitions, on the CPU, in int64 (`want`: the
    requested outputs, as Call.want holds them)."""
    want = {key for key, _, _ in want}
    vr = opts.value_range
    side = opts.padding_side
    B = src.B
    src, lab, masks = src.to_host(), lab and lab.to_host(), masks and masks.to_host()
    extras = {name: (seqs.to_host(), pad) for name, (seqs, pad) in extras.items()}
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.cpu().numpy()
    rows, windows = [], []
    for b in range(B):
        obj = src.row(b)
        s, e = kept_window(len(obj), opts)
        windows.append((s, e))
        rows.append(row_values(obj, "input_ids", b, s, e, vr))
    L = opts.padded_length(max(len(t) for t in rows))

    def stack(per_row, length, value):
        return torch.stack([_ref_pad(x, length, value, side) for x in per_row])

    out = {"input_ids": stack(rows, L, opts.pad_token_id)}
    attention = stack([torch.ones_like(t) for t in rows], L, 0)
    if "attention_mask" in want:
        out["attention_mask"] = attention

    if kind == LABELS_DERIVED:
        per_row = []
        for b, ((s, e), t) in enumerate(zip(windows, rows)):
            lab_b = t.clone()
            if prompt is not None:
                lab_b[torch.arange(s, e) < int(prompt[b])] = opts.label_pad_token_id
            if masks is not None:
                keep = row_values(masks.row(b), masks.name, b, s, e, vr, is_mask=True)
                lab_b[keep == 0] = opts.label_pad_token_id
            per_row.append(lab_b)
        labels = stack(per_row, L, opts.label_pad_token_id)
    elif kind == LABELS_GIVEN:
        per_row = []
        for b in range(B):
            obj = lab.row(b)
            s, e = kept_window(len(obj), opts)
            per_row.append(row_values(obj, "labels", b, s, e, vr))
        labels = stack(per_row, opts.padded_length(max(len(t) for t in per_row)), opts.label_pad_token_id)
    if kind != LABELS_NONE:
        out["labels"] = labels
        if "decoder_input_ids" in want:
            # transformers' shift_tokens_right (T5, BART, ...) on the padded labels
            dec = torch.zeros_like(labels)
            dec[:, 1:] = labels[:, :-1]
            dec[:, :1] = opts.decoder_start_token_id
            out["decoder_input_ids"] = dec.masked_fill(dec == -100, opts.pad_token_id)
        if "shift_labels" in want:
            shifted = torch.full_like(labels, opts.label_pad_token_id)
            shifted[:, :-1] = labels[:, 1:]
            out["shift_labels"] = shifted
    if "position_ids" in want:
        out["position_ids"] = torch.clamp(torch.cumsum(attention, dim=1) - 1, min=0)
    if "loss_mask" in want:
        per_row = []
        for b, ((s, e), t) in enumerate(zip(windows, rows)):
            m = torch.ones_like(t)
            m[: max(int(prompt[b]) - 1 - s, 0)] = 0  # original index < prompt_len - 1
            m[-1:] = 0  # the last kept token (EOS)
            per_row.append(m)
        out["loss_mask"] = stack(per_row, L, 0)
    for name, (seqs, pad) in extras.items():
        vals = []
        for b, (s, e) in enumerate(windows):
            vals.append(row_values(seqs.row(b), name, b, s, e, vr))
        out[name] = stack(vals, L, pad)
    return out
