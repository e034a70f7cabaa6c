"""Backend "triton" of pad_shift_mask: the launcher of the Triton kernel (pyseqpack.kernels.pad_shift_mask,
kernels/pad_shift_mask.py in the checkout). Triton is imported on the first launch, not before."""
from __future__ import annotations

from . import device as _device
from .plan import Call

__all__ = ["run"]


def run(call: Call) -> dict:
    """The backend's launcher: every requested output of a planned call, from one kernel launch."""
    from ..kernels import pad_shift_mask as kernel

    return _device.run(call, kernel.launch)
