"""pyseqpack.pad_shift_mask: one op from ragged token sequences to every tensor a training step needs.

What the drop-in collators built on it reproduce (transformers' padding rules, T5/BART's decoder shift,
verl's loss mask) is written down in docs/semantics.md, sections "transformers collators" (with "Decoder
shifts") and "verl SFT (the seed's notebook)".

CONTRACT (public signature):

    pad_shift_mask(
        input_ids,                   # list of B sequences (Python lists / 1-D numpy arrays / 1-D tensors of ints),
                                     # a 2-D [B, n] array or tensor,
                                     # or a flat 1-D int tensor/array of all tokens together with `offsets`
        *,
        offsets=None,                # [B+1] int64 (list / numpy / tensor, CPU or same device) when input_ids is flat
        labels=None,                 # None               -> no "labels" output
                                     # "input_ids"        -> causal labels derived from input_ids (same length L),
                                     #                       masked by prompt_lengths / loss_masks, pads -> label_pad
                                     # list of sequences  -> given separately (seq2seq targets), padded to their own
                                     #                       length Ll (longest label, or max_length), values kept
                                     # flat + label_offsets
        label_offsets=None,
        prompt_lengths=None,         # [B] ints: with derived labels, tokens at original index < prompt_lengths[b]
                                     # become label_pad_token_id (completion-only loss)
        loss_masks=None,             # list of per-token 0/1 sequences aligned with input_ids (or flat, same offsets):
                                     # 0 -> label_pad_token_id in derived labels (multi-turn assistant masks)
        pad_token_id=None,           # required whenever a row needs padding (ValueError otherwise)
        label_pad_token_id=-100,
        padding="longest",           # "longest" | "max_length"
        max_length=None,
        truncation=False,            # False: a row longer than the padded length raises ValueError naming it;
                                     # True: rows are cut to max_length on `truncation_side`
        truncation_side="right",     # "right" | "left"
        padding_side="right",        # "right" | "left"
        pad_to_multiple_of=None,     # the padded length (L, and Ll for separate labels) is rounded up to this
        decoder_start_token_id=None, # not None -> "decoder_input_ids" [B, Ll]: labels shifted right by one,
                                     # position 0 = decoder_start_token_id, -100 -> pad_token_id (T5/BART rule)
        return_attention_mask=True,  # "attention_mask": 1 on tokens, 0 on pads
        return_position_ids=False,   # "position_ids" = clip(cumsum(attention_mask, -1) - 1, min=0)
        return_shift_labels=False,   # "shift_labels"[b, t] = labels[b, t + 1], label_pad_token_id in the last column
        return_loss_mask=False,      # verl's "loss_mask" (needs prompt_lengths): attention_mask with the first
                                     # prompt_len - 1 tokens (when prompt_len > 1) and the last token zeroed
        extras=None,                 # {name: (sequences, pad_value)} padded exactly like input_ids, in the same
                                     # form (token_type_ids, special_tokens_mask, a user attention_mask, ...);
                                     # the spec must be a tuple (a list would read as a list of rows)
        dtype=torch.int64,           # torch.int64 or torch.int32, for every output
        device=None,                 # output device; default: the device of input_ids when it is a tensor (flat,
                                     # 2-D, or a list of tensors on one device), else CPU
        backend="auto",              # "auto" | "cpu" (C++) | "cuda" | "triton" | "torch" (the reference)
        num_threads=None,            # backend "cpu" with array input: threads to split rows across (None: by
                                     # size, at most torch.get_num_threads(), which DataLoader workers set to 1)
    ) -> dict[str, torch.Tensor]     # keys: input_ids, attention_mask, labels, decoder_input_ids,
                                     #       shift_labels, position_ids, loss_mask, *extras (only those asked for)

Semantics, precisely
--------------------
Lengths. Example b has n_b tokens. With ``truncation=True`` (needs ``max_length``) it keeps
kept_b = min(n_b, max_length) of them: the first ones (``truncation_side="right"``) or the last ones ("left").
The padded length is L = max_b kept_b (``padding="longest"``; ``max_length`` then only drives truncation) or
``max_length`` (``padding="max_length"``), rounded up to ``pad_to_multiple_of``. Without truncation a row longer
than L raises. Separate labels are truncated and padded the same way on their own, to Ll.

Placement. Kept token k of example b goes to column k (right padding) or L - kept_b + k (left padding); other
columns are padding: ``pad_token_id`` in input_ids, 0 in attention_mask, each extra's own pad value.

Derived labels (``labels="input_ids"``): the token, except label_pad_token_id for pads, for tokens whose
ORIGINAL index (before truncation) is < prompt_lengths[b], and for tokens whose loss mask is 0.

position_ids: clip(cumsum(attention_mask) - 1, 0): k on kept token k, 0 on left pads, kept_b - 1 on right pads.

loss_mask (verl, right padding): 1 on tokens, 0 on tokens of original index < prompt_len - 1 and on the last
kept token. Under left truncation the prompt boundary follows the tokens (verl applies it by column).

shift_labels[b, j] = labels[b, j + 1], label_pad_token_id in the last column. decoder_input_ids[b, 0] =
decoder_start_token_id, [b, j] = labels[b, j - 1], then every -100 becomes pad_token_id (T5/BART's
``shift_tokens_right``; with left padding that is the same formula on the left-padded labels).

Values. Tokens are anything with ``__index__``: Python ints (``bool`` counts as 0/1, as in Python), numpy integer
scalars, integer or bool arrays/tensors. Floats, strings and None raise TypeError naming the field, example and
index ("input_ids[3][17]: expected an int, got float"); values outside int64 (or int32 when ``dtype=torch.int32``)
raise ValueError; loss masks must be 0 or 1. Only the tokens that truncation keeps are read and checked. Data that
already lives on a CUDA device is not value-checked (that would need a host sync): it is cast, and kernel loads
stay in bounds whatever the offsets hold. The caller's data is never modified.

Devices and syncs. Host data (lists, numpy, CPU tensors) can be collated onto any device: its kept tokens are
packed into one pinned buffer and copied asynchronously. Data on a CUDA device only to that device. The device
kernels need L on the host: with host offsets (or equal-length rows) nothing syncs; with offsets on the device,
``padding="longest"`` copies them to the host (one sync) while ``padding="max_length"`` needs no sync: the kernel
plans each example from the device offsets (it then needs ``truncation=True``, since too-long rows cannot be
detected, and ``pad_token_id``), so the op is one kernel launch plus the output allocations.

Backends. "torch" is the plain reference (and the last resort). "cpu" reads Python lists / buffers in C++ in one
pass, writing each output once (O(B) Python work; a list of tensors is first joined by one torch.cat). "triton"
and "cuda" launch one kernel for all outputs, from a flat token buffer and its offsets; every native kernel
plans each example with plan_row of csrc/pad_shift_mask.h. The choice goes through pyseqpack/_dispatch.py:
"auto" tries "cpu" for CPU outputs, "cuda" then "triton" for CUDA outputs, then "torch", skipping backends that
cannot run here; a native launch that fails for a reason other than the caller's input warns once and hands
the call to the next. A backend asked for by name that cannot run raises pyseqpack.BackendUnavailable saying
why. Every argument is validated before anything is launched.

Layout of this package: plan.py (inputs, options, the rules and the widths: one copy of each), reference.py
(backend "torch"), cpu.py, cuda.py and triton.py (one launcher each, all with run(call) -> dict), device.py
(what the device launchers share: DeviceLaunch and its one validation).
"""
from __future__ import annotations

import torch

from .. import _native
from .._dispatch import Dispatcher
from .._native import BackendUnavailable
from . import cpu as _cpu
from . import cuda as _cuda
from . import reference as _reference
from . import triton as _triton
from .device import DeviceLaunch
from .plan import CPU, check_threads, options, output_keys, prepare

__all__ = ["pad_shift_mask", "DeviceLaunch", "OUTPUT_KEYS"]


def __getattr__(name):
    # OUTPUT_KEYS, the output slots in kernel order, comes from the build info (plan.output_keys), read on first
    # use.
    if name == "OUTPUT_KEYS":
        return output_keys()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# Backends: a loader each, which returns the launcher or raises BackendUnavailable saying why
# ---------------------------------------------------------------------------------------------------------------

def _load_cpu(device: torch.device):
    if device is not CPU and device.type != "cpu":
        raise BackendUnavailable(f'backend "cpu" writes CPU tensors, but the output device is {device}')
    if not _native.cpu_available():
        _native.cpu_module()  # raises BackendUnavailable with the diagnostic
        raise BackendUnavailable('backend "cpu" is unavailable: pyseqpack._C is not loaded')
    return _cpu


def _load_cuda(device: torch.device):
    if device.type != "cuda":
        raise BackendUnavailable(f'backend "cuda" needs a CUDA output device, got {device}')
    why = _cuda.unavailable_reason() or (None if torch.cuda.is_available() else "torch sees no CUDA device")
    if why:
        raise BackendUnavailable(f'backend "cuda" is unavailable: {why}')
    return _cuda


def _load_triton(device: torch.device):
    _native.require_triton(device)
    return _triton


def _load_reference(device: torch.device):
    return _reference


DISPATCH = Dispatcher("pad_shift_mask", auto={"cpu": ("cpu",), "cuda": ("cuda", "triton")})
DISPATCH.register("cpu", _load_cpu)
DISPATCH.register("cuda", _load_cuda)
DISPATCH.register("triton", _load_triton)
DISPATCH.register("torch", _load_reference)


def pad_shift_mask(
    input_ids,
    *,
    offsets=None,
    labels=None,
    label_offsets=None,
    prompt_lengths=None,
    loss_masks=None,
    pad_token_id=None,
    label_pad_token_id=-100,
    padding="longest",
    max_length=None,
    truncation=False,
    truncation_side="right",
    padding_side="right",
    pad_to_multiple_of=None,
    decoder_start_token_id=None,
    return_attention_mask=True,
    return_position_ids=False,
    return_shift_labels=False,
    return_loss_mask=False,
    extras=None,
    dtype=torch.int64,
    device=None,
    backend="auto",
    num_threads=None,
) -> dict:
    """Pads, truncates, masks and shifts a batch of token sequences into training tensors. See the module
    docstring for the exact semantics of every argument and output."""
    opts = options(pad_token_id, label_pad_token_id, padding, max_length, truncation, truncation_side,
                   padding_side, pad_to_multiple_of, decoder_start_token_id, dtype)
    if num_threads is not None:
        check_threads(num_threads)
    call = prepare(input_ids, offsets, labels, label_offsets, prompt_lengths, loss_masks, extras, opts, device,
                   return_attention_mask, return_position_ids, return_shift_labels, return_loss_mask, num_threads)
    return DISPATCH.run(backend, call.device, lambda name, launcher: launcher.run(call))
