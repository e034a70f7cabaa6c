"""Backend "cuda" of pad_shift_mask: the ctypes launcher of the CUDA kernel (csrc/pad_shift_mask.cu in the
pyseqpack._cuda library).

    unavailable_reason() -> None when the built library holds the kernel, else why not
    run(call) -> dict          the backend's launcher (pyseqpack/pad_shift_mask/device.py builds the launch)
    launch(args: DeviceLaunch) -> None

One kernel launch writes every requested output; the kernel plans each row itself from the offsets
(csrc/pad_shift_mask.h, THE ROW PLAN). launch() first runs check_launch (device.py), which checks what keeps the
raw-pointer call memory-safe and well-typed, then builds the C arguments (attribute reads and data pointers).
The values of offsets, label_offsets and prompt_lengths are not checked (on the device, reading them would
sync): the kernel writes a row whose window leaves its buffer as an empty row instead of reading outside it.
Nothing syncs with the host, so a launch can be captured in a CUDA graph. A nonzero return of the C entry point
(a cudaError_t) raises RuntimeError with the CUDA error string.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import torch

from .. import _native
from . import device as _device
from .device import DeviceLaunch, check_launch
from .plan import Call, output_keys

__all__ = ["launch", "run", "unavailable_reason"]

# Element type codes of the C ABI (enum TypeCode in csrc/pad_shift_mask.cu).
_CODES = {torch.int64: 0, torch.int32: 1, torch.uint8: 2}


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
        p,                    # outs: one pointer per output slot
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


def _ptr(t) -> Optional[int]:
    return t.data_ptr() if t is not None else None


def _code(t) -> int:
    return _CODES[t.dtype] if t is not None else 0


def _c_arguments(a: DeviceLaunch) -> list:
    """The C entry point's arguments (all but the stream) for a checked DeviceLaunch: attribute reads and data
    pointers only. Sizes come from the buffers' first dimension; the output dtype from the first output given
    (int64 when none is); the output pointers in slot order (psm::kOutputNames)."""
    tokens, labels, extras, outputs = a.tokens, a.labels, a.extras, a.outputs
    out_dtype = next((t.dtype for t in outputs.values() if t is not None), torch.int64)
    return [
        a.offsets.data_ptr(), _ptr(a.label_offsets), _ptr(a.prompt_lengths), a.offsets.shape[0] - 1,
        a.L, a.Ll, a.max_length, a.truncate_left, a.pad_left,
        tokens.data_ptr(), tokens.shape[0], _CODES[tokens.dtype],
        _ptr(a.loss_masks), _code(a.loss_masks),
        a.labels_kind, _ptr(labels), labels.shape[0] if labels is not None else 0, _code(labels),
        _out_pointers()(*[_ptr(outputs.get(k)) for k in output_keys()]),
        _ptr(extras), extras.shape[0] if extras is not None else 0, _code(extras), _ptr(a.extra_pads),
        _ptr(outputs.get("extras")),
        a.pad_token_id, a.label_pad_token_id, a.decoder_start_token_id,
        _CODES[out_dtype],
    ]


@functools.lru_cache(maxsize=None)
def _out_pointers():
    """The ctypes array type of the `outs` argument: one pointer per output slot."""
    return ctypes.c_void_p * len(output_keys())


def _arguments(a: DeviceLaunch) -> list:
    """Checks a DeviceLaunch (ValueError naming the bad field) and returns the C entry point's arguments."""
    check_launch(a)
    return _c_arguments(a)


def run(call: Call) -> dict:
    """The backend's launcher: every requested output of a planned call, from one kernel launch."""
    return _device.run(call, launch)


def launch(args: DeviceLaunch) -> None:
    """Writes every output of one batch, enqueued on torch's current stream of the device of args.tokens.

    args is a DeviceLaunch (pyseqpack/pad_shift_mask/device.py, whose docstring gives every field's shape and
    dtype):
    tokens int32/int64 [T]; offsets int64 [B + 1]; loss_masks None or uint8/int32/int64 [T] (derived labels
    only); labels None or int32/int64 [Tl] with label_offsets int64 [B + 1] (labels_kind 2); prompt_lengths
    None or int64 [B]; extras None or int32/int64 [E, T] with extra_pads int64 [E]; outputs {key: [B, L] or
    [B, Ll] tensor} plus "extras" [E, B, L], all int32 or all int64; every tensor contiguous, on one CUDA
    device; max_length an int >= -1, truncate_left and pad_left bools. A bad argument raises ValueError naming
    the field, before anything is launched; a CUDA error RuntimeError. Returns None.
    """
    c_args = _arguments(args)
    device = args.tokens.device
    if device.type != "cuda":
        raise ValueError(f"pad_shift_mask DeviceLaunch.tokens: the CUDA kernel needs CUDA tensors, got tokens and "
                         f"buffers on {device}")
    lib = _lib()
    with _native.device_guard(device):
        rc = lib.pyseqpack_psm_fill(*c_args, torch.cuda.current_stream(device).cuda_stream)
    _check_return(rc)
