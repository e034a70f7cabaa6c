"""Causal-LM SFT with accelerate: gradient accumulation with transformers' `num_items_in_batch` rule, data
parallel on as many processes as `accelerate launch` starts, token accuracy reduced across them.

    python examples/accelerate_sft.py --steps 20                           # one process
    accelerate launch --num_processes 2 examples/accelerate_sft.py       # data parallel

The loss of a micro-batch is sum(token losses) / num_items_in_batch, where num_items_in_batch counts the trained
tokens of *all* micro-batches of the optimizer step on *all* ranks: every token weighs the same, however the
tokens fall into micro-batches (the per-micro-batch mean that `loss / accumulation_steps` would give does not).
DDP averages gradients over ranks, so each rank's loss is multiplied by the number of processes (what Trainer does
with `average_tokens_across_devices`). The fused loss reads num_items_in_batch on the device: no host sync.
Token accuracy: every rank keeps its counts on the device; `accuracy.compute()` all-reduces the counts (not the
per-rank means) once per log line.
"""
import argparse
import contextlib

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import pyseqpack
from pyseqpack.demo import build_tokenizer, causal_features, load_pairs, tiny_llama
from pyseqpack.integrations.transformers import apply_fused_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch and process")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is visible")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(0)
    pairs = load_pairs()
    tokenizer = build_tokenizer(pairs)
    features = causal_features(tokenizer, pairs, max_length=64)
    collator = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(features, batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True)

    model = tiny_llama(len(tokenizer))
    accuracy = apply_fused_loss(model)  # on the bare model, before accelerate wraps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    def micro_batches():
        while True:
            yield from loader

    stream = micro_batches()
    for step in range(1, args.steps + 1):
        group = [next(stream) for _ in range(args.accumulation)]
        # trained tokens of the whole step: the causal loss scores labels[:, 1:] (position t predicts t + 1)
        local = sum((b["labels"][:, 1:] != -100).sum() for b in group)
        num_items = accelerator.gather(local.reshape(1)).sum()
        step_loss = 0.0  # this rank's share of the step's mean token loss (a device tensor: no sync)
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            # skip the gradient all-reduce on all but the last micro-batch
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                loss = model(**batch, num_items_in_batch=num_items).loss
                accelerator.backward(loss * accelerator.num_processes)
            step_loss = step_loss + loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            # both are collective: every rank calls them
            mean_loss = accelerator.reduce(step_loss, reduction="sum").item()
            token_accuracy = accuracy.compute()
            accelerator.print(f"step {step:4d}  loss {mean_loss:.4f}  token_accuracy {token_accuracy:.4f}",
                              flush=True)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
