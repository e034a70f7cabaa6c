"""pyseqpack: fused pad-shift-mask collation and fused cross-entropy for PyTorch training.

``import pyseqpack`` imports torch and the two ops, nothing else: the collators, nn modules and
integrations are imported lazily on first use, and no transformers, triton or native code is loaded until
an op needs it.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys


def _installed_copy():
    """The spec of the installed pyseqpack when this module is the source folder of a checkout, else None.

    A checkout's ``pyseqpack/`` holds no compiled modules (setup.py writes ``_build_info.py`` beside them in an
    install, and in the source folder only for an editable one). Whenever the checkout's root is on sys.path
    first (``python -m ...`` or ``python -m pytest`` run there), Python would import this folder, and every op
    would quietly lose its native backends. So the installed copy is looked up on the rest of sys.path; none
    found is an ImportError that says how to install."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "_build_info.py")):
        return None
    root = os.path.dirname(here)
    rest = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, rest)
    if spec is None or spec.origin is None or os.path.dirname(os.path.abspath(spec.origin)) == here:
        raise ImportError(
            f"pyseqpack was imported from its source folder {here}, which holds no compiled modules, and no "
            f"installed pyseqpack was found: run `pip install {root}` (or `pip install -e {root}` to develop), "
            "then import it again")
    return spec


_spec = _installed_copy()
if _spec is not None:
    # Run the installed package in place of this one: the import machinery returns whatever sys.modules holds
    # under the name once this module finishes, so `import pyseqpack` and `python -m pyseqpack` both get it.
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed
    _spec.loader.exec_module(_installed)
else:
    __version__ = "0.1.0"

    # The ops share their module's name (pyseqpack/pad_shift_mask.py defines pad_shift_mask, ...). Importing a
    # submodule binds its name on the package, so these are imported eagerly: the function, bound last, wins.
    from .cross_entropy import CrossEntropyOutput, cross_entropy, fused_cross_entropy  # noqa: E402
    from .pad_shift_mask import pad_shift_mask  # noqa: E402

    # public name -> submodule that defines it
    _EXPORTS = {
        # collation op (pyseqpack/pad_shift_mask.py; kernels in csrc/pad_shift_mask*, kernels/pad_shift_mask.py)
        "pad_shift_mask": "pad_shift_mask",
        # drop-in collators (pyseqpack/collators/transformers.py) and the SFT collator (pyseqpack/collators/sft.py)
        "DataCollatorForSeq2Seq": "collators",
        "DataCollatorWithPadding": "collators",
        "DataCollatorForLanguageModeling": "collators",
        "DataCollatorForTokenClassification": "collators",
        "DataCollatorForSFT": "collators",
        # fused cross-entropy (pyseqpack/cross_entropy/; kernels in kernels/cross_entropy.py, csrc/cross_entropy.cu)
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
