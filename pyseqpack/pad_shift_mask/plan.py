"""Planning of one pad_shift_mask call: the inputs normalised, the options checked, every rule tying the
arguments together and the padded widths, each written once. Every backend receives the resulting ``Call``.

Semantics: the package docstring (pyseqpack/pad_shift_mask/__init__.py) and docs/semantics.md.
"""
from __future__ import annotations

import array
import dataclasses
import functools
import itertools
import operator
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import _native

# psm::LabelsKind and psm::Mode of csrc/pad_shift_mask.h.
LABELS_NONE, LABELS_DERIVED, LABELS_GIVEN = 0, 1, 2
MODE_PADDED = 0  # psm::kPadded; 1 (kPacked, padding-free packing) is reserved

CPU = torch.device("cpu")
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
_LABEL_WIDTH = ("labels", "decoder_input_ids", "shift_labels")  # [B, Ll] outputs; the others are [B, L]


@functools.lru_cache(maxsize=None)
def output_keys() -> tuple:
    """The output slots, in the order every kernel numbers them: psm::kOutputNames of csrc/pad_shift_mask.h,
    which setup.py copies into the build info (no native code is loaded to read them)."""
    keys = _native.build_info().get("psm_output_keys")
    if not keys:
        raise _native.BackendUnavailable(
            "pad_shift_mask: the build info holds no output slots (a build older than this pyseqpack). "
            + _native._REBUILD_HINT)
    return tuple(keys)


def label_width(key: str) -> bool:
    """Whether output `key` is [B, Ll] (a labels width) rather than [B, L]."""
    return key in _LABEL_WIDTH


# ---------------------------------------------------------------------------------------------------------------
# Inputs, normalised
# ---------------------------------------------------------------------------------------------------------------

class Seqs:
    """One ragged field, in one of two forms: `rows` (one host object per example) or `flat` + `offsets`.

    rows      lists / tuples / 1-D arrays, one per example (host)
    flat      1-D numpy array or tensor, every example back to back
    offsets   flat: int64 [B+1], a numpy array or array("q") (host) or a tensor on the device of `flat`
    lengths   int64 [B] numpy; None while the offsets live on the device. Rows measured in C++ and tensor rows
              keep native int64 bytes until something reads `lengths` (the usual call only needs `extent`).
    extent    (longest, shortest) of the lengths when already known
    opened    rows measured in C++: its capsule of the opened rows (buffers acquired once), which the C++ kernels
              read in place of `rows`
    from_rows flat, made by concatenating the caller's tensor rows: the caller's form is rows
    """

    __slots__ = ("name", "rows", "flat", "offsets", "_lengths", "extent", "opened", "from_rows", "device",
                 "on_host")

    def __init__(self, name: str, rows=None, flat=None, offsets=None, lengths=None, extent=None, opened=None,
                 from_rows=False):
        self.name = name
        self.rows = rows
        self.flat = flat
        self.offsets = offsets
        self._lengths = lengths
        self.extent = extent
        self.opened = opened
        self.from_rows = from_rows
        # Where the data lies: the device of a flat tensor, else the host (rows are host objects).
        if rows is None and type(flat) not in _HOST_TYPES and isinstance(flat, torch.Tensor):  # is_tensor(flat)
            self.device = flat.device
            self.on_host = flat.is_cpu
        else:
            self.device = CPU
            self.on_host = True

    def replace(self, **changes) -> "Seqs":
        fields = dict(name=self.name, rows=self.rows, flat=self.flat, offsets=self.offsets, lengths=self._lengths,
                      extent=self.extent, opened=self.opened, from_rows=self.from_rows)
        fields.update(changes)
        return Seqs(**fields)

    @property
    def lengths(self):
        if isinstance(self._lengths, bytes):
            self._lengths = np.frombuffer(self._lengths, dtype=np.int64)
        return self._lengths

    def same_lengths(self, other: "Seqs") -> bool:
        """Both fields' lengths known as int64 bytes and equal (compared without numpy)."""
        return isinstance(self._lengths, bytes) and self._lengths == other._lengths

    @property
    def B(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.offsets) - 1

    def host_offsets(self) -> bool:
        return self.rows is not None or not is_tensor(self.offsets)

    def row(self, b: int):
        """Example b as a host object (for the reference and the host gather; call to_host() first)."""
        if self.rows is not None:
            return self.rows[b]
        return self.flat[int(self.offsets[b]):int(self.offsets[b + 1])]

    def to_host(self) -> "Seqs":
        """This field with its data and offsets on the host (one copy each)."""
        if self.rows is not None or (self.on_host and self.host_offsets()):
            return self
        off = self.offsets.cpu().numpy() if isinstance(self.offsets, torch.Tensor) else self.offsets
        return self.replace(flat=self.flat.cpu(), offsets=off, lengths=np.diff(off))


def is_tensor(x) -> bool:
    """isinstance(x, torch.Tensor), answered without torch's instance check for the host objects the op
    usually gets (lists, tuples, numpy arrays, None): that check runs Python code on every non-tensor."""
    return type(x) not in _HOST_TYPES and isinstance(x, torch.Tensor)


_HOST_TYPES = frozenset((list, tuple, np.ndarray, type(None), int, array.array, bytes))


def _is_int_dtype(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex())
    return x.dtype.kind in "iub"


def check_int_array(x, name: str):
    if not _is_int_dtype(x):
        raise TypeError(f"{name}: expected integer values, got a {x.dtype} "
                        f"{'tensor' if isinstance(x, torch.Tensor) else 'array'}")


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


def _host_copy_offsets(seqs: Optional[Seqs], like: Optional[Seqs] = None) -> Optional[Seqs]:
    """`seqs` with its device offsets copied to the host and checked (a sync); `like`: share those of input_ids."""
    if seqs is None or seqs.host_offsets():
        return seqs
    if like is not None:
        return seqs.replace(offsets=like.offsets, lengths=like.lengths)
    off = _host_offsets(seqs.offsets, "offsets" if seqs.name == "input_ids" else "label_offsets",
                        int(seqs.flat.shape[0]), seqs.name)
    return seqs.replace(offsets=off, lengths=np.diff(off))


def _measure_rows(rows, name: str):
    """(len() of each example as int64 numpy or native int64 bytes; whether some example is neither a
    list/tuple nor a buffer, e.g. a tensor; (longest, shortest); the rows opened in C++ or None), checking that
    each is a sequence. In C++ when built (psm_row_lengths), so list and numpy batches cost no per-row Python."""
    cpu = _native.cpu_module_or_none()
    if cpu is not None:
        lengths, other, longest, shortest, opened = cpu.psm_row_lengths(rows, name)
        return lengths, other, (longest, shortest), opened
    out = np.empty(len(rows), dtype=np.int64)
    for b, r in enumerate(rows):
        if isinstance(r, np.ndarray) and r.ndim != 1:
            raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {r.ndim}-D array")
        if isinstance(r, (str, dict)) or not hasattr(r, "__len__"):
            raise TypeError(f"{name}[{b}]: expected a sequence of ints (list, tuple, 1-D integer array), "
                            f"got {type(r).__name__}")
        out[b] = len(r)
    return out, True, (int(out.max()), int(out.min())), None


def as_seqs(value, offsets, name: str, offsets_name: str) -> Seqs:
    """Normalises one ragged field (input_ids, labels, loss_masks, an extra), validating its form."""
    if offsets is None and type(value) in (list, tuple) and value:  # the collation hot path: a batch of rows
        first = value[0]
        if type(first) not in _HOST_TYPES and isinstance(first, torch.Tensor):  # is_tensor(first)
            seqs = _tensor_row_seqs(value, name)
            if seqs is not None:
                return seqs
        else:
            cpu = _native.cpu_module_or_none()
            if cpu is not None:  # rows measured and opened in C++ (as _measure_rows does), no Python per row
                lengths, other, longest, shortest, opened = cpu.psm_row_lengths(value, name)
                if not other:
                    return Seqs(name, value, None, None, lengths, (longest, shortest), opened)
        return _row_seqs(value, name)
    if offsets is not None:
        if not isinstance(value, (np.ndarray, torch.Tensor)) or value.ndim != 1:
            raise TypeError(f"{name}: with {offsets_name}, expected a flat 1-D tensor or numpy array, got "
                            f"{type(value).__name__}{'' if not hasattr(value, 'ndim') else f' of {value.ndim} dims'}")
        check_int_array(value, name)
        dev = value.device if isinstance(value, torch.Tensor) else CPU
        if isinstance(offsets, torch.Tensor) and offsets.device.type != "cpu":
            if offsets.device != dev:
                raise ValueError(f"{offsets_name} is on {offsets.device} but {name} is on {dev}")
            if offsets.ndim != 1 or offsets.numel() < 2 or offsets.is_floating_point():
                raise TypeError(f"{offsets_name}: expected a 1-D integer tensor of B + 1 >= 2 entries")
            # Lengths stay unknown on the host (no sync): the kernels plan from the offsets themselves.
            return Seqs(name, flat=value, offsets=offsets.to(torch.int64))
        off = _host_offsets(offsets, offsets_name, int(value.shape[0]), name)
        return Seqs(name, flat=value, offsets=off, lengths=np.diff(off))
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 2:
            raise TypeError(f"{name}: a {value.ndim}-D {type(value).__name__} must be 2-D [B, n], or flat 1-D with "
                            f"{offsets_name}=[0, n_0, n_0 + n_1, ...]")
        check_int_array(value, name)
        B, n = value.shape
        if B == 0:
            raise ValueError(f"{name}: the batch is empty (B = 0)")
        off = np.arange(B + 1, dtype=np.int64) * n
        return Seqs(name, flat=value.reshape(-1), offsets=off, lengths=np.full(B, n, dtype=np.int64))
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list of sequences, a 2-D array or tensor, or a flat 1-D one with "
                        f"{offsets_name}; got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: the batch is empty (B = 0)")
    return _row_seqs(value, name)


def _tensor_row_seqs(rows, name: str) -> Optional[Seqs]:
    """Rows that are all 1-D integer tensors on one device (``dataset.with_format("torch")``) joined into one
    flat buffer with host offsets, or None for anything else (rows of several devices or of float, unsigned or
    mixed wide types, a row that is not 1-D...: _row_seqs then checks each row and names the culprit). One
    torch.cat (no sync on a GPU) instead of a conversion per row; it copies the rows once. Offsets and lengths
    are built as native int64 arrays from Python ints, which at batch sizes costs less than numpy's calls."""
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
    counts = list(map(torch.Tensor.numel, rows))  # numel = len() for 1-D rows
    return Seqs(name, flat=flat, offsets=array.array("q", itertools.accumulate(counts, initial=0)),
                lengths=array.array("q", counts).tobytes(), extent=(max(counts), min(counts)), from_rows=True)


def _row_seqs(value, name: str) -> Seqs:
    """A non-empty list or tuple of rows (those _tensor_row_seqs did not take): measured (in C++ when built), CPU
    tensor rows read through numpy views, device tensor rows checked one by one, then concatenated into one flat
    device buffer."""
    lengths, other, extent, opened = _measure_rows(value, name)
    if not other:
        return Seqs(name, rows=value, lengths=lengths, extent=extent, opened=opened)
    if isinstance(lengths, bytes):
        lengths = np.frombuffer(lengths, dtype=np.int64)
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
            check_int_array(r, f"{name}[{b}]")
        # Valid rows reach this only when torch.cat cannot join their own dtypes (a wide unsigned type beside
        # others): device data is cast, not value-checked (package docstring), so they are joined as int64.
        return Seqs(name, flat=torch.cat([r.to(torch.int64) for r in rows]), offsets=offsets_of(lengths),
                    lengths=lengths, extent=extent, from_rows=True)
    for b in tensor_rows:  # CPU tensors are read through their numpy view: O(1) each
        if rows[b].ndim != 1:
            raise TypeError(f"{name}[{b}]: expected a 1-D sequence, got a {rows[b].ndim}-D tensor")
        rows[b] = rows[b].detach().numpy()
    return Seqs(name, rows=rows, lengths=lengths, extent=extent)


def offsets_of(kept: np.ndarray) -> np.ndarray:
    """[0, kept_0, kept_0 + kept_1, ...]: the offsets of a packed buffer."""
    out = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(kept, out=out[1:])
    return out


def _check_aligned(seqs: Seqs, src: Seqs):
    """loss_masks and extras must be shaped exactly like input_ids: same form, examples and lengths."""
    src_rows = src.rows is not None or src.from_rows  # the caller's form (tensor rows are concatenated)
    if (seqs.rows is not None or seqs.from_rows) != src_rows:
        form = "a list of rows" if src_rows else "flat (1-D with offsets, or 2-D)"
        raise TypeError(f"{seqs.name}: must have the same form as input_ids ({form})")
    if seqs.B != src.B:
        raise ValueError(f"{seqs.name} has {seqs.B} examples but input_ids has {src.B}")
    if not (seqs.on_host and src.on_host) and seqs.device != src.device:
        raise ValueError(f"{seqs.name} is on {seqs.device} but input_ids is on {src.device}")
    if seqs.same_lengths(src):
        return
    if src.lengths is not None:
        diff = np.flatnonzero(seqs.lengths != src.lengths)
        if len(diff):
            b = int(diff[0])
            raise ValueError(f"{seqs.name}[{b}] has {seqs.lengths[b]} values but input_ids[{b}] has "
                             f"{src.lengths[b]} tokens")
    elif seqs.flat.shape[0] != src.flat.shape[0]:
        raise ValueError(f"{seqs.name} holds {seqs.flat.shape[0]} values but input_ids holds {src.flat.shape[0]}")


def as_int(value, name: str, *, optional: bool = False):
    if value is None and optional:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__}") from None


def _prompt_lengths(value, B: int):
    if is_tensor(value) and value.device.type != "cpu":
        if value.ndim != 1 or value.numel() != B or value.is_floating_point():
            raise ValueError(f"prompt_lengths: expected a 1-D integer tensor of B = {B} entries")
        return value.to(torch.int64)
    arr = np.asarray(value.cpu() if is_tensor(value) else value)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"prompt_lengths: expected a 1-D sequence of ints, got {arr.ndim}-D {arr.dtype}")
    if len(arr) != B:
        raise ValueError(f"prompt_lengths has {len(arr)} entries but input_ids has B = {B} examples")
    neg = np.flatnonzero(arr < 0)
    if len(neg):
        raise ValueError(f"prompt_lengths[{neg[0]}] = {arr[neg[0]]} is negative")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
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
        return INT32 if self.dtype == torch.int32 else INT64


def _options(pad_token_id, label_pad_token_id, padding, max_length, truncation, truncation_side, padding_side,
             pad_to_multiple_of, decoder_start_token_id, dtype) -> Options:
    for name, value, allowed in (("padding", padding, ("longest", "max_length")),
                                 ("truncation_side", truncation_side, ("right", "left")),
                                 ("padding_side", padding_side, ("right", "left"))):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if dtype not in (torch.int64, torch.int32):
        raise ValueError(f"dtype must be torch.int64 or torch.int32, got {dtype}")
    max_length = as_int(max_length, "max_length", optional=True)
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length}")
    pad_to_multiple_of = as_int(pad_to_multiple_of, "pad_to_multiple_of", optional=True)
    if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
        raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of}")
    if not isinstance(truncation, bool):
        raise TypeError(f"truncation must be True or False, got {truncation!r}")
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length")
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    opts = Options(
        pad_token_id=as_int(pad_token_id, "pad_token_id", optional=True),
        label_pad_token_id=as_int(label_pad_token_id, "label_pad_token_id", optional=True),
        padding=padding, max_length=max_length, truncation=truncation, truncation_side=truncation_side,
        padding_side=padding_side, pad_to_multiple_of=pad_to_multiple_of,
        decoder_start_token_id=as_int(decoder_start_token_id, "decoder_start_token_id", optional=True), dtype=dtype,
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


def options(*args) -> Options:
    """The checked Options of pad_shift_mask's option arguments, in its signature's order."""
    try:
        return _cached_options(*args)
    except TypeError:
        return _options(*args)


def check_threads(num_threads) -> None:
    """num_threads: None or a positive int (ints of other types, such as numpy's, pass)."""
    if num_threads is None or (type(num_threads) is int and num_threads >= 1):
        return
    n = as_int(num_threads, "num_threads", optional=True)
    if isinstance(num_threads, bool) or n < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")


# ---------------------------------------------------------------------------------------------------------------
# Widths: the padded lengths L and Ll. Every kernel plans each example itself (plan_row in csrc/pad_shift_mask.h)
# ---------------------------------------------------------------------------------------------------------------

def kept_counts(n: np.ndarray, opts: Options) -> np.ndarray:
    """Values each example keeps: min(n, max_length) under truncation (psm::kept_count)."""
    return np.minimum(n, opts.max_length) if opts.truncation else n


def _extent(seqs: Seqs) -> tuple:
    """(longest, shortest) of the lengths: as measured when the rows were, else from the lengths."""
    return seqs.extent or (int(seqs.lengths.max()), int(seqs.lengths.min()))


def _fitted_width(opts: Options, longest: int, shortest: int = -1) -> int:
    """The padded width for rows of these extreme lengths (before truncation), or -1 when a length rule fails:
    the longest kept row does not fit (padding="max_length" without truncation), or a row needs padding but
    pad_token_id is None (pass shortest = -1 to skip that rule, as labels do). min(n, max_length) is monotone
    in n, so the extremes of the lengths give the extremes of the kept counts."""
    if opts.truncation:
        longest, shortest = min(longest, opts.max_length), min(shortest, opts.max_length)
    L = opts.padded_length(longest)
    if longest > L or (opts.pad_token_id is None and 0 <= shortest < L):
        return -1
    return L


def _raise_width(seqs: Seqs, opts: Options, what: str, check_pad: bool):
    """Raises for the example that breaks a length rule _fitted_width found broken: one longer than the padded
    length, else (check_pad) one that needs padding without a pad_token_id."""
    kept = kept_counts(seqs.lengths, opts)
    L = opts.padded_length(int(kept.max()))
    longer = np.flatnonzero(kept > L)
    if len(longer):
        b = int(longer[0])
        how = (f"padding='max_length' pads to {L} (max_length={opts.max_length})" if opts.padding == "max_length"
               else f"the padded length is {L}")
        raise ValueError(f"{seqs.name}[{b}] has {kept[b]} {what}, more than the padded length: {how}; pass "
                         "truncation=True to cut it, or a larger max_length")
    assert check_pad
    b = int(np.flatnonzero(kept < L)[0])
    raise ValueError(f"pad_token_id is None but input_ids[{b}] needs padding ({kept[b]} tokens, padded "
                     f"length {L}); pass pad_token_id")


def _host_widths(src: Seqs, lab: Optional[Seqs], opts: Options, kind: int) -> tuple:
    """(L, Ll) from host lengths, checking every length rule (rows too long, a pad token needed but missing)."""
    L = _fitted_width(opts, *(src.extent or _extent(src)))
    if L < 0:
        _raise_width(src, opts, "tokens", True)
    if kind != LABELS_GIVEN:
        return L, L
    Ll = _fitted_width(opts, (lab.extent or _extent(lab))[0])
    if Ll < 0:
        _raise_width(lab, opts, "labels", False)
    return L, Ll


def _device_widths(opts: Options) -> tuple:
    """Offsets on the device with padding='max_length': L = Ll = max_length (rounded up), known without a sync;
    the kernels plan each example from its device offsets."""
    if not opts.truncation:
        raise ValueError("offsets on the device with padding='max_length' need truncation=True (checking that no row "
                         "is too long would need a host sync); or pass the offsets as a host list / CPU tensor")
    if opts.pad_token_id is None:
        raise ValueError("offsets on the device: pass pad_token_id (whether a row needs padding is only known there)")
    L = opts.padded_length(0)
    return L, L


# ---------------------------------------------------------------------------------------------------------------
# The rules tying the arguments together
# ---------------------------------------------------------------------------------------------------------------

def _labels_field(labels, label_offsets, src: Seqs, opts: Options, return_shift_labels: bool):
    """(labels kind, the labels field or None), with the rules tying labels to the other arguments."""
    if type(labels) is str and labels == "input_ids" and label_offsets is None and opts.label_pad_token_id is not None and (
            opts.decoder_start_token_id is None or opts.pad_token_id is not None):
        return LABELS_DERIVED, None  # the rules below, all met
    if labels is None:
        kind, lab = LABELS_NONE, None
        if label_offsets is not None:
            raise ValueError("label_offsets is given but labels is None")
    elif isinstance(labels, str):
        if labels != "input_ids":
            raise ValueError(f"labels must be None, 'input_ids' or sequences of label ids, got {labels!r}")
        kind, lab = LABELS_DERIVED, None
    else:
        kind, lab = LABELS_GIVEN, as_seqs(labels, label_offsets, "labels", "label_offsets")
        if lab.B != src.B:
            raise ValueError(f"labels has {lab.B} examples but input_ids has B = {src.B}")
    if kind != LABELS_NONE and opts.label_pad_token_id is None:
        raise ValueError("label_pad_token_id must be an int when labels are returned")
    if kind == LABELS_NONE and (return_shift_labels or opts.decoder_start_token_id is not None):
        raise ValueError("return_shift_labels / decoder_start_token_id need labels (labels='input_ids' or sequences)")
    if opts.decoder_start_token_id is not None and opts.pad_token_id is None:
        raise ValueError("decoder_start_token_id needs pad_token_id (decoder_input_ids replace -100 by it)")
    return kind, lab


def _masks_and_extras(src: Seqs, kind: int, offsets, prompt_lengths, loss_masks, extras, return_loss_mask: bool,
                      opts: Options):
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
        masks = as_seqs(loss_masks, offsets, "loss_masks", "offsets")
        _check_aligned(masks, src)
    extra_seqs = {}
    if extras:
        if not isinstance(extras, dict):
            raise TypeError(f"extras must be a dict {{name: (sequences, pad_value)}}, got {type(extras).__name__}")
        keys = output_keys()
        for name, spec in extras.items():
            if not isinstance(name, str) or name in keys:
                raise ValueError(f"extras: name {name!r} must be a str other than the op's own outputs {keys}")
            if not isinstance(spec, tuple) or len(spec) != 2:  # a list would be ambiguous with a list of rows
                raise TypeError(f"extras[{name!r}]: expected (sequences, pad_value), got {type(spec).__name__}")
            seqs = as_seqs(spec[0], offsets, name, "offsets")
            _check_aligned(seqs, src)
            pad = as_int(spec[1], f"extras[{name!r}] pad value")
            lo, hi = opts.value_range
            if not lo <= pad <= hi:
                raise ValueError(f"extras[{name!r}] pad value {pad} does not fit in the output dtype {opts.dtype}")
            extra_seqs[name] = (seqs, pad)
    return prompt, masks, extra_seqs


@functools.lru_cache(maxsize=None)
def _wanted(labels: bool, decoder: bool, attention: bool, shift: bool, position: bool, loss: bool) -> tuple:
    """The requested output keys, in slot order, each as (key, whether it is [B, Ll], its slot). Cached: the
    caller passes plain bools."""
    on = dict(input_ids=True, attention_mask=attention, labels=labels, decoder_input_ids=decoder,
              shift_labels=shift, position_ids=position, loss_mask=loss)
    return tuple((k, label_width(k), slot) for slot, k in enumerate(output_keys()) if on[k])


def _resolve_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ---------------------------------------------------------------------------------------------------------------
# The planned call
# ---------------------------------------------------------------------------------------------------------------

class Call(NamedTuple):
    """One checked call, what every backend's ``run(call)`` takes.

    src, lab, masks  the input_ids, separate labels and loss masks fields (Seqs; lab / masks None when absent)
    kind             LABELS_NONE / LABELS_DERIVED / LABELS_GIVEN
    prompt           None, int64 [B] numpy (host) or tensor (device)
    extras           {name: (Seqs, pad value)}
    opts             Options;  want: the requested outputs, from _wanted
    L, Ll            widths of the [B, L] and [B, Ll] outputs
    B                the number of examples
    device           the output device;  num_threads: backend "cpu"'s thread request (None: by size)
    """

    src: Seqs
    kind: int
    lab: Optional[Seqs]
    prompt: object
    masks: Optional[Seqs]
    extras: dict
    opts: Options
    want: tuple
    L: int
    Ll: int
    B: int
    device: torch.device
    num_threads: Optional[int]


def prepare(input_ids, offsets, labels, label_offsets, prompt_lengths, loss_masks, extras, opts: Options, device,
         attention, position, shift, loss, num_threads) -> Call:
    """Every input normalised and every rule checked, before any backend runs."""
    src = as_seqs(input_ids, offsets, "input_ids", "offsets")
    kind, lab = _labels_field(labels, label_offsets, src, opts, shift)
    if prompt_lengths is None and loss_masks is None and not extras and not loss:
        prompt = masks = None
        extra_seqs = {}
    else:
        prompt, masks, extra_seqs = _masks_and_extras(src, kind, offsets, prompt_lengths, loss_masks, extras, loss,
                                                      opts)

    # devices
    if device is None:
        out_device = src.device
    elif device is CPU or (type(device) is str and device == "cpu"):
        out_device = CPU
    else:
        out_device = _resolve_device(device)
    if masks is not None or extra_seqs or not (src.on_host and (lab is None or lab.on_host)):
        for seqs in (src, lab, masks, *[s for s, _ in extra_seqs.values()]):
            if seqs is not None and not seqs.on_host and seqs.device != out_device:
                raise ValueError(f"{seqs.name} is on {seqs.device} but the output device is {out_device}: data on "
                                 "a device can only be collated onto that device")

    # widths (every length rule is checked here, before any launch)
    if (src.rows is not None or type(src.offsets) in _HOST_TYPES or src.host_offsets()) and (
            lab is None or lab.rows is not None or type(lab.offsets) in _HOST_TYPES or lab.host_offsets()):
        L, Ll = _host_widths(src, lab, opts, kind)
    elif opts.padding == "max_length" and not src.host_offsets() and (lab is None or not lab.host_offsets()):
        L, Ll = _device_widths(opts)
    else:
        # Offsets on the device and padding="longest": the padded length needs them on the host (one sync).
        src, lab, masks, extra_seqs = (_host_copy_offsets(src), _host_copy_offsets(lab), _host_copy_offsets(masks, src),
                                       {k: (_host_copy_offsets(s, src), p) for k, (s, p) in extra_seqs.items()})
        L, Ll = _host_widths(src, lab, opts, kind)

    want = _wanted(kind != LABELS_NONE, opts.decoder_start_token_id is not None, bool(attention), bool(shift),
                   bool(position), bool(loss))
    return Call(src, kind, lab, prompt, masks, extra_seqs, opts, want, L, Ll, src.B, out_device, num_threads)
