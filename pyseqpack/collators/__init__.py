"""pyseqpack's collators, by audience.

    pyseqpack.collators.transformers  drop-ins for transformers' DataCollatorWithPadding, DataCollatorForSeq2Seq,
                                      DataCollatorForTokenClassification and DataCollatorForLanguageModeling:
                                      subclasses of those classes that pad natively (imports transformers)
    pyseqpack.collators.sft           DataCollatorForSFT, pyseqpack's causal-LM SFT collator (no transformers)

Every name is also importable from here and from `pyseqpack`; each submodule is imported on first use of one
of its names, so DataCollatorForSFT never imports transformers. Semantics: docs/semantics.md.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it
_EXPORTS = {
    "DataCollatorWithPadding": "transformers",
    "DataCollatorForSeq2Seq": "transformers",
    "DataCollatorForTokenClassification": "transformers",
    "DataCollatorForLanguageModeling": "transformers",
    "DataCollatorForSFT": "sft",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | {"sft", "transformers"})
