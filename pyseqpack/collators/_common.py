"""Helpers shared by every collator of pyseqpack.collators (the transformers drop-ins and DataCollatorForSFT).

Nothing here imports transformers: DataCollatorForSFT works without it.
"""
from __future__ import annotations

from collections.abc import Mapping
from operator import itemgetter

import torch

LONGEST, MAX_LENGTH, DO_NOT_PAD = "longest", "max_length", "do_not_pad"


def check_return_tensors(return_tensors) -> None:
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")


def check_not_empty(features, name: str = "features") -> None:
    """An empty batch has no padded length and no first example to read the fields from: say so by name."""
    try:
        empty = len(features) == 0
    except TypeError:
        raise TypeError(
            f"{name} must be a list of examples (or a dict of batched columns), got {type(features).__name__}"
        ) from None
    if empty:
        raise ValueError(f"{name} is empty: expected at least one example")


def first_example(features, error, name: str = "features"):
    """features[0], which must be a mapping of fields; `error` is the exception type the transformers class
    raises for anything else (AttributeError or ValueError, depending on the class)."""
    check_not_empty(features, name)
    first = features[0]
    if not isinstance(first, Mapping):
        raise error(
            f"example 0 of {name} is a {type(first).__name__}: expected a dict of fields, e.g. "
            "{'input_ids': [...]}"
        )
    return first


def round_up(n: int, multiple) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def lengths(rows) -> list:
    """len() of each row. Rows that are all 1-D tensors give their element count instead: the same number,
    without the Python-level Tensor.__len__; anything else keeps len()'s answer and its errors."""
    if rows and isinstance(rows[0], torch.Tensor) and all([isinstance(r, torch.Tensor) and r.ndim == 1 for r in rows]):
        return list(map(torch.Tensor.numel, rows))
    return list(map(len, rows))


def gather(features, keys, required=None):
    """{key: [example[key] for each example]}.

    `keys` are read from every example. A missing one raises KeyError naming the example and the field:
    `required` maps a key to why every example needs it; other keys are there because the first example has
    them (transformers' rule: the first example decides the fields, extra keys of later examples are ignored).
    """
    try:
        return {k: list(map(itemgetter(k), features)) for k in keys}
    except KeyError:
        for i, f in enumerate(features):
            for k in keys:
                if k not in f:
                    why = (required or {}).get(k) or (
                        "the first example has it, and every example needs the fields of the first one")
                    raise KeyError(f"example {i} has no {k!r} field: {why}; it has {list(f)}") from None
        raise
