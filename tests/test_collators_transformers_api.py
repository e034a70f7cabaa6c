"""The drop-ins ARE transformers' classes: subclasses with the same fields, whose every method works, whose
native path is reached through the methods transformers' __call__ dispatches to, and which hand transformers
the input they do not reproduce. Also: clear errors on empty batches and bad tokens, compared with
transformers' own. Every expected value comes from the real transformers class (tokenizers and models built
offline by hf_fixtures).
"""
import dataclasses
import inspect
import warnings

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import assert_same_batch, assert_same_outcome, assert_unchanged, make_tokenizer, snapshot

import pyseqpack
import pyseqpack.collators
from pyseqpack.collators import transformers as dropins

PAIRS = {
    "padding": (pyseqpack.DataCollatorWithPadding, transformers.DataCollatorWithPadding),
    "seq2seq": (pyseqpack.DataCollatorForSeq2Seq, transformers.DataCollatorForSeq2Seq),
    "token": (pyseqpack.DataCollatorForTokenClassification, transformers.DataCollatorForTokenClassification),
    "lm": (pyseqpack.DataCollatorForLanguageModeling, transformers.DataCollatorForLanguageModeling),
}


def both(kind, *args, **kwargs):
    ours, theirs = PAIRS[kind]
    return ours(*args, **kwargs), theirs(*args, **kwargs)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class PadForbidden:
    """Context manager: tokenizer.pad raises inside it, so a batch built there came from the native path."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __enter__(self):
        def forbidden(*args, **kwargs):
            raise AssertionError("tokenizer.pad was called: the native path was not taken")

        self.tokenizer.pad = forbidden
        return self

    def __exit__(self, *exc):
        del self.tokenizer.pad


# ---- the same classes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_subclass_with_transformers_constructor(kind):
    ours, theirs = PAIRS[kind]
    assert issubclass(ours, theirs)
    assert [(f.name, f.default, f.init) for f in dataclasses.fields(ours)] == \
        [(f.name, f.default, f.init) for f in dataclasses.fields(theirs)]
    assert inspect.signature(ours) == inspect.signature(theirs)
    tok = make_tokenizer("bert")
    collator = ours(tok)
    assert isinstance(collator, theirs)
    assert collator == ours(tok) and dataclasses.replace(collator, pad_to_multiple_of=8).pad_to_multiple_of == 8
    assert repr(collator).startswith(ours.__name__ + "(")


def test_public_names_everywhere():
    """pyseqpack.X, pyseqpack.collators.X and the audience submodules name the same classes."""
    for name in pyseqpack.collators.__all__:
        assert getattr(pyseqpack, name) is getattr(pyseqpack.collators, name)
    assert pyseqpack.DataCollatorForSFT is pyseqpack.collators.sft.DataCollatorForSFT
    for name in dropins.__all__:
        assert getattr(pyseqpack, name) is getattr(dropins, name)


def test_sft_does_not_import_transformers():
    """DataCollatorForSFT lives apart from the drop-ins: using it imports no transformers."""
    import subprocess
    import sys

    code = ("import sys, pyseqpack; from pyseqpack.collators import DataCollatorForSFT as C; "
            "C(pad_token_id=0)([{'input_ids': [5, 6]}]); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- every method of the transformers class ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["token", "lm"])
@pytest.mark.parametrize("method", ["torch_call", "numpy_call", "call_pt", "call_np"])
def test_dispatch_methods_match_transformers(kind, method):
    """torch_call / numpy_call called directly, and __call__ with return_tensors, as transformers'."""
    tok = make_tokenizer("bert", padding_side="left")
    feats = [{"input_ids": [5, 6, 7], "labels": [1, 2, 3]}, {"input_ids": [8], "labels": [4]}]
    if kind == "lm":
        feats = [{"input_ids": f["input_ids"]} for f in feats]
    extra = {"mlm": False} if kind == "lm" else {}
    ours, theirs = both(kind, tok, **extra)
    call = {
        "torch_call": lambda c: c.torch_call(feats),
        "numpy_call": lambda c: c.numpy_call(feats),
        "call_pt": lambda c: c(feats, return_tensors="pt"),
        "call_np": lambda c: c(feats, return_tensors="np"),
    }[method]
    assert_same_batch(call(ours), call(theirs))
    with PadForbidden(tok):
        call(ours)


def test_lm_static_and_rng_methods():
    """The masking helpers are transformers' own and give its results."""
    ours, theirs = both("lm", make_tokenizer("bert"), mlm=True, seed=3)
    offsets = np.array([[(0, 0), (0, 3), (3, 4), (5, 6), (6, 7), (8, 9)],
                        [(0, 0), (0, 2), (3, 4), (4, 6), (0, 0), (0, 0)]])
    special = np.array([[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 1]])
    for a, b in zip(ours._calc_word_ids_and_prob_mask(offsets, special),
                    theirs._calc_word_ids_and_prob_mask(offsets, special)):
        np.testing.assert_array_equal(a, b)
    word_ids, _ = theirs._calc_word_ids_and_prob_mask(offsets, special)
    mask = np.array([[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(type(ours)._whole_word_mask(word_ids, mask), theirs._whole_word_mask(word_ids, mask))
    assert torch.equal(torch.rand(4, generator=ours.get_generator(3)), torch.rand(4, generator=theirs.get_generator(3)))
    np.testing.assert_array_equal(ours.get_generator(3, "np").random(4), theirs.get_generator(3, "np").random(4))
    inputs = torch.tensor([[2, 5, 6, 7, 8, 3]])
    ours.create_rng("pt")
    theirs.create_rng("pt")
    for a, b in zip(ours.torch_mask_tokens(inputs.clone()), theirs.torch_mask_tokens(inputs.clone())):
        assert torch.equal(a, b)
    ours.create_rng("np")
    theirs.create_rng("np")
    for a, b in zip(ours.numpy_mask_tokens(inputs.numpy().copy()), theirs.numpy_mask_tokens(inputs.numpy().copy())):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_lm_mlm_pads_natively_and_masks_as_transformers(return_tensors, whole_word_mask):
    """mlm=True: the batch is padded natively, then transformers' own masking draws the same numbers."""
    tok = make_tokenizer("bert", padding_side="right")
    rng = np.random.default_rng(0)
    feats = []
    for n in (9, 4, 7):
        ids = [2] + rng.integers(5, 90, n).tolist() + [3]
        # offsets: words of 1-3 tokens (tokens touching the previous one continue its word)
        offsets, pos = [(0, 0)], 0
        for k in range(n):
            gap = int(rng.integers(0, 2)) if k else 1
            pos += gap
            offsets.append((pos, pos + 1))
            pos += 1
        offsets.append((0, 0))
        feats.append({"input_ids": ids, "special_tokens_mask": [1] + [0] * n + [1], "offset_mapping": offsets})
    if not whole_word_mask:
        feats = [{k: v for k, v in f.items() if k != "offset_mapping"} for f in feats]
    else:
        # offset_mapping is not padded (by transformers either): the rows must have one length
        n = max(len(f["input_ids"]) for f in feats)
        feats = [f for f in feats if len(f["input_ids"]) == n] * 2
    ours, theirs = quiet(both, "lm", tok, mlm=True, seed=7, whole_word_mask=whole_word_mask,
                         return_tensors=return_tensors, pad_to_multiple_of=None if whole_word_mask else 4)
    before = snapshot(feats)
    for _ in range(2):  # the second batch continues the same generator
        with PadForbidden(tok):
            got = quiet(ours, feats)
        assert_same_batch(got, quiet(theirs, feats))
    assert_unchanged(feats, before)
    rows = [f["input_ids"] for f in feats]
    # bare rows (whole-word masking needs offsets, which bare rows lack: then both raise the same error)
    quiet(assert_same_outcome, ours, theirs, rows)


def test_user_subclass_super_torch_call_gets_native_path():
    """A user subclass that post-processes with super().torch_call(...) still pads natively."""

    class Tagged(pyseqpack.DataCollatorForTokenClassification):
        def torch_call(self, features):
            batch = super().torch_call(features)
            batch["tag"] = torch.ones(len(features))
            return batch

    class TaggedLM(pyseqpack.DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["tag"] = torch.ones(len(examples))
            return batch

    tok = make_tokenizer("bert")
    feats = [{"input_ids": [5, 6], "labels": [1, 2]}, {"input_ids": [7], "labels": [3]}]
    with PadForbidden(tok):
        out = Tagged(tok)(feats)
        lm = TaggedLM(tok, mlm=False)([{"input_ids": f["input_ids"]} for f in feats])
    theirs = transformers.DataCollatorForTokenClassification(tok)(feats)
    assert out["tag"].tolist() == [1, 1] and torch.equal(out["labels"], theirs["labels"])
    assert lm["tag"].tolist() == [1, 1]


# ---- input handed to transformers ----------------------------------------------------------------------------


def test_delegates_feature_extractor():
    """A feature extractor pads its own fields (floats): DataCollatorWithPadding hands it to transformers."""
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                               return_attention_mask=True)
    rng = np.random.default_rng(1)
    feats = [{"input_values": rng.random(n).astype(np.float32)} for n in (5, 3, 4)]
    assert_same_outcome(pyseqpack.DataCollatorWithPadding(fe), transformers.DataCollatorWithPadding(fe), feats)


@pytest.mark.parametrize("kind", ["padding", "seq2seq", "token"])
def test_delegates_2d_attention_masks(kind):
    """Per-example 2-D attention masks are stacked as they are by tokenizer.pad: transformers does it."""
    tok = make_tokenizer("t5")
    feats = [{"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tril(torch.ones(3, 3, dtype=torch.long))}
             for _ in range(2)]
    if kind != "padding":
        feats = [dict(f, labels=[1, 2, 3]) for f in feats]
    ours, theirs = both(kind, tok)
    assert_same_outcome(ours, theirs, feats)


def test_delegates_one_unbatched_example():
    tok = make_tokenizer("t5")
    ours, theirs = both("padding", tok)
    assert_same_outcome(ours, theirs, {"input_ids": [5, 6, 7]})


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_empty_batch(kind, return_tensors):
    """No example: ValueError naming the argument (transformers raises IndexError or AttributeError)."""
    extra = {"mlm": False} if kind == "lm" else {}
    ours, theirs = both(kind, make_tokenizer("t5"), return_tensors=return_tensors, **extra)
    with pytest.raises((IndexError, AttributeError)):
        theirs([])
    name = "examples" if kind == "lm" else "features"
    with pytest.raises(ValueError, match=f"{name} is empty: expected at least one example"):
        ours([])


def test_empty_batch_sft():
    with pytest.raises(ValueError, match="features is empty"):
        pyseqpack.DataCollatorForSFT(pad_token_id=0)([])


BAD_TOKENS = {
    # transformers raises ValueError for all of these under "pt" (BatchEncoding's tensor conversion)
    "str first": [{"input_ids": ["a", 6]}, {"input_ids": [5]}],
    "str later": [{"input_ids": [5, "a"]}, {"input_ids": [5]}],
    "str later row": [{"input_ids": [5, 6]}, {"input_ids": [5, "a"]}],
    "None first": [{"input_ids": [None, 6]}, {"input_ids": [5]}],
    "None later": [{"input_ids": [5, None]}, {"input_ids": [5]}],
    "str row": [{"input_ids": [5, 6]}, {"input_ids": "ab"}],
    "str token type": [{"input_ids": [5, 6], "token_type_ids": [0, "a"]}, {"input_ids": [5], "token_type_ids": [0]}],
    "None in mask": [{"input_ids": [5, 6], "attention_mask": [1, None]}, {"input_ids": [5], "attention_mask": [1]}],
    # a None row: TypeError in both
    "None row": [{"input_ids": [5, 6]}, {"input_ids": None}],
}
LABEL_TOKENS = {
    "label str later": [{"input_ids": [5, 6], "labels": [1, "a"]}, {"input_ids": [5], "labels": [2]}],
    "label str first": [{"input_ids": [5, 6], "labels": ["a", 1]}, {"input_ids": [5], "labels": [2]}],
    "label None": [{"input_ids": [5, 6], "labels": [1, None]}, {"input_ids": [5], "labels": [2]}],
    "inputs and labels": [{"input_ids": [5, "x"], "labels": [1, "a"]}, {"input_ids": [5], "labels": [2]}],
}
LM_ROWS = {
    "row str later": [[5, "a"], [5]],
    "row str first": [["a", 5], [5]],
    "row None": [[5, None], [5]],
}


def bad_token_cases():
    for kind in sorted(PAIRS):
        cases = dict(BAD_TOKENS)
        if kind in ("seq2seq", "token"):
            cases.update(LABEL_TOKENS)
        if kind == "lm":
            cases.update(LM_ROWS)
        for name in cases:
            for return_tensors in ("pt", "np"):
                yield kind, name, cases[name], return_tensors


@pytest.mark.parametrize("kind, name, feats, return_tensors",
                         [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[3]}") for c in bad_token_cases()])
def test_bad_tokens_raise_as_transformers(kind, name, feats, return_tensors):
    """A str or None where a token id belongs: the exception type transformers raises, with a message naming
    the field and the example. Under "np", transformers returns object arrays for some of these; pyseqpack
    raises ValueError there too (token ids must be integers)."""
    extra = {"mlm": False} if kind == "lm" else {}
    ours, theirs = both(kind, make_tokenizer("t5"), return_tensors=return_tensors, **extra)
    try:
        quiet(theirs, feats)
        expected = ValueError
    except Exception as e:  # noqa: BLE001 - compared by type
        expected = type(e)
    with pytest.raises(expected) as err:
        quiet(ours, feats)
    assert any(s in str(err.value) for s in ("input_ids", "token_type_ids", "attention_mask", "labels")), err.value
    assert "example" in str(err.value) or "][" in str(err.value) or "[1]" in str(err.value), err.value


@pytest.mark.parametrize("feats, needle", [
    ([{"text": "a b"}, {"input_ids": [5]}], r"example 0 has no 'input_ids' field: DataCollatorForSFT needs the "
                                            r"token ids of every example; it has \['text'\]"),
    ([{"input_ids": [5]}, {"ids": [5]}], r"example 1 has no 'input_ids' field: DataCollatorForSFT needs"),
    ([{"input_ids": [5], "completion_mask": [1]}, {"input_ids": [5]}],
     r"example 1 has no 'completion_mask' field: the first example has it"),
])
def test_sft_missing_field_names_example_and_field(feats, needle):
    with pytest.raises(KeyError, match=needle):
        pyseqpack.DataCollatorForSFT(pad_token_id=0)(feats)


@pytest.mark.parametrize("whole_word_mask", [False, True])
def test_lm_seeded_masks_in_dataloader_workers(whole_word_mask):
    """With a seed, each DataLoader worker seeds its own generator (seed + worker id) the transformers way:
    the same batches as transformers' collator, and different ones for another seed."""
    tok = make_tokenizer("bert")
    rng = np.random.default_rng(2)
    feats = []
    for _ in range(8):
        ids = [2] + rng.integers(5, 90, 12).tolist() + [3]
        f = {"input_ids": ids}
        if whole_word_mask:
            f["offset_mapping"] = [(0, 0)] + [(k + k // 3, k + k // 3 + 1) for k in range(12)] + [(0, 0)]
        feats.append(f)

    def batches(cls, seed):
        collator = quiet(cls, tok, seed=seed, whole_word_mask=whole_word_mask)
        loader = torch.utils.data.DataLoader(feats, batch_size=2, num_workers=2, collate_fn=collator)
        return list(loader)

    ours, theirs = batches(pyseqpack.DataCollatorForLanguageModeling, 42), \
        batches(transformers.DataCollatorForLanguageModeling, 42)
    assert len(ours) == len(theirs) == 4
    for a, b in zip(ours, theirs):
        assert_same_batch(a, b)
    other = batches(pyseqpack.DataCollatorForLanguageModeling, 43)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ours, other))
