"""Integrations with training frameworks (transformers, TRL, accelerate).

* ``pyseqpack.integrations.transformers``: ``apply_fused_loss(model)`` swaps a causal-LM / seq2seq-LM head's loss
  for the fused cross-entropy and returns a ``TokenAccuracy`` (device-side counts); ``TokenAccuracyCallback`` /
  ``add_token_accuracy_callback`` log ``token_accuracy`` from Trainer.
* ``pyseqpack.integrations.trl``: ``SFTTrainer``, TRL's trainer with the fused loss and ``mean_token_accuracy``
  from pyseqpack's counts.

Names are imported lazily: importing this package does not import transformers or TRL.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TokenAccuracy": "transformers",
    "AccuracyWindow": "transformers",
    "FusedLMLoss": "transformers",
    "apply_fused_loss": "transformers",
    "remove_fused_loss": "transformers",
    "TokenAccuracyCallback": "transformers",
    "add_token_accuracy_callback": "transformers",
    "SFTTrainer": "trl",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'pyseqpack.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
