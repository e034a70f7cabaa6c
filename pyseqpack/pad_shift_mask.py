"""pyseqpack.pad_shift_mask: one op from ragged token sequences to every tensor a training step needs.

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

Backends. "torch" is the plain reference (and the fallback). "cpu" reads Python lists / buffers in C++ in one pass,
writing each output once (O(B) Python work; a list of tensors is first joined by one torch.cat). "triton" and
"cuda" launch one kernel for all outputs, from a flat token buffer and its offsets; every native kernel plans each
example with plan_row of csrc/pad_shift_mask.h.
"auto": "cpu" for CPU outputs when pyseqpack._C is built, else "torch"; on CUDA "cuda" when
pyseqpack.pad_shift_mask_cuda provides a kernel, else "triton", else "torch" (a Triton compile or launch failure
under "auto" warns once and falls back to "torch"). A backend asked for by name that cannot run raises
pyseqpack.BackendUnavailable saying why. Every argument is validated before anything is launched.
"""
from __future__ import annotations

import array
import dataclasses
import functools
import importlib
import importlib.util
import itertools
import operator
import warnings
from typing import Optional

import numpy as np
import torch

from . import _native
from ._native import BackendUnavailable

__all__ = ["pad_shift_mask", "DeviceLaunch", "OUTPUT_KEYS"]

# psm::LabelsKind and psm::Mode of csrc/pad_shift_mask.h.
LABELS_NONE, LABELS_DERIVED, LABELS_GIVEN = 0, 1, 2
MODE_PADDED = 0  # psm::kPadded; 1 (kPacked, padding-free packing) is reserved

OUTPUT_KEYS = (
    "input_ids", "attention_mask", "labels", "decoder_input_ids", "shift_labels", "position_ids", "loss_mask",
)
_BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_CPU = torch.device("cpu")
_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)


# ---------------------------------------------------------------------------------------------------------------
# Inputs, normalized
# ---------------------------------------------------------------------------------------------------------------

def _length_array(lengths):
    """int64 [B] numpy lengths from what _row_lengths returns (the bytes C++ measured, or numpy already)."""
    return np.frombuffer(lengths, dtype=np.int64) if isinstance(lengths, bytes) else lengths


class _Seqs:
    """One ragged field, in one of two forms: `rows` (one host object per example) or `flat` + `offsets`.

    rows     lists / tuples / 1-D arrays, one per example (host)
    flat     1-D numpy array or tensor, every example back to back
    offsets  flat: int64 [B+1], a numpy array (host) or a tensor on the device of `flat`
    lengths  int64 [B] numpy; None while the offsets live on the device. Rows measured in C++ keep the bytes it
             returned until something reads `lengths` (the common call only needs `extent`).
    extent   (longest, shortest) of the lengths when already known (rows measured in C++)
    opened   rows measured in C++: its capsule of the opened rows (buffers acquired once), which the C++ kernels
             read in place of `rows`
    from_rows  flat, made by concatenating the caller's tensor rows: the caller's form is rows
    A plain class with slots: built twice per call on the collation hot path.
    """

    __slots__ = ("name", "rows", "flat", "offsets", "_lengths", "extent", "opened", "from_rows", "device")

    def __init__(self, name: str, rows=None, flat=None, offsets=None, lengths=None, extent=None, opened=None,
                 from_rows=False):
        self.name, self.rows, self.flat, self.offsets, self._lengths, self.extent, self.opened, self.from_rows = (
            name, rows, flat, offsets, lengths, extent, opened, from_rows)
        # Where the data lies: the device of a flat tensor, else the host.
        self.device = _CPU if flat is None or not isinstance(flat, torch.Tensor) else flat.device

    def replace(self, **changes) -> "_Seqs":
        fields = dict(name=self.name, rows=self.rows, flat=self.flat, offsets=self.offsets, lengths=self._lengths,
                      extent=self.extent, opened=self.opened, from_rows=self.from_rows)
        fields.update(changes)
        return _Seqs(**fields)

    @property
    def lengths(self):
        self._lengths = _length_array(self._lengths)
        return self._lengths

    def measured_alike(self, other: "_Seqs") -> bool:
        """Both fields measured in C++, to the same lengths (compared as bytes, without numpy)."""
        return isinstance(self._lengths, bytes) and isinstance(other._lengths, bytes) and self._lengths == other._lengths

    @property
    def B(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets) - 1

    @property
    def on_host(self) -> bool:
        return self.device.type == "cpu"

    def host_offsets(self) -> bool:
        return self.rows is not None or isinstance(self.offsets, np.ndarray)

    def row(self, b: int):
        """Example b as a host object (for the reference and the host gather; call to_host() first)."""
        if self.rows is not None:
            return self.rows[b]
        return self.flat[int(self.offsets[b]):int(self.offsets[b + 1])]

    def to_host(self) -> "_Seqs":
        """This field with its data and offsets on the host (one copy each)."""
        if self.rows is not None or (self.on_host and self.host_offsets()):
            return self
        off = self.offsets.cpu().numpy() if isinstance(self.offsets, torch.Tensor) else self.offsets
        return self.replace(flat=self.flat.cpu(), offsets=off, lengths=np.diff(off))


def _is_int_dtype(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    return x.dtype.kind in "iub"


def _check_int_array(x, name: str):
    if not _is_int_dtype(x):
        raise TypeError(f"{name}: expected integer values, got a {x.dtype} {'tensor' if isinstance(x, torch.Tensor) else 'array'}")


def _host_offsets(offsets, name: str, total: int, value_name: str) -> np.ndarray:
    arr = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected a 1-D sequence of ints, got {arr.ndim}-D {arr.dtype}")
    if len(arr) < 2:
        raise ValueError(f"{name}: expected B + 1 >= 2 entries (B >= 1 examples), got {len(arr)}")
    arr = arr.astype(np.int64)
    if arr[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {arr[0]}")
    drops = np.flatnonzero(arr[1:] < arr[:-1])
    if len(drops):
        i = int(drops[0]) + 1
        raise ValueError(f"{name} must be non-decreasing: {name}[{i}] = {arr[i]} < {name}[{i - 1}] = {arr[i - 1]}")
    if arr[-1] != total:
        raise ValueError(f"{name}[-1] = {arr[-1]} but {value_name} holds {total} values")
    return arr


def _host_copy_offsets(seqs: Optional[_Seqs], like: Optional[_Seqs] = None) -> Optional[_Seqs]:
    """`seqs` with its device offsets copied to the host and checked (a sync); `like`: share those of input_ids."""
    if seqs is None or seqs.host_offsets():
        return seqs
    if like is not None:
        return seqs.replace(offsets=like.offsets, lengths=like.lengths)
    off = _host_offsets(seqs.offsets, "offsets" if seqs.name == "input_ids" else "label_offsets",
                        int(seqs.flat.shape[0]), seqs.name)
    return seqs.replace(offsets=off, lengths=np.diff(off))


def _row_lengths(rows, name: str):
    """(len() of each example: int64 numpy, or the bytes of one from C++; whether some example is neither a
    list/tuple nor a buffer, e.g. a tensor; (longest, shortest); the opened rows or None), checking that each is
    a sequence. C++ when built, so list and numpy batches cost no per-row Python."""
    cpu = _native.cpu_module_or_none()
    if cpu is not None:
        lengths, other, longest, shortest, opened = cpu.psm_row_lengths(rows, name)
        return lengths, other, (longest, shortest), opened
    out = np.empty(len(rows), dtype=np.int64)
    for b, r in enumerate(rows):
        if isinstance(r, np.ndarray) and r.ndim != 1:
            raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {r.ndim}-D array")
        if isinstance(r, (str, dict)) or not hasattr(r, "__len__"):
            raise TypeError(f"{name}[{b}]: expected a sequence of ints (list, tuple, 1-D integer array), got {type(r).__name__}")
        out[b] = len(r)
    return out, True, (int(out.max()), int(out.min())), None


def _as_seqs(value, offsets, name: str, offsets_name: str) -> _Seqs:
    """Normalizes one ragged field (input_ids, labels, loss_masks, an extra), validating its form."""
    if offsets is None and type(value) in (list, tuple) and value:  # the collation hot path: a batch of rows
        if isinstance(value[0], torch.Tensor):
            seqs = _tensor_row_seqs(value, name)
            if seqs is not None:
                return seqs
        return _row_seqs(value, name)
    if offsets is not None:
        if not isinstance(value, (np.ndarray, torch.Tensor)) or value.ndim != 1:
            raise TypeError(f"{name}: with {offsets_name}, expected a flat 1-D tensor or numpy array, got "
                            f"{type(value).__name__}{'' if not hasattr(value, 'ndim') else f' of {value.ndim} dims'}")
        _check_int_array(value, name)
        dev = value.device if isinstance(value, torch.Tensor) else _CPU
        if isinstance(offsets, torch.Tensor) and offsets.device.type != "cpu":
            if offsets.device != dev:
                raise ValueError(f"{offsets_name} is on {offsets.device} but {name} is on {dev}")
            if offsets.ndim != 1 or offsets.numel() < 2 or offsets.is_floating_point():
                raise TypeError(f"{offsets_name}: expected a 1-D integer tensor of B + 1 >= 2 entries")
            # Lengths stay unknown on the host (no sync): the kernels plan from the offsets themselves.
            return _Seqs(name, flat=value, offsets=offsets.to(torch.int64))
        off = _host_offsets(offsets, offsets_name, int(value.shape[0]), name)
        return _Seqs(name, flat=value, offsets=off, lengths=np.diff(off))
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 2:
            raise TypeError(f"{name}: a {value.ndim}-D {type(value).__name__} must be 2-D [B, n], or flat 1-D with "
                            f"{offsets_name}=[0, n_0, n_0 + n_1, ...]")
        _check_int_array(value, name)
        B, n = value.shape
        if B == 0:
            raise ValueError(f"{name}: the batch is empty (B = 0)")
        off = np.arange(B + 1, dtype=np.int64) * n
        return _Seqs(name, flat=value.reshape(-1), offsets=off, lengths=np.full(B, n, dtype=np.int64))
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of sequences, a 2-D array or tensor, or a flat 1-D one with "
                        f"{offsets_name}; got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: the batch is empty (B = 0)")
    return _row_seqs(value, name)


def _cat_tensor_rows(rows):
    """Rows that are all 1-D integer tensors on one device (``dataset.with_format("torch")``) joined into one
    flat buffer: (flat, row lengths as a list), or None for anything else (rows of several devices or of float,
    unsigned or mixed wide types, a row that is not 1-D...). One torch.cat (no sync on a GPU) instead of a
    conversion per row (a numpy view costs about 0.6 us, len() of a tensor 0.4 us); it copies the rows once,
    which on a CPU costs what a memcpy of them does."""
    if not all([isinstance(r, torch.Tensor) for r in rows]):
        return None
    try:
        flat = torch.cat(rows)  # one dtype from the rows' promotion; every row on one device
    except (RuntimeError, TypeError):
        return None
    # cat keeps the values of integer rows (their promoted type holds them all), but a float or complex row
    # turns the whole buffer float, and rows of 2 dims cat to 2 dims; uint16 / uint32 / uint64 rows only
    # concatenate among themselves, and their values are checked when read, as numpy rows are.
    if flat.ndim != 1 or flat.dtype.is_floating_point or flat.dtype.is_complex:
        return None
    return flat, list(map(torch.Tensor.numel, rows))  # numel = len() for 1-D rows


def _tensor_row_seqs(rows, name: str) -> Optional[_Seqs]:
    """_cat_tensor_rows as a field with host offsets; None where it declines (_row_seqs then checks each row
    and names the culprit)."""
    joined = _cat_tensor_rows(rows)
    if joined is None:
        return None
    flat, counts = joined
    # At batch sizes, running sums and max / min of a Python list beat numpy's calls (_offsets_of: about 2 us).
    offsets = np.array(list(itertools.accumulate(counts, initial=0)), dtype=np.int64)
    return _Seqs(name, flat=flat, offsets=offsets, lengths=np.array(counts, dtype=np.int64),
                 extent=(max(counts), min(counts)), from_rows=True)


def _row_seqs(value, name: str) -> _Seqs:
    """A non-empty list or tuple of rows (those _tensor_row_seqs did not take): measured (in C++ when built), CPU
    tensor rows read through numpy views, device tensor rows checked one by one, then concatenated into one flat
    device buffer."""
    lengths, other, extent, opened = _row_lengths(value, name)
    if not other:
        return _Seqs(name, rows=value, lengths=lengths, extent=extent, opened=opened)
    lengths = _length_array(lengths)
    rows = list(value)
    tensor_rows = [b for b, r in enumerate(rows) if isinstance(r, torch.Tensor)]
    devices = {rows[b].device for b in tensor_rows}
    if any(d.type != "cpu" for d in devices):
        # Rows already on a device: one flat device buffer (torch.cat, no sync); lengths are host metadata.
        if len(tensor_rows) != len(rows) or len(devices) != 1:
            raise ValueError(f"{name}: rows on a CUDA device must all be tensors on that one device, got "
                             f"{sorted({str(d) for d in devices} | ({'host'} if len(tensor_rows) != len(rows) else set()))}")
        for b, r in enumerate(rows):
            if r.ndim != 1:
                raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {r.ndim}-D tensor")
            _check_int_array(r, f"{name}[{b}]")
        # Valid rows reach this only when torch.cat cannot join their own dtypes (a wide unsigned type beside
        # others): device data is cast, not value-checked (module docstring), so they are joined as int64.
        return _Seqs(name, flat=torch.cat([r.to(torch.int64) for r in rows]), offsets=_offsets_of(lengths),
                     lengths=lengths, extent=extent, from_rows=True)
    for b in tensor_rows:  # CPU tensors are read through their numpy view: O(1) each
        if rows[b].ndim != 1:
            raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {rows[b].ndim}-D tensor")
        rows[b] = rows[b].detach().numpy()
    return _Seqs(name, rows=rows, lengths=lengths, extent=extent)


def _check_aligned(seqs: _Seqs, src: _Seqs):
    """loss_masks and extras must be shaped exactly like input_ids: same form, examples and lengths."""
    src_rows = src.rows is not None or src.from_rows  # the caller's form (tensor rows are concatenated)
    if (seqs.rows is not None or seqs.from_rows) != src_rows:
        form = "a list of rows" if src_rows else "flat (1-D with offsets, or 2-D)"
        raise TypeError(f"{seqs.name}: must have the same form as input_ids ({form})")
    if seqs.B != src.B:
        raise ValueError(f"{seqs.name} has {seqs.B} examples but input_ids has {src.B}")
    if seqs.device != src.device:
        raise ValueError(f"{seqs.name} is on {seqs.device} but input_ids is on {src.device}")
    if seqs.measured_alike(src):
        return
    if isinstance(src.lengths, np.ndarray):
        diff = np.flatnonzero(seqs.lengths != src.lengths)
        if len(diff):
            b = int(diff[0])
            raise ValueError(f"{seqs.name}[{b}] has {seqs.lengths[b]} values but input_ids[{b}] has {src.lengths[b]} tokens")
    elif seqs.flat.shape[0] != src.flat.shape[0]:
        raise ValueError(f"{seqs.name} holds {seqs.flat.shape[0]} values but input_ids holds {src.flat.shape[0]}")


def _as_int(value, name: str, *, optional: bool = False):
    if value is None and optional:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__}") from None


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Options:
    pad_token_id: Optional[int]
    label_pad_token_id: Optional[int]
    padding: str
    max_length: Optional[int]
    truncation: bool
    truncation_side: str
    padding_side: str
    pad_to_multiple_of: Optional[int]
    decoder_start_token_id: Optional[int]
    dtype: torch.dtype
    # Derived once (the options object is cached per distinct call): psm::Layout's planning options as the
    # kernels take them, max_length (-1: no truncation), trunc_left, pad_left; and the kernels' scalar values
    # pad_token_id, label_pad_token_id, decoder_start_token_id (0 where unused) and the output item size.
    layout: tuple = dataclasses.field(init=False, repr=False, compare=False)
    fills: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layout", (self.max_length if self.truncation else -1,
                                            self.truncation_side == "left", self.padding_side == "left"))
        object.__setattr__(self, "fills", (self.pad_token_id or 0, self.label_pad_token_id or 0,
                                           self.decoder_start_token_id or 0, self.dtype.itemsize))

    def padded_length(self, longest: int) -> int:
        length = self.max_length if self.padding == "max_length" else longest
        m = self.pad_to_multiple_of
        return -(-length // m) * m if m else length

    @property
    def value_range(self):
        return _INT32 if self.dtype == torch.int32 else _INT64


def _options(pad_token_id, label_pad_token_id, padding, max_length, truncation, truncation_side, padding_side,
             pad_to_multiple_of, decoder_start_token_id, dtype) -> _Options:
    for name, value, allowed in (("padding", padding, ("longest", "max_length")),
                                 ("truncation_side", truncation_side, ("right", "left")),
                                 ("padding_side", padding_side, ("right", "left"))):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
    max_length = _as_int(max_length, "max_length", optional=True)
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length}")
    pad_to_multiple_of = _as_int(pad_to_multiple_of, "pad_to_multiple_of", optional=True)
    if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of}")
    if not isinstance(truncation, bool):
        raise TypeError(f"truncation must be True or False, got {truncation!r}")
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    opts = _Options(
        pad_token_id=_as_int(pad_token_id, "pad_token_id", optional=True),
        label_pad_token_id=_as_int(label_pad_token_id, "label_pad_token_id", optional=True),
        padding=padding, max_length=max_length, truncation=truncation, truncation_side=truncation_side,
        padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
        decoder_start_token_id=_as_int(decoder_start_token_id, "decoder_start_token_id", optional=True), dtype=dtype,
    )
    lo, hi = opts.value_range
    for name in ("pad_token_id", "label_pad_token_id", "decoder_start_token_id"):
        v = getattr(opts, name)
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"{name}={v} does not fit in the output dtype {dtype}")
    return opts


# The same options come back on every call of a training run: checked once each (typed, so that 2.0 is not
# taken for 2). Unhashable arguments (always an error) go to _options uncached, which names them.
_cached_options = functools.lru_cache(maxsize=64, typed=True)(_options)


def _check_threads(num_threads) -> None:
    """num_threads: None or a positive int (ints of other types, such as numpy's, pass)."""
    n = _as_int(num_threads, "num_threads", optional=True)
    if isinstance(num_threads, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")


def _checked_options(*args) -> _Options:
    try:
        return _cached_options(*args)
    except TypeError:
        return _options(*args)


# ---------------------------------------------------------------------------------------------------------------
# Widths: the padded lengths L and Ll. Every kernel plans each example itself (plan_row in csrc/pad_shift_mask.h)
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Widths:
    L: int
    Ll: int


def _kept(n: np.ndarray, opts: _Options) -> np.ndarray:
    """Values each example keeps: min(n, max_length) under truncation (psm::kept_count)."""
    return np.minimum(n, opts.max_length) if opts.truncation else n


def _extent(seqs: _Seqs) -> tuple:
    """(longest, shortest) of the lengths: as measured in C++ when the rows were, else from the lengths."""
    return seqs.extent or (int(seqs.lengths.max()), int(seqs.lengths.min()))


def _kept_extent(seqs: _Seqs, opts: _Options) -> tuple:
    """(longest, shortest) kept counts; min(n, max_length) is monotone in n, so the extremes of the lengths
    give them."""
    longest, shortest = _extent(seqs)
    if opts.truncation:
        return min(longest, opts.max_length), min(shortest, opts.max_length)
    return longest, shortest


def _check_fits(seqs: _Seqs, length: int, opts: _Options, what: str):
    """Raises for the first example longer than the padded length (the caller found one)."""
    kept = _kept(seqs.lengths, opts)
    b = int(np.flatnonzero(kept > length)[0])
    how = (f"padding='max_length' pads to {length} (max_length={opts.max_length})" if opts.padding == "max_length"
           else f"the padded length is {length}")
    raise ValueError(f"{seqs.name}[{b}] has {kept[b]} {what}, more than the padded length: {how}; pass "
                     "truncation=True to cut it, or a larger max_length")


def _fitted_width(opts: _Options, longest: int, shortest: int = -1) -> int:
    """The padded width for rows of these extreme lengths (before truncation), or -1 when a length rule fails:
    the longest kept row does not fit (padding="max_length" without truncation), or a row needs padding but
    pad_token_id is None (pass shortest = -1 to skip that rule, as labels do). Callers find the row and raise."""
    if opts.truncation:
        longest, shortest = min(longest, opts.max_length), min(shortest, opts.max_length)
    L = opts.padded_length(longest)
    if longest > L or (opts.pad_token_id is None and 0 <= shortest < L):
        return -1
    return L


def _host_widths(src: _Seqs, lab: Optional[_Seqs], opts: _Options, kind: int) -> _Widths:
    """L and Ll from host lengths, checking every length rule (rows too long, a pad token needed but missing)."""
    L = _fitted_width(opts, *_extent(src))
    if L < 0:
        longest = _kept_extent(src, opts)[0]
        L = opts.padded_length(longest)
        if longest > L:
            _check_fits(src, L, opts, "tokens")
        kept = _kept(src.lengths, opts)
        b = int(np.flatnonzero(kept < L)[0])
        raise ValueError(f"pad_token_id is None but input_ids[{b}] needs padding ({kept[b]} tokens, padded "
                         f"length {L}); pass pad_token_id")
    Ll = L
    if kind == LABELS_GIVEN:
        Ll = _fitted_width(opts, _extent(lab)[0])
        if Ll < 0:
            _check_fits(lab, opts.padded_length(_kept_extent(lab, opts)[0]), opts, "labels")
    return _Widths(L, Ll)


def _device_widths(opts: _Options) -> _Widths:
    """Offsets on the device with padding='max_length': L = Ll = max_length (rounded up), known without a sync;
    the kernels plan each example from its device offsets."""
    if not opts.truncation:
        raise ValueError("offsets on the device with padding='max_length' need truncation=True (checking that no row "
                         "is too long would need a host sync); or pass the offsets as a host list / CPU tensor")
    if opts.pad_token_id is None:
        raise ValueError("offsets on the device: pass pad_token_id (whether a row needs padding is only known there)")
    L = opts.padded_length(0)
    return _Widths(L, L)


def _prompt_lengths(value, B: int):
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        if value.ndim != 1 or value.numel() != B or value.is_floating_point():
            raise ValueError(f"prompt_lengths: expected a 1-D integer tensor of B = {B} entries")
        return value.to(torch.int64)
    arr = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"prompt_lengths: expected a 1-D sequence of ints, got {arr.ndim}-D {arr.dtype}")
    if len(arr) != B:
        raise ValueError(f"prompt_lengths has {len(arr)} entries but input_ids has B = {B} examples")
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"prompt_lengths[{neg[0]}] = {arr[neg[0]]} is negative")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The torch reference: plain per-row code, independent of the plan
# ---------------------------------------------------------------------------------------------------------------

def _ref_values(obj, name: str, b: int, start: int, stop: int, value_range, is_mask: bool = False) -> torch.Tensor:
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
        if seg.dtype == np.uint64 and (seg > _INT64[1]).any():
            i = int(np.flatnonzero(seg > _INT64[1])[0])
            raise ValueError(f"{name}[{b}][{start + i}]: {seg[i]} is out of the int64 range")
        values = torch.from_numpy(seg.astype(np.int64))
    else:
        py = []
        for i in range(start, stop):
            try:
                v = operator.index(obj[i])
            except TypeError:
                raise TypeError(f"{name}[{b}][{i}]: expected an int, got {type(obj[i]).__name__}") from None
            if not _INT64[0] <= v <= _INT64[1]:
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


def _ref_window(n: int, opts: _Options):
    """[start, stop) of the values an example of length n keeps."""
    if opts.truncation and n > opts.max_length:
        return (0, opts.max_length) if opts.truncation_side == "right" else (n - opts.max_length, n)
    return 0, n


def _ref_pad(x: torch.Tensor, length: int, value, side: str) -> torch.Tensor:
    if len(x) == length:
        return x
    fill = torch.full((length - len(x),), value, dtype=torch.int64)
    return torch.cat([x, fill] if side == "right" else [fill, x])


def _reference(src: _Seqs, kind: int, lab: Optional[_Seqs], prompt, masks: Optional[_Seqs], extras, opts: _Options,
               want: tuple) -> dict:
    """backend="torch": every output built row by row from the definitions, on the CPU, in int64 (`want`: the
    requested outputs, from _wanted)."""
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
        s, e = _ref_window(len(obj), opts)
        windows.append((s, e))
        rows.append(_ref_values(obj, "input_ids", b, s, e, vr))
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
                keep = _ref_values(masks.row(b), masks.name, b, s, e, vr, is_mask=True)
                lab_b[keep == 0] = opts.label_pad_token_id
            per_row.append(lab_b)
        labels = stack(per_row, L, opts.label_pad_token_id)
    elif kind == LABELS_GIVEN:
        per_row = []
        for b in range(B):
            obj = lab.row(b)
            s, e = _ref_window(len(obj), opts)
            per_row.append(_ref_values(obj, "labels", b, s, e, vr))
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
            vals.append(_ref_values(seqs.row(b), name, b, s, e, vr))
        out[name] = stack(vals, L, pad)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Backend "cpu": pyseqpack._C reads the caller's objects directly
# ---------------------------------------------------------------------------------------------------------------

def _cpu_source(seqs: _Seqs):
    """(object C++ reads, int64 offsets or None): the rows (opened when measured in C++), or a flat buffer and its
    offsets."""
    if seqs.rows is not None:
        return seqs.rows if seqs.opened is None else seqs.opened, None
    flat = seqs.flat.detach().numpy() if isinstance(seqs.flat, torch.Tensor) else seqs.flat
    return flat, seqs.offsets


def _run_cpu(widths: _Widths, src, kind, lab, prompt, masks, extras, opts: _Options, want: tuple,
             num_threads) -> dict:
    tokens, tok_offsets = _cpu_source(src)
    labels, lab_offsets = _cpu_source(lab) if lab is not None else (None, None)
    mask_obj, mask_offsets = _cpu_source(masks) if masks is not None else (None, None)
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.cpu().numpy()
    extra_args = tuple([(name, *_cpu_source(seqs), pad) for name, (seqs, pad) in extras.items()])
    return _cpu_fill(_native.cpu_module(), src.B, widths.L, widths.Ll, opts, want, tokens, tok_offsets, kind, labels,
                     lab_offsets, prompt, mask_obj, mask_offsets, extra_args, num_threads)


def _cpu_fill(cpu, B: int, L: int, Ll: int, opts: _Options, want: tuple, tokens, tok_offsets, kind: int, labels,
              lab_offsets, prompt, mask_obj, mask_offsets, extra_args: tuple, num_threads) -> dict:
    """Allocates the requested outputs ([B, L] or [B, Ll]) and the extras' ([B, L]), then one psm_fill writes
    them all. Each field comes in its own form: rows (offsets None), or flat with its offsets; `extra_args` holds
    (name, values, offsets, pad). Sizes go to torch.empty as separate ints: parsed about 0.5 us faster than a
    tuple."""
    outs = {}
    addr = [0] * len(OUTPUT_KEYS)  # the C slots, in the order of OUTPUT_KEYS; 0 = not requested
    for key, label_width, slot in want:
        out = outs[key] = torch.empty(B, Ll if label_width else L, dtype=opts.dtype)
        addr[slot] = out.data_ptr()
    extra_addr = []
    for name, *_ in extra_args:
        out = outs[name] = torch.empty(B, L, dtype=opts.dtype)
        extra_addr.append(out.data_ptr())
    # num_threads=None: C++ picks by size, at most torch's intra-op thread count (1 in DataLoader workers).
    cpu.psm_fill(B, L, Ll, *opts.layout, tokens, tok_offsets, kind, labels, lab_offsets, prompt, mask_obj,
                 mask_offsets, extra_args, tuple(addr), tuple(extra_addr), *opts.fills, num_threads or 0,
                 torch.get_num_threads())
    return outs


def _express_field(cpu, rows, name: str):
    """One field of the express path: (values for psm_fill, their offsets or None, the lengths as int64 bytes,
    longest, shortest), or None when the general path must take it. Rows that are all CPU tensors are
    concatenated (_cat_tensor_rows); other rows are measured and opened in C++ (psm_row_lengths, which raises
    the general path's error for a row that is not a sequence)."""
    if isinstance(rows[0], torch.Tensor):
        joined = _cat_tensor_rows(rows) if rows[0].is_cpu else None  # cat: every row on the CPU
        if joined is None:
            return None
        flat, counts = joined  # integer: .numpy() needs no detach; array("q"): native int64, like psm_row_lengths
        return (flat.numpy(), array.array("q", itertools.accumulate(counts, initial=0)),
                array.array("q", counts).tobytes(), max(counts), min(counts))
    lengths, other, longest, shortest, opened = cpu.psm_row_lengths(rows, name)
    return None if other else (opened, None, lengths, longest, shortest)


def _express_cpu(input_ids, labels, prompt_lengths, loss_masks, extras, opts: _Options, attention, position, shift,
                 loss, num_threads):
    """The collation hot path, with nothing but the C++ calls and the allocations in between: rows (lists,
    tuples, 1-D integer buffers, CPU tensors) of input_ids, labels None / "input_ids" / rows, host prompt
    lengths, loss masks and extras as rows, no offsets, CPU outputs (the caller checked those arguments).

    Returns None for anything else, or when any rule of the general path would fail (a labels rule, a length
    rule, a field not shaped like input_ids, rows of mixed kinds...): the general path then runs and computes
    the same outputs or raises its error. Rows that are not sequences at all raise here, with the general
    path's message (psm_row_lengths is its own measuring call); bad values raise from psm_fill, as there."""
    cpu = _native.cpu_module_or_none()
    if cpu is None or type(input_ids) not in (list, tuple) or not input_ids:
        return None
    if labels is None:
        if shift or opts.decoder_start_token_id is not None:
            return None
        kind = LABELS_NONE
    elif type(labels) in (list, tuple) and labels:
        kind = LABELS_GIVEN
    elif isinstance(labels, str) and labels == "input_ids":
        kind = LABELS_DERIVED
    else:
        return None
    if kind != LABELS_NONE and opts.label_pad_token_id is None:
        return None
    if opts.decoder_start_token_id is not None and opts.pad_token_id is None:
        return None
    if prompt_lengths is None:
        if loss:
            return None
    elif (kind != LABELS_DERIVED and not loss) or (isinstance(prompt_lengths, torch.Tensor)
                                                    and prompt_lengths.device.type != "cpu"):
        return None
    if loss_masks is not None and (kind != LABELS_DERIVED or type(loss_masks) not in (list, tuple) or not loss_masks):
        return None

    field = _express_field(cpu, input_ids, "input_ids")
    if field is None:
        return None
    tokens, tok_offsets, lengths, longest, shortest = field
    L = _fitted_width(opts, longest, shortest)
    if L < 0:
        return None
    B, Ll, lab_values, lab_offsets = len(input_ids), L, None, None
    if kind == LABELS_GIVEN:
        field = _express_field(cpu, labels, "labels") if len(labels) == B else None
        if field is None:
            return None
        lab_values, lab_offsets, _, longest, _ = field
        Ll = _fitted_width(opts, longest)
        if Ll < 0:
            return None
    prompt = None if prompt_lengths is None else _prompt_lengths(prompt_lengths, B)
    mask_values = mask_offsets = None
    if loss_masks is not None:
        field = _express_field(cpu, loss_masks, "loss_masks")
        if field is None or field[2] != lengths:  # shaped like input_ids
            return None
        mask_values, mask_offsets = field[:2]
    extra_args = ()
    if extras:
        if type(extras) is not dict:
            return None
        lo, hi = opts.value_range
        extra_args = []
        for name, spec in extras.items():
            if (type(name) is not str or name in OUTPUT_KEYS or type(spec) is not tuple or len(spec) != 2
                    or type(spec[0]) not in (list, tuple) or not spec[0] or type(spec[1]) is not int
                    or not lo <= spec[1] <= hi):
                return None
            field = _express_field(cpu, spec[0], name)
            if field is None or field[2] != lengths:  # the same lengths as input_ids (bytes equal, so B too)
                return None
            extra_args.append((name, field[0], field[1], spec[1]))
        extra_args = tuple(extra_args)
    want = _wanted(kind != LABELS_NONE, opts.decoder_start_token_id is not None, bool(attention), bool(shift),
                   bool(position), bool(loss))
    return _cpu_fill(cpu, B, L, Ll, opts, want, tokens, tok_offsets, kind, lab_values, lab_offsets, prompt,
                     mask_values, mask_offsets, extra_args, num_threads)


# ---------------------------------------------------------------------------------------------------------------
# Device backends ("triton", "cuda"): one launch from flat device buffers and their offsets
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DeviceLaunch:
    """Everything a device kernel gets for one call; both kernels/pad_shift_mask.py and the CUDA launcher take it.

    Each kernel plans every example itself, from its offsets, with plan_row() of csrc/pad_shift_mask.h (the
    Triton kernel mirrors it), so nothing is computed on the device before the launch.
    Tensors are on the output device, contiguous, int64 buffers 16-byte aligned (Triton mis-loads others).
    tokens          int32 / int64 [T]
    offsets         int64 [B + 1]: example b's tokens are tokens[offsets[b] : offsets[b + 1]] (not trusted: a
                    kernel keeps every load inside its buffer whatever they hold)
    loss_masks      None or uint8 / int32 / int64 [T], aligned with tokens (0 drops a derived label)
    labels          None or int32 / int64 [Tl], separate labels (labels_kind == 2) ...
    label_offsets   ... and their int64 [B + 1] offsets (None otherwise)
    prompt_lengths  None or int64 [B]: tokens of original index < prompt_lengths[b] are the prompt
    extras          None or [E, T] (int32 / int64), aligned with tokens; extra_pads int64 [E]
    outputs         {key: tensor} for the requested keys of OUTPUT_KEYS ([B, L] or [B, Ll], dtype int32/int64),
                    plus "extras": [E, B, L] when E > 0
    L, Ll           widths of the outputs;  max_length: truncation to it, -1 for none
    truncate_left   truncation keeps the last max_length values;  pad_left: padding goes on the left
    labels_kind     0 none, 1 derived from tokens, 2 given;  mode: 0 (padded; 1 = packed is reserved)
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    loss_masks: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    label_offsets: Optional[torch.Tensor]
    prompt_lengths: Optional[torch.Tensor]
    extras: Optional[torch.Tensor]
    extra_pads: Optional[torch.Tensor]
    outputs: dict
    L: int
    Ll: int
    max_length: int
    truncate_left: bool
    pad_left: bool
    labels_kind: int
    pad_token_id: int
    label_pad_token_id: int
    decoder_start_token_id: int
    mode: int = MODE_PADDED


@functools.lru_cache(maxsize=None)
def _cuda_kernel():
    """(launcher module, None) or (None, why). HOOK for the CUDA kernel: pyseqpack/pad_shift_mask_cuda.py must
    define `launch(args: DeviceLaunch) -> None` (enqueue on the current stream, no sync) and
    `unavailable_reason() -> Optional[str]` (None when the library holds the kernel)."""
    if importlib.util.find_spec("pyseqpack.pad_shift_mask_cuda") is None:
        return None, "pyseqpack.pad_shift_mask_cuda (the CUDA launcher) is not part of this install"
    try:
        mod = importlib.import_module("pyseqpack.pad_shift_mask_cuda")
        why = mod.unavailable_reason()
    except Exception as e:  # noqa: BLE001 - a broken launcher makes the backend unavailable, with the reason
        return None, f"pyseqpack.pad_shift_mask_cuda failed to load ({type(e).__name__}: {e})"
    return (None, why) if why else (mod, None)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To `device` without a host sync: a host tensor goes through pinned memory, asynchronously."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _gather_host(seqs: _Seqs, kept: np.ndarray, opts: _Options, is_mask: bool, pin: bool) -> torch.Tensor:
    """Every example's kept values back to back, in the output dtype, validated (`kept`: how many each keeps).
    `pin`: into pinned memory, ready for an asynchronous copy to the GPU."""
    if _native.cpu_available():
        out = torch.empty(int(kept.sum()), dtype=opts.dtype, pin_memory=pin)
        obj, offsets = _cpu_source(seqs)
        max_length, trunc_left, _ = opts.layout
        _native.cpu_module().psm_gather(obj, seqs.name, seqs.B, offsets, max_length, trunc_left, out.data_ptr(),
                                        out.element_size(), int(is_mask))
        return out
    parts = []
    for b in range(seqs.B):
        obj = seqs.row(b)
        s, e = _ref_window(len(obj), opts)
        parts.append(_ref_values(obj, seqs.name, b, s, e, opts.value_range, is_mask))
    return torch.cat(parts).to(opts.dtype)


def _offsets_of(kept: np.ndarray) -> np.ndarray:
    """[0, kept_0, kept_0 + kept_1, ...]: the offsets of a packed buffer."""
    out = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=out[1:])
    return out


def _device_launch(widths: _Widths, src, kind, lab, prompt, masks, extras, opts: _Options, device: torch.device,
                   outputs: dict) -> DeviceLaunch:
    """The kernel's inputs on the device. Fields on the host are packed (kept values only, one asynchronous copy
    each) with offsets of their own; fields already on the device are used in place, with their offsets (copied
    there when they are host metadata)."""
    pin = device.type == "cuda"

    def field(seqs, kept, is_mask):
        if seqs.on_host:  # host data implies host offsets
            return _to_device(_gather_host(seqs, kept, opts, is_mask, pin), device)
        flat = seqs.flat
        if flat.dtype == torch.bool and is_mask:
            flat = flat.view(torch.uint8)
        elif flat.dtype not in (torch.int32, torch.int64) and not (is_mask and flat.dtype == torch.uint8):
            flat = flat.to(torch.int64)  # the kernels read int32 / int64 (and uint8 masks)
        return _aligned(flat)

    def offsets(seqs, kept):
        off = _offsets_of(kept) if seqs.on_host else seqs.offsets
        return _aligned(_to_device(torch.from_numpy(off) if isinstance(off, np.ndarray) else off, device))

    kept = _kept(src.lengths, opts) if src.on_host else None
    lab_kept = _kept(lab.lengths, opts) if kind == LABELS_GIVEN and lab.on_host else None
    if prompt is not None and src.on_host and opts.truncation and opts.truncation_side == "left":
        # The packed tokens are already cut: plan_row then sees cut = 0, so the prompt moves by the cut.
        cut = src.lengths - kept
        prompt = prompt - (torch.from_numpy(cut).to(prompt.device) if isinstance(prompt, torch.Tensor) else cut)
    if isinstance(prompt, np.ndarray):
        prompt = torch.from_numpy(prompt)
    extras_t = pads = None
    if extras:
        flats = [field(seqs, kept, False) for seqs, _ in extras.values()]
        if len({f.dtype for f in flats}) > 1:
            flats = [f.to(torch.int64) for f in flats]
        extras_t = _aligned(torch.stack(flats))
        pads = _to_device(torch.tensor([pad for _, pad in extras.values()], dtype=torch.int64), device)
    given = kind == LABELS_GIVEN
    max_length, trunc_left, pad_left = opts.layout
    pad, label_pad, decoder_start, _ = opts.fills
    return DeviceLaunch(
        tokens=field(src, kept, False), offsets=offsets(src, kept),
        loss_masks=field(masks, kept, True) if masks is not None else None,
        labels=field(lab, lab_kept, False) if given else None,
        label_offsets=offsets(lab, lab_kept) if given else None,
        prompt_lengths=_aligned(_to_device(prompt, device)) if prompt is not None else None,
        extras=extras_t, extra_pads=pads, outputs=outputs, L=widths.L, Ll=widths.Ll, max_length=max_length,
        truncate_left=trunc_left, pad_left=pad_left, labels_kind=kind, pad_token_id=pad,
        label_pad_token_id=label_pad, decoder_start_token_id=decoder_start)


def _run_device(backend: str, args: DeviceLaunch) -> None:
    if backend == "cuda":
        _cuda_kernel()[0].launch(args, check=False)  # the op built and checked every field itself
    else:
        from .kernels import pad_shift_mask as triton_kernel

        triton_kernel.launch(args)


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------

_TRITON_BROKEN: list = []  # the first Triton launch failure under backend="auto" (then "torch" is used)


def _select_backend(backend: str, device: torch.device) -> str:
    if not isinstance(backend, str) or backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if _native.cpu_available() else "torch"
        if device.type == "cuda":
            if torch.cuda.is_available() and _cuda_kernel()[0] is not None:
                return "cuda"
            if _native.triton_available(device) and not _TRITON_BROKEN:
                return "triton"
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendUnavailable(f'backend "cpu" writes CPU tensors, but the output device is {device}')
        _native.cpu_module()
    elif backend == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f'backend "cuda" needs a CUDA output device, got {device}')
        why = _cuda_kernel()[1] or (None if torch.cuda.is_available() else "torch sees no CUDA device")
        if why:
            raise BackendUnavailable(f'backend "cuda" is unavailable: {why}')
    elif backend == "triton":
        _native.require_triton(device)
    return backend


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _labels_field(labels, label_offsets, B: int, opts: _Options, return_shift_labels: bool):
    """(labels kind, the labels field or None), with the rules tying labels to the other arguments."""
    if labels is None:
        kind, lab = LABELS_NONE, None
        if label_offsets is not None:
            raise ValueError("label_offsets is given but labels is None")
    elif isinstance(labels, str):
        if labels != "input_ids":
            raise ValueError(f"labels must be None, 'input_ids' or sequences of label ids, got {labels!r}")
        kind, lab = LABELS_DERIVED, None
    else:
        kind, lab = LABELS_GIVEN, _as_seqs(labels, label_offsets, "labels", "label_offsets")
        if lab.B != B:
            raise ValueError(f"labels has {lab.B} examples but input_ids has B = {B}")
    if kind != LABELS_NONE and opts.label_pad_token_id is None:
        raise ValueError("label_pad_token_id must be an int when labels are returned")
    if kind == LABELS_NONE and (return_shift_labels or opts.decoder_start_token_id is not None):
        raise ValueError("return_shift_labels / decoder_start_token_id need labels (labels='input_ids' or sequences)")
    if opts.decoder_start_token_id is not None and opts.pad_token_id is None:
        raise ValueError("decoder_start_token_id needs pad_token_id (decoder_input_ids replace -100 by it)")
    return kind, lab


def _masks_and_extras(src: _Seqs, kind: int, offsets, prompt_lengths, loss_masks, extras, return_loss_mask: bool,
                      opts: _Options):
    """(prompt lengths, the loss_masks field, {name: (field, pad)}): the per-example masks and the extra fields,
    each checked against input_ids."""
    prompt = masks = None
    if prompt_lengths is not None:
        if kind != LABELS_DERIVED and not return_loss_mask:
            raise ValueError("prompt_lengths applies to labels='input_ids' or return_loss_mask=True")
        prompt = _prompt_lengths(prompt_lengths, src.B)
    elif return_loss_mask:
        raise ValueError("return_loss_mask=True needs prompt_lengths")
    if loss_masks is not None:
        if kind != LABELS_DERIVED:
            raise ValueError("loss_masks apply to derived labels (labels='input_ids')")
        masks = _as_seqs(loss_masks, offsets, "loss_masks", "offsets")
        _check_aligned(masks, src)
    extra_seqs = {}
    if extras:
        if not isinstance(extras, dict):
            raise TypeError(f"extras must be a dict {{name: (sequences, pad_value)}}, got {type(extras).__name__}")
        for name, spec in extras.items():
            if not isinstance(name, str) or name in OUTPUT_KEYS:
                raise ValueError(f"extras: name {name!r} must be a str other than the op's own outputs {OUTPUT_KEYS}")
            if not isinstance(spec, tuple) or len(spec) != 2:  # a list would be ambiguous with a list of rows
                raise TypeError(f"extras[{name!r}]: expected (sequences, pad_value), got {type(spec).__name__}")
            seqs = _as_seqs(spec[0], offsets, name, "offsets")
            _check_aligned(seqs, src)
            pad = _as_int(spec[1], f"extras[{name!r}] pad value")
            lo, hi = opts.value_range
            if not lo <= pad <= hi:
                raise ValueError(f"extras[{name!r}] pad value {pad} does not fit in the output dtype {opts.dtype}")
            extra_seqs[name] = (seqs, pad)
    return prompt, masks, extra_seqs


@functools.lru_cache(maxsize=None)
def _wanted(labels: bool, decoder: bool, attention: bool, shift: bool, position: bool, loss: bool) -> tuple:
    """The requested keys of OUTPUT_KEYS, in order, each as (key, whether it is [B, Ll] (a labels width) rather
    than [B, L], its index in OUTPUT_KEYS). Cached: the caller passes plain bools."""
    on = dict(input_ids=True, attention_mask=attention, labels=labels, decoder_input_ids=decoder,
              shift_labels=shift, position_ids=position, loss_mask=loss)
    return tuple((k, k in ("labels", "decoder_input_ids", "shift_labels"), slot)
                 for slot, k in enumerate(OUTPUT_KEYS) if on[k])


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
    opts = _checked_options(pad_token_id, label_pad_token_id, padding, max_length, truncation, truncation_side,
                            padding_side, pad_to_multiple_of, decoder_start_token_id, dtype)
    if num_threads is not None and (type(num_threads) is not int or num_threads < 1):
        _check_threads(num_threads)
    if ((device is None or type(device) in (str, torch.device) and device in ("cpu", _CPU))
            and type(backend) is str and backend in ("auto", "cpu") and offsets is None and label_offsets is None):
        out = _express_cpu(input_ids, labels, prompt_lengths, loss_masks, extras, opts, return_attention_mask,
                           return_position_ids, return_shift_labels, return_loss_mask, num_threads)
        if out is not None:
            return out
    src = _as_seqs(input_ids, offsets, "input_ids", "offsets")
    B = src.B
    kind, lab = _labels_field(labels, label_offsets, B, opts, return_shift_labels)
    prompt, masks, extra_seqs = _masks_and_extras(src, kind, offsets, prompt_lengths, loss_masks, extras,
                                                  return_loss_mask, opts)

    # devices
    out_device = src.device if device is None else _resolve_device(device)
    for seqs in (src, lab, masks, *[s for s, _ in extra_seqs.values()]):
        if seqs is not None and seqs.rows is None and not seqs.on_host and seqs.device != out_device:
            raise ValueError(f"{seqs.name} is on {seqs.device} but the output device is {out_device}: data on a "
                             "device can only be collated onto that device")
    requested, backend = backend, _select_backend(backend, out_device)

    # widths (every length rule is checked here, before any launch)
    if src.host_offsets() and (lab is None or lab.host_offsets()):
        widths = _host_widths(src, lab, opts, kind)
    elif opts.padding == "max_length" and not src.host_offsets() and (lab is None or not lab.host_offsets()):
        widths = _device_widths(opts)
    else:
        # Offsets on the device and padding="longest": the padded length needs them on the host (one sync).
        src, lab, masks, extra_seqs = (_host_copy_offsets(src), _host_copy_offsets(lab), _host_copy_offsets(masks, src),
                                       {k: (_host_copy_offsets(s, src), p) for k, (s, p) in extra_seqs.items()})
        widths = _host_widths(src, lab, opts, kind)

    want = _wanted(kind != LABELS_NONE, opts.decoder_start_token_id is not None, bool(return_attention_mask),
                   bool(return_shift_labels), bool(return_position_ids), bool(return_loss_mask))
    if backend == "torch":
        out = _reference(src, kind, lab, prompt, masks, extra_seqs, opts, want)
        return {k: v.to(device=out_device, dtype=opts.dtype) for k, v in out.items()}

    if backend == "cpu":
        return _run_cpu(widths, src, kind, lab, prompt, masks, extra_seqs, opts, want, num_threads)

    L, Ll = widths.L, widths.Ll
    outs = {key: torch.empty(B, Ll if label_width else L, dtype=opts.dtype, device=out_device)
            for key, label_width, _ in want}
    outputs = dict(outs)
    if extra_seqs:
        outputs["extras"] = torch.empty((len(extra_seqs), B, L), dtype=opts.dtype, device=out_device)
    try:
        _run_device(backend, _device_launch(widths, src, kind, lab, prompt, masks, extra_seqs, opts, out_device,
                                            outputs))
    except Exception as e:
        # Under "auto", a Triton compile or launch failure (no C compiler, a driver problem) falls back to the
        # reference for the rest of the process; bad input (ValueError / TypeError) is the caller's to see.
        if requested != "auto" or backend != "triton" or isinstance(e, (ValueError, TypeError)):
            raise
        _TRITON_BROKEN.append(e)
        warnings.warn(f"pyseqpack.pad_shift_mask: the Triton kernel failed ({type(e).__name__}: {e}); "
                      "backend='auto' uses 'torch' from now on", RuntimeWarning, stacklevel=2)
        out = _reference(src, kind, lab, prompt, masks, extra_seqs, opts, want)
        return {k: v.to(device=out_device, dtype=opts.dtype) for k, v in out.items()}
    for e, name in enumerate(extra_seqs):
        outs[name] = outputs["extras"][e]
    return outs
