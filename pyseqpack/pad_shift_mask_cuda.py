"""ctypes launcher of the CUDA pad_shift_mask kernel (csrc/pad_shift_mask.cu in the pyseqpack._cuda library).

The hook pyseqpack/pad_shift_mask.py calls for backend="cuda", with the same argument as the Triton launcher:

    unavailable_reason() -> None when the built library holds the kernel, else why not
    launch(args: pyseqpack.pad_shift_mask.DeviceLaunch, check=True) -> None

One kernel launch writes every requested output; the kernel plans each row itself from the offsets
(csrc/pad_shift_mask.h, THE ROW PLAN). The caller owns the semantics (value ranges for int32 outputs, which
outputs it asks for). With check=True this module checks what keeps the raw-pointer call memory-safe and
well-typed: devices, dtypes, shapes, contiguity, and that the host pad values fit the output dtype. The values
of offsets, label_offsets and prompt_lengths are NOT checked (on the device, reading them would sync): the
kernel writes a row whose window leaves its buffer as an empty row instead of reading outside it. check=False
is for a caller that built the DeviceLaunch itself (the op): it only builds the C arguments, a few
microseconds on the host. Nothing syncs with the host, so a launch can be captured in a CUDA graph. A nonzero
return of the C entry point (a cudaError_t) raises RuntimeError with the CUDA error string.
"""
from __future__ import annotations

import ctypes
import functools
import operator
from typing import Optional

import torch

from . import _native

__all__ = ["launch", "unavailable_reason"]

# Output slots of the C ABI, in the order of its `outs` array (enum Out in csrc/pad_shift_mask.cu).
_OUTS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "shift_labels", "position_ids", "loss_mask")
_LABEL_OUTS = ("labels", "decoder_input_ids", "shift_labels")  # [B, Ll]; the others are [B, L]
# Element type codes of the C ABI (enum TypeCode in csrc/pad_shift_mask.cu).
_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}
_INTS = (torch.int64, torch.int32)
_MASK_TYPES = (torch.uint8,) + _INTS
_RANGES = {dt: (torch.iinfo(dt).min, torch.iinfo(dt).max) for dt in _INTS}
_OUT_KEYS = frozenset(_OUTS) | {"extras"}
_OutPointers = ctypes.c_void_p * len(_OUTS)
_LABELS_KINDS = (0, 1, 2)  # none, derived from tokens, given (psm::LabelsKind)
_INT64_MAX = 2**63 - 1
# Columns are tiled by 256 threads and the grid has at most 65535 tiles (csrc/pad_shift_mask.cu).
_MAX_WIDTH = 65535 * 256


@functools.lru_cache(maxsize=None)
def _lib():
    return _declare(_native.cuda_library())  # BackendUnavailable, with a diagnostic, when the library was not built


def _declare(lib):
    """Sets the C signatures of this module's entry points on `lib` (pyseqpack._cuda, or a build of the same
    sources: the test of the kernel's host emulation) and returns it."""
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.pyseqpack_psm_fill.argtypes = [
        p, p, p, i64,         # offsets, label_offsets, prompt_lengths, B
        i64, i64, i64,        # L, Ll, max_length
        i32, i32,             # trunc_left, pad_left
        p, i64, i32,          # tokens, n_tokens, tokens_code
        p, i32,               # loss_masks, mask_code
        i32, p, i64, i32,     # labels_kind, labels, n_labels, labels_code
        p,                    # outs: 7 pointers
        p, i64, i32, p, p,    # extras, n_extras, extras_code, extra_pads, extras_out
        i64, i64, i64,        # pad_token_id, label_pad_token_id, decoder_start_token_id
        i32, p,               # out_code, stream
    ]
    lib.pyseqpack_psm_fill.restype = i32
    lib.pyseqpack_cuda_error_string.argtypes = [i32]
    lib.pyseqpack_cuda_error_string.restype = ctypes.c_char_p
    return lib


def unavailable_reason() -> Optional[str]:
    """None when pyseqpack._cuda is built and holds this kernel; else a diagnostic (and how to fix it)."""
    try:
        lib = _native.cuda_library()
    except _native.BackendUnavailable as e:
        return str(e)
    if not hasattr(lib, "pyseqpack_psm_fill"):
        return ("pyseqpack._cuda was built without the pad_shift_mask kernel (a stale build); reinstall with "
                "`pip install --no-build-isolation --no-deps .` (PYSEQPACK_CUDA=1 forces the CUDA build)")
    return None


def _check_return(rc: int) -> None:
    if rc != 0:
        msg = _lib().pyseqpack_cuda_error_string(rc).decode(errors="replace")
        raise RuntimeError(f"pyseqpack CUDA pad_shift_mask: pyseqpack_psm_fill failed with CUDA error {rc}: {msg}")


def _error(msg: str) -> ValueError:
    return ValueError(f"pyseqpack CUDA pad_shift_mask: {msg}")


# The checks below run on every checked launch: each message is formatted only once its check has failed.


def _require_tensor(name: str, t, device: torch.device, dtypes: tuple, shape: tuple) -> None:
    """`t` is a C-contiguous tensor of `shape` with one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise _error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise _error(f"{name} must be on {device} (the device of tokens), got {t.device}")
    if t.dtype not in dtypes:
        raise _error(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.shape != shape:
        raise _error(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise _error(f"{name} must be contiguous, got strides {t.stride()}")


def _require_int(name: str, value, lo: int, hi: int, what: str) -> int:
    """`value` (an int, numpy integers too, not a bool) as an int, checked to lie in [lo, hi]."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise _error(f"{name} must be an int, got {value!r}")
    value = operator.index(value)
    if not lo <= value <= hi:
        raise _error(f"{name} = {value} is outside {what}")
    return value


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise _error(f"{name} must be a bool, got {value!r}")


def _check(a) -> None:
    """Checks every field of a DeviceLaunch that the C call's memory safety and types depend on."""
    tokens = a.tokens
    if not isinstance(tokens, torch.Tensor):
        raise _error(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    device = tokens.device
    n = tokens.numel()
    _require_tensor("tokens", tokens, device, _INTS, (n,))
    offsets = a.offsets
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise _error("offsets must be a 1-D tensor of B + 1 >= 1 entries, got "
                     f"{list(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__}")
    B = offsets.shape[0] - 1
    if B >= 2**31:
        raise _error(f"offsets describe B = {B} rows; one launch takes at most 2**31 - 1")
    _require_tensor("offsets", offsets, device, (torch.int64,), (B + 1,))
    if a.mode != 0:
        raise _error(f"mode {a.mode!r} is not built: only mode 0 (padded) is")
    kind = a.labels_kind
    if kind not in _LABELS_KINDS:
        raise _error(f"labels_kind must be 0 (none), 1 (derived) or 2 (given), got {kind!r}")
    L = _require_int("L", a.L, 0, _MAX_WIDTH, f"[0, {_MAX_WIDTH}]")
    Ll = _require_int("Ll", a.Ll, 0, _MAX_WIDTH, f"[0, {_MAX_WIDTH}]")
    if kind == 1 and Ll != L:
        raise _error(f"derived labels (labels_kind 1) need Ll == L, got L={L}, Ll={Ll}")
    _require_int("max_length", a.max_length, -1, _INT64_MAX, "[-1, 2**63 - 1] (-1: no truncation)")
    _require_bool("truncate_left", a.truncate_left)
    _require_bool("pad_left", a.pad_left)
    if a.prompt_lengths is not None:
        _require_tensor("prompt_lengths", a.prompt_lengths, device, (torch.int64,), (B,))

    masks = a.loss_masks
    if masks is not None:
        if kind != 1:
            raise _error(f"loss_masks apply to derived labels (labels_kind 1), got labels_kind {kind}")
        _require_tensor("loss_masks", masks, device, _MASK_TYPES, (n,))
    labels = a.labels
    if kind == 2:
        if labels is None:
            raise _error("labels_kind 2 needs the `labels` buffer")
        _require_tensor("labels", labels, device, _INTS, (labels.numel() if isinstance(labels, torch.Tensor) else -1,))
        _require_tensor("label_offsets", a.label_offsets, device, (torch.int64,), (B + 1,))
    elif labels is not None or a.label_offsets is not None:
        raise _error(f"`labels` and `label_offsets` are only read with labels_kind 2, got labels_kind {kind}")

    outputs = a.outputs
    if not isinstance(outputs, dict):
        raise _error(f"outputs must be a dict {{key: tensor}}, got {type(outputs).__name__}")
    if not _OUT_KEYS.issuperset(outputs):
        raise _error(f"outputs has unknown keys {sorted(set(outputs) - _OUT_KEYS)}; expected keys from "
                     f"{list(_OUTS)} and 'extras'")
    if kind == 0 and any(outputs.get(k) is not None for k in _LABEL_OUTS):
        raise _error(f"outputs {[k for k in _LABEL_OUTS if outputs.get(k) is not None]} need labels "
                     "(labels_kind 1 or 2), got labels_kind 0")
    extras, E = a.extras, 0
    if extras is not None:
        E = extras.shape[0] if isinstance(extras, torch.Tensor) and extras.dim() == 2 else -1
        _require_tensor("extras", extras, device, _INTS, (E, n))
        _require_tensor("extra_pads", a.extra_pads, device, (torch.int64,), (E,))
    elif a.extra_pads is not None:
        raise _error("extra_pads is only read with extras, got extras None")
    if (outputs.get("extras") is not None) != (E > 0):
        raise _error(f"outputs['extras'] ([E, B, L]) must be given exactly when there are extras (E = {E})")
    # Every output the kernel writes; they share one dtype.
    out_dtype = None
    for k, t in outputs.items():
        if t is None:
            continue
        shape = (E, B, L) if k == "extras" else (B, Ll) if k in _LABEL_OUTS else (B, L)
        _require_tensor(f"outputs[{k!r}]", t, device, _INTS, shape)
        if out_dtype is None:
            out_dtype = t.dtype
        elif t.dtype != out_dtype:
            raise _error(f"every output must have the same dtype, got {out_dtype} and {t.dtype} (outputs[{k!r}])")
    lo, hi = _RANGES[out_dtype or torch.int64]
    for name in ("pad_token_id", "label_pad_token_id", "decoder_start_token_id"):
        _require_int(name, getattr(a, name), lo, hi, f"the output dtype {out_dtype or torch.int64}")


def _ptr(t) -> Optional[int]:
    return t.data_ptr() if t is not None else None


def _code(t) -> int:
    return _CODES[t.dtype] if t is not None else 0


def _c_arguments(a) -> list:
    """The C entry point's arguments (all but the stream) for a DeviceLaunch, without any check: the hot path
    (attribute reads and data pointers only). Sizes come from the buffers' first dimension; the output dtype
    from the first output given (int64 when none is)."""
    tokens, labels, extras, outputs = a.tokens, a.labels, a.extras, a.outputs
    out_dtype = next((t.dtype for t in outputs.values() if t is not None), torch.int64)
    return [
        a.offsets.data_ptr(), _ptr(a.label_offsets), _ptr(a.prompt_lengths), a.offsets.shape[0] - 1,
        a.L, a.Ll, a.max_length, a.truncate_left, a.pad_left,
        tokens.data_ptr(), tokens.shape[0], _CODES[tokens.dtype],
        _ptr(a.loss_masks), _code(a.loss_masks),
        a.labels_kind, _ptr(labels), labels.shape[0] if labels is not None else 0, _code(labels),
        _OutPointers(*[_ptr(outputs.get(k)) for k in _OUTS]),
        _ptr(extras), extras.shape[0] if extras is not None else 0, _code(extras), _ptr(a.extra_pads),
        _ptr(outputs.get("extras")),
        a.pad_token_id, a.label_pad_token_id, a.decoder_start_token_id,
        _CODES[out_dtype],
    ]


def _arguments(a) -> list:
    """Checks a DeviceLaunch (ValueError naming the bad field) and returns the C entry point's arguments."""
    _check(a)
    return _c_arguments(a)


def launch(args, check: bool = True) -> None:
    """Writes every output of one batch, enqueued on torch's current stream of the device of args.tokens.

    args is a pyseqpack.pad_shift_mask.DeviceLaunch (its docstring gives every field's shape and dtype):
    tokens int32/int64 [T]; offsets int64 [B + 1]; loss_masks None or uint8/int32/int64 [T] (derived labels
    only); labels None or int32/int64 [Tl] with label_offsets int64 [B + 1] (labels_kind 2); prompt_lengths
    None or int64 [B]; extras None or int32/int64 [E, T] with extra_pads int64 [E]; outputs {key: [B, L] or
    [B, Ll] tensor} plus "extras" [E, B, L], all int32 or all int64; every tensor contiguous, on one CUDA
    device; max_length an int >= -1, truncate_left and pad_left bools. check=True (the default) raises
    ValueError naming the field for a bad argument; check=False trusts the caller with all of that (a malformed
    DeviceLaunch can then corrupt memory). RuntimeError for a CUDA error. Returns None.
    """
    device = args.tokens.device
    if check:
        c_args = _arguments(args)
        if device.type != "cuda":
            raise _error(f"the CUDA kernel needs CUDA tensors, got tokens and buffers on {device}")
    else:
        c_args = _c_arguments(args)
    lib = _lib()
    with _native.device_guard(device):
        rc = lib.pyseqpack_psm_fill(*c_args, torch.cuda.current_stream(device).cuda_stream)
    _check_return(rc)
