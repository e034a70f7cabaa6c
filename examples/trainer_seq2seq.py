"""A T5 model trained with transformers' Trainer, with pyseqpack's seq2seq collator and fused loss, and
`token_accuracy` in the logs.

The pyseqpack lines:

    collator = pyseqpack.DataCollatorForSeq2Seq(tokenizer, model=model)   # drop-in: same batch, decoder_input_ids
    accuracy = apply_fused_loss(model)                                    # outputs.loss is the fused loss
    add_token_accuracy_callback(trainer, accuracy)                        # logs token_accuracy / eval_token_accuracy

    python examples/trainer_seq2seq.py --steps 40 [--output-dir runs/t5]
"""
import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

import pyseqpack
from pyseqpack.demo import build_tokenizer, load_pairs, seq2seq_features, tiny_t5
from pyseqpack.integrations.transformers import add_token_accuracy_callback, apply_fused_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default=None, help="checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is visible")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pairs = load_pairs()
    tokenizer = build_tokenizer(pairs)
    # {"input_ids": instruction </s>, "attention_mask": ..., "labels": response </s>}
    features = seq2seq_features(tokenizer, pairs, max_length=64, max_target_length=32)
    train, evaluation = features[16:], features[:16]
    model = tiny_t5(len(tokenizer))
    accuracy = apply_fused_loss(model)

    training_args = TrainingArguments(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="pyseqpack-t5-"),
        max_steps=args.steps, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=16,
        gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 4), eval_strategy="steps", eval_steps=max(1, args.steps // 2),
        save_strategy="no", report_to=[], use_cpu=args.cpu, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=pyseqpack.DataCollatorForSeq2Seq(tokenizer, model=model))
    add_token_accuracy_callback(trainer, accuracy)
    trainer.train()
    for entry in trainer.state.log_history:
        if "token_accuracy" in entry:
            print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  token_accuracy {entry['token_accuracy']:.4f}")
        if "eval_token_accuracy" in entry:
            print(f"step {entry['step']:4d}  eval_loss {entry['eval_loss']:.4f}  "
                  f"eval_token_accuracy {entry['eval_token_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
