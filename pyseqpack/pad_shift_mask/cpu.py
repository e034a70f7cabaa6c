"""Backend "cpu" of pad_shift_mask: the C++ module pyseqpack._C (csrc/pad_shift_mask_cpu.cpp) reads the
caller's objects directly and writes every output in one pass.

Each field goes to C++ in its own form: the rows (as psm_row_lengths opened them while planning, so each row's
buffer is acquired once per call), or a flat buffer with its int64 offsets.
"""
from __future__ import annotations

import torch

from .. import _native
from .plan import Call, Options, Seqs, is_tensor, output_keys

__all__ = ["run", "gather"]


def source(seqs: Seqs):
    """(object C++ reads, int64 offsets or None): the rows (opened when measured in C++), or a flat buffer and its
    offsets."""
    if seqs.rows is not None:
        return seqs.rows if seqs.opened is None else seqs.opened, None
    flat = seqs.flat.numpy() if is_tensor(seqs.flat) else seqs.flat  # integer tensors never require grad
    return flat, seqs.offsets


def run(call: Call) -> dict:
    """Allocates the requested outputs ([B, L] or [B, Ll]) and the extras' ([B, L]), then one psm_fill writes
    them all. Sizes go to torch.empty as separate ints, which it parses faster than a tuple."""
    cpu = _native.cpu_module_or_none() or _native.cpu_module()
    src, kind, lab, prompt, masks, extras, opts, want, L, Ll, B, _, num_threads = call
    dtype = opts.dtype
    tokens, tok_offsets = (src.opened, None) if src.opened is not None else source(src)
    labels, lab_offsets = source(lab) if lab is not None else (None, None)
    masks, mask_offsets = source(masks) if masks is not None else (None, None)
    if prompt is not None and is_tensor(prompt):
        prompt = prompt.cpu().numpy()
    outs = {}
    addr = [0] * len(output_keys())  # the C slots, in slot order; 0 = not requested
    for key, label_width, slot in want:
        out = outs[key] = torch.empty(B, Ll if label_width else L, dtype=dtype)
        addr[slot] = out.data_ptr()
    extra_args = extra_addr = ()
    if extras:
        extra_args, extra_addr = [], []
        for name, (seqs, pad) in extras.items():
            out = outs[name] = torch.empty(B, L, dtype=dtype)
            extra_args.append((name, *source(seqs), pad))
            extra_addr.append(out.data_ptr())
        extra_args, extra_addr = tuple(extra_args), tuple(extra_addr)
    # num_threads=None: C++ picks by size, at most torch's intra-op thread count (1 in DataLoader workers).
    cpu.psm_fill(B, L, Ll, *opts.layout, tokens, tok_offsets, kind, labels, lab_offsets, prompt, masks,
                 mask_offsets, extra_args, tuple(addr), extra_addr, *opts.fills, num_threads or 0,
                 torch.get_num_threads())
    return outs


def gather(seqs: Seqs, total: int, opts: Options, is_mask: bool, pin: bool) -> torch.Tensor:
    """Every example's kept values back to back (`total` of them), in the output dtype, read and validated as
    psm_fill reads them; `pin`: into pinned memory, ready for an asynchronous copy to a GPU."""
    out = torch.empty(total, dtype=opts.dtype, pin_memory=pin)
    obj, offsets = source(seqs)
    max_length, trunc_left, _ = opts.layout
    _native.cpu_module().psm_gather(obj, seqs.name, seqs.B, offsets, max_length, trunc_left, out.data_ptr(),
                                    out.element_size(), int(is_mask))
    return out
