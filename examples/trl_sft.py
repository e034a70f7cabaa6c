"""TRL's SFTTrainer on prompt/completion data, with pyseqpack's SFT collator, fused loss and token accuracy.

The pyseqpack lines:

    from pyseqpack.integrations.trl import SFTTrainer                       # instead of trl.SFTTrainer
    data_collator = pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id)

TRL prepares the dataset as usual (tokenizes, masks the prompt in "labels"); the collator pads it in one native
pass, the model's loss is the fused cross-entropy, and `mean_token_accuracy` comes from that loss's own counts.

    python examples/trl_sft.py --steps 40
"""
import argparse
import tempfile

import torch
from datasets import Dataset
from trl import SFTConfig

import pyseqpack
from pyseqpack.demo import build_tokenizer, load_pairs, tiny_llama
from pyseqpack.integrations.trl import SFTTrainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default=None, help="checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is visible")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    pairs = load_pairs()
    tokenizer = build_tokenizer(pairs)
    dataset = Dataset.from_list([{"prompt": p, "completion": " " + c} for p, c in pairs])
    model = tiny_llama(len(tokenizer))
    config = SFTConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="pyseqpack-sft-"), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 4), max_length=64, save_strategy="no", report_to=[],
        use_cpu=args.cpu, disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=pyseqpack.DataCollatorForSFT(pad_token_id=tokenizer.pad_token_id))
    trainer.train()
    for entry in trainer.state.log_history:
        if "mean_token_accuracy" in entry:
            print(f"step {entry['step']:4d}  loss {entry['loss']:.4f}  "
                  f"mean_token_accuracy {entry['mean_token_accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
