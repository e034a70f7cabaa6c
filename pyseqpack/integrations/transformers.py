"""Use pyseqpack's fused cross-entropy inside transformers models, with token accuracy for free.

One call swaps the loss of a causal-LM or seq2seq-LM head for ``pyseqpack.fused_cross_entropy``::

    accuracy = apply_fused_loss(model)          # returns a TokenAccuracy
    loss = model(**batch).loss                  # same value and gradient as before
    print(accuracy.compute())                   # token accuracy of every step since the last compute()

``outputs.loss`` keeps the model's own definition: the same shift, the same ``ignore_index``, the same mean, and
``num_items_in_batch`` (transformers' gradient-accumulation rule, ``sum / num_items_in_batch``) wherever the model
honours it. What changes is how it is computed: one fused kernel per row of logits computes the loss and its
gradient together in fp32 registers (no fp32 copy of bf16 logits, which transformers' ``ForCausalLMLoss`` makes;
no log-softmax tensor saved for backward), and the same pass counts the tokens whose argmax equals the label.
Those counts stay on the device (int64 tensors, no host sync) in a :class:`TokenAccuracy`; ``compute()`` is the
only sync, once per logging step, and it all-reduces the *counts* across data-parallel ranks, so the logged
accuracy is token-weighted over every rank and every micro-batch.

How the swap is done, per model family (nothing global in transformers is patched; everything is undone by
:func:`remove_fused_loss`):

* Models whose ``forward`` routes the loss through ``self.loss_function`` (every decoder-only LM: Llama, Qwen2,
  Mistral, GPT-2, ...; and encoder-decoders such as T5Gemma or Moonshine): the instance's ``loss_function`` is set,
  the override hook transformers provides. The model keeps passing ``num_items_in_batch`` and ``shift_labels``.
* Encoder-decoder models that compute ``CrossEntropyLoss`` inline (T5, mT5, BART, mBART, Marian, Pegasus, ...): the
  instance's ``forward`` is wrapped. It takes ``labels`` away (pass them by keyword, as ``model(**batch)`` does),
  builds ``decoder_input_ids`` from them exactly as the model would (``prepare_decoder_input_ids_from_labels``),
  runs the model without a loss, and scores its logits. These models ignore ``num_items_in_batch`` (their loss is
  a plain per-batch mean, also under Trainer's gradient accumulation), and so does the wrapper.

The fused loss validates label ranges with one host sync per call unless ``PYSEQPACK_CHECK_LABELS=0`` (see
``pyseqpack.fused_cross_entropy``); set it for sync-free training steps.
"""
from __future__ import annotations

import functools
import inspect
import re
import weakref

import torch
from transformers import TrainerCallback
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss

__all__ = [
    "TokenAccuracy",
    "FusedLMLoss",
    "apply_fused_loss",
    "remove_fused_loss",
    "TokenAccuracyCallback",
    "add_token_accuracy_callback",
]

_MODES = ("train", "eval")
# What apply_fused_loss installs on a model instance carries this attribute, holding what the instance had there
# before (a user's loss_function, TRL's patched forward, ...; _NOTHING when it had nothing): remove_fused_loss
# undoes only pyseqpack's own work and puts that back.
_MARK = "_pyseqpack_replaced"
_NOTHING = object()


class TokenAccuracy:
    """Token-accuracy counts from the fused loss, kept on the device until asked for.

    Two independent windows, ``"train"`` and ``"eval"``; the loss picks one from ``model.training``. Each holds
    ``num_correct`` and ``num_tokens`` as int64 device tensors summed over every loss call since the last reset:
    ``update`` is two in-place adds on the device (no host sync), ``counts``/``compute`` sync once.
    """

    def __init__(self):
        self._counts = {mode: None for mode in _MODES}

    @staticmethod
    def _check_mode(mode):
        if mode not in _MODES:
            raise ValueError(f"TokenAccuracy: mode must be one of {_MODES}, got {mode!r}")

    def update(self, num_correct: torch.Tensor, num_tokens: torch.Tensor, mode: str = "train") -> None:
        """Add one loss call's counts (0-d integer tensors, any device) to the ``mode`` window. No host sync."""
        self._check_mode(mode)
        for name, value in (("num_correct", num_correct), ("num_tokens", num_tokens)):
            if not torch.is_tensor(value) or value.numel() != 1 or value.is_floating_point():
                raise TypeError(f"TokenAccuracy.update: {name} must be a one-element integer tensor, got {value!r}")
        correct = num_correct.detach().reshape(()).to(torch.int64)
        total = num_tokens.detach().reshape(()).to(device=correct.device, dtype=torch.int64)
        current = self._counts[mode]
        if current is None:
            # clone: the window must never alias a tensor the caller (or the loss output) still owns; and made
            # outside inference mode, so that a window opened under torch.inference_mode() can still be added to
            # (or reset) later outside it
            with torch.inference_mode(False):
                self._counts[mode] = [correct.clone(), total.clone()]
        else:
            current[0] += correct.to(current[0].device)
            current[1] += total.to(current[1].device)

    def reset(self, mode: str | None = None) -> None:
        """Forget the counts of ``mode`` (both windows when None)."""
        for m in _MODES if mode is None else (mode,):
            self._check_mode(m)
            self._counts[m] = None

    def counts(self, mode: str = "train", *, reduce: bool = True) -> tuple[int, int]:
        """``(num_correct, num_tokens)`` of the ``mode`` window as Python ints (one host sync).

        With ``reduce=True`` and an initialized ``torch.distributed`` group of more than one rank, the counts are
        summed over all ranks (an all-reduce of one int64 pair: collective, so every rank must call it; a rank
        that saw no tokens contributes zeros). Accelerate and Trainer run on torch.distributed, so this is the
        reduction they would do.
        """
        self._check_mode(mode)
        current = self._counts[mode]
        pair = torch.zeros(2, dtype=torch.int64) if current is None else torch.stack(current)
        if reduce and _distributed():
            dist = torch.distributed
            # NCCL reduces CUDA tensors only, gloo CPU tensors (and CUDA ones through a copy): use the group's kind.
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            else:
                device = torch.device("cpu")
            pair = pair.to(device)
            dist.all_reduce(pair, op=dist.ReduceOp.SUM)
        correct, total = pair.tolist()
        return int(correct), int(total)

    def compute(self, mode: str = "train", *, reduce: bool = True, reset: bool = True) -> float | None:
        """Token-weighted accuracy ``num_correct / num_tokens`` of the ``mode`` window (None when it saw no
        token), summed over ranks as in :meth:`counts`; then the window is reset unless ``reset=False``."""
        correct, total = self.counts(mode, reduce=reduce)
        if reset:
            self.reset(mode)
        return correct / total if total > 0 else None

    def __repr__(self):
        parts = []
        for mode in _MODES:
            current = self._counts[mode]
            parts.append(f"{mode}=" + ("empty" if current is None else "<on device>"))
        return f"TokenAccuracy({', '.join(parts)})"


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FusedLMLoss:
    """``pyseqpack.fused_cross_entropy`` behind the signature of transformers' ``ForCausalLMLoss`` (``shift=True``)
    or ``ForMaskedLMLoss`` (``shift=False``), so it can be a model's ``loss_function``.

    Call: ``loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kw)``

    * ``logits``: ``[..., vocab_size]`` float (fp32, bf16 or fp16), usually ``[B, T, V]``; read once, never copied.
    * ``labels``: int64 ``[...]`` (the logits without their last dim), or None when ``shift_labels`` is given.
    * ``shift_labels``: int64, same shape as the logits without their last dim, already aligned with them (context
      parallelism, packed collators): scored without a shift, as transformers does.
    * ``num_items_in_batch``: int or tensor; when given the loss is ``sum / num_items_in_batch`` (transformers'
      gradient-accumulation rule), else the mean over tokens whose label is not ``ignore_index``.

    Other keyword arguments (what a model's forward passes along) are accepted and ignored, as transformers does.
    Returns the 0-d fp32 loss. As a side effect the argmax counts go into ``self.accuracy`` (``"train"`` window
    while the model is in training mode, ``"eval"`` otherwise; ``"train"`` when no model is attached).
    One difference from torch: a batch with no valid token gives 0 (zero gradient) instead of NaN.
    """

    def __init__(self, *, shift: bool, accuracy: TokenAccuracy | None = None, model=None, backend: str = "auto"):
        self.shift = bool(shift)
        self.accuracy = TokenAccuracy() if accuracy is None else accuracy
        self.backend = backend
        # a weak reference: the model owns this object (model.loss_function), it must not keep the model alive
        self._model = None if model is None else weakref.ref(model)

    def _mode(self) -> str:
        model = None if self._model is None else self._model()
        return "eval" if model is not None and not model.training else "train"

    def __call__(self, logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                 shift_labels=None, **kwargs):
        if not torch.is_tensor(logits) or logits.dim() < 2:
            raise ValueError(f"FusedLMLoss: logits must be a tensor [..., vocab_size], got {_describe(logits)}")
        if vocab_size is not None and logits.shape[-1] != vocab_size:
            raise ValueError(
                f"FusedLMLoss: logits have {logits.shape[-1]} classes in their last dim but vocab_size={vocab_size}"
            )
        if shift_labels is not None:
            targets, shift = shift_labels, False
        elif labels is not None:
            targets, shift = labels, self.shift
        else:
            raise ValueError("FusedLMLoss: pass labels or shift_labels (both are None)")
        if not torch.is_tensor(targets) or tuple(targets.shape) != tuple(logits.shape[:-1]):
            name = "shift_labels" if shift_labels is not None else "labels"
            raise ValueError(
                f"FusedLMLoss: {name} must have the logits' shape without the vocab dim, "
                f"{tuple(logits.shape[:-1])}, got {_describe(targets)}"
            )
        return _score(logits, targets, shift=shift, num_items_in_batch=num_items_in_batch,
                      ignore_index=ignore_index, backend=self.backend, accuracy=self.accuracy, mode=self._mode())


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def _score(logits, targets, *, shift, num_items_in_batch, ignore_index, backend, accuracy, mode):
    """One fused pass: loss (mean, or sum / num_items_in_batch) and the argmax counts into ``accuracy``."""
    from ..cross_entropy import fused_cross_entropy

    targets = targets.to(logits.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    out = fused_cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction, shift=shift,
                              backend=backend)
    loss = out.loss
    if num_items_in_batch is not None:
        # transformers' fixed_cross_entropy: the summed loss divided by the token count of the whole accumulated
        # batch (an int, or a tensor that may sit on another device and may be fractional after Trainer's
        # division by the tensor-parallel size). Same operation, same rounding.
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    accuracy.update(out.num_correct, out.num_tokens, mode=mode)
    return loss


def _forward_source(model) -> str:
    try:
        return inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (compiled, interactive): nothing can be inferred from it
        return ""


# `decoder_input_ids = self._shift_right(labels)` (T5), `decoder_input_ids = shift_tokens_right(labels, ...)` (BART)
_DECODER_IDS_FROM_LABELS = re.compile(r"decoder_input_ids\s*=\s*[\w.]+\(\s*labels\b")
# BART, Marian, Pegasus, LED: `if labels is not None: ... use_cache = False` (T5 and PLBart keep the cache)
_NO_CACHE_WITH_LABELS = re.compile(r"if labels is not None:[^\n]*\n(?:[^\n]*\n){0,3}?[^\n]*use_cache = False")


def apply_fused_loss(model, *, accuracy: TokenAccuracy | None = None, backend: str = "auto") -> TokenAccuracy:
    """Make ``model``'s LM loss pyseqpack's fused cross-entropy; return the :class:`TokenAccuracy` it fills.

    Args:
        model: a transformers ``PreTrainedModel`` with a causal-LM head (``...ForCausalLM``) or a seq2seq-LM head
            (``T5ForConditionalGeneration``, ``BartForConditionalGeneration``, ...). Apply it before wrapping the
            model (DDP, accelerate ``prepare``, PEFT): it changes this instance only.
        accuracy: an existing accumulator to fill (e.g. shared by several models); a new one by default.
        backend: passed to ``pyseqpack.fused_cross_entropy`` (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``).

    Applying it again replaces the previous installation. Raises ``TypeError`` for a model whose loss is not a
    token-level LM cross-entropy pyseqpack knows how to reproduce.
    """
    if getattr(model, "config", None) is None or not hasattr(model, "forward"):
        raise TypeError(f"apply_fused_loss: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    accuracy = TokenAccuracy() if accuracy is None else accuracy
    if not isinstance(accuracy, TokenAccuracy):
        raise TypeError(f"apply_fused_loss: accuracy must be a TokenAccuracy, got {type(accuracy).__name__}")
    remove_fused_loss(model)
    name = type(model).__name__

    source = _forward_source(model)
    if "self.loss_function" in source:
        loss_type = getattr(model, "loss_type", None) or "ForCausalLM"  # transformers' own default
        reference = LOSS_MAPPING.get(loss_type)
        if reference is ForCausalLMLoss:
            shift = True
        elif reference is ForMaskedLMLoss:
            shift = False
        else:
            raise TypeError(
                f"apply_fused_loss: {name} uses loss_type={loss_type!r}, which is not a language-modelling "
                "cross-entropy (expected a ForCausalLM or ForMaskedLM loss)"
            )
        loss = FusedLMLoss(shift=shift, accuracy=accuracy, model=model, backend=backend)
        setattr(loss, _MARK, model.__dict__.get("_loss_function", _NOTHING))
        model.loss_function = loss  # transformers' setter stores it on the instance as _loss_function
        return accuracy

    if (
        getattr(model.config, "is_encoder_decoder", False)
        and hasattr(model, "prepare_decoder_input_ids_from_labels")
        and _DECODER_IDS_FROM_LABELS.search(source)
    ):
        loss = FusedLMLoss(shift=False, accuracy=accuracy, model=model, backend=backend)
        model.forward = _seq2seq_forward(model, loss, no_cache=bool(_NO_CACHE_WITH_LABELS.search(source)))
        return accuracy

    raise TypeError(
        f"apply_fused_loss: {name} is not supported: its forward does not call self.loss_function, and it is not an "
        "encoder-decoder LM whose forward builds decoder_input_ids from the labels with "
        "prepare_decoder_input_ids_from_labels, so pyseqpack cannot reproduce its loss"
    )


def _seq2seq_forward(model, loss: FusedLMLoss, no_cache: bool):
    """Wrap ``model.forward`` of an encoder-decoder whose loss is ``CrossEntropyLoss()(logits.view(-1, V),
    labels.view(-1))`` (mean over labels != -100, no shift: the decoder inputs are already shifted right).
    ``no_cache``: the model turns its KV cache off when given labels; the wrapper does the same for it."""
    original = model.forward  # the bound method, or a forward already patched on this instance (which it keeps)
    model_ref = weakref.ref(model)

    # functools.wraps keeps the signature: Trainer inspects it for **kwargs, generate() for the accepted kwargs
    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            # the model would do exactly this itself when given labels (T5: _shift_right; BART: shift_tokens_right)
            kwargs["decoder_input_ids"] = model_ref().prepare_decoder_input_ids_from_labels(labels)
        if no_cache:
            kwargs["use_cache"] = False
        out = original(*args, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out.logits
        value = _score(logits, labels, shift=False, num_items_in_batch=None, ignore_index=-100,
                       backend=loss.backend, accuracy=loss.accuracy, mode=loss._mode())
        if isinstance(out, tuple):  # return_dict=False: the loss leads the tuple, as the model would put it
            return (value,) + out
        return type(out)(**{**out, "loss": value})

    setattr(forward, _MARK, model.__dict__.get("forward", _NOTHING))
    return forward


def remove_fused_loss(model) -> bool:
    """Undo :func:`apply_fused_loss` on ``model``; returns whether anything was installed."""
    removed = False
    for attr in ("_loss_function", "forward"):
        installed = model.__dict__.get(attr)
        if installed is None or not hasattr(installed, _MARK):
            continue
        previous = getattr(installed, _MARK)
        if previous is _NOTHING:
            delattr(model, attr)
        else:
            setattr(model, attr, previous)
        removed = True
    return removed


class TokenAccuracyCallback(TrainerCallback):
    """Adds ``token_accuracy`` (training logs) and ``<prefix>_token_accuracy`` (evaluation logs) to Trainer's logs,
    from the counts the fused loss kept in ``accuracy``: token-weighted over the logging window, every
    micro-batch and every data-parallel rank (``Trainer.log`` runs on every rank, so the all-reduce is collective).

    Trainer calls callbacks in order, and reporting integrations (W&B, TensorBoard, ...) come before the callbacks
    passed to ``Trainer(callbacks=...)``: use :func:`add_token_accuracy_callback` to put this one first so they see
    the value. ``state.log_history`` gets it either way.
    """

    def __init__(self, accuracy: TokenAccuracy, name: str = "token_accuracy"):
        if not isinstance(accuracy, TokenAccuracy):
            raise TypeError(f"TokenAccuracyCallback: accuracy must be a TokenAccuracy, got {type(accuracy).__name__}")
        self.accuracy = accuracy
        self.name = name

    def on_train_begin(self, args, state, control, **kwargs):
        # counts from forwards run before training (a sanity check, a warm-up) are not part of any logging window
        self.accuracy.reset("train")

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        # predict() logs nothing; its counts must not leak into the next evaluate()
        self.accuracy.reset("eval")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            key, mode = self.name, "train"
        else:
            # evaluate() logs "<prefix>_loss" next to "<prefix>_runtime" (prefix "eval", "eval_<name>", "test");
            # the end-of-training summary has the same shape with the prefix "train", and is no evaluation
            prefixes = [k[: -len("_loss")] for k in logs
                        if k.endswith("_loss") and k[: -len("_loss")] + "_runtime" in logs and k != "train_loss"]
            if not prefixes:
                return
            key, mode = f"{prefixes[0]}_{self.name}", "eval"
        value = self.accuracy.compute(mode)
        if value is None:
            return
        logs[key] = value
        # Trainer.log appended a copy of these logs to log_history just before calling on_log
        if state.log_history:
            state.log_history[-1][key] = value


def add_token_accuracy_callback(trainer, accuracy: TokenAccuracy, name: str = "token_accuracy"):
    """Put a :class:`TokenAccuracyCallback` first in ``trainer``'s callbacks (so reporting integrations log the
    value too) and return it."""
    callback = TokenAccuracyCallback(accuracy, name=name)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
