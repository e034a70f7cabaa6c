"""`tokenizer.pad`'s semantics for the transformers drop-ins, computed by one `pyseqpack.pad_shift_mask` call.

The rules reproduced are those of docs/semantics.md, 'transformers collators'. Fields that `tokenizer.pad` pads:
the main input (`tokenizer.model_input_names[0]`, "input_ids") with `pad_token_id`; "attention_mask" with 0
(created as ones when missing, and then placed after the other keys) when it is a model input of the
tokenizer; "token_type_ids" with `pad_token_type_id`; "special_tokens_mask" with 1. Every other field is not
padded and is batched by transformers' own BatchEncoding conversion (fixed-length ints become int64, floats
float32, ragged or string fields raise ValueError under "pt").

transformers pads by turning every row into a Python list, padding it by list concatenation and building the
tensors with `torch.tensor`. Here the fields are gathered (one dict lookup per example and field), the few
tokenizer attributes needed are read, and `pad_shift_mask` reads the lists / arrays / tensors natively and
writes every padded tensor once.

Input `tokenizer.pad` accepts and this module does not reproduce raises `Unsupported` before anything is
computed; the drop-ins then call transformers' own method (their parent class).
"""
from __future__ import annotations

import warnings
from collections import UserDict

import numpy as np
import torch
from transformers.tokenization_utils_base import LARGE_INTEGER, BatchEncoding, PreTrainedTokenizerBase
from transformers.utils import PaddingStrategy
from transformers.utils.generic import to_py_obj

from .. import pad_shift_mask
from ._common import DO_NOT_PAD, LONGEST, MAX_LENGTH, lengths, round_up

# A given attention_mask travels through pad_shift_mask as an extra under this name (the op's own
# "attention_mask" output is the one it creates from the lengths).
GIVEN_MASK = "given_attention_mask"
_OP_KEY = {"attention_mask": GIVEN_MASK}
_FEATURE_KEY = {GIVEN_MASK: "attention_mask"}


class Unsupported(Exception):
    """Input that tokenizer.pad handles and this module does not: the caller delegates to transformers."""


def fit_width(row_lengths, longest: int, target: int, what: str, why) -> int:
    """Width of rows padded to `target` the transformers way, without truncation (`longest`: max(row_lengths)).

    Shorter rows are padded to `target`; longer rows are left as they are, so the batch stacks only when
    every row longer than `target` has the same length (then that is the width). Otherwise ValueError, whose
    message ends with `why()` (formatted only then: this runs on every batch).
    """
    if longest <= target:
        return target
    if min(row_lengths) == longest:
        return longest
    i = next(i for i, n in enumerate(row_lengths) if n > target)
    j = next(j for j, n in enumerate(row_lengths) if n != row_lengths[i])
    raise ValueError(
        f"{what} of example {i} has {row_lengths[i]} tokens, more than the padded length {target} ({why()}), and "
        f"example {j} has {row_lengths[j]}: transformers pads without truncating, so these rows cannot be stacked. "
        "Truncate the examples or raise max_length."
    )


def uniform_width(row_lengths, what: str, why: str) -> int:
    """Width of rows that are not padded at all: they must already have one length."""
    for j, n in enumerate(row_lengths):
        if n != row_lengths[0]:
            raise ValueError(
                f"{what} of example 0 has {row_lengths[0]} tokens and example {j} has {n}, but {why} does not pad: "
                "rows of different lengths cannot be stacked"
            )
    return row_lengths[0]


def geometry(width: int, longest: int) -> dict:
    """pad_shift_mask arguments that pad rows whose longest is `longest` to exactly `width` (>= longest)."""
    return dict(padding=LONGEST) if width == longest else dict(padding=MAX_LENGTH, max_length=width)


def _rows_are_arrays(rows, name: str) -> bool:
    """tokenizer.pad's type probe on the main input; True when its rows are numpy arrays / tensors.

    transformers looks at the first token of the first non-empty row: a Python int (or an all-empty batch)
    means Python lists; a numpy array or tensor means every field is first converted to Python lists (which
    decides the dtypes of the unpadded fields); anything else raises ValueError.
    """
    first = rows[0]
    probe, example = first, 0
    if isinstance(first, (list, tuple)):
        for example, row in enumerate(rows):
            if len(row):
                probe = row[0]
                break
    if isinstance(probe, (int, list, tuple)):
        return False
    if isinstance(probe, (np.ndarray, torch.Tensor)):
        return True
    raise ValueError(
        f"example {example} field {name!r}: expected token ids (Python ints, or a 1-D integer numpy array / "
        f"tensor), got {probe!r} of type {type(probe).__name__}"
    )


def _bad_token(rows):
    """(example, index, value) of the first value of `rows` that is not a token id, or None.

    Token ids are what pad_shift_mask reads: values with __index__ (ints, numpy integer scalars), and integer
    or bool arrays / tensors. Used only after the op has raised, to name the field at fault."""
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            if row.dtype.is_floating_point or row.dtype.is_complex:
                return i, None, row.dtype
            continue
        if isinstance(row, np.ndarray):
            if row.dtype != np.bool_ and not np.issubdtype(row.dtype, np.integer):
                return i, None, row.dtype
            continue
        if isinstance(row, (str, bytes)):
            return i, None, row
        for j, token in enumerate(row):
            if not hasattr(token, "__index__"):
                return i, j, token
    return None


def raise_like_conversion(error: TypeError, rows, name: str, return_tensors: str, per_row: bool) -> None:
    """After pad_shift_mask raised `error` (TypeError) on `rows`, a field transformers converts itself (labels
    by torch.tensor / np.array of the padded lists, bare LM rows one torch.tensor / np.array each): raises
    ValueError where that conversion does, for a str token: numpy always, torch when the str is the first
    value it reads (of the batch, or of each row when `per_row`). Otherwise returns: the TypeError stands."""
    bad = _bad_token(rows)
    if bad is None:
        return
    i, j, value = bad
    if isinstance(value, (str, bytes)) and j is not None and (return_tensors == "np" or j == 0 and (per_row or i == 0)):
        raise ValueError(f"{name}[{i}][{j}]: expected integer token ids, got {value!r} (str)") from error


def resolve_padding(tokenizer, padding, max_length):
    """(strategy, max_length) as tokenizer.pad reads `padding` and `max_length`."""
    if padding is True:
        if max_length is not None:
            warnings.warn(
                f"max_length={max_length} is ignored with padding=True (the batch is padded to its longest "
                "example, as transformers does); use padding='max_length' to pad to max_length.",
                UserWarning,
                stacklevel=5,
            )
        return LONGEST, max_length
    if padding is False:
        return DO_NOT_PAD, max_length
    strategy = PaddingStrategy(padding).value  # ValueError listing the valid strategies
    if strategy == MAX_LENGTH and max_length is None:
        if tokenizer.model_max_length > LARGE_INTEGER:  # no model limit: transformers then does not pad
            return DO_NOT_PAD, None
        max_length = tokenizer.model_max_length
    return strategy, max_length


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None or pad < 0:
        raise ValueError(
            f"tokenizer ({type(tokenizer).__name__}) has no pad token, and this batch must be padded: set one, "
            "e.g. `tokenizer.pad_token = tokenizer.eos_token`, or add one with "
            "`tokenizer.add_special_tokens({'pad_token': '[PAD]'})`"
        )
    return pad


def batch_encoding(data: dict) -> BatchEncoding:
    """BatchEncoding(data). BatchEncoding is a UserDict, whose constructor copies the items one __setitem__ at a
    time; the empty one takes `data` as its documented backing dict instead."""
    if not issubclass(BatchEncoding, UserDict):  # another transformers design: use its constructor
        return BatchEncoding(data)
    batch = BatchEncoding()
    batch.data = data
    return batch


def _convert_unpadded(cols: dict, rows_are_arrays: bool, return_tensors: str) -> dict:
    """Batch the fields tokenizer.pad does not pad, exactly as transformers does (its own conversion)."""
    out = {}
    for key, values in cols.items():
        if rows_are_arrays:
            values = to_py_obj(values)
        try:
            out[key] = BatchEncoding({key: values}, tensor_type=return_tensors)[key]
        except ValueError as e:
            raise ValueError(
                f"field {key!r} cannot be batched: only input_ids, attention_mask, token_type_ids and "
                "special_tokens_mask are padded, every other field must be a number or an equal-length "
                f"sequence in every example ({e.__cause__ or e})"
            ) from e
    return out


def check_supported(tokenizer, cols: dict) -> None:
    """Raises Unsupported for what tokenizer.pad does and Batch does not: a `tokenizer` that is not a
    transformers tokenizer (a feature extractor pads its own fields), per-example 2-D attention masks
    (stacked as they are), and a single unbatched example given as one dict of token ids."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise Unsupported
    mask = cols.get("attention_mask")
    if mask and getattr(mask[0], "ndim", 0) > 1:
        raise Unsupported
    main = cols.get(tokenizer.model_input_names[0])
    if main and isinstance(main, (list, tuple)) and isinstance(main[0], int):
        raise Unsupported


class Batch:
    """One batch padded with tokenizer.pad's semantics, without tokenizer.pad.

    Built from the fields of the examples (`cols`, in the first example's key order); works out the padded
    width and which fields are padded with what, then `run` calls pad_shift_mask once (or twice, when
    separate labels need a width the op cannot derive in the same call) and `assemble` puts the tensors
    back in transformers' key order.
    """

    __slots__ = (
        "main", "order", "rows", "longest", "width", "rows_are_arrays", "pad_token_id", "padding_side",
        "padded", "extras", "unpadded", "create_mask",
    )

    def __init__(self, tokenizer, cols: dict, padding, max_length, pad_to_multiple_of):
        check_supported(tokenizer, cols)
        main = tokenizer.model_input_names[0]
        if main not in cols:
            raise ValueError(
                f"the examples have no {main!r} field (the tokenizer's main input); they have {list(cols)}"
            )
        rows = cols[main]
        self.rows_are_arrays = _rows_are_arrays(rows, main)
        strategy, max_length = resolve_padding(tokenizer, padding, max_length)
        self.pad_token_id = None if strategy == DO_NOT_PAD else _pad_token_id(tokenizer)
        try:
            row_lengths = lengths(rows)
        except TypeError:
            i = next(i for i, r in enumerate(rows) if not hasattr(r, "__len__") or getattr(r, "ndim", 1) == 0)
            raise TypeError(
                f"example {i} field {main!r}: expected a sequence of token ids, got {type(rows[i]).__name__}"
            ) from None
        longest = max(row_lengths)
        if strategy == DO_NOT_PAD:
            self.width = uniform_width(row_lengths, main, f"padding={padding!r}")
        else:
            target = round_up(longest if strategy == LONGEST else max_length, pad_to_multiple_of)
            self.width = fit_width(row_lengths, longest, target, main,
                                   lambda: f"padding={padding!r}, max_length={max_length}")
        self.main, self.order, self.rows, self.longest = main, tuple(cols), rows, longest
        self.padding_side = tokenizer.padding_side

        # Padded fields and their pad values; everything else is batched as is.
        mask_is_input = "attention_mask" in tokenizer.model_input_names
        extras = {}
        if mask_is_input and "attention_mask" in cols:  # the op's own "attention_mask" is the created one
            extras[GIVEN_MASK] = (cols["attention_mask"], 0)
        if "token_type_ids" in cols:
            extras["token_type_ids"] = (cols["token_type_ids"], tokenizer.pad_token_type_id)
        if "special_tokens_mask" in cols:
            extras["special_tokens_mask"] = (cols["special_tokens_mask"], 1)
        self.extras = extras
        self.padded = {main, *(_FEATURE_KEY.get(k, k) for k in extras)}
        self.unpadded = {k: v for k, v in cols.items() if k not in self.padded}
        self.create_mask = mask_is_input and "attention_mask" not in cols

    def run(self, labels=None, label_width=None, longest_label=None, label_pad_token_id=-100,
            pad_to_multiple_of=None, decoder_start_token_id=None):
        """Pads the batch; returns pad_shift_mask's dict of tensors (keys "input_ids", the padded extras,
        "attention_mask" when created, "labels" / "decoder_input_ids" when asked for).

        labels: None, "input_ids" (labels derived from input_ids, width `width`), or a list of label rows
        padded to `label_width` (the longest of them has `longest_label` values).
        """
        try:
            return self._run(labels, label_width, longest_label, label_pad_token_id, pad_to_multiple_of,
                             decoder_start_token_id)
        except TypeError as e:
            self._raise_bad_input_token(e)
            raise

    def _raise_bad_input_token(self, error: TypeError) -> None:
        """transformers builds the padded input fields with BatchEncoding, which raises ValueError for a value
        that is not a token id (a str, None, ...), before it looks at any label: so does this."""
        fields = {self.main: self.rows, **{_FEATURE_KEY.get(k, k): rows for k, (rows, _) in self.extras.items()}}
        for name, rows in fields.items():
            bad = _bad_token(rows)
            if bad is not None:
                i, j, value = bad
                where = f"{name}[{i}]" if j is None else f"{name}[{i}][{j}]"
                what = f"dtype {value}" if j is None and not isinstance(value, (str, bytes)) else (
                    f"{value!r} ({type(value).__name__})")
                raise ValueError(f"{where}: expected integer token ids, got {what}") from error

    def _run(self, labels, label_width, longest_label, label_pad_token_id, pad_to_multiple_of,
             decoder_start_token_id):
        common = dict(
            pad_token_id=self.pad_token_id,
            label_pad_token_id=label_pad_token_id,
            padding_side=self.padding_side,
            return_attention_mask=self.create_mask,
            extras=self.extras or None,
        )
        width, longest = self.width, self.longest
        if labels is None or isinstance(labels, str):
            return pad_shift_mask(self.rows, labels=labels, **geometry(width, longest), **common)
        # One call pads input_ids to `width` and the labels to `label_width` when the op's own geometry gives
        # both: "longest" gives (longest row, longest label), each rounded up to pad_to_multiple_of;
        # "max_length" gives (max_length, max_length).
        if width == longest and label_width == longest_label:
            both = dict(padding=LONGEST)
        elif width == label_width:
            both = dict(padding=MAX_LENGTH, max_length=width)
        elif (pad_to_multiple_of and width == round_up(longest, pad_to_multiple_of)
              and label_width == round_up(longest_label, pad_to_multiple_of)):
            both = dict(padding=LONGEST, pad_to_multiple_of=pad_to_multiple_of)
        else:
            both = None
        if both is not None:
            return pad_shift_mask(
                self.rows, labels=labels, decoder_start_token_id=decoder_start_token_id, **both, **common
            )
        out = pad_shift_mask(self.rows, **geometry(width, longest), **common)
        out["labels"] = pad_shift_mask(
            labels,
            pad_token_id=label_pad_token_id,
            padding_side=self.padding_side,
            return_attention_mask=False,
            **geometry(label_width, longest_label),
        )["input_ids"]
        return out

    def assemble(self, out: dict, return_tensors: str) -> dict:
        """The padded fields and the unpadded ones, in the order tokenizer.pad returns them: the first
        example's keys, then "attention_mask" when it was created."""
        unpadded = _convert_unpadded(self.unpadded, self.rows_are_arrays, return_tensors) if self.unpadded else {}
        numpy = return_tensors == "np"
        data = {}
        for key in self.order:
            if key in self.padded:
                value = out[_OP_KEY.get(key, key) if key != self.main else "input_ids"]
                data[key] = value.numpy() if numpy else value
            else:
                data[key] = unpadded[key]
        if self.create_mask:
            data["attention_mask"] = out["attention_mask"].numpy() if numpy else out["attention_mask"]
        return data
