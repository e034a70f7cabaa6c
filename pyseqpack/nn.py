"""nn.Module wrappers of pyseqpack's fused cross-entropy.

* ``CrossEntropyLoss``: drop-in for ``torch.nn.CrossEntropyLoss``, a subclass with torch's own constructor
  (weight buffer, legacy size_average/reduce, state_dict, repr), whose forward is ``pyseqpack.cross_entropy``.
* ``FusedCrossEntropyLoss``: ``fused_cross_entropy`` as a module; returns the ``CrossEntropyOutput``
  (loss, num_correct, num_tokens, accuracy).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .cross_entropy import CrossEntropyOutput, cross_entropy, fused_cross_entropy, validate_options

__all__ = ["CrossEntropyLoss", "FusedCrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` with the fused forward: same arguments, values and gradients."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class FusedCrossEntropyLoss(torch.nn.Module):
    """``fused_cross_entropy`` with its options fixed at construction.

    ``forward(logits, labels, num_items_in_batch=None) -> CrossEntropyOutput``; see ``fused_cross_entropy`` for
    the arguments (including the hazard of ``inplace_backward=True``). Options are validated at construction.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        shift: bool = False,
        inplace_backward: bool = False,
        backend: str = "auto",
        check_labels: Optional[bool] = None,
    ):
        super().__init__()
        validate_options(ignore_index, reduction, label_smoothing, z_loss, softcap, backend)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.shift = shift
        self.inplace_backward = inplace_backward
        self.backend = backend
        self.check_labels = check_labels

    def forward(self, logits: Tensor, labels: Tensor, num_items_in_batch=None) -> CrossEntropyOutput:
        return fused_cross_entropy(
            logits,
            labels,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            shift=self.shift,
            num_items_in_batch=num_items_in_batch,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
            check_labels=self.check_labels,
        )

    def extra_repr(self) -> str:
        opts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        for name, default in (("label_smoothing", 0.0), ("z_loss", 0.0), ("softcap", None), ("shift", False),
                              ("inplace_backward", False), ("backend", "auto")):
            value = getattr(self, name)
            if value != default:
                opts.append(f"{name}={value!r}")
        return ", ".join(opts)
