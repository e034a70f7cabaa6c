"""ctypes launcher of the CUDA fused cross-entropy (csrc/cross_entropy.cu in the pyseqpack._cuda library).

The launcher contract of every backend (see pyseqpack/cross_entropy/reference.py and
pyseqpack.kernels.cross_entropy):

    fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap)
    scale_grad_(grad, grad_output)

The caller validates the semantics (label ranges, option values, stride(0) >= V, ...). This module checks only
what keeps the raw-pointer call memory-safe: devices, dtypes, shapes and the unit column stride. Pointers,
sizes, strides, dtype codes and torch's current stream go to the C entry points; nothing syncs with the host,
so both calls can be captured in a CUDA graph. A nonzero return (a cudaError_t) raises RuntimeError with the
CUDA error string.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .. import _native

__all__ = ["fwd_bwd", "scale_grad_"]

# dtype codes of the C ABI (enum DTypeCode in csrc/cross_entropy.cu).
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.lru_cache(maxsize=None)
def _lib():
    lib = _native.cuda_library()  # BackendUnavailable, with a diagnostic, when the library was not built
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.pyseqpack_ce_fwd_bwd.argtypes = [
        p, i32, i64, i64, i64,  # logits, dtype, N, V, logits_row_stride
        p, i32,                 # labels, labels_is_int32
        p, p, p,                # loss, lse, correct
        p, i64, p,              # grad, grad_row_stride, grad_scale
        i64, f32, f32, f32,     # ignore_index, label_smoothing, z_loss, softcap
        p,                      # stream
    ]
    lib.pyseqpack_ce_fwd_bwd.restype = i32
    lib.pyseqpack_ce_scale_grad.argtypes = [p, i32, i64, i64, i64, p, i32, p]
    lib.pyseqpack_ce_scale_grad.restype = i32
    lib.pyseqpack_cuda_error_string.argtypes = [i32]
    lib.pyseqpack_cuda_error_string.restype = ctypes.c_char_p
    return lib


def _check_return(rc: int, entry: str) -> None:
    if rc != 0:
        msg = _lib().pyseqpack_cuda_error_string(rc).decode(errors="replace")
        raise RuntimeError(f"pyseqpack CUDA cross-entropy: {entry} failed with CUDA error {rc}: {msg}")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(f"pyseqpack CUDA cross-entropy: {msg}")


def _require_vector(name: str, t: torch.Tensor, n: int, dtypes: tuple, device: torch.device) -> None:
    _require(t.device == device, f"{name} must be on {device} (the device of logits), got {t.device}")
    _require(t.dtype in dtypes, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    _require(t.numel() == n and t.is_contiguous(), f"{name} must be a contiguous tensor of {n} elements, got "
             f"shape {tuple(t.shape)} with strides {t.stride()}")


def _require_matrix(name: str, t: torch.Tensor, device: torch.device) -> int:
    _require(t.device.type == "cuda", f"{name} must be a CUDA tensor, got device {t.device}")
    _require(t.device == device, f"{name} must be on {device}, got {t.device}")
    _require(t.dim() == 2 and t.stride(1) == 1,
             f"{name} must be 2-D [N, V] with stride(1) == 1, got shape {tuple(t.shape)} strides {t.stride()}")
    code = _DTYPE_CODES.get(t.dtype)
    _require(code is not None, f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return code


def fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row cross-entropy, log-sum-exp, accuracy (when ``correct`` is given) and the scaled gradient (when
    ``grad`` is given).

    logits      [N, V] float32 / bfloat16 / float16 CUDA tensor, stride(1) == 1, any stride(0); never copied
    labels      [N] int64 or int32, contiguous, same device (already shifted by the caller)
    loss        [N] float32 out: unscaled per-row loss, 0.0 where the label is ignore_index (or outside [0, V))
    lse         [N] float32 out: log-sum-exp of every row (after the softcap)
    correct     [N] int32 out: 1 where the label is valid and equals the first argmax, else 0; or None (loss
                only): NULL goes to the C entry point, which then runs the kernels compiled without the argmax
    grad        [N, V] same dtype as logits, stride(1) == 1 (may be ``logits`` itself), or None (forward only):
                grad_scale * d loss_i / d logits_i; exact zeros in ignored rows
    grad_scale  [1] float32 device tensor (read by the kernel, never by the host); required with ``grad``
    ignore_index (int), label_smoothing (float eps), z_loss (float z), softcap (float c; <= 0 or None: off)
    """
    device = logits.device
    code = _require_matrix("logits", logits, device)
    n, v = logits.shape
    _require_vector("labels", labels, n, (torch.int64, torch.int32), device)
    _require_vector("loss", loss, n, (torch.float32,), device)
    _require_vector("lse", lse, n, (torch.float32,), device)
    correct_ptr = None
    if correct is not None:
        _require_vector("correct", correct, n, (torch.int32,), device)
        correct_ptr = correct.data_ptr()
    grad_ptr, grad_stride, scale_ptr = None, 0, None
    if grad is not None:
        _require_matrix("grad", grad, device)
        _require(grad.dtype == logits.dtype and grad.shape == logits.shape,
                 f"grad must match logits ({logits.dtype}, {tuple(logits.shape)}), got {grad.dtype}, {tuple(grad.shape)}")
        _require(grad_scale is not None, "grad_scale (a float32 device tensor of 1 element) is required with grad")
        _require_vector("grad_scale", grad_scale, 1, (torch.float32,), device)
        grad_ptr, grad_stride, scale_ptr = grad.data_ptr(), grad.stride(0), grad_scale.data_ptr()
    lib = _lib()
    with _native.device_guard(device):
        rc = lib.pyseqpack_ce_fwd_bwd(
            logits.data_ptr(), code, n, v, logits.stride(0),
            labels.data_ptr(), int(labels.dtype == torch.int32),
            loss.data_ptr(), lse.data_ptr(), correct_ptr,
            grad_ptr, grad_stride, scale_ptr,
            int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
            torch.cuda.current_stream(device).cuda_stream,
        )
    _check_return(rc, "pyseqpack_ce_fwd_bwd")


def scale_grad_(grad, grad_output):
    """In place ``grad *= grad_output``; returns ``grad``.

    grad         [N, V] float32 / bfloat16 / float16 CUDA tensor, stride(1) == 1
    grad_output  float32 device tensor of 1 element (one factor) or N elements (one per row), contiguous.
                 A factor of exactly 1.0 is detected on the device and leaves grad untouched (no host sync).
    """
    device = grad.device
    code = _require_matrix("grad", grad, device)
    n, v = grad.shape
    _require(grad_output.numel() in (1, n),
             f"grad_output must have 1 element or one per row of grad ({n}), got shape {tuple(grad_output.shape)}")
    per_row = grad_output.numel() != 1
    _require_vector("grad_output", grad_output, grad_output.numel(), (torch.float32,), device)
    lib = _lib()
    with _native.device_guard(device):
        rc = lib.pyseqpack_ce_scale_grad(
            grad.data_ptr(), code, n, v, grad.stride(0), grad_output.data_ptr(), int(per_row),
            torch.cuda.current_stream(device).cuda_stream,
        )
    _check_return(rc, "pyseqpack_ce_scale_grad")
    return grad
