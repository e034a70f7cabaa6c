"""Timing of the collators against the classes they replace, on the batch the drop-ins are meant for:
B=32 examples of 64-512 tokens given as Python lists (inputs, attention_mask, labels of 64-512 tokens).

Slow (excluded by default). Two ways to run the same cases:

    .venv/bin/pytest tests/test_collators_bench.py -m slow --benchmark-group-by=param:case
    .venv/bin/python tests/test_collators_bench.py        # timeit, one line per case with the speed-up

Every case first checks that both collators return the same batch, so the timings compare the same work.
"""
import random
import timeit

import pytest
import torch
import transformers
from hf_fixtures import assert_same_batch, make_model, make_tokenizer, word_ids

import pyseqpack

B, LO, HI = 32, 64, 512
S2S = ["attention_mask", "labels"]


def _features(tokenizer, fields, seed=0):
    """B examples of LO..HI ordinary tokens with the given extra fields ("attention_mask", "labels" of their
    own LO..HI length, "completion_mask" after a random prompt)."""
    rng = random.Random(seed)
    words = list(word_ids(tokenizer))
    feats = []
    for _ in range(B):
        ids = [rng.choice(words) for _ in range(rng.randint(LO, HI))]
        f = {"input_ids": ids}
        if "attention_mask" in fields:
            f["attention_mask"] = [1] * len(ids)
        if "labels" in fields:
            f["labels"] = [rng.choice(words) for _ in range(rng.randint(LO, HI))]
        if "completion_mask" in fields:
            prompt = rng.randint(0, len(ids) - 1)
            f["completion_mask"] = [0] * prompt + [1] * (len(ids) - prompt)
        feats.append(f)
    return feats


def _sft_reference(collator):
    """TRL's collator on labels built as TRL's dataset preparation builds them (completion tokens only)."""
    def run(feats):
        rows = [{"input_ids": f["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(f["input_ids"], f["completion_mask"])]} for f in feats]
        return collator(rows)
    return run


def cases():
    """name -> (ours, theirs, features, same): `same` checks the outputs agree before anything is timed."""
    t5, mbart, qwen = make_tokenizer("t5"), make_tokenizer("mbart"), make_tokenizer("qwen")
    out = {
        "seq2seq": (pyseqpack.DataCollatorForSeq2Seq(t5), transformers.DataCollatorForSeq2Seq(t5), _features(t5, S2S)),
        "seq2seq+t5": (pyseqpack.DataCollatorForSeq2Seq(t5, model=make_model("t5")),
                       transformers.DataCollatorForSeq2Seq(t5, model=make_model("t5")), _features(t5, S2S)),
        "seq2seq+mbart": (pyseqpack.DataCollatorForSeq2Seq(mbart, model=make_model("mbart")),
                          transformers.DataCollatorForSeq2Seq(mbart, model=make_model("mbart")), _features(mbart, S2S)),
        "with_padding": (pyseqpack.DataCollatorWithPadding(t5), transformers.DataCollatorWithPadding(t5),
                         _features(t5, ["attention_mask"])),
        "lm": (pyseqpack.DataCollatorForLanguageModeling(qwen, mlm=False),
               transformers.DataCollatorForLanguageModeling(qwen, mlm=False), _features(qwen, ["attention_mask"])),
    }
    out = {name: (ours, theirs, feats, assert_same_batch) for name, (ours, theirs, feats) in out.items()}
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator
    except ImportError:
        return out

    def same_tensors(ours, theirs):
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(ours[key], theirs[key]), key

    out["sft(trl)"] = (pyseqpack.DataCollatorForSFT(pad_token_id=qwen.pad_token_id),
                       _sft_reference(TRLCollator(pad_token_id=qwen.pad_token_id)),
                       _features(qwen, ["completion_mask"]), same_tensors)
    return out


@pytest.fixture(scope="module")
def all_cases():
    return cases()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["pyseqpack", "reference"])
@pytest.mark.parametrize("case", ["seq2seq", "seq2seq+t5", "seq2seq+mbart", "with_padding", "lm", "sft(trl)"])
def test_collator_speed(benchmark, all_cases, case, side):
    if case not in all_cases:
        pytest.skip("trl is not installed")
    ours, theirs, feats, same = all_cases[case]
    same(ours(feats), theirs(feats))
    benchmark(ours if side == "pyseqpack" else theirs, feats)


def main():
    print(f"B={B} examples of {LO}-{HI} tokens as Python lists; best of 7, us per batch")
    for name, (ours, theirs, feats, same) in cases().items():
        same(ours(feats), theirs(feats))
        a = min(timeit.repeat(lambda: ours(feats), number=200, repeat=7)) / 200 * 1e6
        b = min(timeit.repeat(lambda: theirs(feats), number=10, repeat=7)) / 10 * 1e6
        print(f"{name:14s} pyseqpack {a:7.0f}   reference {b:7.0f}   {b / a:5.1f}x")


if __name__ == "__main__":
    main()
