"""End to end: a few optimizer steps with pyseqpack's collator + fused loss against the same steps with
transformers' collator + the model's own torch loss, from the same initial weights on the same examples.

After every step: the collated batches are identical, the losses and the token accuracies agree, and so do the
updated parameters. Data: the instruction set shipped with pyseqpack, tokenized by the demo's offline BPE.

Tolerances: fp32 throughout. The fused loss sums exp() in another order than torch's log_softmax (relative
differences ~1e-7). The optimizer is SGD, whose update is linear in the gradient, so parameters stay within
rtol 1e-4 / atol 1e-6 (AdamW would not be a fair judge: on its first step, components whose gradient is near its
eps turn a 1e-7 relative gradient difference into a 1e-4 one). Accuracies may differ by one token where a
near-tie argmax flips (never seen here, but the steps after the first start from weights ~1e-7 apart).
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyseqpack  # noqa: E402
from pyseqpack import demo  # noqa: E402
from pyseqpack.integrations.transformers import apply_fused_loss  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def data():
    pairs = demo.load_pairs()
    tokenizer = demo.build_tokenizer(pairs, vocab_size=320)
    return pairs, tokenizer


def batches(n_examples, batch_size, steps, seed=0):
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def argmax_counts(logits, labels, shift):
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    return int(((logits.argmax(-1) == labels) & mask).sum()), int(mask.sum())


def assert_same_params(ref, model, step):
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m: f"after step {step}, {name}: {m}")


def step_both(opt_ref, opt, ref, model, step):
    """One optimizer step on each side, then the parameters must still agree."""
    for o in (opt_ref, opt):
        o.step()
        o.zero_grad()
    assert_same_params(ref, model, step)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_causal_lm_sft_prompt_masked(data, micro_batches):
    """Llama SFT, prompt masked. With 2 micro-batches per step the loss uses transformers' num_items_in_batch
    rule (sum over the step / trained tokens of the whole step) on both sides."""
    pairs, tokenizer = data
    features = demo.causal_features(tokenizer, pairs, max_length=48)   # input_ids + prompt_length
    baseline_features = demo.baseline_sft_features(features)          # + labels built in Python
    ref = demo.tiny_llama(len(tokenizer), hidden_size=32, layers=1)
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    collator_ref = transformers.DataCollatorForSeq2Seq(tokenizer)
    collator = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    for step, idx in enumerate(batches(len(features), 6 * micro_batches, STEPS)):
        chunks = [idx[i::micro_batches] for i in range(micro_batches)]
        batches_ref = [collator_ref([baseline_features[i] for i in c]) for c in chunks]
        batches_ours = [collator([features[i] for i in c]) for c in chunks]
        for a, b in zip(batches_ref, batches_ours):
            assert set(b) == {"input_ids", "attention_mask", "labels"}
            for key in b:
                assert torch.equal(a[key], b[key]), f"step {step}: {key} differs"
        num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches_ours)
        kwargs = {"num_items_in_batch": num_items} if micro_batches > 1 else {}
        loss_ref = loss = 0.0
        correct = total = 0
        for a, b in zip(batches_ref, batches_ours):
            out_ref = ref(**a, **kwargs)
            out = model(**b, **kwargs)
            out_ref.loss.backward()
            out.loss.backward()
            loss_ref += out_ref.loss.item()
            loss += out.loss.item()
            c, t = argmax_counts(out_ref.logits.detach(), a["labels"], shift=True)
            correct, total = correct + c, total + t
        assert loss == pytest.approx(loss_ref, rel=1e-5), f"step {step}"
        got_correct, got_total = accuracy.counts()
        assert got_total == total == num_items
        assert abs(got_correct - correct) <= 1, f"step {step}: {got_correct} vs {correct} correct of {total}"
        accuracy.reset()
        step_both(opt_ref, opt, ref, model, step)


def test_seq2seq_with_decoder_input_ids(data):
    """T5: both collators build decoder_input_ids from the labels (given the model); the model runs on them."""
    pairs, tokenizer = data
    features = demo.seq2seq_features(tokenizer, pairs, max_length=48, max_target_length=24)
    ref = demo.tiny_t5(len(tokenizer), d_model=32, layers=1)
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    collator_ref = transformers.DataCollatorForSeq2Seq(tokenizer, model=ref)
    collator = pyseqpack.DataCollatorForSeq2Seq(tokenizer, model=model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    for step, idx in enumerate(batches(len(features), 8, STEPS, seed=1)):
        feats = [features[i] for i in idx]
        a, b = collator_ref(feats), collator(feats)
        assert list(b.keys()) == list(a.keys())
        assert "decoder_input_ids" in b
        for key in a:
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differs"
        out_ref = ref(**a)
        out = model(**b)
        assert out.loss.item() == pytest.approx(out_ref.loss.item(), rel=1e-5), f"step {step}"
        out_ref.loss.backward()
        out.loss.backward()
        correct, total = argmax_counts(out_ref.logits.detach(), a["labels"], shift=False)
        got_correct, got_total = accuracy.counts()
        assert got_total == total
        assert abs(got_correct - correct) <= 1
        accuracy.reset()
        step_both(opt_ref, opt, ref, model, step)
