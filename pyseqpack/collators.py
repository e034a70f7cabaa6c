"""Drop-in replacements for transformers' padding collators, and a causal-LM SFT collator.

The drop-ins (DataCollatorForSeq2Seq, DataCollatorWithPadding, DataCollatorForLanguageModeling with
mlm=False, DataCollatorForTokenClassification) take the same constructor arguments as the transformers
classes and return the same thing for the same features: the same keys in the same order, dtypes, values,
a BatchEncoding, and the same exception types for bad input (with messages that name the example and the
field). transformers pads through `tokenizer.pad`, which turns every row into a Python list, pads it with
list concatenation and builds the tensors with `torch.tensor` (about 4.5 ms for 32 examples of 64-512
tokens). Here each collator only gathers the fields (one dict lookup per example and field), reads the few
tokenizer attributes it needs, and hands the rows to `pyseqpack.pad_shift_mask`, which reads the Python
lists / arrays / tensors natively and writes every padded tensor in one pass.

Fields that `tokenizer.pad` pads: the main input (`tokenizer.model_input_names[0]`, "input_ids") with
`pad_token_id`; "attention_mask" with 0 (created as ones when missing, and then placed after the other keys)
when it is a model input of the tokenizer; "token_type_ids" with `pad_token_type_id`; "special_tokens_mask"
with 1. Every other field is not padded and is batched exactly as transformers batches it (by
transformers' own BatchEncoding conversion: fixed-length ints become int64, floats float32, ragged or string
fields raise ValueError under "pt").

Deliberate differences, all on input transformers mishandles:
  * token ids that are not integers raise wherever they are (transformers type-checks only the first token,
    raising ValueError as we do, and otherwise returns a float `input_ids` tensor);
  * rows that cannot be stacked raise ValueError under return_tensors="np" as well (transformers returns
    object arrays there), and under padding=False also when the first row is empty (torch.tensor quietly
    turns [[], [5]] into an empty (2, 0) tensor);
  * return_tensors other than "pt" / "np" raise ValueError up front;
  * per-example 2-D attention masks (which tokenizer.pad stacks as they are) are not supported.

DataCollatorForSFT is pyseqpack's own collator for causal-LM supervised fine-tuning (see its docstring).
"""
from __future__ import annotations

import functools
import warnings
from collections import UserDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .pad_shift_mask import pad_shift_mask

__all__ = [
    "DataCollatorForSeq2Seq",
    "DataCollatorWithPadding",
    "DataCollatorForLanguageModeling",
    "DataCollatorForTokenClassification",
    "DataCollatorForSFT",
]

_LONGEST, _MAX_LENGTH, _DO_NOT_PAD = "longest", "max_length", "do_not_pad"
# A given attention_mask travels through pad_shift_mask as an extra under this name (the op's own
# "attention_mask" output is the one it creates from the lengths).
_GIVEN_MASK = "user_attention_mask"
_OP_KEY = {"attention_mask": _GIVEN_MASK}
_FEATURE_KEY = {_GIVEN_MASK: "attention_mask"}


@functools.lru_cache(maxsize=None)
def _hf():
    """The transformers names the drop-ins use, imported on first use (DataCollatorForSFT needs none)."""
    from transformers import DataCollatorForLanguageModeling as LanguageModeling
    from transformers.tokenization_utils_base import LARGE_INTEGER, BatchEncoding
    from transformers.utils import PaddingStrategy
    from transformers.utils.generic import to_py_obj

    return SimpleNamespace(
        BatchEncoding=BatchEncoding,
        LARGE_INTEGER=LARGE_INTEGER,
        PaddingStrategy=PaddingStrategy,
        to_py_obj=to_py_obj,
        LanguageModeling=LanguageModeling,
    )


def _check_return_tensors(return_tensors) -> None:
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")


def _round_up(n: int, multiple) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _fit_width(lengths, longest: int, target: int, what: str, why) -> int:
    """Width of rows padded to `target` the transformers way, without truncation (`longest`: max(lengths)).

    Shorter rows are padded to `target`; longer rows are left as they are, so the batch stacks only when
    every row longer than `target` has the same length (then that is the width). Otherwise ValueError, whose
    message ends with `why()` (formatted only then: this runs on every batch).
    """
    if longest <= target:
        return target
    if min(lengths) == longest:
        return longest
    i = next(i for i, n in enumerate(lengths) if n > target)
    j = next(j for j, n in enumerate(lengths) if n != lengths[i])
    raise ValueError(
        f"{what} of example {i} has {lengths[i]} tokens, more than the padded length {target} ({why()}), and "
        f"example {j} has {lengths[j]}: transformers pads without truncating, so these rows cannot be stacked. "
        "Truncate the examples or raise max_length."
    )


def _uniform_width(lengths, what: str, why: str) -> int:
    """Width of rows that are not padded at all: they must already have one length."""
    for j, n in enumerate(lengths):
        if n != lengths[0]:
            raise ValueError(
                f"{what} of example 0 has {lengths[0]} tokens and example {j} has {n}, but {why} does not pad: "
                "rows of different lengths cannot be stacked"
            )
    return lengths[0]


def _geometry(width: int, longest: int) -> dict:
    """pad_shift_mask arguments that pad rows whose longest is `longest` to exactly `width` (>= longest)."""
    return dict(padding=_LONGEST) if width == longest else dict(padding=_MAX_LENGTH, max_length=width)


def _lengths(rows) -> list:
    """len() of each row. Rows that are all 1-D tensors give their element count instead: the same number,
    without Tensor.__len__ (a Python method, about 0.4 us a row); anything else keeps len()'s answer and errors."""
    if rows and isinstance(rows[0], torch.Tensor) and all([isinstance(r, torch.Tensor) and r.ndim == 1 for r in rows]):
        return list(map(torch.Tensor.numel, rows))
    return list(map(len, rows))


def _gather(features, keys):
    """{key: [example[key] for each example]} for the first example's keys (transformers' rule: extra keys in
    later examples are ignored, missing ones raise KeyError naming the example)."""
    try:
        return {k: list(map(itemgetter(k), features)) for k in keys}
    except KeyError:
        for i, f in enumerate(features):
            for k in keys:
                if k not in f:
                    raise KeyError(
                        f"example {i} has no {k!r} field, but example 0 has it: every example needs the fields "
                        "of the first one"
                    ) from None
        raise


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


def _resolve_padding(tokenizer, padding, max_length):
    """(strategy, max_length) as tokenizer.pad reads `padding` and `max_length`."""
    hf = _hf()
    if padding is True:
        if max_length is not None:
            warnings.warn(
                f"max_length={max_length} is ignored with padding=True (the batch is padded to its longest "
                "example, as transformers does); use padding='max_length' to pad to max_length.",
                UserWarning,
                stacklevel=4,
            )
        return _LONGEST, max_length
    if padding is False:
        return _DO_NOT_PAD, max_length
    strategy = hf.PaddingStrategy(padding).value  # ValueError listing the valid strategies
    if strategy == _MAX_LENGTH and max_length is None:
        if tokenizer.model_max_length > hf.LARGE_INTEGER:  # no model limit: transformers then does not pad
            return _DO_NOT_PAD, None
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


def _batch_encoding(data: dict):
    """BatchEncoding(data). BatchEncoding is a UserDict, whose constructor copies the items one __setitem__ at a
    time (about 1 us for a batch); the empty one takes `data` as its documented backing dict instead."""
    cls = _hf().BatchEncoding
    if not issubclass(cls, UserDict):  # another transformers design: use its constructor
        return cls(data)
    batch = cls()
    batch.data = data
    return batch


def _convert_unpadded(cols: dict, rows_are_arrays: bool, return_tensors: str) -> dict:
    """Batch the fields tokenizer.pad does not pad, exactly as transformers does (its own conversion)."""
    hf = _hf()
    out = {}
    for key, values in cols.items():
        if rows_are_arrays:
            values = hf.to_py_obj(values)
        try:
            out[key] = hf.BatchEncoding({key: values}, tensor_type=return_tensors)[key]
        except ValueError as e:
            raise ValueError(
                f"field {key!r} cannot be batched: only input_ids, attention_mask, token_type_ids and "
                "special_tokens_mask are padded, every other field must be a number or an equal-length "
                f"sequence in every example ({e.__cause__ or e})"
            ) from e
    return out


class _Batch:
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
        main = tokenizer.model_input_names[0]
        if main not in cols:
            raise ValueError(
                f"the examples have no {main!r} field (the tokenizer's main input); they have {list(cols)}"
            )
        rows = cols[main]
        self.rows_are_arrays = _rows_are_arrays(rows, main)
        strategy, max_length = _resolve_padding(tokenizer, padding, max_length)
        self.pad_token_id = None if strategy == _DO_NOT_PAD else _pad_token_id(tokenizer)
        try:
            lengths = _lengths(rows)
        except TypeError:
            i = next(i for i, r in enumerate(rows) if not hasattr(r, "__len__") or getattr(r, "ndim", 1) == 0)
            raise TypeError(
                f"example {i} field {main!r}: expected a sequence of token ids, got {type(rows[i]).__name__}"
            ) from None
        longest = max(lengths)
        if strategy == _DO_NOT_PAD:
            self.width = _uniform_width(lengths, main, f"padding={padding!r}")
        else:
            target = _round_up(longest if strategy == _LONGEST else max_length, pad_to_multiple_of)
            self.width = _fit_width(lengths, longest, target, main,
                                    lambda: f"padding={padding!r}, max_length={max_length}")
        self.main, self.order, self.rows, self.longest = main, tuple(cols), rows, longest
        self.padding_side = tokenizer.padding_side

        # Padded fields and their pad values; everything else is batched as is.
        mask_is_input = "attention_mask" in tokenizer.model_input_names
        extras = {}
        if mask_is_input and "attention_mask" in cols:  # the op's own "attention_mask" is the created one
            extras[_GIVEN_MASK] = (cols["attention_mask"], 0)
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
        common = dict(
            pad_token_id=self.pad_token_id,
            label_pad_token_id=label_pad_token_id,
            padding_side=self.padding_side,
            return_attention_mask=self.create_mask,
            extras=self.extras or None,
        )
        width, longest = self.width, self.longest
        if labels is None or isinstance(labels, str):
            return pad_shift_mask(self.rows, labels=labels, **_geometry(width, longest), **common)
        # One call pads input_ids to `width` and the labels to `label_width` when the op's own geometry gives
        # both: "longest" gives (longest row, longest label), each rounded up to pad_to_multiple_of;
        # "max_length" gives (max_length, max_length).
        if width == longest and label_width == longest_label:
            geometry = dict(padding=_LONGEST)
        elif width == label_width:
            geometry = dict(padding=_MAX_LENGTH, max_length=width)
        elif (pad_to_multiple_of and width == _round_up(longest, pad_to_multiple_of)
              and label_width == _round_up(longest_label, pad_to_multiple_of)):
            geometry = dict(padding=_LONGEST, pad_to_multiple_of=pad_to_multiple_of)
        else:
            geometry = None
        if geometry is not None:
            return pad_shift_mask(
                self.rows, labels=labels, decoder_start_token_id=decoder_start_token_id, **geometry, **common
            )
        out = pad_shift_mask(self.rows, **_geometry(width, longest), **common)
        out["labels"] = pad_shift_mask(
            labels,
            pad_token_id=label_pad_token_id,
            padding_side=self.padding_side,
            return_attention_mask=False,
            **_geometry(label_width, longest_label),
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


def _first_example(features, error):
    """features[0], which must be a mapping of fields; `error` is the exception type transformers' class
    raises for anything else (AttributeError or ValueError, depending on the class)."""
    first = features[0]
    if not isinstance(first, Mapping):
        raise error(
            f"example 0 is a {type(first).__name__}: expected a dict of fields, e.g. {{'input_ids': [...]}}"
        )
    return first


def _split_labels(features, return_tensors, default_return_tensors):
    """The opening of the label-taking drop-ins (Seq2Seq, TokenClassification), as transformers does it: the
    return type (the call's, else the collator's), the feature columns, and the label column popped from them.
    The label key is "label" when the first example has it, else "labels".
    Returns (return_tensors, cols, label_name, labels or None)."""
    return_tensors = default_return_tensors if return_tensors is None else return_tensors
    _check_return_tensors(return_tensors)
    first = _first_example(features, AttributeError)
    label_name = "label" if "label" in first else "labels"
    cols = _gather(features, first.keys())
    return return_tensors, cols, label_name, cols.pop(label_name, None)


def _label_lengths(labels, name: str, error=TypeError):
    """Lengths of the label rows; a None row among given labels raises `error` (the type transformers raises
    there: TypeError, but ValueError where its numpy concatenation meets the None first)."""
    try:
        return _lengths(labels)
    except TypeError:
        i = next(i for i, row in enumerate(labels) if not hasattr(row, "__len__"))
        raise error(
            f"example {i} field {name!r} is {labels[i]!r}: labels must be a sequence of ids in every example, "
            "or None in every example"
        ) from None


# ---- decoder_input_ids ------------------------------------------------------------------------------------
# transformers' DataCollatorForSeq2Seq calls model.prepare_decoder_input_ids_from_labels(labels). The models
# below implement it with one of three shifts, computed here without calling the model; any other model
# (or one that overrides the method) is called.
_SHIFT_START = frozenset({"bart", "marian", "pegasus", "led", "bigbird_pegasus", "mvp", "pegasus_x"})
_SHIFT_START_T5 = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})  # via self._shift_right
_SHIFT_WRAP = {"mbart": "wrap", "plbart": "wrap", "fsmt": "wrap_in_place"}


def _decoder_rule(model) -> str:
    """"start", "wrap", "wrap_in_place" or "call", from the module that defines the model's method."""
    if "prepare_decoder_input_ids_from_labels" in getattr(model, "__dict__", {}):
        return "call"
    method = getattr(type(model), "prepare_decoder_input_ids_from_labels", None)
    module = getattr(method, "__module__", None) or ""
    family = module[len("transformers.models."):].split(".")[0] if module.startswith("transformers.models.") else ""
    if module != f"transformers.models.{family}.modeling_{family}":
        return "call"
    if family in _SHIFT_START:
        return "start"
    if family in _SHIFT_START_T5:
        shift = getattr(type(model), "_shift_right", None)
        return "start" if getattr(shift, "__module__", None) == module else "call"
    return _SHIFT_WRAP.get(family, "call")


# The post-processing below works on numpy views of the op's CPU tensors (shared memory): for [32, 512] int64
# tensors an elementwise numpy op costs a few us, a torch op several times more (dispatch overhead).


def _shift_start(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """T5 / BART / Marian / Pegasus: out[:, 0] = start, out[:, j] = labels[:, j - 1], then every -100 (the
    literal value, whatever label_pad_token_id is, as the models do) becomes pad."""
    out = torch.empty_like(labels)
    o = out.numpy()
    o[:, 1:] = labels.numpy()[:, :-1]
    o[:, 0] = start  # IndexError on empty labels, as in transformers
    np.putmask(o, o == -100, pad)
    return out


def _wrap_first_column(shifted: torch.Tensor, labels: torch.Tensor, pad: int, model_name: str) -> torch.Tensor:
    """mBART / PLBart / FSMT: the labels with -100 -> pad ("filled"), shifted right by one, and in column 0
    the row's language id: filled[b, n_b - 1] where n_b counts the non-pad values of filled row b (the last
    token under right padding; under left padding the models pick a wrong token, and so does this).

    `shifted` is the start-token shift with start = pad: column 0 is pad, columns 1.. are filled[:, :-1]. So
    one count over `shifted` (column 0 adds nothing) plus filled's last column (the only one not in
    `shifted`) gives n_b without materializing filled; column 0 is then overwritten in place.
    """
    s, lab = shifted.numpy(), labels.numpy()
    width = lab.shape[1]
    tail = np.where(lab[:, -1] == -100, pad, lab[:, -1])  # filled[:, -1]
    last = (s != pad).sum(1) + (tail != pad) - 1
    if (last < 0).any():
        i = int(np.flatnonzero(last < 0)[0])
        raise RuntimeError(
            f"labels of example {i} have no token other than padding / -100: {model_name} takes the decoder "
            "start token from the last non-pad label (index -1 is out of bounds, as in transformers)"
        )
    inside = s[np.arange(len(s)), np.minimum(last + 1, width - 1)]  # filled[b, last] when last < width - 1
    s[:, 0] = np.where(last == width - 1, tail, inside)
    return shifted


# ---- drop-ins ---------------------------------------------------------------------------------------------


@dataclass
class DataCollatorWithPadding:
    """Drop-in for `transformers.DataCollatorWithPadding`: pads like tokenizer.pad and renames "label" /
    "label_ids" to "labels" (moved last). `features` is a list of dicts, or a dict of batched columns."""

    tokenizer: Any
    padding: Any = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, features):
        _check_return_tensors(self.return_tensors)
        if isinstance(features, Mapping):
            cols = {k: list(v) for k, v in features.items()}
        else:
            cols = _gather(features, _first_example(features, ValueError).keys())
        batch = _Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        data = batch.assemble(batch.run(), self.return_tensors)
        if "label" in data:
            data["labels"] = data.pop("label")
        if "label_ids" in data:
            data["labels"] = data.pop("label_ids")
        return _batch_encoding(data)


@dataclass
class DataCollatorForSeq2Seq:
    """Drop-in for `transformers.DataCollatorForSeq2Seq`.

    Inputs are padded like tokenizer.pad; labels (key "label" if the first example has it, else "labels";
    output key "labels") are padded separately with label_pad_token_id to the longest label (or max_length
    with padding="max_length"), rounded up to pad_to_multiple_of, on the tokenizer's padding side; no labels
    (or all None) gives labels=None. With a `model` that has prepare_decoder_input_ids_from_labels,
    "decoder_input_ids" follow that model's rule: the T5/BART/Marian/Pegasus shift is fused into the padding
    pass, mBART/PLBart/FSMT's "wrap the language id" shift (and FSMT's rewrite of -100 in the labels) are
    computed here, and any other model's method is called.
    """

    tokenizer: Any
    model: Any | None = None
    padding: Any = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    return_tensors: str = "pt"
    _rule_model: Any = field(default=None, init=False, repr=False, compare=False)
    _rule: Any = field(default=None, init=False, repr=False, compare=False)

    def _model_rule(self):
        """The decoder rule of self.model (None: no decoder_input_ids), cached per model object."""
        model = self.model
        if model is None or not hasattr(model, "prepare_decoder_input_ids_from_labels"):
            return None
        if self._rule_model is not model:
            self._rule, self._rule_model = _decoder_rule(model), model
        return self._rule

    def __call__(self, features, return_tensors=None):
        return_tensors, cols, label_name, labels = _split_labels(features, return_tensors, self.return_tensors)
        if labels is not None and all(row is None for row in labels):
            labels = None
        batch = _Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        if labels is None:
            data = batch.assemble(batch.run(), return_tensors)
            data["labels"] = None
            return _batch_encoding(data)

        no_padding = self.padding is False or self.padding == _DO_NOT_PAD
        label_lengths = _label_lengths(labels, label_name,
                                       ValueError if no_padding and not isinstance(labels[0], list) else TypeError)
        longest_label = max(label_lengths)
        if no_padding:
            label_width = _uniform_width(label_lengths, "labels", f"padding={self.padding!r}")
        else:
            by_max_length = self.padding == _MAX_LENGTH and self.max_length is not None
            target = _round_up(self.max_length if by_max_length else longest_label, self.pad_to_multiple_of)
            label_width = _fit_width(label_lengths, longest_label, target, "labels", lambda: (
                f"padding={self.padding!r}, max_length={self.max_length}, labels are padded to their own length"))

        rule = self._model_rule()
        fused_start = None
        if rule in ("start", "wrap", "wrap_in_place") and return_tensors == "pt" and label_width > 0:
            # The op's fused shift writes the tokenizer's pad id where the model writes its config's: fuse it
            # only when they agree. Start rule: the model's start token (None is left to the model's own
            # error, from the unfused path); wrap rules: a placeholder, column 0 is rewritten afterwards.
            config = self.model.config
            if batch.pad_token_id is not None and config.pad_token_id == batch.pad_token_id:
                fused_start = config.decoder_start_token_id if rule == "start" else config.pad_token_id
        out = batch.run(labels, label_width, longest_label, self.label_pad_token_id, self.pad_to_multiple_of,
                        fused_start)
        data = batch.assemble(out, return_tensors)
        data["labels"] = out["labels"].numpy() if return_tensors == "np" else out["labels"]
        if rule is not None:
            data["decoder_input_ids"] = self._decoder_input_ids(
                rule, data["labels"], out.get("decoder_input_ids"), return_tensors
            )
        return _batch_encoding(data)

    def _decoder_input_ids(self, rule, labels, shifted, return_tensors):
        """decoder_input_ids from the padded labels; `shifted` is the op's fused start-token shift, or None."""
        model = self.model
        if rule == "call":
            return model.prepare_decoder_input_ids_from_labels(labels=labels)
        if return_tensors != "pt":
            raise AttributeError(
                f"return_tensors={return_tensors!r} with model={type(model).__name__}: its "
                "prepare_decoder_input_ids_from_labels needs torch tensors (transformers fails here too); "
                "use return_tensors='pt', or model=None for no decoder_input_ids"
            )
        config = model.config
        pad = config.pad_token_id
        if rule == "start":
            if shifted is not None:
                return shifted
            if config.decoder_start_token_id is None or pad is None:
                return model.prepare_decoder_input_ids_from_labels(labels=labels)  # raises the model's own error
            return _shift_start(labels, config.decoder_start_token_id, pad)
        if pad is None:
            return model.prepare_decoder_input_ids_from_labels(labels=labels)  # raises the model's own error
        if labels.shape[1] == 0:
            raise RuntimeError(
                f"every label row is empty: {type(model).__name__} takes the decoder start token from the last "
                "non-pad label (index -1 is out of bounds, as in transformers)"
            )
        decoder = _wrap_first_column(shifted if shifted is not None else _shift_start(labels, pad, pad), labels,
                                     pad, type(model).__name__)
        if rule == "wrap_in_place":  # FSMT's shift rewrites -100 -> pad in the labels tensor it is given
            lab = labels.numpy()
            np.putmask(lab, lab == -100, pad)
        return decoder


@dataclass
class DataCollatorForTokenClassification:
    """Drop-in for `transformers.DataCollatorForTokenClassification`: inputs padded like tokenizer.pad, the
    labels (key "label" or "labels", kept as is) padded with label_pad_token_id to the input length."""

    tokenizer: Any
    padding: Any = True
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    return_tensors: str = "pt"

    def __call__(self, features, return_tensors=None):
        return_tensors, cols, label_name, labels = _split_labels(features, return_tensors, self.return_tensors)
        batch = _Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        if labels is None:
            return _batch_encoding(batch.assemble(batch.run(), return_tensors))
        label_lengths = _label_lengths(labels, label_name)
        longest_label = max(label_lengths)
        label_width = _fit_width(label_lengths, longest_label, batch.width, label_name,
                                 lambda: "labels are padded to the input length")
        out = batch.run(labels, label_width, longest_label, self.label_pad_token_id)
        data = batch.assemble(out, return_tensors)
        data[label_name] = out["labels"].numpy() if return_tensors == "np" else out["labels"]
        return _batch_encoding(data)


@dataclass
class DataCollatorForLanguageModeling:
    """Drop-in for `transformers.DataCollatorForLanguageModeling`.

    mlm=False (causal LM) is done here: labels are input_ids with every token EQUAL to pad_token_id set to
    -100 (transformers masks by value, so when pad == eos the EOS tokens are never trained; use
    DataCollatorForSFT to mask by position). Dict examples give a BatchEncoding padded like tokenizer.pad
    (special_tokens_mask and offset_mapping dropped, user "labels" overwritten); bare sequences give a plain
    dict with input_ids and labels only, in the dtype of the first row when it is a tensor (numpy array under
    return_tensors="np"), and equal-length rows need no pad token (an empty row under left padding is padded
    here; transformers raises there, its `result[i, -0:]` slice being the whole row). mlm=True (random
    masking) is delegated to transformers' own class, which also validates the arguments.
    """

    tokenizer: Any
    mlm: bool = True
    whole_word_mask: bool = False
    mlm_probability: float | None = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    seed: int | None = None
    _transformers: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._transformers = _hf().LanguageModeling(
            self.tokenizer,
            mlm=self.mlm,
            whole_word_mask=self.whole_word_mask,
            mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob,
            random_replace_prob=self.random_replace_prob,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors=self.return_tensors,
            seed=self.seed,
        )

    def __call__(self, examples, return_tensors=None):
        return_tensors = self.return_tensors if return_tensors is None else return_tensors
        if self.mlm:
            return self._transformers(examples, return_tensors=return_tensors)
        _check_return_tensors(return_tensors)
        if isinstance(examples[0], Mapping):
            return self._call_dicts(examples, return_tensors)
        return self._call_rows(examples, return_tensors)

    def _call_dicts(self, examples, return_tensors):
        cols = _gather(examples, examples[0].keys())
        cols.pop("special_tokens_mask", None)  # transformers pads it, then drops it
        batch = _Batch(self.tokenizer, cols, True, None, self.pad_to_multiple_of)
        out = batch.run(labels="input_ids")
        labels = out["labels"]  # padding is already -100; now every token EQUAL to pad too (transformers' rule)
        np.putmask(labels.numpy(), out["input_ids"].numpy() == batch.pad_token_id, -100)
        data = batch.assemble(out, return_tensors)
        data.pop("offset_mapping", None)
        data["labels"] = labels.numpy() if return_tensors == "np" else labels
        return _batch_encoding(data)

    def _call_rows(self, rows, return_tensors):
        # transformers keeps the first row's dtype when it is a tensor, and under "np" also a numpy array's
        first = rows[0]
        if isinstance(first, torch.Tensor):
            dtype = first.dtype
        elif isinstance(first, np.ndarray) and return_tensors == "np":
            dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        else:
            dtype = torch.int64
        lengths = _lengths(rows)
        longest = width = max(lengths)
        stacks = min(lengths) == width and (not self.pad_to_multiple_of or width % self.pad_to_multiple_of == 0)
        if not stacks:
            if self.tokenizer.pad_token is None:
                raise ValueError(
                    f"the examples have different lengths (example 0: {lengths[0]} tokens, longest: {width}) or "
                    f"need pad_to_multiple_of={self.pad_to_multiple_of}, but the tokenizer "
                    f"({type(self.tokenizer).__name__}) has no pad token: set `tokenizer.pad_token`"
                )
            width = _round_up(width, self.pad_to_multiple_of)
        pad = self.tokenizer.pad_token_id  # None only when nothing is padded
        out = pad_shift_mask(
            rows,
            labels="input_ids",
            pad_token_id=pad,
            padding_side="right" if self.tokenizer.padding_side == "right" else "left",
            return_attention_mask=False,
            dtype=dtype if dtype in (torch.int32, torch.int64) else torch.int64,
            **_geometry(width, longest),
        )
        input_ids, labels = out["input_ids"], out["labels"]
        if pad is not None:
            np.putmask(labels.numpy(), input_ids.numpy() == pad, -100)
        input_ids, labels = input_ids.to(dtype), labels.to(dtype)
        if return_tensors == "np":
            return {"input_ids": input_ids.numpy(), "labels": labels.numpy()}
        return {"input_ids": input_ids, "labels": labels}


# ---- SFT ----------------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForSFT:
    """Collator for causal-LM supervised fine-tuning: pads input_ids and builds labels masked by POSITION.

    Padding becomes label_pad_token_id because of where it is, not because of its value, so an EOS that
    equals the pad token is still trained (transformers' DataCollatorForLanguageModeling masks by value and
    drops it). Optionally only the completion, or only the assistant turns, are trained.

    Fields of each example (the first example decides which fields are used; every example must then have
    them; other fields, e.g. a tokenizer's attention_mask, are ignored):
        input_ids        token ids: list of ints, 1-D integer numpy array or tensor (required)
        labels           optional, aligned with input_ids: label values to use instead of input_ids (e.g. a
                         TRL-prepared dataset, -100 on ignored tokens); the masks below still apply
        prompt_length    optional int: the first prompt_length tokens are the prompt and are not trained
                         (used when completion_only_loss)
        completion_mask  optional 0/1 per token, aligned with input_ids (TRL's prompt-completion field):
                         0 = not trained (used when completion_only_loss)
        assistant_masks  optional 0/1 per token, aligned with input_ids (transformers'
                         apply_chat_template(return_assistant_tokens_mask=True), TRL's multi-turn field):
                         0 = not trained (used when assistant_only_loss)

    Args:
        pad_token_id: id written into input_ids padding (tokenizer.pad_token_id; pad == eos is fine).
        padding_side: "right" (default) or "left".
        padding: "longest" (default: the longest example of the batch) or "max_length" (needs max_length).
        max_length: the padded length for padding="max_length", and the longest example accepted.
        truncation: False (default): an example longer than max_length raises ValueError naming it;
            True: examples are cut to max_length on truncation_side ("right" keeps the start, "left" the end).
            The prompt length keeps counting in the example's original tokens.
        pad_to_multiple_of: round the padded length up to a multiple of this.
        label_pad_token_id: label of untrained positions (-100, the ignore_index of torch's cross-entropy);
            must be negative, so that no token id can collide with it.
        completion_only_loss: apply prompt_length / completion_mask when the examples have them (default True).
        assistant_only_loss: apply assistant_masks when the examples have them (default True).
        return_attention_mask: return "attention_mask" (1 on tokens, 0 on padding); default True.
        return_position_ids: return "position_ids" = clip(cumsum(attention_mask) - 1, min=0); default False.
        return_shift_labels: return "shift_labels"[b, t] = labels[b, t + 1] (label_pad_token_id in the last
            column), for models that take pre-shifted labels; default False.
        return_tensors: "pt" (default) or "np".

    Returns a dict of int64 [B, L] tensors (numpy arrays for "np"): input_ids, attention_mask, position_ids,
    labels, shift_labels (those asked for, in this order).
    """

    pad_token_id: int
    padding_side: str = "right"
    padding: str = "longest"
    max_length: int | None = None
    truncation: bool = False
    truncation_side: str = "right"
    pad_to_multiple_of: int | None = None
    label_pad_token_id: int = -100
    completion_only_loss: bool = True
    assistant_only_loss: bool = True
    return_attention_mask: bool = True
    return_position_ids: bool = False
    return_shift_labels: bool = False
    return_tensors: str = "pt"

    def __post_init__(self):
        def check(ok, arg, expected):
            if not ok:
                raise ValueError(f"DataCollatorForSFT: {arg} must be {expected}, got {getattr(self, arg)!r}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        check(is_int(self.pad_token_id), "pad_token_id", "an int (e.g. tokenizer.pad_token_id)")
        check(self.padding_side in ("right", "left"), "padding_side", "'right' or 'left'")
        check(self.padding in (_LONGEST, _MAX_LENGTH), "padding", "'longest' or 'max_length'")
        check(self.max_length is None or (is_int(self.max_length) and self.max_length > 0), "max_length",
              "None or a positive int")
        check(self.padding != _MAX_LENGTH or self.max_length is not None, "max_length",
              "set when padding='max_length'")
        check(not self.truncation or self.max_length is not None, "max_length", "set when truncation=True")
        check(self.truncation_side in ("right", "left"), "truncation_side", "'right' or 'left'")
        check(self.pad_to_multiple_of is None or (is_int(self.pad_to_multiple_of) and self.pad_to_multiple_of > 0),
              "pad_to_multiple_of", "None or a positive int")
        check(is_int(self.label_pad_token_id) and self.label_pad_token_id < 0, "label_pad_token_id",
              "a negative int (e.g. -100)")
        check(self.return_tensors in ("pt", "np"), "return_tensors", "'pt' or 'np'")

    def __call__(self, features, return_tensors=None):
        return_tensors = self.return_tensors if return_tensors is None else return_tensors
        _check_return_tensors(return_tensors)
        first = _first_example(features, TypeError)
        masks = [k for k, on in (("completion_mask", self.completion_only_loss),
                                 ("assistant_masks", self.assistant_only_loss)) if on and k in first]
        use_prompt = self.completion_only_loss and "prompt_length" in first
        given = "labels" in first
        keys = ["input_ids"] + masks + ["prompt_length"] * use_prompt + ["labels"] * given
        cols = _gather(features, keys)
        if self.max_length is not None and not self.truncation and self.padding == _LONGEST:
            # pad_shift_mask checks rows against the padded length only; max_length is a limit here too
            lengths = _lengths(cols["input_ids"])
            if max(lengths) > self.max_length:
                b = next(b for b, n in enumerate(lengths) if n > self.max_length)
                raise ValueError(
                    f"input_ids[{b}] has {lengths[b]} tokens, more than max_length={self.max_length}; pass "
                    "truncation=True to cut it, or a larger max_length"
                )

        # The op derives labels from input_ids with the prompt and the first mask applied by position. A
        # second mask and given label values travel as extra fields, padded and truncated exactly like
        # input_ids, and are folded in afterwards with a few elementwise ops.
        extras = {k: (cols[k], 0) for k in masks[1:]}
        if given:
            extras["given_labels"] = (cols["labels"], self.label_pad_token_id)
        fold = bool(extras)
        out = pad_shift_mask(
            cols["input_ids"],
            labels="input_ids",
            prompt_lengths=cols["prompt_length"] if use_prompt else None,
            loss_masks=cols[masks[0]] if masks else None,
            extras=extras or None,
            pad_token_id=self.pad_token_id,
            label_pad_token_id=self.label_pad_token_id,
            padding=self.padding,
            max_length=self.max_length,
            truncation=self.truncation,
            truncation_side=self.truncation_side,
            padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_attention_mask=self.return_attention_mask,
            return_position_ids=self.return_position_ids,
            return_shift_labels=self.return_shift_labels and not fold,
        )
        labels = out["labels"]
        if fold:
            lab = labels.numpy()
            ignored = lab == self.label_pad_token_id  # padding, prompt, first mask
            for k in masks[1:]:
                mask = out[k].numpy()
                _check_binary(mask, k)
                ignored |= mask == 0
            if given:
                labels = out["given_labels"]
                lab = labels.numpy()
            np.putmask(lab, ignored, self.label_pad_token_id)
        data = {"input_ids": out["input_ids"]}
        for key in ("attention_mask", "position_ids"):
            if key in out:
                data[key] = out[key]
        data["labels"] = labels
        if self.return_shift_labels:
            shift = out.get("shift_labels")
            if shift is None:
                shift = torch.empty_like(labels)
                sh = shift.numpy()
                sh[:, :-1] = labels.numpy()[:, 1:]
                sh[:, -1:] = self.label_pad_token_id
            data["shift_labels"] = shift
        if return_tensors == "np":
            return {k: v.numpy() for k, v in data.items()}
        return data


def _check_binary(mask: np.ndarray, name: str) -> None:
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        b, t = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"{name} of example {b}: expected 0 or 1 per token, got {int(mask[b, t])}")
