"""Triton launcher of the fused cross-entropy: the kernels of ``pyseqpack.kernels.cross_entropy`` behind the
launcher contract of every backend (see pyseqpack/cross_entropy/reference.py):

    fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap)
    scale_grad_(grad, grad_output)

Importing this module imports triton. It runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

from pyseqpack.kernels import cross_entropy as kernels

__all__ = ["fwd_bwd", "scale_grad_"]


def fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """``kernels.fwd_bwd``, with the labels moved to a 16-byte aligned buffer when they are not: Triton mis-loads
    integer tensors whose data pointer is not 16-byte aligned (a piece of the labels starting mid-row)."""
    if labels.data_ptr() % 16:
        labels = labels.clone()  # N elements, next to the N x V of the logits
    kernels.fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, ignore_index=ignore_index,
                    label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)


def scale_grad_(grad, grad_output):
    """``kernels.scale_grad_``: grad *= grad_output in place (rows whose factor is exactly 1.0 untouched)."""
    kernels.scale_grad_(grad, grad_output)
