"""Every drop-in collator against the class it replaces, on the batch they are meant for.

B=32 examples of 64-512 tokens as Python lists (what a ``datasets`` pipeline yields), one group per collator:

    transformers DataCollatorWithPadding                     vs pyseqpack's        (input_ids, attention_mask)
    transformers DataCollatorForLanguageModeling(mlm=False)  vs pyseqpack's        (causal labels)
    transformers DataCollatorForTokenClassification          vs pyseqpack's        (per-token labels)
    transformers DataCollatorForSeq2Seq + a T5 model         vs pyseqpack's        (decoder_input_ids: start token)
    transformers DataCollatorForSeq2Seq + an mBART model     vs pyseqpack's        (decoder_input_ids: wrap the EOS)
    TRL's DataCollatorForLanguageModeling                    vs pyseqpack.DataCollatorForSFT  (completion-only)

(bench_collate.py covers DataCollatorForSeq2Seq without a model over all shapes and list / numpy inputs.)
Each case first checks that both return the same tensors, so the timings compare the same work. The models
come from tiny configs with random weights; only their config and decoder shift matter to a collator.
bytes = output bytes (every tensor of the batch).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers as H

BATCH, LO, HI = 32, 64, 512
SEED = 1234


def _model(kind: str):
    import transformers as T

    small = dict(vocab_size=H.VOCAB_SIZE, d_model=16, decoder_start_token_id=H.PAD_ID, pad_token_id=H.PAD_ID,
                 eos_token_id=2)
    if kind == "t5":
        cfg = T.T5Config(d_kv=8, d_ff=32, num_layers=1, num_heads=2, **small)
        return T.T5ForConditionalGeneration(cfg)
    cfg = T.MBartConfig(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=HI + 8, **small)
    return T.MBartForConditionalGeneration(cfg)


def _features(fields, seed=SEED):
    """BATCH examples of LO..HI tokens (ids >= 3: no pad or EOS inside), as lists, with the given extra fields."""
    rng = np.random.default_rng(seed)
    feats = []
    for n in H.random_lengths(BATCH, LO, HI, seed=seed):
        ids = rng.integers(3, H.VOCAB_SIZE, size=n).tolist()
        f = {"input_ids": ids}
        if "attention_mask" in fields:
            f["attention_mask"] = [1] * n
        if "token_labels" in fields:
            f["labels"] = rng.integers(0, 9, size=n).tolist()
        if "labels" in fields:  # seq2seq targets of their own length, ending in EOS (mBART wraps it)
            f["labels"] = rng.integers(3, H.VOCAB_SIZE, size=int(rng.integers(LO, HI + 1)) - 1).tolist() + [2]
        if "completion_mask" in fields:
            prompt = int(rng.integers(0, n))
            f["completion_mask"] = [0] * prompt + [1] * (n - prompt)
        feats.append(f)
    return feats


def _trl_reference(collator):
    """TRL's collator, fed what TRL's dataset preparation gives it: the completion mask folded into labels."""
    return lambda feats: collator([{"input_ids": f["input_ids"],
                                    "labels": [t if m else -100 for t, m in zip(f["input_ids"], f["completion_mask"])]}
                                   for f in feats])


def _cases(tokenizer):
    """case -> (transformers' label, theirs, pyseqpack's label, ours, features)."""
    import transformers as T

    import pyseqpack as P

    t5, mbart = _model("t5"), _model("mbart")
    out = {
        "with_padding": ("transformers DataCollatorWithPadding", T.DataCollatorWithPadding(tokenizer),
                         "pyseqpack DataCollatorWithPadding", P.DataCollatorWithPadding(tokenizer),
                         _features(["attention_mask"])),
        "lm": ("transformers DataCollatorForLanguageModeling", T.DataCollatorForLanguageModeling(tokenizer, mlm=False),
               "pyseqpack DataCollatorForLanguageModeling", P.DataCollatorForLanguageModeling(tokenizer, mlm=False),
               _features(["attention_mask"])),
        "token_classification": (
            "transformers DataCollatorForTokenClassification", T.DataCollatorForTokenClassification(tokenizer),
            "pyseqpack DataCollatorForTokenClassification", P.DataCollatorForTokenClassification(tokenizer),
            _features(["attention_mask", "token_labels"])),
        "seq2seq+t5": ("transformers DataCollatorForSeq2Seq(model=T5)", T.DataCollatorForSeq2Seq(tokenizer, model=t5),
                       "pyseqpack DataCollatorForSeq2Seq(model=T5)", P.DataCollatorForSeq2Seq(tokenizer, model=t5),
                       _features(["attention_mask", "labels"])),
        "seq2seq+mbart": ("transformers DataCollatorForSeq2Seq(model=mBART)",
                          T.DataCollatorForSeq2Seq(tokenizer, model=mbart),
                          "pyseqpack DataCollatorForSeq2Seq(model=mBART)",
                          P.DataCollatorForSeq2Seq(tokenizer, model=mbart), _features(["attention_mask", "labels"])),
    }
    try:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator
    except ImportError:
        return out
    out["sft"] = ("TRL DataCollatorForLanguageModeling (completion labels)",
                  _trl_reference(TRLCollator(pad_token_id=H.PAD_ID)),
                  "pyseqpack DataCollatorForSFT", P.DataCollatorForSFT(pad_token_id=H.PAD_ID),
                  _features(["completion_mask"]))
    return out


@pytest.fixture(scope="module")
def cases():
    return _cases(H.make_tokenizer())


CASES = ["with_padding", "lm", "token_classification", "seq2seq+t5", "seq2seq+mbart", "sft"]


@pytest.mark.parametrize("side", ["reference", "pyseqpack"])
@pytest.mark.parametrize("case", CASES)
def test_collator(benchmark, bench_cfg, cases, case, side):
    if case not in cases:
        pytest.skip("trl is not installed")
    their_label, theirs, our_label, ours, feats = cases[case]
    expected, got = theirs(feats), ours(feats)
    for key, value in expected.items():  # TRL adds no keys pyseqpack lacks; the drop-ins return the same keys
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), f"{our_label}: {key!r} differs from {their_label}"
    benchmark.group = f"collators[list] {case} B={BATCH} len={LO}-{HI}"
    reference = side == "reference"
    info = {"suite": "collate", "impl": their_label if reference else our_label,
            "role": H.BASELINE if reference else H.OURS, "input": "list", "batch": BATCH, "len_lo": LO,
            "len_hi": HI, "threads": bench_cfg.cpu_threads, "order": 3}
    H.measure(benchmark, lambda: (theirs if reference else ours)(feats), bench_cfg, nbytes=H.output_bytes(expected),
              info=info)
