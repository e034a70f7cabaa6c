"""Supervised fine-tuning of a causal LM in a plain PyTorch loop, with pyseqpack's collator and fused loss.

The two pyseqpack lines:

    collator = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)   # labels masked by position
    accuracy = apply_fused_loss(model)                                              # model(...).loss is fused

Everything else is an ordinary loop. The model is a tiny Llama with random weights and the data the small
instruction set shipped with pyseqpack, so it runs anywhere in seconds:

    python examples/plain_pytorch_sft.py --steps 30 [--device cuda]
"""
import argparse

import torch
from torch.utils.data import DataLoader

import pyseqpack
from pyseqpack.demo import build_tokenizer, causal_features, load_pairs, tiny_llama
from pyseqpack.integrations.transformers import apply_fused_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    pairs = load_pairs()
    tokenizer = build_tokenizer(pairs)
    # each example: {"input_ids": <s> instruction response </s>, "prompt_length": len(<s> instruction)}
    features = causal_features(tokenizer, pairs, max_length=64)
    collator = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)
    loader = DataLoader(features, batch_size=args.batch_size, shuffle=True, collate_fn=collator, drop_last=True)

    model = tiny_llama(len(tokenizer)).to(device).train()
    accuracy = apply_fused_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    step = 0
    while step < args.steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss = model(**batch).loss  # fused cross-entropy; its argmax counts go into `accuracy`
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                # the only host sync for the metrics: once per log line, token-weighted over the window
                print(f"step {step:4d}  loss {loss.item():.4f}  token_accuracy {accuracy.compute():.4f}", flush=True)
            if step == args.steps:
                break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
