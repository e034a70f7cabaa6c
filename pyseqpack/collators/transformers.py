"""Drop-ins for transformers' padding collators: the same classes, padding through `pyseqpack.pad_shift_mask`.

Each class here subclasses the transformers class it replaces (`isinstance(ours, transformers.X)` holds) and
adds no field: the constructor, the dataclass fields and every other method are transformers' own. Only the
methods that pad are overridden: `__call__` for DataCollatorWithPadding and DataCollatorForSeq2Seq, and
`torch_call` / `numpy_call` (the methods transformers' `__call__` dispatches to) for
DataCollatorForTokenClassification and DataCollatorForLanguageModeling, so a subclass calling
`super().torch_call(...)` gets the native path. They return what transformers returns for the same features:
the same keys in the same order, dtypes, values, a BatchEncoding, and the same exception types for bad input
(with messages that name the example and the field). Semantics: docs/semantics.md, 'transformers collators'
(its 'Decoder shifts' paragraph for decoder_input_ids).

Input the native path does not reproduce (a `tokenizer` that is not a transformers tokenizer, per-example 2-D
attention masks, one unbatched example) is handed to the transformers method, the parent class's.

Deliberate differences, all on input transformers mishandles:
  * an empty batch raises ValueError naming the argument (transformers raises IndexError or AttributeError);
  * token ids that are not integers raise ValueError wherever they are (transformers checks only the first
    token, and otherwise returns a float `input_ids` tensor);
  * rows that cannot be stacked raise ValueError under return_tensors="np" as well (transformers returns
    object arrays there), and under padding=False also when the first row is empty (torch.tensor quietly
    turns [[], [5]] into an empty (2, 0) tensor);
  * return_tensors other than "pt" / "np" raise ValueError naming return_tensors.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
import transformers

from .. import pad_shift_mask
from ._common import (
    DO_NOT_PAD,
    MAX_LENGTH,
    check_not_empty,
    check_return_tensors,
    first_example,
    gather,
    lengths,
    round_up,
)
from ._tokenizer_pad import (
    Batch,
    Unsupported,
    batch_encoding,
    fit_width,
    geometry,
    raise_like_conversion,
    uniform_width,
)

__all__ = [
    "DataCollatorWithPadding",
    "DataCollatorForSeq2Seq",
    "DataCollatorForTokenClassification",
    "DataCollatorForLanguageModeling",
]


def _split_labels(features, return_tensors, default_return_tensors):
    """The opening of the label-taking drop-ins (Seq2Seq, TokenClassification), as transformers does it: the
    return type (the call's, else the collator's), the feature columns, and the label column popped from them.
    The label key is "label" when the first example has it, else "labels".
    Returns (return_tensors, cols, label_name, labels or None)."""
    return_tensors = default_return_tensors if return_tensors is None else return_tensors
    check_return_tensors(return_tensors)
    first = first_example(features, AttributeError)
    label_name = "label" if "label" in first else "labels"
    cols = gather(features, first.keys())
    return return_tensors, cols, label_name, cols.pop(label_name, None)


def _label_lengths(labels, name: str, error=TypeError):
    """Lengths of the label rows; a None row among given labels raises `error` (the type transformers raises
    there: TypeError, but ValueError where its numpy concatenation meets the None first)."""
    try:
        return lengths(labels)
    except TypeError:
        i = next(i for i, row in enumerate(labels) if not hasattr(row, "__len__"))
        raise error(
            f"example {i} field {name!r} is {labels[i]!r}: labels must be a sequence of ids in every example, "
            "or None in every example"
        ) from None


def _run_with_labels(batch, labels, label_name, return_tensors, *args):
    """batch.run(labels, *args), a bad label token raising the exception type transformers' conversion of
    the padded label lists raises."""
    try:
        return batch.run(labels, *args)
    except TypeError as e:
        raise_like_conversion(e, labels, label_name, return_tensors, per_row=False)
        raise


def _tensors(data: dict, return_tensors: str) -> dict:
    return {k: v.numpy() for k, v in data.items()} if return_tensors == "np" else data


# ---- DataCollatorWithPadding ---------------------------------------------------------------------------------


class DataCollatorWithPadding(transformers.DataCollatorWithPadding):
    """`transformers.DataCollatorWithPadding`, padding natively: tokenizer.pad's rules, then "label" /
    "label_ids" renamed to "labels" (moved last). `features` is a list of dicts, or a dict of batched columns.
    docs/semantics.md, 'transformers collators'."""

    def __call__(self, features):
        check_return_tensors(self.return_tensors)
        check_not_empty(features)
        if isinstance(features, Mapping):
            cols = {k: list(v) for k, v in features.items()}
        else:
            cols = gather(features, first_example(features, ValueError).keys())
        try:
            batch = Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        except Unsupported:
            return super().__call__(features)
        data = batch.assemble(batch.run(), self.return_tensors)
        if "label" in data:
            data["labels"] = data.pop("label")
        if "label_ids" in data:
            data["labels"] = data.pop("label_ids")
        return batch_encoding(data)


# ---- DataCollatorForSeq2Seq: decoder_input_ids ---------------------------------------------------------------

# transformers' DataCollatorForSeq2Seq calls model.prepare_decoder_input_ids_from_labels(labels). For the model
# types below that method is one of three shifts (docs/semantics.md, 'transformers collators', paragraph
# 'Decoder shifts'), computed here without calling the model:
#   "start":         out[:, 0] = decoder_start_token_id, out[:, j] = labels[:, j - 1], then -100 -> pad
#   "wrap":          -100 -> pad, then shifted right by one with the row's last non-pad label in column 0
#   "wrap_in_place": "wrap", and -100 -> pad in the labels tensor itself (FSMT rewrites its argument)
# Each entry names the transformers class whose methods the rule reproduces: a model whose methods are not
# those very functions (a subclass overriding them, another class of the same model_type) is called, and so
# is every model of a type not listed.
_OWN = ("prepare_decoder_input_ids_from_labels",)
_T5 = ("prepare_decoder_input_ids_from_labels", "_shift_right")  # the T5 family shifts in self._shift_right
DECODER_RULES = {
    # model_type: (rule, transformers class, the methods of that class the rule stands for)
    "t5": ("start", "T5ForConditionalGeneration", _T5),
    "mt5": ("start", "MT5ForConditionalGeneration", _T5),
    "umt5": ("start", "UMT5ForConditionalGeneration", _T5),
    "longt5": ("start", "LongT5ForConditionalGeneration", _T5),
    "switch_transformers": ("start", "SwitchTransformersForConditionalGeneration", _T5),
    "bart": ("start", "BartForConditionalGeneration", _OWN),
    "mvp": ("start", "MvpForConditionalGeneration", _OWN),
    "led": ("start", "LEDForConditionalGeneration", _OWN),
    "marian": ("start", "MarianMTModel", _OWN),
    "pegasus": ("start", "PegasusForConditionalGeneration", _OWN),
    "pegasus_x": ("start", "PegasusXForConditionalGeneration", _OWN),
    "bigbird_pegasus": ("start", "BigBirdPegasusForConditionalGeneration", _OWN),
    "mbart": ("wrap", "MBartForConditionalGeneration", _OWN),
    "plbart": ("wrap", "PLBartForConditionalGeneration", _OWN),
    "fsmt": ("wrap_in_place", "FSMTForConditionalGeneration", _OWN),
}


def decoder_rule(model) -> str:
    """The rule of DECODER_RULES for `model` (which has prepare_decoder_input_ids_from_labels), or "call":
    call the model's own method."""
    if "prepare_decoder_input_ids_from_labels" in getattr(model, "__dict__", {}):
        return "call"
    entry = DECODER_RULES.get(getattr(getattr(model, "config", None), "model_type", None))
    if entry is None:
        return "call"
    rule, class_name, methods = entry
    reference = getattr(transformers, class_name, None)
    if reference is None or any(getattr(type(model), m, None) is not getattr(reference, m, False) for m in methods):
        return "call"
    return rule


# The shifts below work on numpy views of the op's CPU tensors (shared memory): an elementwise numpy op on a
# small int64 tensor has less fixed overhead than the torch op.


def _shift_start(labels: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """"start": out[:, 0] = start, out[:, j] = labels[:, j - 1], then every -100 (the literal value, whatever
    label_pad_token_id is, as the models do) becomes pad."""
    out = torch.empty_like(labels)
    o = out.numpy()
    o[:, 1:] = labels.numpy()[:, :-1]
    o[:, 0] = start  # IndexError on empty labels, as in transformers
    np.putmask(o, o == -100, pad)
    return out


def _wrap_first_column(shifted: torch.Tensor, labels: torch.Tensor, pad: int, model_name: str) -> torch.Tensor:
    """"wrap": the labels with -100 -> pad ("filled"), shifted right by one, and in column 0 the row's
    language id: filled[b, n_b - 1] where n_b counts the non-pad values of filled row b (the last token under
    right padding; under left padding the models pick a wrong token, and so does this).

    `shifted` is the "start" shift with start = pad: column 0 is pad, columns 1.. are filled[:, :-1]. So one
    count over `shifted` (column 0 adds nothing) plus filled's last column (the only one not in `shifted`)
    gives n_b without materializing filled; column 0 is then overwritten in place.
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


# ---- DataCollatorForSeq2Seq ----------------------------------------------------------------------------------


class DataCollatorForSeq2Seq(transformers.DataCollatorForSeq2Seq):
    """`transformers.DataCollatorForSeq2Seq`, padding natively.

    Inputs are padded like tokenizer.pad; labels (key "label" if the first example has it, else "labels";
    output key "labels") are padded separately with label_pad_token_id to the longest label (or max_length
    with padding="max_length"), rounded up to pad_to_multiple_of, on the tokenizer's padding side; no labels
    (or all None) gives labels=None. With a `model` that has prepare_decoder_input_ids_from_labels,
    "decoder_input_ids" follow DECODER_RULES for its model_type: the "start" shift is fused into the padding
    pass, the "wrap" shifts are computed from the padded labels, and any other model's method is called.
    docs/semantics.md, 'transformers collators' (paragraphs DataCollatorForSeq2Seq and 'Decoder shifts').
    """

    def _model_rule(self):
        """The decoder rule of self.model (None: no decoder_input_ids), cached per model object."""
        model = self.model
        if model is None or not hasattr(model, "prepare_decoder_input_ids_from_labels"):
            return None
        cached = self.__dict__.get("_pyseqpack_rule")
        if cached is None or cached[0] is not model:
            cached = self.__dict__["_pyseqpack_rule"] = (model, decoder_rule(model))
        return cached[1]

    def __call__(self, features, return_tensors=None):
        return_tensors, cols, label_name, labels = _split_labels(features, return_tensors, self.return_tensors)
        if labels is not None and all(row is None for row in labels):
            labels = None
        try:
            batch = Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        except Unsupported:
            return super().__call__(features, return_tensors)
        if labels is None:
            data = batch.assemble(batch.run(), return_tensors)
            data["labels"] = None
            return batch_encoding(data)

        no_padding = self.padding is False or self.padding == DO_NOT_PAD
        label_lengths = _label_lengths(labels, label_name,
                                       ValueError if no_padding and not isinstance(labels[0], list) else TypeError)
        longest_label = max(label_lengths)
        if no_padding:
            label_width = uniform_width(label_lengths, "labels", f"padding={self.padding!r}")
        else:
            by_max_length = self.padding == MAX_LENGTH and self.max_length is not None
            target = round_up(self.max_length if by_max_length else longest_label, self.pad_to_multiple_of)
            label_width = fit_width(label_lengths, longest_label, target, "labels", lambda: (
                f"padding={self.padding!r}, max_length={self.max_length}, labels are padded to their own length"))

        rule = self._model_rule()
        fused_start = None
        if rule in ("start", "wrap", "wrap_in_place") and return_tensors == "pt" and label_width > 0:
            # The op's fused shift writes the tokenizer's pad id where the model writes its config's: fuse it
            # only when they agree. "start": the model's start token (None is left to the model's own error,
            # from the unfused path); "wrap": a placeholder, column 0 is rewritten afterwards.
            config = self.model.config
            if batch.pad_token_id is not None and config.pad_token_id == batch.pad_token_id:
                fused_start = config.decoder_start_token_id if rule == "start" else config.pad_token_id
        out = _run_with_labels(batch, labels, label_name, return_tensors, label_width, longest_label,
                               self.label_pad_token_id, self.pad_to_multiple_of, fused_start)
        data = batch.assemble(out, return_tensors)
        data["labels"] = out["labels"].numpy() if return_tensors == "np" else out["labels"]
        if rule is not None:
            data["decoder_input_ids"] = self._decoder_input_ids(
                rule, data["labels"], out.get("decoder_input_ids"), return_tensors
            )
        return batch_encoding(data)

    def _decoder_input_ids(self, rule, labels, shifted, return_tensors):
        """decoder_input_ids from the padded labels; `shifted` is the op's fused "start" shift, or None."""
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


# ---- DataCollatorForTokenClassification ----------------------------------------------------------------------


class DataCollatorForTokenClassification(transformers.DataCollatorForTokenClassification):
    """`transformers.DataCollatorForTokenClassification`, padding natively: inputs padded like tokenizer.pad,
    the labels (key "label" or "labels", kept as is) padded with label_pad_token_id to the input length.
    docs/semantics.md, 'transformers collators'."""

    def __call__(self, features, return_tensors=None):
        check_return_tensors(self.return_tensors if return_tensors is None else return_tensors)
        return super().__call__(features, return_tensors)

    def torch_call(self, features):
        batch = self._collate(features, "pt")
        return super().torch_call(features) if batch is None else batch

    def numpy_call(self, features):
        batch = self._collate(features, "np")
        return super().numpy_call(features) if batch is None else batch

    def _collate(self, features, return_tensors):
        """The batch, or None when transformers' own method must run (see the module docstring)."""
        _, cols, label_name, labels = _split_labels(features, return_tensors, return_tensors)
        try:
            batch = Batch(self.tokenizer, cols, self.padding, self.max_length, self.pad_to_multiple_of)
        except Unsupported:
            return None
        if labels is None:
            return batch_encoding(batch.assemble(batch.run(), return_tensors))
        label_lengths = _label_lengths(labels, label_name)
        longest_label = max(label_lengths)
        label_width = fit_width(label_lengths, longest_label, batch.width, label_name,
                                lambda: "labels are padded to the input length")
        out = _run_with_labels(batch, labels, label_name, return_tensors, label_width, longest_label,
                               self.label_pad_token_id)
        data = batch.assemble(out, return_tensors)
        data[label_name] = out["labels"].numpy() if return_tensors == "np" else out["labels"]
        return batch_encoding(data)


# ---- DataCollatorForLanguageModeling -------------------------------------------------------------------------


class DataCollatorForLanguageModeling(transformers.DataCollatorForLanguageModeling):
    """`transformers.DataCollatorForLanguageModeling`, padding natively; masking is transformers' own.

    The batch is padded here, then mlm=True hands it to `torch_mask_tokens` / `numpy_mask_tokens` (whole-word
    masking included), which draw the same random numbers as in transformers; mlm=False (causal LM) sets
    labels to input_ids with every token EQUAL to pad_token_id set to -100 (transformers masks by value, so
    when pad == eos the EOS tokens are never trained; DataCollatorForSFT masks by position). Dict examples give
    a BatchEncoding padded like tokenizer.pad (special_tokens_mask and offset_mapping dropped, user "labels"
    overwritten); bare sequences give a plain dict with input_ids and labels only, in the dtype of the first
    row when it is a tensor (a numpy array's under return_tensors="np"), and equal-length rows need no pad
    token (an empty row under left padding is padded here; transformers raises there, its `result[i, -0:]`
    slice being the whole row). docs/semantics.md, 'transformers collators'.
    """

    def __call__(self, examples, return_tensors=None):
        check_return_tensors(self.return_tensors if return_tensors is None else return_tensors)
        return super().__call__(examples, return_tensors)

    def torch_call(self, examples):
        batch = self._collate(examples, "pt")
        return super().torch_call(examples) if batch is None else batch

    def numpy_call(self, examples):
        batch = self._collate(examples, "np")
        return super().numpy_call(examples) if batch is None else batch

    def _collate(self, examples, return_tensors):
        """The batch, or None when transformers' own method must run (see the module docstring)."""
        check_not_empty(examples, "examples")
        if isinstance(examples[0], Mapping):
            batch = self._pad_dicts(examples, return_tensors)
            if batch is None:
                return None
        else:
            batch = self._pad_rows(examples, return_tensors)
        special_tokens_mask = batch.pop("special_tokens_mask", None)
        offset_mapping = batch.pop("offset_mapping", None)
        if not self.mlm:
            return batch
        # transformers' seeded generator, made (or remade in a new worker process) as its torch_call does
        kind = torch.Generator if return_tensors == "pt" else np.random.Generator
        if self.seed is not None and (not isinstance(self.generator, kind) or self._generator_pid != os.getpid()):
            self.create_rng(return_tensors)
        mask_tokens = self.torch_mask_tokens if return_tensors == "pt" else self.numpy_mask_tokens
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping
        )
        return batch

    def _causal(self) -> str | None:
        """pad_shift_mask's `labels` argument: labels derived from input_ids for mlm=False, none for mlm."""
        return None if self.mlm else "input_ids"

    def _pad_dicts(self, examples, return_tensors):
        cols = gather(examples, examples[0].keys())
        try:
            batch = Batch(self.tokenizer, cols, True, None, self.pad_to_multiple_of)
        except Unsupported:
            return None
        out = batch.run(labels=self._causal())
        data = batch.assemble(out, return_tensors)
        if not self.mlm:
            # padding is already -100 in the derived labels; now every token EQUAL to pad too
            labels = out["labels"]
            np.putmask(labels.numpy(), out["input_ids"].numpy() == batch.pad_token_id, -100)
            data["labels"] = labels.numpy() if return_tensors == "np" else labels
        return batch_encoding(data)

    def _pad_rows(self, rows, return_tensors):
        # transformers keeps the first row's dtype when it is a tensor, and under "np" also a numpy array's
        first = rows[0]
        if isinstance(first, torch.Tensor):
            dtype = first.dtype
        elif isinstance(first, np.ndarray) and return_tensors == "np":
            dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        else:
            dtype = torch.int64
        row_lengths = lengths(rows)
        longest = width = max(row_lengths)
        stacks = min(row_lengths) == width and (not self.pad_to_multiple_of or width % self.pad_to_multiple_of == 0)
        if not stacks:
            if self.tokenizer.pad_token is None:
                raise ValueError(
                    f"the examples have different lengths (example 0: {row_lengths[0]} tokens, longest: {width}) "
                    f"or need pad_to_multiple_of={self.pad_to_multiple_of}, but the tokenizer "
                    f"({type(self.tokenizer).__name__}) has no pad token: set `tokenizer.pad_token`"
                )
            width = round_up(width, self.pad_to_multiple_of)
        pad = self.tokenizer.pad_token_id  # None only when nothing is padded
        try:
            out = pad_shift_mask(
                rows,
                labels=self._causal(),
                pad_token_id=pad,
                padding_side="right" if self.tokenizer.padding_side == "right" else "left",
                return_attention_mask=False,
                dtype=dtype if dtype in (torch.int32, torch.int64) else torch.int64,
                **geometry(width, longest),
            )
        except TypeError as e:  # transformers converts each row with torch.tensor / np.array
            raise_like_conversion(e, rows, "input_ids", return_tensors, per_row=True)
            raise
        data = {"input_ids": out["input_ids"].to(dtype)}
        if not self.mlm:
            labels = out["labels"]
            if pad is not None:
                np.putmask(labels.numpy(), out["input_ids"].numpy() == pad, -100)
            data["labels"] = labels.to(dtype)
        return _tensors(data, return_tensors)
