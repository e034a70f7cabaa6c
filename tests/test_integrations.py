"""pyseqpack.integrations: the fused loss inside real transformers models, Trainer and TRL's SFTTrainer.

Every check compares against the real thing, run on the same inputs: the unpatched model (loss, every parameter's
gradient, the ``num_items_in_batch`` rule), TRL-style argmax accuracy recomputed from the model's logits,
transformers' Trainer with gradient accumulation, and ``trl.SFTTrainer``.

Tolerances (fp32): the fused loss sums exp() in a different order than torch's log_softmax, so loss and gradients
agree to rounding: rtol 1e-5, and an absolute slack of 1e-5 x the largest gradient of the tensor (gradient sizes
differ by orders of magnitude between tensors). bf16 logits: the gradient is rounded to bf16 by both (rtol 2e-2).
"""
from __future__ import annotations

import copy
import functools
import inspect
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_fixtures  # noqa: E402
from pyseqpack.integrations.transformers import (  # noqa: E402
    FusedLMLoss,
    TokenAccuracy,
    TokenAccuracyCallback,
    add_token_accuracy_callback,
    apply_fused_loss,
    remove_fused_loss,
)

VOCAB = 61  # odd on purpose: no power-of-two block covers a row exactly


# ----------------------------------------------------------------------------------------------- helpers


def causal_model(name: str, seed: int = 0, dtype=torch.float32):
    """A tiny decoder-only LM (one layer, hidden 16) with seeded random weights."""
    specs = {
        "llama": ("LlamaConfig", "LlamaForCausalLM",
                  dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
                  dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=16, n_layer=1, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2)),
    }
    config_cls, model_cls, kwargs = specs[name]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
    return model.to(dtype)


def sft_batch(seed: int = 0, batch: int = 3, length: int = 9):
    """input_ids [B, T] with prompts of different lengths masked to -100 in the labels, and right padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    labels = input_ids.clone()
    attention_mask = torch.ones_like(input_ids)
    for b in range(batch):
        labels[b, : 1 + b] = -100            # prompt
        pad = b                              # row b has b pad tokens on the right
        if pad:
            labels[b, -pad:] = -100
            attention_mask[b, -pad:] = 0
    return input_ids, attention_mask, labels


def assert_grads_close(ref_model, model, rtol=1e-5, rel_atol=1e-5):
    checked = 0
    for (name, a), b in zip(ref_model.named_parameters(), model.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        atol = rel_atol * float(a.grad.abs().max()) + 1e-12
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")
        checked += 1
    assert checked > 0


def trl_counts(logits, labels, shift: bool):
    """Token accuracy as TRL computes it (SEMANTICS.md): argmax over the logits, labels != -100."""
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    mask = labels != -100
    return int(((logits.argmax(-1) == labels) & mask).sum()), int(mask.sum())


# ----------------------------------------------------------------------------------------------- causal LMs


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("num_items", [None, 17, "tensor"])
def test_causal_lm_loss_and_grads_match_the_unpatched_model(name, num_items):
    ref = causal_model(name)
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    input_ids, attention_mask, labels = sft_batch()
    labels_before = labels.clone()
    kwargs = {}
    if num_items == "tensor":
        kwargs["num_items_in_batch"] = torch.tensor(23)
    elif num_items is not None:
        kwargs["num_items_in_batch"] = num_items

    # train mode, dropout on (GPT-2): the same seed gives both forwards the same masks
    torch.manual_seed(1)
    out_ref = ref(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    torch.manual_seed(1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=0, atol=0)
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(ref, model)
    assert torch.equal(labels, labels_before), "the caller's labels were modified"

    correct, total = accuracy.counts("train")
    assert (correct, total) == trl_counts(out_ref.logits, labels, shift=True)
    assert total == int((labels[:, 1:] != -100).sum())


def test_causal_lm_shift_labels_are_scored_without_a_shift():
    # Context parallelism / padding-free collators hand the model pre-shifted labels: transformers scores
    # `shift_labels` as they are, and so must the fused loss.
    ref = causal_model("llama")
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    input_ids, _, labels = sft_batch(seed=1)
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    shift_labels[0, 2] = -100  # differs from a plain shift of labels, so a second shift would be caught
    out_ref = ref(input_ids=input_ids, labels=labels, shift_labels=shift_labels)
    out = model(input_ids=input_ids, labels=labels, shift_labels=shift_labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(ref, model)
    assert accuracy.counts() == trl_counts(out_ref.logits, shift_labels, shift=False)


def test_causal_lm_bf16_logits():
    ref = causal_model("llama", dtype=torch.bfloat16)
    model = copy.deepcopy(ref)
    apply_fused_loss(model)
    input_ids, _, labels = sft_batch(seed=2, batch=4, length=12)
    out_ref = ref(input_ids=input_ids, labels=labels)
    out = model(input_ids=input_ids, labels=labels)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    # both compute the loss in fp32 from the same bf16 logits
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(ref, model, rtol=2e-2, rel_atol=2e-2)


def test_eval_mode_counts_go_to_the_eval_window():
    model = causal_model("llama")
    accuracy = apply_fused_loss(model)
    input_ids, _, labels = sft_batch()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    assert accuracy.counts("train") == (0, 0)
    expected = trl_counts(out.logits, labels, shift=True)
    assert accuracy.counts("eval") == expected
    assert accuracy.compute("eval") == pytest.approx(expected[0] / expected[1])
    assert accuracy.counts("eval") == (0, 0), "compute() resets its window"


def test_remove_and_reapply():
    model = causal_model("llama")
    default = model.loss_function
    first = apply_fused_loss(model)
    assert isinstance(model.loss_function, FusedLMLoss)
    second = apply_fused_loss(model)  # replaces the first installation
    assert second is not first and model.loss_function.accuracy is second
    shared = TokenAccuracy()
    assert apply_fused_loss(model, accuracy=shared) is shared
    assert remove_fused_loss(model) is True
    assert model.loss_function is default
    assert remove_fused_loss(model) is False

    # what the instance had before (a user's own loss, another library's patched forward) comes back
    def users_loss(*args, **kwargs):
        raise AssertionError("not called while the fused loss is installed")

    model.loss_function = users_loss
    apply_fused_loss(model)
    apply_fused_loss(model)
    assert isinstance(model.loss_function, FusedLMLoss)
    remove_fused_loss(model)
    assert model.loss_function is users_loss

    t5 = copy.deepcopy(hf_fixtures.make_model("t5"))
    patched = t5.forward
    t5.forward = patched  # an instance-level forward, as TRL's add_fused_lm_head installs
    apply_fused_loss(t5)
    assert t5.forward is not patched
    assert remove_fused_loss(t5) is True
    assert t5.__dict__["forward"] is patched


def test_fused_loss_validates_its_arguments():
    loss = FusedLMLoss(shift=True)
    logits = torch.randn(2, 5, VOCAB)
    with pytest.raises(ValueError, match="vocab_size=60"):
        loss(logits, torch.zeros(2, 5, dtype=torch.long), vocab_size=60)
    with pytest.raises(ValueError, match=r"labels must have the logits' shape without the vocab dim, \(2, 5\)"):
        loss(logits, torch.zeros(2, 4, dtype=torch.long), vocab_size=VOCAB)
    with pytest.raises(ValueError, match="pass labels or shift_labels"):
        loss(logits, None, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="logits must be a tensor"):
        loss([1.0], torch.zeros(1, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- seq2seq LMs

SEQ2SEQ = ["t5", "mt5", "umt5", "longt5", "bart", "mbart", "plbart", "marian", "pegasus", "pegasus_x", "led", "mvp"]


def seq2seq_batch(name, seed=0):
    """input_ids [3, 7] and labels [3, 5] (two rows with -100 padding) drawn from the model family's words."""
    g = torch.Generator().manual_seed(seed)
    ids = list(hf_fixtures.word_ids(hf_fixtures.make_tokenizer(hf_fixtures.SEQ2SEQ_MODELS[name])))
    pick = torch.tensor(ids)
    input_ids = pick[torch.randint(len(ids), (3, 7), generator=g)]
    labels = pick[torch.randint(len(ids), (3, 5), generator=g)]
    labels[0, 3:] = -100
    labels[2, 4:] = -100
    return input_ids, labels


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_loss_and_grads_match_the_unpatched_model(name):
    # train mode with dropout on: both forwards draw the same masks from the same seed, so any difference in
    # how the wrapper runs the model (e.g. a wrong decoder_input_ids) shows up in the loss.
    ref = copy.deepcopy(hf_fixtures.make_model(name)).train()
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    input_ids, labels = seq2seq_batch(name)
    labels_before = labels.clone()
    torch.manual_seed(1)
    out_ref = ref(input_ids=input_ids, labels=labels)
    torch.manual_seed(1)
    out = model(input_ids=input_ids, labels=labels)
    assert list(out.keys()) == list(out_ref.keys())
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=0, atol=0)
    out_ref.loss.backward()
    out.loss.backward()
    assert_grads_close(ref, model)
    assert torch.equal(labels, labels_before), "the caller's labels were modified"
    assert accuracy.counts() == trl_counts(out_ref.logits, labels, shift=False)


def test_seq2seq_given_decoder_inputs_tuple_output_and_num_items():
    ref = copy.deepcopy(hf_fixtures.make_model("t5")).eval()
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    input_ids, labels = seq2seq_batch("t5", seed=3)
    # explicit decoder inputs (what collators built with model=... provide) are used as given
    decoder_input_ids = ref.prepare_decoder_input_ids_from_labels(labels)
    decoder_input_ids[1, 2] = 5
    tuple_ref = ref(input_ids=input_ids, decoder_input_ids=decoder_input_ids, labels=labels, return_dict=False)
    tuple_out = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, labels=labels, return_dict=False)
    assert isinstance(tuple_out, tuple) and len(tuple_out) == len(tuple_ref)
    torch.testing.assert_close(tuple_out[0], tuple_ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(tuple_out[1], tuple_ref[1], rtol=0, atol=0)
    # T5 computes a plain per-batch mean and ignores num_items_in_batch; the patched model keeps that rule
    with_items = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(1000))
    plain_ref = ref(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(with_items.loss, plain_ref.loss, rtol=1e-5, atol=0)
    # without labels the model runs untouched (generation, inference)
    no_labels = model(input_ids=input_ids, decoder_input_ids=decoder_input_ids)
    assert no_labels.loss is None
    assert accuracy.counts("eval")[1] == 2 * int((labels != -100).sum())


@pytest.mark.parametrize("name", ["whisper", "fsmt", "m2m100", "blenderbot", "switch_transformers"])
def test_unsupported_seq2seq_models_are_refused_with_the_reason(name):
    # whisper / m2m100 / blenderbot: no prepare_decoder_input_ids_from_labels; fsmt: its forward builds the
    # decoder inputs from input_ids, not labels; switch_transformers adds router losses. The wrapper could not
    # reproduce their loss, so it refuses, naming the model type.
    model = copy.deepcopy(hf_fixtures.make_model(name))
    with pytest.raises(TypeError, match=rf"{type(model).__name__} is not supported \(model_type "
                                        rf"'{model.config.model_type}'\)"):
        apply_fused_loss(model)
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__


def test_causal_heads_with_an_inline_loss_are_refused():
    # BartForCausalLM computes CrossEntropyLoss itself: replacing loss_function would change nothing
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32)
    model = transformers.BartForCausalLM(config)
    with pytest.raises(TypeError, match=r"BartForCausalLM is not supported \(model_type 'bart'\): its forward "
                                        "computes CrossEntropyLoss itself"):
        apply_fused_loss(model)
    assert "_loss_function" not in model.__dict__


def _forward_source(cls) -> str:
    return inspect.getsource(cls.forward)


def test_model_type_tables_match_transformers_sources():
    """The tables apply_fused_loss decides by are checked against the installed transformers' own sources."""
    from transformers.models.auto import modeling_auto

    from pyseqpack.integrations import transformers as integ

    builds_from_labels = re.compile(r"decoder_input_ids\s*=\s*[\w.]+\(\s*labels\b")
    cache_off = re.compile(r"if labels is not None:[^\n]*\n(?:[^\n]*\n){0,3}?[^\n]*use_cache = False")
    for model_type, (head, no_cache) in integ._SEQ2SEQ_INLINE_LOSS.items():
        cls = getattr(transformers, head)
        source = _forward_source(cls)
        assert cls.config_class.model_type == model_type, head
        assert hasattr(cls, "prepare_decoder_input_ids_from_labels"), head
        assert "self.loss_function" not in source and "CrossEntropyLoss(" in source, head
        assert builds_from_labels.search(source), head
        assert bool(cache_off.search(source)) == no_cache, head
    heads = {}  # model_type -> its LM heads, from every registry of generating heads
    for registry in ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
                     "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES",
                     "MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        for model_type, names in getattr(modeling_auto, registry, {}).items():
            heads.setdefault(model_type, set()).update([names] if isinstance(names, str) else names)
    for model_type in integ._SEQ2SEQ_LOSS_FUNCTION:
        classes = [getattr(transformers, n) for n in heads.get(model_type, ()) if hasattr(transformers, n)]
        assert classes, model_type
        assert all("self.loss_function" in _forward_source(c) for c in classes), model_type
        assert all(c.config_class().is_encoder_decoder for c in classes), model_type
    # the decoder-only list is complete: every other causal-LM head transformers registers calls loss_function
    for model_type, names in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        for head in [names] if isinstance(names, str) else names:
            cls = getattr(transformers, head, None)
            if cls is None:  # a head whose optional dependencies are missing here
                continue
            inline = "self.loss_function" not in _forward_source(cls)
            assert inline == (model_type in integ._CAUSAL_INLINE_LOSS), (model_type, head)


def test_non_lm_heads_are_refused():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, pad_token_id=0))
    with pytest.raises(TypeError, match="ForSequenceClassification.*not a language-modelling cross-entropy"):
        apply_fused_loss(model)
    with pytest.raises(TypeError, match="BertForSequenceClassification is not supported"):
        apply_fused_loss(transformers.BertForSequenceClassification(config))
    with pytest.raises(TypeError, match="must be a transformers PreTrainedModel"):
        apply_fused_loss(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="accuracy must be a TokenAccuracy"):
        apply_fused_loss(causal_model("llama"), accuracy=object())


# ----------------------------------------------------------------------------------------------- TokenAccuracy


def test_token_accuracy_accumulates_on_device_and_resets():
    acc = TokenAccuracy()
    assert acc.compute() is None
    correct, total = torch.tensor(3), torch.tensor(10)
    acc.update(correct, total)
    acc.update(torch.tensor(1, dtype=torch.int32), torch.tensor(2, dtype=torch.int32))
    assert (int(correct), int(total)) == (3, 10), "update must not add into the caller's tensors"
    acc.update(torch.tensor(5), torch.tensor(5), split="eval")
    assert acc.counts("train") == (4, 12)
    assert acc.compute("train", reset=False) == pytest.approx(4 / 12)
    assert acc.compute("train") == pytest.approx(4 / 12)
    assert acc.counts("train") == (0, 0)
    assert acc.counts("eval") == (5, 5)
    acc.reset()
    assert acc.counts("eval") == (0, 0)


def test_token_accuracy_windows_are_named_attributes():
    acc = TokenAccuracy()
    assert acc.window("train") is acc.train and acc.window("eval") is acc.eval
    assert acc.train.empty and acc.eval.empty and repr(acc) == "TokenAccuracy(train=empty, eval=empty)"
    acc.eval.update(torch.tensor(2), torch.tensor(8))
    acc.update(torch.tensor(1), torch.tensor(3), split="eval")
    assert not acc.eval.empty and acc.eval.calls == 2 and acc.train.empty
    assert repr(acc.eval) == "AccuracyWindow('eval', 2 call(s), on device)"
    assert acc.eval.counts() == acc.counts("eval") == (3, 11)
    assert acc.eval.compute() == pytest.approx(3 / 11)
    assert acc.eval.empty and acc.eval.calls == 0


def test_empty_window_warns_where_the_counts_are():
    """After eval-mode forwards the counts are in the eval window: asking the train window says so."""
    model = causal_model("llama")
    accuracy = apply_fused_loss(model)
    input_ids, _, labels = sft_batch()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels)
    with pytest.warns(UserWarning, match=r"the 'train' window is empty, but the 'eval' window holds the counts of "
                                         r"1 loss call\(s\).*model\.eval\(\).*accuracy\.eval\.compute\(\)"):
        assert accuracy.compute() is None
    with pytest.warns(UserWarning, match="'train' window is empty"):
        assert accuracy.train.compute() is None
    expected = trl_counts(out.logits, labels, shift=True)
    assert accuracy.eval.compute() == pytest.approx(expected[0] / expected[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both windows empty: nothing to point at
        assert accuracy.compute() is None and accuracy.eval.compute() is None


def test_token_accuracy_mixes_inference_mode_and_no_grad():
    # a window opened under torch.inference_mode() must keep accepting counts outside it (and the reverse)
    acc = TokenAccuracy()
    with torch.inference_mode():
        acc.update(torch.tensor(1), torch.tensor(2), split="eval")
    with torch.no_grad():
        acc.update(torch.tensor(1), torch.tensor(2), split="eval")
    with torch.inference_mode():
        acc.update(torch.tensor(1), torch.tensor(3), split="eval")
    assert acc.counts("eval") == (3, 7)


def test_token_accuracy_rejects_bad_input():
    acc = TokenAccuracy()
    with pytest.raises(ValueError, match="split must be one of"):
        acc.update(torch.tensor(1), torch.tensor(1), split="test")
    with pytest.raises(TypeError, match="num_correct must be a one-element integer tensor"):
        acc.update(torch.tensor(0.5), torch.tensor(1))
    with pytest.raises(TypeError, match="num_tokens must be a one-element integer tensor"):
        acc.update(torch.tensor(1), 3)
    with pytest.raises(ValueError, match="split must be one of"):
        acc.counts("valid")


_TWO_RANKS = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from pyseqpack.integrations.transformers import TokenAccuracy
    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    acc = TokenAccuracy()
    if rank == 0:   # rank 0: 3 of 10 correct over two micro-batches; rank 1: 1 of 2, and nothing in eval
        acc.update(torch.tensor(2), torch.tensor(6)); acc.update(torch.tensor(1), torch.tensor(4))
        acc.update(torch.tensor(1), torch.tensor(1), split="eval")
    else:
        acc.update(torch.tensor(1), torch.tensor(2))
    print(rank, acc.counts(), acc.compute(), acc.compute("eval"), acc.compute(reduce=False), flush=True)
    dist.destroy_process_group()
""")


def test_token_accuracy_is_token_weighted_across_ranks():
    # The all-reduce sums the counts: (3 + 1) / (10 + 2) = 1/3, not the mean of the rank means (0.3 + 0.5) / 2.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_RANKS, str(r), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    lines = sorted(out.strip() for out, _ in outs)
    # compute() resets after counts(): the local (reduce=False) value afterwards is None on both ranks
    assert lines == [f"0 (4, 12) {4 / 12} 1.0 None", f"1 (4, 12) {4 / 12} 1.0 None"]


# ----------------------------------------------------------------------------------------------- Trainer


def _sft_features(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        prompt = 1 + i % 3
        feats.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]})
    return feats


class _Recorder(transformers.TrainerCallback):
    """Keeps every logs dict it is shown, to check what callbacks placed after the accuracy callback see."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def _trainer(model, features, callbacks=(), grad_accum=2, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="pyseqpack-test-"), per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_accumulation_steps=grad_accum, max_steps=2, logging_steps=1,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_drop_last=True, **kwargs)
    tok = hf_fixtures.make_tokenizer("t5")
    collator = transformers.DataCollatorForSeq2Seq(tok, model=model if model.config.is_encoder_decoder else None)
    return transformers.Trainer(model=model, args=args, train_dataset=features, eval_dataset=features[:8],
                                data_collator=collator, callbacks=list(callbacks))


def test_callback_reads_the_window_each_log_belongs_to():
    acc = TokenAccuracy()
    callback = TokenAccuracyCallback(acc)
    state = transformers.TrainerState()

    def log(logs):
        state.log_history.append(dict(logs))
        callback.on_log(None, state, None, logs=logs)
        assert state.log_history[-1] == logs
        return logs

    acc.update(torch.tensor(1), torch.tensor(2))
    acc.update(torch.tensor(3), torch.tensor(4), split="eval")
    # the end-of-training summary looks like an evaluation with prefix "train", and is not one
    assert "train_token_accuracy" not in log({"train_runtime": 1.0, "train_loss": 2.0, "epoch": 1.0})
    assert "learning_rate" in log({"learning_rate": 0.1})  # nothing to add to
    assert log({"eval_loss": 1.0, "eval_runtime": 0.1})["eval_token_accuracy"] == 0.75
    acc.update(torch.tensor(1), torch.tensor(4), split="eval")
    assert log({"test_loss": 1.0, "test_runtime": 0.1})["test_token_accuracy"] == 0.25
    assert log({"loss": 1.0, "grad_norm": 0.5})["token_accuracy"] == 0.5
    assert "token_accuracy" not in log({"loss": 1.0})  # an empty window adds nothing
    acc.update(torch.tensor(1), torch.tensor(1), split="eval")
    callback.on_predict(None, state, None)  # predict() logs nothing: its counts are dropped
    assert acc.counts("eval") == (0, 0)


def _record_trl_counts(model, shift):
    """Wrap the reference model's forward to record, per call, TRL-style counts from its logits."""
    seen = []
    original = model.forward

    @functools.wraps(original)  # Trainer reads the signature to pick the dataset columns to keep
    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((model.training, trl_counts(out.logits.detach(), kwargs["labels"], shift)))
        return out

    model.forward = forward
    return seen


def test_trainer_with_gradient_accumulation_matches_and_logs_token_accuracy():
    features = _sft_features()
    ref = causal_model("llama")
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    seen = _record_trl_counts(ref, shift=True)
    trainer_ref = _trainer(ref, features)
    trainer_ref.train()
    trainer_ref.evaluate()
    recorder = _Recorder()
    trainer = _trainer(model, features, callbacks=[recorder])
    add_token_accuracy_callback(trainer, accuracy)
    assert isinstance(trainer.callback_handler.callbacks[0], TokenAccuracyCallback)
    trainer.train()
    trainer.evaluate()

    # num_items_in_batch: Trainer counts the labels of both micro-batches and the loss is sum / that count;
    # a wrong rule changes the logged losses and the SGD update.
    logs_ref = [h for h in trainer_ref.state.log_history if "loss" in h]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for a, b in zip(logs_ref, logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # token_accuracy of step s = the counts of its two micro-batches together (token-weighted)
    train_counts = [c for training, c in seen if training]
    for step, entry in enumerate(logs):
        micro = train_counts[2 * step: 2 * step + 2]
        correct, total = sum(c for c, _ in micro), sum(t for _, t in micro)
        assert abs(entry["token_accuracy"] * total - correct) <= 1, (entry, micro)  # at most one argmax near-tie
    eval_counts = [c for training, c in seen if not training]
    eval_log = next(h for h in trainer.state.log_history if "eval_loss" in h)
    expected = sum(c for c, _ in eval_counts) / sum(t for _, t in eval_counts)
    assert eval_log["eval_token_accuracy"] == pytest.approx(expected, abs=1.5 / sum(t for _, t in eval_counts))
    # callbacks after it (reporting integrations) see the value in the logs they are given
    assert [("token_accuracy" in logs) for logs in recorder.seen if "loss" in logs] == [True, True]
    assert any("eval_token_accuracy" in logs for logs in recorder.seen)


def test_trainer_seq2seq_matches():
    features = [{"input_ids": f["input_ids"], "attention_mask": f["attention_mask"],
                 "labels": [t for t in f["input_ids"][: 3 + i % 4]]} for i, f in enumerate(_sft_features(seed=1))]
    for f in features:
        f["input_ids"] = [t % hf_fixtures.VOCAB_SIZE for t in f["input_ids"]]
        f["labels"] = [t % hf_fixtures.VOCAB_SIZE for t in f["labels"]]
    ref = copy.deepcopy(hf_fixtures.make_model("t5"))
    ref.config.dropout_rate = 0.0
    for module in ref.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = copy.deepcopy(ref)
    accuracy = apply_fused_loss(model)
    _trainer(ref, features).train()
    trainer = _trainer(model, features, callbacks=[TokenAccuracyCallback(accuracy)])
    trainer.train()
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    logged = [h["token_accuracy"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(0.0 <= v <= 1.0 for v in logged)


# ----------------------------------------------------------------------------------------------- TRL


def _sft_dataset(n=16):
    datasets = pytest.importorskip("datasets")
    from pyseqpack import demo

    pairs = demo.load_pairs()[:n]
    return datasets.Dataset.from_list([{"prompt": a, "completion": " " + b} for a, b in pairs])


def _sft_args(**kwargs):
    trl = pytest.importorskip("trl")
    return trl.SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="pyseqpack-test-"), per_device_train_batch_size=4,
        per_device_eval_batch_size=16, max_steps=3, logging_steps=1, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
        **kwargs)


# trl 1.16's SFTConfig sets gradient_checkpointing, which transformers 5.24 reports as deprecated
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_trl_sft_trainer_matches_trl():
    trl = pytest.importorskip("trl")
    import pyseqpack
    from pyseqpack import demo
    from pyseqpack.integrations.trl import SFTTrainer

    tokenizer = demo.build_tokenizer(vocab_size=256)
    dataset = _sft_dataset()
    ref = demo.tiny_llama(len(tokenizer), hidden_size=16, layers=1)
    model = copy.deepcopy(ref)
    model_collated = copy.deepcopy(ref)
    trainer_ref = trl.SFTTrainer(model=ref, args=_sft_args(), train_dataset=dataset, eval_dataset=dataset,
                                 processing_class=tokenizer)
    trainer = SFTTrainer(model=model, args=_sft_args(), train_dataset=dataset, eval_dataset=dataset,
                         processing_class=tokenizer)
    # pyseqpack's SFT collator on the dataset TRL prepared (input_ids + labels with the prompt at -100)
    trainer_collated = SFTTrainer(model=model_collated, args=_sft_args(), train_dataset=dataset, eval_dataset=dataset,
                                  processing_class=tokenizer,
                                  data_collator=pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id))
    for t in (trainer_ref, trainer, trainer_collated):
        t.train()
        t.evaluate()
    # the two collators build the same batches, so the two runs are the same run
    strip = ("_runtime", "_per_second")
    history = [{k: v for k, v in h.items() if not k.endswith(strip)} for h in trainer.state.log_history]
    history_collated = [{k: v for k, v in h.items() if not k.endswith(strip)}
                        for h in trainer_collated.state.log_history]
    assert history_collated == history
    for a, b in zip(model.parameters(), model_collated.parameters()):
        assert torch.equal(a, b)

    logs_ref = [h for h in trainer_ref.state.log_history if "loss" in h or "eval_loss" in h]
    logs = [h for h in trainer.state.log_history if "loss" in h or "eval_loss" in h]
    assert len(logs) == len(logs_ref) == 4
    # Step 1 starts from the same weights: same loss (to rounding) and the same accuracy. TRL's chunked LM head
    # computes its gradient ~1e-5 (relative) away from the model's own loss (which the fused loss matches to
    # ~1e-7, see the tests above), so the runs then drift apart slightly: a looser check after step 1.
    assert logs[0]["loss"] == pytest.approx(logs_ref[0]["loss"], rel=1e-6)
    assert logs[0]["mean_token_accuracy"] == pytest.approx(logs_ref[0]["mean_token_accuracy"], abs=1e-6)
    for a, b in zip(logs_ref, logs):
        key = "loss" if "loss" in a else "eval_loss"
        prefix = "" if key == "loss" else "eval_"
        assert b[key] == pytest.approx(a[key], rel=1e-4)
        # one micro-batch per step and one eval batch: TRL's mean of per-step values and the token-weighted
        # window are the same quantity
        assert b[prefix + "mean_token_accuracy"] == pytest.approx(a[prefix + "mean_token_accuracy"], abs=5e-3)
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own deprecation notice for label smoothing
@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "dft"}, "loss_type='dft'"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1"),
])
def test_trl_sft_trainer_refuses_what_it_does_not_compute(kwargs, message):
    pytest.importorskip("trl")
    from pyseqpack import demo
    from pyseqpack.integrations.trl import SFTTrainer

    tokenizer = demo.build_tokenizer(vocab_size=256)
    model = demo.tiny_llama(len(tokenizer), hidden_size=16, layers=1)
    with pytest.raises(ValueError, match=message):
        SFTTrainer(model=model, args=_sft_args(**kwargs), train_dataset=_sft_dataset(4), processing_class=tokenizer)
