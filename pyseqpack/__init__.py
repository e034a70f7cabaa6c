"""pyseqpack: fused pad-shift-mask collation and fused cross-entropy for PyTorch training.

``import pyseqpack`` imports torch and the two ops, nothing else: the collators, nn modules and
integrations are imported lazily on first use, and no transformers, triton or native code is loaded until
an op needs it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The ops share their module's name (pyseqpack/pad_shift_mask.py defines pad_shift_mask, ...). Importing a
# submodule binds its name on the package, so these are imported eagerly: the function, bound last, wins.
from .cross_entropy import CrossEntropyOutput, cross_entropy, fused_cross_entropy  # noqa: E402
from .pad_shift_mask import pad_shift_mask  # noqa: E402

# public name -> submodule that defines it
_EXPORTS = {
    # collation op (pyseqpack/pad_shift_mask.py; kernels in csrc/pad_shift_mask*, kernels/pad_shift_mask.py)
    "pad_shift_mask": "pad_shift_mask",
    # drop-in collators and the SFT collator (pyseqpack/collators.py)
    "DataCollatorForSeq2Seq": "collators",
    "DataCollatorWithPadding": "collators",
    "DataCollatorForLanguageModeling": "collators",
    "DataCollatorForTokenClassification": "collators",
    "DataCollatorForSFT": "collators",
    # fused cross-entropy (pyseqpack/cross_entropy.py; kernels in kernels/cross_entropy.py, csrc/cross_entropy.cu)
    "fused_cross_entropy": "cross_entropy",
    "CrossEntropyOutput": "cross_entropy",
    "cross_entropy": "cross_entropy",
    # nn modules (pyseqpack/nn.py)
    "CrossEntropyLoss": "nn",
    "FusedCrossEntropyLoss": "nn",
    # environment
    "available_backends": "_native",
    "BackendUnavailable": "_native",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyseqpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
