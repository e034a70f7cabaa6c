"""pyseqpack.DataCollatorForSFT against TRL (its dataset preparation + collator) and a plain reference.

TRL 1.16 builds labels at dataset preparation (SFTTrainer._prepare_dataset: completion_mask / assistant_masks
folded into a "labels" column, then truncation), and its collator pads them on the right. Where the two
overlap (right padding, masks or labels given, keep_start / keep_end truncation) the outputs must be equal.
Everything else (left padding, prompt_length, shift_labels, position_ids, padding="max_length") is checked
against `sft_reference`, a direct per-example transcription of the class docstring.
"""
import random
import types
import warnings

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import assert_unchanged, make_tokenizer, snapshot, word_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyseqpack
from pyseqpack import DataCollatorForSFT

PAD = 0  # qwen-like tokenizer: pad == eos == 0


# ---- TRL reference ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_reference():
    """f(features, tokenizer, max_length, truncation_mode, pad_to_multiple_of) -> TRL's batch: the real
    SFTTrainer._prepare_dataset (label building, truncation) on a datasets.Dataset, then TRL's collator."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer

    datasets.disable_progress_bars()

    def run(features, tokenizer, max_length=None, truncation_mode="keep_start", pad_to_multiple_of=None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end, transformers some defaults
            args = trl.SFTConfig(output_dir="/tmp/pyseqpack-trl-test", max_length=max_length,
                                 truncation_mode=truncation_mode, completion_only_loss=True, report_to=[],
                                 use_cpu=True, bf16=False)
        # _prepare_dataset only reads these attributes of the trainer
        trainer = types.SimpleNamespace(completion_only_loss=True, _tokenizer=tokenizer, chat_template=None)
        prepared = SFTTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(features), tokenizer, args,
                                               False, None, "train")
        rows = list(prepared)
        assert len(rows) == len(features), "TRL dropped a fully masked example: the test data must avoid that"
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                                   pad_to_multiple_of=pad_to_multiple_of)
        return collator(rows)

    return run


def sft_features(rng, tokenizer, n, lo=2, hi=10, fields=("completion_mask",), max_prompt=None):
    """Random examples ending in EOS. Token p = min(len - 1, max_prompt) and the last token are trained by
    every mask, so no example is fully masked, even after truncation to max_prompt + 1 tokens (TRL would
    drop it)."""
    words = list(word_ids(tokenizer))
    feats = []
    for _ in range(n):
        ids = [rng.choice(words) for _ in range(rng.randint(lo, hi))] + [tokenizer.eos_token_id]
        p = len(ids) - 1 if max_prompt is None else min(len(ids) - 1, max_prompt)
        prompt = rng.randint(0, p)
        f = {"input_ids": ids}
        if "completion_mask" in fields:
            f["completion_mask"] = [0] * prompt + [1] * (len(ids) - prompt)
        if "assistant_masks" in fields:
            f["assistant_masks"] = [1 if i in (p, len(ids) - 1) else rng.randint(0, 1) for i in range(len(ids))]
        if "prompt_length" in fields:
            f["prompt_length"] = prompt
        if "labels" in fields:
            f["labels"] = [t if i in (p, len(ids) - 1) or rng.random() < 0.7 else -100 for i, t in enumerate(ids)]
        feats.append(f)
    return feats


@pytest.mark.parametrize("fields", [(), ("completion_mask",), ("assistant_masks",),
                                    ("completion_mask", "assistant_masks"), ("labels",)])
@pytest.mark.parametrize("truncate", [None, "keep_start", "keep_end"])
@pytest.mark.parametrize("multiple", [None, 4])
def test_sft_matches_trl(trl_reference, fields, truncate, multiple):
    tok = make_tokenizer("qwen")
    rng = random.Random(repr((fields, truncate, multiple)))
    max_length = 6 if truncate else None
    feats = sft_features(rng, tok, 6, fields=fields, max_prompt=max_length and max_length - 1)
    theirs = trl_reference(feats, tok, max_length, truncate or "keep_start", multiple)
    before = snapshot(feats)
    ours = DataCollatorForSFT(pad_token_id=tok.pad_token_id, max_length=max_length, truncation=bool(truncate),
                              truncation_side="left" if truncate == "keep_end" else "right",
                              pad_to_multiple_of=multiple, return_position_ids=True)(feats)
    assert_unchanged(feats, before)
    for key in ("input_ids", "attention_mask", "labels"):
        assert ours[key].dtype == theirs[key].dtype == torch.int64
        assert torch.equal(ours[key], theirs[key]), f"{key}:\n{ours[key]}\nvs TRL\n{theirs[key]}"
    # TRL's position ids (return_position_ids=True in TRL) agree on tokens; pads differ by definition
    trl_pos = pyseqpack_trl_positions(theirs["attention_mask"])
    mask = ours["attention_mask"].bool()
    assert torch.equal(ours["position_ids"][mask], trl_pos[mask])


def pyseqpack_trl_positions(attention_mask):
    """TRL's padded position ids: arange(len) per example (0 on pads, which are masked anyway)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask


def test_pad_equal_eos_keeps_eos_label():
    """pad == eos: transformers' LM collator masks every EOS label (by value); SFT keeps real EOS tokens
    trained and masks only padding (by position), like TRL."""
    tok = make_tokenizer("qwen")
    assert tok.pad_token_id == tok.eos_token_id
    feats = [{"input_ids": [5, 6, 7, tok.eos_token_id]}, {"input_ids": [8, tok.eos_token_id]}]
    hf = transformers.DataCollatorForLanguageModeling(tok, mlm=False)(feats)
    ours = DataCollatorForSFT(pad_token_id=tok.pad_token_id)(feats)
    assert torch.equal(ours["input_ids"], hf["input_ids"])
    assert hf["labels"][0, 3] == -100 and hf["labels"][1, 1] == -100  # the known bug
    assert ours["labels"].tolist() == [[5, 6, 7, 0], [8, 0, -100, -100]]


# ---- plain reference ------------------------------------------------------------------------------------------


def sft_reference(features, pad_token_id, padding_side="right", padding="longest", max_length=None,
                  truncation=False, truncation_side="right", pad_to_multiple_of=None, label_pad_token_id=-100,
                  completion_only_loss=True, assistant_only_loss=True, return_attention_mask=True,
                  return_position_ids=False, return_shift_labels=False):
    """DataCollatorForSFT's docstring, example by example, with Python lists."""
    first = features[0]
    rows = []
    for f in features:
        ids = [int(t) for t in f["input_ids"]]
        labels = [int(t) for t in f["labels"]] if "labels" in first else list(ids)
        trained = [True] * len(ids)
        if completion_only_loss and "prompt_length" in first:
            trained = [i >= f["prompt_length"] and t for i, t in enumerate(trained)]
        if completion_only_loss and "completion_mask" in first:
            trained = [m == 1 and t for m, t in zip(f["completion_mask"], trained)]
        if assistant_only_loss and "assistant_masks" in first:
            trained = [m == 1 and t for m, t in zip(f["assistant_masks"], trained)]
        labels = [lab if t else label_pad_token_id for lab, t in zip(labels, trained)]
        if truncation and len(ids) > max_length:
            keep = slice(0, max_length) if truncation_side == "right" else slice(len(ids) - max_length, None)
            ids, labels = ids[keep], labels[keep]
        rows.append((ids, labels))
    length = max_length if padding == "max_length" else max(len(ids) for ids, _ in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of

    def place(values, fill):
        padding_ = [fill] * (length - len(values))
        return values + padding_ if padding_side == "right" else padding_ + values

    out = {"input_ids": [place(ids, pad_token_id) for ids, _ in rows]}
    if return_attention_mask:
        out["attention_mask"] = [place([1] * len(ids), 0) for ids, _ in rows]
    if return_position_ids:
        out["position_ids"] = [
            place(list(range(len(ids))), max(len(ids) - 1, 0) if padding_side == "right" else 0) for ids, _ in rows
        ]
    out["labels"] = [place(labels, label_pad_token_id) for _, labels in rows]
    if return_shift_labels:
        out["shift_labels"] = [row[1:] + [label_pad_token_id] for row in out["labels"]]
    return {k: torch.tensor(v, dtype=torch.int64).reshape(len(rows), length) for k, v in out.items()}


def assert_same(ours, expected):
    assert list(ours) == list(expected)
    for key in expected:
        assert ours[key].dtype == expected[key].dtype, key
        assert torch.equal(ours[key], expected[key]), f"{key}:\n{ours[key]}\nvs\n{expected[key]}"


FIELD_SETS = [(), ("prompt_length",), ("completion_mask",), ("assistant_masks",), ("labels",),
              ("prompt_length", "assistant_masks"), ("completion_mask", "assistant_masks"),
              ("labels", "prompt_length", "completion_mask", "assistant_masks")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.sampled_from(FIELD_SETS), n=st.integers(1, 5), seed=st.integers(0, 2**16),
       padding_side=st.sampled_from(["right", "left"]),
       geometry=st.sampled_from([("longest", None, False), ("longest", 5, True), ("max_length", 12, False),
                                 ("max_length", 6, True)]),
       truncation_side=st.sampled_from(["right", "left"]), multiple=st.sampled_from([None, 3, 8]),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_sft_matches_reference(fields, n, seed, padding_side, geometry, truncation_side, multiple, flags):
    completion_only, assistant_only, want_mask, want_pos, want_shift = flags
    padding, max_length, truncation = geometry
    tok = make_tokenizer("qwen")
    feats = sft_features(random.Random(seed), tok, n, lo=0, hi=10, fields=fields)
    kwargs = dict(padding_side=padding_side, padding=padding, max_length=max_length, truncation=truncation,
                  truncation_side=truncation_side, pad_to_multiple_of=multiple,
                  completion_only_loss=completion_only, assistant_only_loss=assistant_only,
                  return_attention_mask=want_mask, return_position_ids=want_pos, return_shift_labels=want_shift)
    before = snapshot(feats)
    collator = DataCollatorForSFT(pad_token_id=PAD, **kwargs)
    if not truncation and max_length is not None and max(len(f["input_ids"]) for f in feats) > max_length:
        with pytest.raises(ValueError, match="input_ids"):
            collator(feats)
        return
    assert_same(collator(feats), sft_reference(feats, PAD, **kwargs))
    assert_unchanged(feats, before)


@pytest.mark.parametrize("form", ["np32", "np64", "torch"])
def test_sft_array_inputs_and_numpy_output(form):
    conv = {"np32": lambda r: np.asarray(r, dtype=np.int32), "np64": lambda r: np.asarray(r, dtype=np.int64),
            "torch": torch.tensor}[form]
    tok = make_tokenizer("qwen")
    feats = sft_features(random.Random(3), tok, 4, fields=("completion_mask", "assistant_masks", "labels"))
    arrays = [{k: conv(v) for k, v in f.items()} for f in feats]
    collator = DataCollatorForSFT(pad_token_id=PAD, padding_side="left", return_shift_labels=True)
    expected = collator(feats)
    assert_same(collator(arrays), expected)
    out = collator(arrays, return_tensors="np")
    assert list(out) == list(expected)
    for key in expected:
        assert out[key].dtype == np.int64 and np.array_equal(out[key], expected[key].numpy())


def test_sft_ignores_other_fields_and_flags():
    """Fields the collator does not use (a tokenizer's attention_mask, text) are ignored; a mask whose flag
    is off is ignored."""
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "text": "a b c", "completion_mask": [0, 1, 1]},
             {"input_ids": [8, 9], "attention_mask": [1, 1], "text": "d e", "completion_mask": [0, 1]}]
    out = DataCollatorForSFT(pad_token_id=PAD, completion_only_loss=False)(feats)
    assert out["labels"].tolist() == [[5, 6, 7], [8, 9, -100]]
    assert list(out) == ["input_ids", "attention_mask", "labels"]


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, needle", [
    ({"pad_token_id": None}, "pad_token_id"),
    ({"pad_token_id": 0, "padding_side": "middle"}, "padding_side"),
    ({"pad_token_id": 0, "padding": True}, "padding"),
    ({"pad_token_id": 0, "padding": "max_length"}, "max_length"),
    ({"pad_token_id": 0, "truncation": True}, "max_length"),
    ({"pad_token_id": 0, "max_length": 0}, "max_length"),
    ({"pad_token_id": 0, "truncation_side": "up"}, "truncation_side"),
    ({"pad_token_id": 0, "pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ({"pad_token_id": 0, "label_pad_token_id": 3}, "label_pad_token_id"),
    ({"pad_token_id": 0, "return_tensors": "tf"}, "return_tensors"),
])
def test_sft_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DataCollatorForSFT(**kwargs)


@pytest.mark.parametrize("feats, error, needle", [
    ([{"input_ids": [5, 6], "completion_mask": [0, 1]}, {"input_ids": [5]}], KeyError, "example 1"),
    ([{"input_ids": [5, 6], "completion_mask": [0, 2]}], ValueError, r"\[0\]\[1\]"),
    ([{"input_ids": [5, 6], "completion_mask": [0, 1], "assistant_masks": [1, 1]},
      {"input_ids": [5], "completion_mask": [1], "assistant_masks": [3]}], ValueError, "assistant_masks of example 1"),
    ([{"input_ids": [5, 6], "completion_mask": [0, 1, 1]}], ValueError, "input_ids"),
    ([{"input_ids": [5, 6], "prompt_length": -1}], ValueError, "prompt_length"),
    ([{"input_ids": [5, 6.5]}], TypeError, r"input_ids\[0\]\[1\]"),
    ([{"input_ids": [5, 6]}, {"input_ids": list(range(3, 30))}], ValueError, r"input_ids\[1\]"),
    ([[5, 6]], TypeError, "example 0"),
])
def test_sft_bad_features(feats, error, needle):
    collator = DataCollatorForSFT(pad_token_id=PAD, max_length=20)
    with pytest.raises(error, match=needle):
        collator(feats)


def test_public_names():
    assert pyseqpack.DataCollatorForSFT is DataCollatorForSFT
