"""DataCollatorForSFT: pyseqpack's collator for causal-LM supervised fine-tuning (needs no transformers)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import pad_shift_mask
from ._common import LONGEST, MAX_LENGTH, check_return_tensors, first_example, gather, lengths

__all__ = ["DataCollatorForSFT"]


@dataclass
class DataCollatorForSFT:
    """Collator for causal-LM supervised fine-tuning: pads input_ids and builds labels masked by POSITION.
    (How TRL and transformers build these batches: docs/semantics.md, 'TRL SFT collator' and 'transformers
    collators'.)

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
        check(self.padding in (LONGEST, MAX_LENGTH), "padding", "'longest' or 'max_length'")
        check(self.max_length is None or (is_int(self.max_length) and self.max_length > 0), "max_length",
              "None or a positive int")
        check(self.padding != MAX_LENGTH or self.max_length is not None, "max_length",
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
        check_return_tensors(return_tensors)
        first = first_example(features, TypeError)
        masks = [k for k, on in (("completion_mask", self.completion_only_loss),
                                 ("assistant_masks", self.assistant_only_loss)) if on and k in first]
        use_prompt = self.completion_only_loss and "prompt_length" in first
        given = "labels" in first
        keys = ["input_ids"] + masks + ["prompt_length"] * use_prompt + ["labels"] * given
        cols = gather(features, keys, {"input_ids": "DataCollatorForSFT needs the token ids of every example"})
        if self.max_length is not None and not self.truncation and self.padding == LONGEST:
            # pad_shift_mask checks rows against the padded length only; max_length is a limit here too
            row_lengths = lengths(cols["input_ids"])
            if max(row_lengths) > self.max_length:
                b = next(b for b, n in enumerate(row_lengths) if n > self.max_length)
                raise ValueError(
                    f"input_ids[{b}] has {row_lengths[b]} tokens, more than max_length={self.max_length}; pass "
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
