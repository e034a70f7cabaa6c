"""TRL's ``SFTTrainer`` with pyseqpack's fused loss and token accuracy.

TRL 1.16's ``SFTTrainer.compute_loss`` runs the model with ``fused_lm_head=True``: TRL's own chunked LM head,
which scores the hidden states tile by tile and returns per-token log-probs, entropy and ``is_top1`` (its
``mean_token_accuracy``), then gathers the counts across ranks and syncs to the host every step. TRL documents
overriding ``compute_loss`` as the way to change the loss; this subclass does exactly that:

* the model runs its ordinary forward, whose loss is ``pyseqpack.fused_cross_entropy`` (installed with
  :func:`~pyseqpack.integrations.transformers.apply_fused_loss`), with Trainer's ``num_items_in_batch`` and
  ``average_tokens_across_devices`` rules, so the loss is the one TRL's ``"nll"`` loss computes;
* ``mean_token_accuracy`` comes from the counts of that same pass, kept on the device and all-reduced once per
  logging step (token-weighted over the window's micro-batches and ranks; TRL averages per-step values).

Not reproduced: TRL's ``entropy`` and ``num_tokens`` metrics (``TrainingArguments.include_num_input_tokens_seen``
gives the token count), ``loss_type="dft"``, label smoothing, ``compute_loss_func`` and the MoE auxiliary loss:
asking for any of those raises at construction. Pair it with ``pyseqpack.DataCollatorForSFT`` as
``data_collator`` to collate with pyseqpack too.
"""
from __future__ import annotations

import trl

from .transformers import TokenAccuracy, apply_fused_loss

__all__ = ["SFTTrainer"]


class SFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` whose loss and ``mean_token_accuracy`` come from pyseqpack's fused cross-entropy.

    Same constructor as ``trl.SFTTrainer``, plus ``fused_loss_backend`` (the ``backend`` of
    ``pyseqpack.fused_cross_entropy``). ``self.token_accuracy`` is the :class:`TokenAccuracy` being filled.
    """

    def __init__(self, *args, fused_loss_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        unsupported = []
        if self.compute_loss_func is not None:
            unsupported.append("compute_loss_func")
        if self.args.loss_type != "nll":
            unsupported.append(f"loss_type={self.args.loss_type!r}")
        if self.label_smoother is not None:
            unsupported.append(f"label_smoothing_factor={self.args.label_smoothing_factor}")
        if self.aux_loss_enabled:
            unsupported.append("a MoE router auxiliary loss (router_aux_loss_coef != 0)")
        if unsupported:
            raise ValueError(
                "pyseqpack.integrations.trl.SFTTrainer computes the plain next-token loss only; not supported: "
                + ", ".join(unsupported) + ". Use trl.SFTTrainer for these."
            )
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.token_accuracy: TokenAccuracy = apply_fused_loss(model, backend=fused_loss_backend)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Like TRL: no KV cache while training (it only costs memory, and breaks gradient checkpointing).
        inputs = {**inputs, "use_cache": False}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)
        loss = outputs.loss
        # Trainer's rule: num_items_in_batch counts the tokens of every rank and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        # TRL's log() averages self._metrics[mode] into the logs (with an "eval_" prefix in evaluation): put the
        # window's token-weighted accuracy there, as one value. compute() is collective: log runs on every rank.
        split = "train" if self.model.training else "eval"
        accuracy = self.token_accuracy.window(split).compute()
        if accuracy is not None:
            self._metrics[split]["mean_token_accuracy"] = [accuracy]
        super().log(logs, start_time)
