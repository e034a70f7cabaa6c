"""`python -m pyseqpack demo`: train tiny models both ways and compare, step by step.

Two tiny models are built from configs with random weights, on a small instruction dataset shipped with the
package (``pyseqpack/data/tiny_instructions.txt``) and a BPE tokenizer trained on it offline:

* ``t5``:    a T5 encoder-decoder: instruction -> response (seq2seq, ``decoder_input_ids`` from the labels);
* ``llama``: a Llama decoder: ``<s> instruction response </s>``, the loss on the response only (SFT).

Each model is trained ``--steps`` steps twice from the same initial weights, on the same batches:

  (a) baseline:  transformers' ``DataCollatorForSeq2Seq`` + the loss the model itself uses (torch's
                 cross-entropy: ``CrossEntropyLoss`` for T5, transformers' ``ForCausalLMLoss`` for Llama) + token
                 accuracy as TRL computes it (an ``argmax`` over the logits, one more pass);
  (b) pyseqpack: pyseqpack's collator (``DataCollatorForSeq2Seq``, ``DataCollatorForSFT``) +
                 ``fused_cross_entropy``, whose pass over the logits also counts the correct tokens.

Every step prints both runs' losses and accuracies side by side, and checks that (1) the two collators built the
same batch and (2) on side (b)'s logits, the fused loss and its counts equal the baseline's loss and argmax counts
computed on those same logits (loss within ``--rtol``, counts exactly); any failure is flagged on the step's line
and makes the exit status 1. The two runs train independently, so their columns agree to rounding in the first
steps and then drift apart slowly (AdamW amplifies the ~1e-7 rounding differences step after step): the drift is
reported, not judged. At the end: the median collate time and loss time (forward + backward of the loss alone,
on the logits) per step for each side, and their ratio. The first ``--warmup`` steps are warm-up (one-time costs:
loading native code, compiling kernels, the allocator's first blocks) and are not timed. A ratio is printed only
when the timings can carry it (see ``judge``); on a machine busy with other work the summary says that it is too
noisy to judge, and why, instead.

The helpers ``load_pairs``, ``build_tokenizer``, ``tiny_llama`` and ``tiny_t5`` are reused by the examples.
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from importlib import resources

import torch

__all__ = ["main", "load_pairs", "build_tokenizer", "tiny_llama", "tiny_t5", "causal_features", "seq2seq_features"]

DATA_FILE = "tiny_instructions.txt"
SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3: pad=0 (T5's decoder start), eos=1, bos=2


def load_pairs() -> list[tuple[str, str]]:
    """The shipped dataset: (instruction, response) pairs, in file order."""
    text = resources.files("pyseqpack").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    pairs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise ValueError(f"{DATA_FILE} line {lineno}: expected 'instruction<TAB>response', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def build_tokenizer(pairs=None, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on the pairs (milliseconds, offline), as a PreTrainedTokenizerFast.

    Special tokens: <pad>=0, </s>=1, <s>=2, <unk>=3; right padding. ``len(tokenizer)`` may be below
    ``vocab_size`` when the corpus runs out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pairs = load_pairs() if pairs is None else pairs
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator((text for pair in pairs for text in pair), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>", padding_side="right")


def tiny_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """A Llama causal LM with random weights (seeded): pad=0, eos=1, bos=2, no dropout."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def tiny_t5(vocab_size: int, *, d_model: int = 64, layers: int = 2, seed: int = 0):
    """A T5 encoder-decoder with random weights (seeded): pad=0 (also the decoder start), eos=1, no dropout."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
                      num_layers=layers, num_decoder_layers=layers, num_heads=4, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(config)


def causal_features(tokenizer, pairs, max_length: int | None = None) -> list[dict]:
    """SFT examples for a causal LM: ``input_ids = <s> instruction response </s>`` and ``prompt_length`` (the
    number of leading tokens, <s> + instruction, that get no loss). Cut to ``max_length`` tokens."""
    out = []
    for instruction, response in pairs:
        prompt = [tokenizer.bos_token_id] + tokenizer(instruction, add_special_tokens=False)["input_ids"]
        completion = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        out.append({"input_ids": ids, "prompt_length": min(len(prompt), len(ids))})
    return out


def seq2seq_features(tokenizer, pairs, max_length: int | None = None, max_target_length: int | None = None):
    """Seq2seq examples: ``input_ids = instruction </s>``, ``labels = response </s>``, each cut to its limit."""
    out = []
    for instruction, response in pairs:
        ids = (tokenizer(instruction, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:max_length]
        labels = (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[:max_target_length]})
    return out


def baseline_sft_features(features: list[dict]) -> list[dict]:
    """What the baseline collator needs for SFT: labels built per example in Python (TRL does this while it
    prepares the dataset): a copy of input_ids with the prompt set to -100."""
    out = []
    for f in features:
        ids, n = f["input_ids"], f["prompt_length"]
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:]})
    return out


# --------------------------------------------------------------------------------------------------------------
# The two sides


class _Timer:
    """Wall time of a region; on a GPU the device is synchronized first and last (a demo, not a hot path)."""

    def __init__(self, device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __enter__(self):
        self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.start


def _baseline_loss(kind):
    """The model's own loss + TRL's argmax accuracy, on detached logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss_fn(logits, labels):
        if kind == "llama":
            loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
            pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
        else:
            loss = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits.view(-1, logits.shape[-1]), labels.view(-1))
            pred, target = logits.argmax(-1), labels
        mask = target != -100
        return loss, ((pred == target) & mask).sum(), mask.sum()

    return loss_fn


def _fused_loss(kind):
    from pyseqpack import fused_cross_entropy

    def loss_fn(logits, labels):
        out = fused_cross_entropy(logits, labels, shift=(kind == "llama"))
        return out.loss, out.num_correct, out.num_tokens

    return loss_fn


def _train_step(model, optimizer, collator, features, loss_fn, device):
    """One optimizer step. Returns (loss, correct, total, collate seconds, loss seconds, the model inputs
    of the batch, its labels, the logits (detached))."""
    timer = _Timer(device)
    with timer:
        batch = collator(features)
    collate_s = timer.seconds
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    labels = batch.pop("labels")
    logits = model(**batch).logits
    # The loss is timed alone: forward and backward on a detached copy of the logits, whose gradient is then
    # pushed through the model.
    leaf = logits.detach().requires_grad_()
    with timer:
        loss, correct, total = loss_fn(leaf, labels)
        loss.backward()
    logits.backward(leaf.grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), int(correct), int(total), collate_s, timer.seconds, batch, labels, leaf.detach()


def _same_batch(a, b):
    """Whether two collated batches have the same keys and equal tensors under each."""
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def run_model(kind: str, args, out=print) -> dict:
    """Train ``kind`` ("t5" or "llama") both ways; return the per-side timings and the mismatch count."""
    import pyseqpack
    from transformers import DataCollatorForSeq2Seq

    device = torch.device(args.device)
    pairs = load_pairs()
    tokenizer = build_tokenizer(pairs, vocab_size=args.vocab_size)
    vocab = len(tokenizer)
    model_a = tiny_llama(vocab, seed=args.seed) if kind == "llama" else tiny_t5(vocab, seed=args.seed)
    model_b = copy.deepcopy(model_a)
    if kind == "llama":
        features_b = causal_features(tokenizer, pairs, args.max_length)
        features_a = baseline_sft_features(features_b)
        collator_a = DataCollatorForSeq2Seq(tokenizer)
        collator_b = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)
    else:
        features_a = features_b = seq2seq_features(tokenizer, pairs, args.max_length, args.max_target_length)
        collator_a = DataCollatorForSeq2Seq(tokenizer, model=model_a)
        collator_b = pyseqpack.DataCollatorForSeq2Seq(tokenizer, model=model_b)
    sides = {}
    for name, model, collator, features, loss_fn in (
        ("a", model_a, collator_a, features_a, _baseline_loss(kind)),
        ("b", model_b, collator_b, features_b, _fused_loss(kind)),
    ):
        model.to(device).train()
        sides[name] = dict(model=model, collator=collator, features=features, loss_fn=loss_fn,
                           optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr), collate=[], loss=[])

    order = list(range(len(pairs)))
    random.Random(args.seed).shuffle(order)
    reference = _baseline_loss(kind)
    mismatches, drift = 0, 0.0
    out(f"\n== {kind}: {sum(p.numel() for p in model_a.parameters()) / 1e6:.2f}M parameters, vocab {vocab}, "
        f"{args.steps} steps of {args.batch_size} examples on {device} ==")
    out(f"{'step':>4} | {'loss: transformers':>18} {'pyseqpack':>10} | {'acc: transformers':>17} {'pyseqpack':>9} |")
    bar = _progress(args.steps, kind, args.progress)
    for step in range(args.steps):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        results = {}
        for name, side in sides.items():
            feats = [side["features"][i] for i in idx]
            loss, correct, total, collate_s, loss_s, batch, labels, logits = _train_step(
                side["model"], side["optimizer"], side["collator"], feats, side["loss_fn"], device)
            results[name] = (loss, correct, total, batch, labels, logits)
            if step >= args.warmup:
                side["collate"].append(collate_s)
                side["loss"].append(loss_s)
        (la, ca, ta, ba, ya, _), (lb, cb, tb, bb, yb, logits_b) = results["a"], results["b"]
        problems = []
        if not _same_batch({**ba, "labels": ya}, {**bb, "labels": yb}):
            problems.append("batches differ")
        # the baseline's loss and argmax counts on the very logits the fused loss scored
        with torch.no_grad():
            ref_loss, ref_correct, ref_total = (float(x) for x in reference(logits_b, yb))
        if abs(lb - ref_loss) > args.rtol * max(abs(ref_loss), 1e-12):
            problems.append(f"fused loss {lb:.6f} vs torch {ref_loss:.6f} on the same logits")
        if (cb, tb) != (int(ref_correct), int(ref_total)):
            problems.append(f"accuracy counts {cb}/{tb} vs argmax {int(ref_correct)}/{int(ref_total)} "
                            "on the same logits")
        mismatches += bool(problems)
        drift = max(drift, abs(la - lb) / max(abs(la), 1e-12))
        acc_a, acc_b = ca / max(ta, 1), cb / max(tb, 1)
        flag = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
        bar.write(f"{step:>4} | {la:>18.6f} {lb:>10.6f} | {acc_a:>17.4f} {acc_b:>9.4f} | {flag}")
        bar.update(1)
    bar.close()
    return {"kind": kind, "mismatches": mismatches, "steps": args.steps, "drift": drift,
            **{f"{name}_{what}": side[what] for name, side in sides.items() for what in ("collate", "loss")}}


def _progress(total, desc, enabled):
    """A tqdm bar (on stderr) whose write() goes above it; a plain printer when tqdm is missing or disabled."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
        return tqdm(total=total, desc=desc, unit="step", disable=None if enabled else True, leave=False,
                    file=sys.stderr)

    class _Plain:
        def write(self, line):
            print(line, flush=True)

        def update(self, n):
            pass

        def close(self):
            pass

    return _Plain()


MIN_TIMED_STEPS = 6  # fewer timed steps than this: no ratio is judged
HALVES_DISAGREE = 1.5  # the two halves' ratios differing by more than this factor: the timings disagree


def _quartiles(xs):
    """(first quartile, median, third quartile) of two or more values."""
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def judge(a: list, b: list):
    """Whether per-step times ``a`` (baseline) and ``b`` (pyseqpack) carry a ratio of medians.

    Returns (ratio, None) or (None, reason). The ratio median(a) / median(b) is withheld when
      * fewer than MIN_TIMED_STEPS steps were timed;
      * the spread between the quartiles of either side is as large as the difference of the two medians
        (the sides' typical steps overlap: the machine's other work decides which is faster);
      * the first and second half of the timed steps, judged apart, disagree: their ratios lie on different
        sides of 1, or differ by more than a factor HALVES_DISAGREE (the load changed during the run).
    """
    n = min(len(a), len(b))
    if n < MIN_TIMED_STEPS:
        return None, f"too few timed steps to judge ({n}; at least {MIN_TIMED_STEPS}: raise --steps)"
    (a1, ma, a3), (b1, mb, b3) = _quartiles(a), _quartiles(b)
    spread = max(a3 - a1, b3 - b1)
    if spread >= abs(ma - mb):
        return None, (f"too noisy to judge: a quartile spread of {1e3 * spread:.3f} ms against a difference of "
                      f"the medians of {1e3 * abs(ma - mb):.3f} ms")
    half = n // 2
    r1 = statistics.median(a[:half]) / statistics.median(b[:half])
    r2 = statistics.median(a[half:n]) / statistics.median(b[half:n])
    if (r1 - 1) * (r2 - 1) <= 0 or max(r1, r2) / min(r1, r2) > HALVES_DISAGREE:
        return None, f"too noisy to judge: the first and second half of the steps give {r1:.2f}x and {r2:.2f}x"
    return ma / mb, None


def _summary(result, out=print):
    timed = len(result["a_collate"])
    first = result["steps"] - timed
    warm = "no warm-up" if first == 0 else "step 0: warm-up" if first == 1 else f"steps 0-{first - 1}: warm-up"
    out(f"-- {result['kind']}: median per step over steps {first}-{result['steps'] - 1} ({warm}, not timed) --")
    out(f"   {'':<8} {'transformers+torch':>19} {'pyseqpack':>11}   ratio (median over median)")
    both = {side: [c + l for c, l in zip(result[f"{side}_collate"], result[f"{side}_loss"])] for side in "ab"}
    for label, a, b in (("collate", result["a_collate"], result["b_collate"]),
                        ("loss", result["a_loss"], result["b_loss"]), ("both", both["a"], both["b"])):
        ratio, why = judge(a, b)
        verdict = f"{ratio:.2f}x" if ratio is not None else why
        out(f"   {label:<8} {1e3 * statistics.median(a):>16.3f} ms {1e3 * statistics.median(b):>8.3f} ms   {verdict}")
    status = "all steps agree" if result["mismatches"] == 0 else f"{result['mismatches']} step(s) MISMATCHED"
    out(f"   agreement: {status} (same batches; fused loss and counts = torch's on the same logits)")
    out(f"   the two runs' losses differ by at most {result['drift']:.1e} (relative) over {result['steps']} steps")


def _parser():
    p = argparse.ArgumentParser(prog="python -m pyseqpack demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("t5", "llama", "both"), default="both", help="which tiny model (default both)")
    p.add_argument("--steps", type=_positive, default=20, help="optimizer steps per side (default 20)")
    p.add_argument("--batch-size", type=_positive, default=16, help="examples per step (default 16)")
    p.add_argument("--max-length", type=_positive, default=64,
                   help="tokens kept per input sequence (llama: the whole example) (default 64)")
    p.add_argument("--max-target-length", type=_positive, default=32, help="t5 label tokens kept (default 32)")
    p.add_argument("--vocab-size", type=_positive, default=1024,
                   help="BPE vocabulary to train (the model's output dim; default 1024)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--cpu-threads", type=_non_negative, default=1,
                   help="torch's CPU threads during the run (default 1, a DataLoader worker's share; one thread "
                        "also waits least on other work of the machine; 0: torch's own default)")
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="first steps left out of the timings as warm-up (default 2)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="relative difference between the fused and torch's loss on the same logits flagged as a "
                        "mismatch (default 1e-5)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        print(f"demo: --device {args.device!r} is not a torch device ({e})", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"demo: --device {args.device} asked for CUDA, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.warmup >= args.steps:
        print(f"demo: --warmup ({args.warmup}) must be below --steps ({args.steps}) to time anything",
              file=sys.stderr)
        return 2
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"demo: needs transformers and tokenizers ({e}); `pip install '.[hf]'` in the pyseqpack checkout", file=sys.stderr)
        return 2
    kinds = ("t5", "llama") if args.model == "both" else (args.model,)
    threads = torch.get_num_threads()
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    try:
        print(f"pyseqpack demo: {', '.join(kinds)}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
              + f", {torch.get_num_threads()} CPU thread(s)")
        results = [run_model(kind, args) for kind in kinds]
        print("\n== summary ==")
        for result in results:
            _summary(result)
    finally:
        torch.set_num_threads(threads)
    return 0 if all(r["mismatches"] == 0 for r in results) else 1
