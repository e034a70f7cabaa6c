"""pyseqpack's drop-in collators against the real transformers classes they replace.

Every test builds the same features for both, runs both, and compares the whole output (container type,
key order, dtypes, shapes, values) or, for bad input, the exception type. Tokenizers and models are built
offline by hf_fixtures (random tiny models, WordLevel tokenizers with each family's special-token layout).
"""
import copy
import random
import warnings

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import (
    SEQ2SEQ_MODELS,
    assert_same_batch,
    assert_same_outcome,
    assert_unchanged,
    make_model,
    make_tokenizer,
    snapshot,
    word_ids,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pyseqpack
from pyseqpack.collators.transformers import DECODER_RULES
from pyseqpack.collators.transformers import decoder_rule as _decoder_rule

OURS = {
    "seq2seq": pyseqpack.DataCollatorForSeq2Seq,
    "padding": pyseqpack.DataCollatorWithPadding,
    "lm": pyseqpack.DataCollatorForLanguageModeling,
    "token": pyseqpack.DataCollatorForTokenClassification,
}
THEIRS = {
    "seq2seq": transformers.DataCollatorForSeq2Seq,
    "padding": transformers.DataCollatorWithPadding,
    "lm": transformers.DataCollatorForLanguageModeling,
    "token": transformers.DataCollatorForTokenClassification,
}


def both(kind, *args, **kwargs):
    """(our collator, transformers' collator) built with the same arguments."""
    return OURS[kind](*args, **kwargs), THEIRS[kind](*args, **kwargs)


def compare(kind, features, *args, call_kwargs=None, **kwargs):
    """Runs both collators on the same features; same batch or same exception type. Checks no mutation."""
    ours, theirs = both(kind, *args, **kwargs)
    before = snapshot(features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation chatter; warnings have their own test
        result = assert_same_outcome(lambda f: ours(f, **(call_kwargs or {})),
                                     lambda f: theirs(f, **(call_kwargs or {})), features)
    assert_unchanged(features, before)
    return result


def rand_rows(rng, tokenizer, n, lo, hi, specials=()):
    """n rows of lo..hi token ids: ordinary words, sprinkled with the given special ids."""
    words = list(word_ids(tokenizer))
    pool = words + list(specials) * max(1, len(words) // 10)
    return [[rng.choice(pool) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def seq2seq_features(rng, tokenizer, n=5, with_mask=True, label_key="labels", lo=1, hi=9):
    """n examples: input_ids (+ attention_mask) and labels of lo..hi tokens, each label row ending in eos."""
    inputs = rand_rows(rng, tokenizer, n, lo, hi)
    # labels carry -100 too (a user's own ignore positions), and end with eos like real targets
    labels = rand_rows(rng, tokenizer, n, lo, hi, specials=[-100])
    eos = tokenizer.eos_token_id
    feats = []
    for x, y in zip(inputs, labels):
        f = {"input_ids": x}
        if with_mask:
            f["attention_mask"] = [1] * len(x)
        f[label_key] = y + ([eos] if eos is not None else [])
        feats.append(f)
    return feats


# ---- DataCollatorForSeq2Seq --------------------------------------------------------------------------------

# rule that pyseqpack must recognize for each model (None: the model has no prepare_decoder_input_ids_from_labels)
EXPECTED_RULE = {
    "t5": "start", "mt5": "start", "umt5": "start", "longt5": "start", "switch_transformers": "start",
    "bart": "start", "pegasus": "start", "marian": "start", "bigbird_pegasus": "start", "mvp": "start",
    "pegasus_x": "start", "led": "start", "mbart": "wrap", "plbart": "wrap", "fsmt": "wrap_in_place",
    "whisper": None, "m2m100": None, "blenderbot": None,
}


@pytest.mark.parametrize("name", sorted(SEQ2SEQ_MODELS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_seq2seq_with_model(name, side):
    """decoder_input_ids for every model family, computed by us (no model call) and equal to the model's."""
    model = make_model(name)
    assert (_decoder_rule(model) if hasattr(model, "prepare_decoder_input_ids_from_labels") else None) == \
        EXPECTED_RULE[name]
    tok = make_tokenizer(SEQ2SEQ_MODELS[name], padding_side=side)
    rng = random.Random(f"{name}-{side}")
    feats = seq2seq_features(rng, tok)
    out = compare("seq2seq", feats, tok, model=model, pad_to_multiple_of=4 if side == "left" else None)
    assert ("decoder_input_ids" in out) == (EXPECTED_RULE[name] is not None)


def calls_of(function, fn, *args, **kwargs):
    """(fn(*args, **kwargs), how many times `function`'s code ran meanwhile), counted by a profile hook, so
    nothing about the model is changed."""
    import sys

    code, count = function.__code__, [0]

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            count[0] += 1

    sys.setprofile(profile)
    try:
        result = fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return result, count[0]


@pytest.mark.parametrize("name", sorted(n for n, rule in EXPECTED_RULE.items() if rule is not None))
def test_seq2seq_does_not_call_known_models(name):
    """The DECODER_RULES models are shifted here: the model's own method never runs (and its result is
    matched by test_seq2seq_with_model)."""
    model = make_model(name)
    tok = make_tokenizer(SEQ2SEQ_MODELS[name])
    feats = seq2seq_features(random.Random(0), tok)
    method = type(model).prepare_decoder_input_ids_from_labels
    out, calls = calls_of(method, pyseqpack.DataCollatorForSeq2Seq(tok, model=model), feats)
    assert "decoder_input_ids" in out and calls == 0
    _, calls = calls_of(method, transformers.DataCollatorForSeq2Seq(tok, model=model), feats)
    assert calls == 1  # the counter sees the method when it does run


def test_decoder_rules_table():
    """DECODER_RULES lists exactly the model types with a rule, each naming a transformers class of that
    type whose method the rule stands for."""
    assert set(DECODER_RULES) == {n for n, rule in EXPECTED_RULE.items() if rule is not None}
    for model_type, (rule, class_name, methods) in DECODER_RULES.items():
        assert rule == EXPECTED_RULE[model_type]
        cls = getattr(transformers, class_name)
        assert cls.config_class.model_type == model_type
        assert all(callable(getattr(cls, m)) for m in methods)


def test_seq2seq_unknown_model_type_is_called():
    """A model type not in DECODER_RULES: the model's own method is called, like transformers."""
    config = copy.deepcopy(make_model("bart").config)
    model = transformers.BartForConditionalGeneration(config)
    model.config.model_type = "my_bart"  # an instance attribute: the class's model_type is untouched
    assert _decoder_rule(model) == "call"
    tok = make_tokenizer("bart")
    feats = seq2seq_features(random.Random(3), tok)
    out, calls = calls_of(type(model).prepare_decoder_input_ids_from_labels,
                          pyseqpack.DataCollatorForSeq2Seq(tok, model=model), feats)
    assert calls == 1
    assert_same_batch(out, transformers.DataCollatorForSeq2Seq(tok, model=model)(feats))


def test_seq2seq_overridden_t5_shift_is_called():
    """T5's method shifts in self._shift_right: a subclass overriding _shift_right is called."""

    class Shifted(transformers.T5ForConditionalGeneration):
        def _shift_right(self, input_ids):
            return input_ids.flip(-1).clamp(min=0)

    model = Shifted(make_model("t5").config)
    assert _decoder_rule(model) == "call"
    tok = make_tokenizer("t5")
    compare("seq2seq", seq2seq_features(random.Random(4), tok), tok, model=model)


def test_seq2seq_unknown_model_is_called():
    """A model whose method we do not know (here: a subclass overriding it) is called, like transformers."""

    class Custom(type(make_model("bart"))):
        def prepare_decoder_input_ids_from_labels(self, labels):
            return labels.flip(-1) * 2

    model = Custom(make_model("bart").config)
    assert _decoder_rule(model) == "call"
    tok = make_tokenizer("bart")
    compare("seq2seq", seq2seq_features(random.Random(1), tok), tok, model=model)


@pytest.mark.parametrize("name", ["mbart", "fsmt"])
def test_seq2seq_wrap_all_ignored_row_raises(name):
    """mBART/FSMT take the start token from the last non-pad label: an all -100 row raises (RuntimeError)."""
    tok = make_tokenizer(SEQ2SEQ_MODELS[name])
    feats = [{"input_ids": [5, 6], "labels": [7, 8, 2]}, {"input_ids": [5], "labels": [-100, -100]}]
    err = compare("seq2seq", feats, tok, model=make_model(name))
    assert "example 1" in str(err)


def test_seq2seq_fsmt_rewrites_labels():
    """FSMT's shift rewrites -100 -> pad in the labels tensor itself (transformers' known bug, reproduced)."""
    tok = make_tokenizer("bart")
    feats = [{"input_ids": [5, 6, 7], "labels": [9, -100, 2]}, {"input_ids": [5], "labels": [9, 2]}]
    out = compare("seq2seq", feats, tok, model=make_model("fsmt"))
    assert (out["labels"] != -100).all()  # even the label padding became pad


def test_seq2seq_fused_shift_falls_back_when_model_pad_differs():
    """The fused T5/BART shift uses the tokenizer's pad id; a model whose config pad differs is shifted
    with its own pad id (the unfused path), like transformers."""
    tok = make_tokenizer("t5")
    config = copy.deepcopy(make_model("t5").config)
    config.pad_token_id, config.decoder_start_token_id = 7, 9
    model = transformers.T5ForConditionalGeneration(config)
    compare("seq2seq", seq2seq_features(random.Random(2), tok), tok, model=model)


@pytest.mark.parametrize("padding", [True, "longest", "max_length", False, "do_not_pad"])
@pytest.mark.parametrize("max_length", [None, 10])
@pytest.mark.parametrize("multiple", [None, 4])
def test_seq2seq_padding_options(padding, max_length, multiple):
    """Every padding strategy x max_length x pad_to_multiple_of, on ragged and on equal-length batches, with
    a tokenizer without a model limit and one with model_max_length=12 (padding='max_length' pads to it)."""
    rng = random.Random(7)
    for model_max_length in (None, 12):
        kw = {} if model_max_length is None else {"model_max_length": model_max_length}
        tok = make_tokenizer("t5", **kw)
        ragged = seq2seq_features(rng, tok, lo=1, hi=8)
        equal = [{"input_ids": r, "labels": r[::-1]} for r in rand_rows(rng, tok, 3, 5, 5)]
        for feats in (ragged, equal):
            compare("seq2seq", feats, tok, model=make_model("t5"), padding=padding, max_length=max_length,
                    pad_to_multiple_of=multiple)


def test_seq2seq_max_length_and_longer_rows():
    """padding='max_length' never truncates: longer labels / inputs raise ValueError, unless all the longer
    rows have one length (then transformers returns them unpadded, and so do we)."""
    tok = make_tokenizer("t5")
    cases = [
        [{"input_ids": [5, 6], "labels": [5, 6, 7, 8, 9]}, {"input_ids": [5], "labels": [5]}],  # ragged labels
        [{"input_ids": [5, 6], "labels": [5, 6, 7, 8, 9]}, {"input_ids": [5], "labels": [5, 6, 7, 8, 9]}],
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5]}, {"input_ids": [5, 6], "labels": [5]}],  # ragged inputs
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [5]}, {"input_ids": [5, 6, 7, 8, 9], "labels": [5]}],
    ]
    for feats in cases:
        err = compare("seq2seq", feats, tok, padding="max_length", max_length=3)
        if isinstance(err, Exception):
            assert isinstance(err, ValueError) and "example" in str(err)


def test_seq2seq_label_keys_and_missing_labels():
    tok = make_tokenizer("bart")
    rng = random.Random(3)
    model = make_model("bart")
    compare("seq2seq", seq2seq_features(rng, tok, label_key="label"), tok, model=model)  # "label" -> "labels"
    no_labels = [{k: v for k, v in f.items() if k != "labels"} for f in seq2seq_features(rng, tok)]
    out = compare("seq2seq", no_labels, tok, model=model)
    assert "labels" in out and out["labels"] is None
    none_labels = [dict(f, labels=None) for f in no_labels]
    assert compare("seq2seq", none_labels, tok, model=model)["labels"] is None
    # a mix of None and lists raises TypeError, whichever comes first, and with every padding mode
    mixed = [{"input_ids": [5, 6], "labels": [7, 8, 2]} for _ in range(3)]
    for i in (0, 2):
        feats = [dict(f) for f in mixed]
        feats[i]["labels"] = None
        for padding, max_length in ((True, None), ("max_length", 12), (False, None)):
            err = compare("seq2seq", feats, tok, padding=padding, max_length=max_length)
            assert isinstance(err, (TypeError, ValueError)) and f"example {i}" in str(err)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, "torch32", "torch64"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_seq2seq_array_inputs(dtype, return_tensors):
    """numpy / tensor rows (int32 comes out int64), with both return types."""
    tok = make_tokenizer("t5", padding_side="left")
    feats = seq2seq_features(random.Random(4), tok)

    def conv(row):
        if dtype == "torch32":
            return torch.tensor(row, dtype=torch.int32)
        if dtype == "torch64":
            return torch.tensor(row)
        return np.asarray(row, dtype=dtype)

    feats = [{k: conv(v) for k, v in f.items()} for f in feats]
    compare("seq2seq", feats, tok, return_tensors=return_tensors, pad_to_multiple_of=8)
    compare("seq2seq", feats, tok, call_kwargs={"return_tensors": return_tensors})
    # FSMT rewrites -100 in the labels tensor: ours, never the caller's arrays (compare checks no mutation)
    compare("seq2seq", feats, tok, model=make_model("fsmt"), return_tensors=return_tensors)


def test_seq2seq_numpy_with_model():
    """return_tensors='np' with a model: transformers' shift functions need torch tensors and raise
    AttributeError; so do we (known models), and a model without the method just gets no decoder ids."""
    tok = make_tokenizer("bart")
    feats = seq2seq_features(random.Random(5), tok)
    for name in ("bart", "mbart", "fsmt", "m2m100"):
        compare("seq2seq", feats, tok, model=make_model(name), return_tensors="np")


def test_seq2seq_single_example_and_empty_rows():
    tok = make_tokenizer("t5")
    model = make_model("t5")
    compare("seq2seq", [{"input_ids": [5, 6, 7], "labels": [8, 1]}], tok, model=model)
    compare("seq2seq", [{"input_ids": [], "labels": [8, 1]}, {"input_ids": [5], "labels": []}], tok, model=model)
    compare("seq2seq", [{"input_ids": [5], "labels": []}, {"input_ids": [5], "labels": []}], tok, model=model)


# ---- extras, dtypes and errors shared by the tokenizer.pad-based collators ----------------------------------


@pytest.mark.parametrize("kind", ["seq2seq", "padding", "token"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_extra_fields(kind, return_tensors):
    """Unpadded extras (ints, floats, fixed-length lists, strings, ragged) are batched exactly as transformers
    batches them; token_type_ids / special_tokens_mask are padded with pad_token_type_id / 1."""
    tok = make_tokenizer("bert", padding_side="left")
    rng = random.Random(6)
    rows = rand_rows(rng, tok, 4, 1, 7)
    base = [{"input_ids": r, "token_type_ids": [rng.randint(0, 1) for _ in r],
             "special_tokens_mask": [rng.randint(0, 1) for _ in r]} for r in rows]
    if kind == "token":
        base = [dict(f, labels=[rng.randint(0, 4) for _ in f["input_ids"]]) for f in base]
    extras = {
        "idx": lambda i: i,
        "score": lambda i: i + 0.5,
        "pair": lambda i: [i, i * 2],
        "name": lambda i: f"ex{i}",
        "ragged": lambda i: list(range(i + 1)),
        "np_float": lambda i: np.float64(i) / 3,
    }
    for key, make in extras.items():
        feats = [dict(f, **{key: make(i)}) for i, f in enumerate(base)]
        compare(kind, feats, tok, return_tensors=return_tensors)
        # the same extra when the token rows are arrays or tensors (transformers then converts every field to
        # lists first), beside list rows of token_type_ids / special_tokens_mask
        arrays = [dict(f, input_ids=np.asarray(f["input_ids"], dtype=np.int32)) for f in feats]
        compare(kind, arrays, tok, return_tensors=return_tensors)
        tensors = [dict(f, input_ids=torch.tensor(f["input_ids"])) for f in feats]
        compare(kind, tensors, tok, return_tensors=return_tensors)


@pytest.mark.parametrize("kind", ["seq2seq", "padding", "token", "lm"])
def test_key_order_and_created_attention_mask(kind):
    """Keys come in the first example's order, with a created attention_mask after them."""
    tok = make_tokenizer("bert")
    rng = random.Random(8)
    rows = rand_rows(rng, tok, 3, 1, 6)
    feats = [{"token_type_ids": [0] * len(r), "input_ids": r, "labels": list(r)} for r in rows]
    if kind == "lm":
        feats = [{k: v for k, v in f.items() if k != "labels"} for f in feats]
    compare(kind, feats, tok, **({"mlm": False} if kind == "lm" else {}))
    with_mask = [{"attention_mask": [1] * len(f["input_ids"]), **f} for f in feats]
    compare(kind, with_mask, tok, **({"mlm": False} if kind == "lm" else {}))
    # a tokenizer whose model inputs do not include attention_mask: none is created, a given one is not padded
    tok2 = make_tokenizer("t5", model_input_names=["input_ids"])
    compare(kind, [{k: v for k, v in f.items() if k != "token_type_ids"} for f in feats], tok2,
            **({"mlm": False} if kind == "lm" else {}))


@pytest.mark.parametrize("kind", ["seq2seq", "padding", "token", "lm"])
def test_errors_match(kind):
    """Bad input raises the same exception type as transformers, with a message naming example and field."""
    extra = {"mlm": False} if kind == "lm" else {}
    tok = make_tokenizer("t5")
    no_pad = make_tokenizer("llama")
    ok = [{"input_ids": [5, 6, 7]}, {"input_ids": [5]}]
    cases = [
        (no_pad, ok, "pad token"),  # padding needed, no pad token
        (no_pad, [{"input_ids": [5, 6]}, {"input_ids": [7, 8]}], "pad token"),  # even when nothing is padded
        (tok, [{"input_ids": [5.0, 6]}, {"input_ids": [5]}], "example 0"),  # float token id
        (tok, [{"input_ids": ["a", 6]}, {"input_ids": [5]}], "example 0"),  # string token
        (tok, [{"input_ids": [np.int64(5), 6]}, {"input_ids": [5]}], "example 0"),  # numpy scalar in a list
        (tok, [{"input_ids": [5, 6], "attention_mask": [1, 1]}, {"input_ids": [5]}], "example 1"),  # missing key
        (tok, [{"ids": [5, 6]}], "input_ids"),  # no main input
        (tok, [{"input_ids": [5, 6], "x": [1, 2]}, {"input_ids": [5], "x": [1]}], "'x'"),  # ragged extra
        (tok, [{"input_ids": [5, 6], "x": "a"}, {"input_ids": [5], "x": "b"}], "'x'"),  # string extra
    ]
    for tokenizer, feats, needle in cases:
        err = compare(kind, feats, tokenizer, **extra)
        assert isinstance(err, Exception), feats
        assert needle in str(err), f"{needle!r} not in {err}"
    # an invalid padding strategy
    if kind != "lm":
        compare(kind, ok, tok, padding="middle")


def test_float_token_later_in_a_row_raises():
    """transformers only type-checks the first token and returns a float32 input_ids tensor for a float
    later on; we reject it, naming the example and the field."""
    tok = make_tokenizer("t5")
    feats = [{"input_ids": [5, 6], "labels": [1]}, {"input_ids": [5, 6.5], "labels": [1]}]
    with pytest.raises((TypeError, ValueError), match=r"input_ids.*1|1.*input_ids"):
        pyseqpack.DataCollatorForSeq2Seq(tok)(feats)


@pytest.mark.parametrize("kind", ["seq2seq", "padding", "token", "lm"])
@pytest.mark.parametrize("return_tensors", ["tf", "mlx", None])
def test_unsupported_return_tensors(kind, return_tensors):
    """Only "pt" and "np" exist here: anything else is a ValueError naming return_tensors."""
    tok = make_tokenizer("t5")
    extra = {"mlm": False} if kind == "lm" else {}
    collator = OURS[kind](tok, return_tensors=return_tensors, **extra)
    with pytest.raises(ValueError, match="return_tensors"):
        collator([{"input_ids": [5, 6]}, {"input_ids": [5]}])


@pytest.mark.parametrize("kind", ["seq2seq", "padding", "token"])
def test_max_length_with_padding_true_warns(kind):
    tok = make_tokenizer("t5")
    feats = [{"input_ids": [5, 6, 7]}, {"input_ids": [5]}]
    for collator in both(kind, tok, max_length=5):
        with pytest.warns(UserWarning, match="max_length"):
            collator(feats)
    compare(kind, feats, tok, max_length=5)


# ---- DataCollatorWithPadding ---------------------------------------------------------------------------------


def test_with_padding_label_renames():
    tok = make_tokenizer("bart", padding_side="left")
    rng = random.Random(9)
    rows = rand_rows(rng, tok, 4, 1, 7)
    for key, make in (("label", lambda i: i % 2), ("label_ids", lambda i: [i, 1 - i]), ("labels", lambda i: i)):
        feats = [{key: make(i), "input_ids": r} for i, r in enumerate(rows)]
        compare("padding", feats, tok, pad_to_multiple_of=3)
    both_keys = [{"label": 1, "input_ids": r, "label_ids": [0, 1]} for r in rows]
    compare("padding", both_keys, tok)


def test_with_padding_dict_of_columns():
    """tokenizer.pad (so DataCollatorWithPadding) also takes one dict of batched columns."""
    tok = make_tokenizer("t5")
    rows = rand_rows(random.Random(10), tok, 3, 1, 6)
    compare("padding", {"input_ids": rows, "label": [0, 1, 0]}, tok)


# ---- DataCollatorForTokenClassification -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_token_classification(side, return_tensors):
    tok = make_tokenizer("bert", padding_side=side)
    rng = random.Random(11)
    rows = rand_rows(rng, tok, 5, 1, 8)
    for key in ("label", "labels"):
        feats = [{"input_ids": r, key: [rng.randint(0, 8) for _ in r]} for r in rows]
        compare("token", feats, tok, return_tensors=return_tensors, pad_to_multiple_of=4)
        compare("token", feats, tok, return_tensors=return_tensors, padding="max_length", max_length=9)
        # labels longer than the input length: ValueError, unless they all have one length
        long = [dict(f, **{key: f[key] + [1] * 12}) for f in feats]
        compare("token", long, tok, return_tensors=return_tensors)
        same = [dict(f, **{key: [1] * 12}) for f in feats]
        compare("token", same, tok, return_tensors=return_tensors)
        nones = [dict(f, **{key: None}) if i == 1 else f for i, f in enumerate(feats)]
        compare("token", nones, tok, return_tensors=return_tensors)
    compare("token", [{"input_ids": r} for r in rows], tok, return_tensors=return_tensors)  # no labels


# ---- DataCollatorForLanguageModeling -------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen", "bart"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_lm_dict_examples(family, side):
    """mlm=False on dicts: labels masked by VALUE (qwen: pad == eos, so every EOS label is -100, the known bug
    reproduced); special_tokens_mask dropped, user labels overwritten in place."""
    tok = make_tokenizer(family, padding_side=side)
    rng = random.Random(12)
    rows = rand_rows(rng, tok, 5, 1, 8, specials=[tok.eos_token_id])
    rows = [r + [tok.eos_token_id] for r in rows]
    feats = [{"input_ids": r, "special_tokens_mask": [0] * len(r)} for r in rows]
    out = compare("lm", feats, tok, mlm=False, pad_to_multiple_of=4)
    if family == "qwen":
        assert not (out["labels"] == tok.eos_token_id).any()
    compare("lm", [{"labels": [0] * len(r), "input_ids": r} for r in rows], tok, mlm=False)  # ragged labels
    compare("lm", [{"labels": [0, 1], "input_ids": r} for r in rows], tok, mlm=False)
    compare("lm", feats, tok, mlm=False, return_tensors="np")


@pytest.mark.parametrize("form", ["list", "tuple", "np32", "np64", "torch32", "torch64"])
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_lm_bare_rows(form, return_tensors):
    """Bare sequences: a plain dict of input_ids and labels, dtype as transformers picks it (a tensor's dtype
    under "pt", a numpy array's under "np", else int64); equal-length rows need no pad token."""
    conv = {
        "list": list, "tuple": tuple,
        "np32": lambda r: np.asarray(r, dtype=np.int32), "np64": lambda r: np.asarray(r, dtype=np.int64),
        "torch32": lambda r: torch.tensor(r, dtype=torch.int32), "torch64": torch.tensor,
    }[form]
    tok = make_tokenizer("qwen", padding_side="left")
    rows = rand_rows(random.Random(13), tok, 4, 1, 7, specials=[tok.eos_token_id])
    equal = [conv(r[:1] * 4) for r in rows]
    no_pad = make_tokenizer("llama")
    compare("lm", equal, no_pad, mlm=False, return_tensors=return_tensors)  # stacked, no pad token needed
    if return_tensors == "np" and form.startswith("torch"):
        return  # transformers' numpy path cannot pad tensors (np.full with a torch dtype raises TypeError)
    compare("lm", [conv(r) for r in rows], tok, mlm=False, return_tensors=return_tensors)
    compare("lm", [conv(r) for r in rows], tok, mlm=False, return_tensors=return_tensors, pad_to_multiple_of=8)
    compare("lm", equal, no_pad, mlm=False, return_tensors=return_tensors, pad_to_multiple_of=3)  # must pad
    compare("lm", [conv(r) for r in rows], no_pad, mlm=False, return_tensors=return_tensors)


def test_lm_bare_empty_row_left_padding():
    """transformers left-pads bare rows with result[i, -len(row):] = row, which for an empty row is the
    whole row, so it raises; pyseqpack pads the empty row (a documented difference)."""
    tok = make_tokenizer("qwen", padding_side="left")
    with pytest.raises((RuntimeError, ValueError)):
        transformers.DataCollatorForLanguageModeling(tok, mlm=False)([[5, 6], []])
    out = pyseqpack.DataCollatorForLanguageModeling(tok, mlm=False)([[5, 6], []])
    assert out["input_ids"].tolist() == [[5, 6], [0, 0]]
    assert out["labels"].tolist() == [[5, 6], [-100, -100]]


def test_lm_mlm_masks_as_transformers():
    """mlm=True: padded natively, masked by transformers' own methods: same seed, same batch; same argument
    validation (transformers' own __post_init__)."""
    tok = make_tokenizer("bert")
    rows = rand_rows(random.Random(14), tok, 4, 2, 9)
    feats = [{"input_ids": r} for r in rows]
    # seed=1, not 0: some transformers versions test `if self.seed and ...`, for which seed=0 means the global RNG
    # (each collator would then draw different masks).
    compare("lm", feats, tok, mlm=True, seed=1)
    compare("lm", feats, tok, mlm=True, seed=1, return_tensors="np")
    for bad in ({"mlm_probability": 1.5}, {"mask_replace_prob": 0.9, "random_replace_prob": 0.2}):
        with pytest.raises(ValueError):
            pyseqpack.DataCollatorForLanguageModeling(tok, **bad)
        with pytest.raises(ValueError):
            transformers.DataCollatorForLanguageModeling(tok, **bad)
    for bad in ({"mlm": True}, {"mlm": False, "whole_word_mask": True}):  # t5 has no mask token
        with pytest.raises(ValueError):
            pyseqpack.DataCollatorForLanguageModeling(make_tokenizer("t5"), **bad)


# ---- property tests: random ragged batches, every drop-in against its original -------------------------------

row_lengths = st.lists(st.integers(0, 9), min_size=1, max_size=5)
padding_choice = st.sampled_from([(True, None), ("longest", None), ("max_length", 9), ("max_length", 11),
                                  (False, None)])


def stacks_differently(rows, padding, return_tensors):
    """Unpadded ragged batches where transformers does not raise and pyseqpack does (documented): numpy
    object arrays under "np", and torch.tensor([[], [5]]) -> an empty (2, 0) tensor when the first row is
    empty."""
    ragged = len({len(r) for r in rows}) > 1
    return padding is False and ragged and (return_tensors == "np" or len(rows[0]) == 0)


def token_rows(family):
    """Ragged rows of ordinary tokens mixed with the family's first special ids (pad, eos, ... as content)."""
    tok_ids = list(word_ids(make_tokenizer(family)))
    return st.lists(st.lists(st.sampled_from(tok_ids + [0, 1, 2]), max_size=9), min_size=1, max_size=5)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(family=st.sampled_from(["mbart", "t5"]), data=st.data(), label_lengths=row_lengths,
       side=st.sampled_from(["right", "left"]), multiple=st.sampled_from([None, 2, 8]), padding=padding_choice,
       model=st.sampled_from([None, "bart", "mbart", "t5", "fsmt"]), return_tensors=st.sampled_from(["pt", "np"]),
       seed=st.integers(0, 2**16))
def test_property_seq2seq(family, data, label_lengths, side, multiple, padding, model, return_tensors, seed):
    """Random ragged batches; the models' pad ids match the tokenizer's or not (fused / unfused shifts)."""
    rows = data.draw(token_rows(family))
    rng = random.Random(seed)
    tok = make_tokenizer(family, padding_side=side)
    feats = []
    for i, r in enumerate(rows):
        n = label_lengths[i % len(label_lengths)]
        feats.append({"input_ids": r, "labels": [rng.choice([5, 6, 7, -100, 0, 1, 98]) for _ in range(n)]})
    assume(not stacks_differently(rows, padding[0], return_tensors))
    assume(not stacks_differently([f["labels"] for f in feats], padding[0], return_tensors))
    compare("seq2seq", feats, tok, model=make_model(model) if model else None, padding=padding[0],
            max_length=padding[1], pad_to_multiple_of=multiple, return_tensors=return_tensors)


@SETTINGS
@given(rows=token_rows("bert"), side=st.sampled_from(["right", "left"]), multiple=st.sampled_from([None, 3]),
       padding=padding_choice, kind=st.sampled_from(["padding", "token", "lm"]),
       return_tensors=st.sampled_from(["pt", "np"]), seed=st.integers(0, 2**16))
def test_property_padding_token_lm(rows, side, multiple, padding, kind, return_tensors, seed):
    assume(not stacks_differently(rows, padding[0], return_tensors))
    rng = random.Random(seed)
    tok = make_tokenizer("bert", padding_side=side)
    feats = [{"input_ids": r, "token_type_ids": [rng.randint(0, 1) for _ in r]} for r in rows]
    if kind == "token":
        feats = [dict(f, labels=[rng.randint(0, 5) for _ in f["input_ids"]]) for f in feats]
    if kind == "lm":
        compare("lm", feats, tok, mlm=False, pad_to_multiple_of=multiple, return_tensors=return_tensors)
        if side == "right" or all(rows):  # see test_lm_bare_empty_row_left_padding
            compare("lm", rows, tok, mlm=False, pad_to_multiple_of=multiple, return_tensors=return_tensors)
    else:
        compare(kind, feats, tok, padding=padding[0], max_length=padding[1], pad_to_multiple_of=multiple,
                return_tensors=return_tensors)


def test_batch_encoding_and_tensor_types():
    """Outputs are BatchEncoding objects whose .to() works, like transformers' (assert_same_batch checks types)."""
    tok = make_tokenizer("t5")
    out = pyseqpack.DataCollatorForSeq2Seq(tok)([{"input_ids": [5, 6], "labels": [1]}])
    assert isinstance(out, transformers.BatchEncoding)
    assert out.to("cpu")["input_ids"].tolist() == [[5, 6]]
    theirs = transformers.DataCollatorForSeq2Seq(tok)([{"input_ids": [5, 6], "labels": [1]}])
    assert_same_batch(out, theirs)
    # Built without its constructor (_tokenizer_pad.batch_encoding): the same attributes and state as transformers'.
    assert vars(out).keys() == vars(theirs).keys()
    assert (out.encodings, out.n_sequences, out.is_fast) == (theirs.encodings, theirs.n_sequences, theirs.is_fast)
    out["extra"] = 1
    assert "extra" in out.data and "extra" not in theirs
