"""Use pyseqpack's fused cross-entropy inside transformers models, with token accuracy for free.

One call swaps the loss of a causal-LM or seq2seq-LM head for ``pyseqpack.fused_cross_entropy``::

    accuracy = apply_fused_loss(model)          # returns a TokenAccuracy
    loss = model(**batch).loss                  # same value and gradient as before
    print(accuracy.train.compute())             # token accuracy of the training steps since the last compute()
    print(accuracy.eval.compute())              # ... of the forwards run in eval mode (model.eval())

``outputs.loss`` keeps the model's own definition: the same shift, the same ``ignore_index``, the same mean, and
``num_items_in_batch`` (transformers' gradient-accumulation rule, ``sum / num_items_in_batch``) wherever the model
honours it. What changes is how it is computed: one fused kernel per row of logits computes the loss and its
gradient together in fp32 registers (no fp32 copy of bf16 logits, which transformers' ``ForCausalLMLoss`` makes;
no log-softmax tensor saved for backward), and the same pass counts the tokens whose argmax equals the label.
Those counts stay on the device (int64 tensors, no host sync) in a :class:`TokenAccuracy`, one window for the
forwards run in training mode and one for those run in eval mode; ``compute()`` is the only sync, once per logging
step, and it all-reduces the *counts* across data-parallel ranks, so the logged accuracy is token-weighted over
every rank and every micro-batch (docs/semantics.md, "Token accuracy as TRL logs it", without the extra argmax
pass; the loss: "Cross-entropy, as pyseqpack defines it").

How the swap is done is decided by ``model.config.model_type``, from the tables below (nothing global in
transformers is patched; everything is undone by :func:`remove_fused_loss`):

* Decoder-only LMs whose ``forward`` routes the loss through ``self.loss_function`` (Llama, Qwen2, Mistral, GPT-2,
  ...: every model type but those of ``_CAUSAL_INLINE_LOSS``), and the encoder-decoders of
  ``_SEQ2SEQ_LOSS_FUNCTION`` (T5Gemma, Moonshine, ...): the instance's ``loss_function`` is set, the override hook
  transformers provides. The model keeps passing ``num_items_in_batch`` and ``shift_labels``.
* The encoder-decoder heads of ``_SEQ2SEQ_INLINE_LOSS``, which compute ``CrossEntropyLoss`` inline (T5, mT5, BART,
  mBART, Marian, Pegasus, ...): the instance's ``forward`` is wrapped. It takes ``labels`` away (pass them by
  keyword, as ``model(**batch)`` does), builds ``decoder_input_ids`` from them exactly as the model would
  (``prepare_decoder_input_ids_from_labels``), runs the model without a loss, and scores its logits. These models
  ignore ``num_items_in_batch`` (their loss is a plain per-batch mean, also under Trainer's gradient accumulation),
  and so does the wrapper.

The fused loss validates label ranges with one host sync per call unless ``PYSEQPACK_CHECK_LABELS=0`` (see
``pyseqpack.fused_cross_entropy``); set it for sync-free training steps.
"""
from __future__ import annotations

import functools
import warnings
import weakref
from typing import NamedTuple

import torch
from transformers import TrainerCallback
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss, ForMaskedLMLoss

__all__ = [
    "TokenAccuracy",
    "AccuracyWindow",
    "FusedLMLoss",
    "apply_fused_loss",
    "remove_fused_loss",
    "TokenAccuracyCallback",
    "add_token_accuracy_callback",
]

_SPLITS = ("train", "eval")
# What apply_fused_loss installs on a model instance carries this attribute, holding what the instance had there
# before (a user's loss_function, TRL's patched forward, ...; _NOTHING when it had nothing): remove_fused_loss
# undoes only pyseqpack's own work and puts that back.
_MARK = "_pyseqpack_replaced"
_NOTHING = object()


class AccuracyWindow:
    """One window of a :class:`TokenAccuracy` (``accuracy.train`` or ``accuracy.eval``): ``num_correct`` and
    ``num_tokens`` as int64 device tensors, summed over every loss call since the last reset.

    ``update`` is two in-place adds on the device (no host sync); ``counts`` and ``compute`` sync once.
    """

    def __init__(self, split: str, owner: "TokenAccuracy"):
        self.split = split
        self._owner = weakref.ref(owner)
        self._counts = None  # [num_correct, num_tokens], or None while empty
        self.calls = 0  # loss calls counted since the last reset (host side, no sync)

    @property
    def empty(self) -> bool:
        """No loss call was counted since the last reset (known on the host: no sync)."""
        return self._counts is None

    def update(self, num_correct: torch.Tensor, num_tokens: torch.Tensor) -> None:
        """Add one loss call's counts (0-d integer tensors, any device). No host sync."""
        for name, value in (("num_correct", num_correct), ("num_tokens", num_tokens)):
            if not torch.is_tensor(value) or value.numel() != 1 or value.is_floating_point():
                raise TypeError(f"TokenAccuracy.update: {name} must be a one-element integer tensor, got {value!r}")
        correct = num_correct.detach().reshape(()).to(torch.int64)
        total = num_tokens.detach().reshape(()).to(device=correct.device, dtype=torch.int64)
        if self._counts is None:
            # clone: the window must never alias a tensor the caller (or the loss output) still owns; and made
            # outside inference mode, so that a window opened under torch.inference_mode() can still be added to
            # (or reset) later outside it
            with torch.inference_mode(False):
                self._counts = [correct.clone(), total.clone()]
        else:
            self._counts[0] += correct.to(self._counts[0].device)
            self._counts[1] += total.to(self._counts[1].device)
        self.calls += 1

    def reset(self) -> None:
        """Forget the counts."""
        self._counts = None
        self.calls = 0

    def counts(self, *, reduce: bool = True) -> tuple[int, int]:
        """``(num_correct, num_tokens)`` as Python ints (one host sync).

        With ``reduce=True`` and an initialized ``torch.distributed`` group of more than one rank, the counts are
        summed over all ranks (an all-reduce of one int64 pair: collective, so every rank must call it; a rank
        that saw no tokens contributes zeros). Accelerate and Trainer run on torch.distributed, so this is the
        reduction they would do.
        """
        pair = torch.zeros(2, dtype=torch.int64) if self._counts is None else torch.stack(self._counts)
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

    def compute(self, *, reduce: bool = True, reset: bool = True) -> float | None:
        """Token-weighted accuracy ``num_correct / num_tokens`` (summed over ranks as in :meth:`counts`), None
        when no token was counted; then the window is reset unless ``reset=False``.

        An empty window whose sibling holds counts warns, naming the sibling: the loss counts into the window of
        the mode the model was in (``model.train()`` / ``model.eval()``) during its forwards."""
        if self.empty:
            owner = self._owner()
            other = None if owner is None else owner.window(_SPLITS[1 - _SPLITS.index(self.split)])
            if other is not None and not other.empty:
                warnings.warn(
                    f"TokenAccuracy: the {self.split!r} window is empty, but the {other.split!r} window holds the "
                    f"counts of {other.calls} loss call(s): the model was in {other.split} mode "
                    f"(model.{other.split}()) during those forwards. Read them with "
                    f"accuracy.{other.split}.compute() or accuracy.compute({other.split!r})", UserWarning,
                    stacklevel=3)
        correct, total = self.counts(reduce=reduce)
        if reset:
            self.reset()
        return correct / total if total > 0 else None

    def __repr__(self):
        return f"AccuracyWindow({self.split!r}, " + ("empty)" if self.empty else f"{self.calls} call(s), on device)")


class TokenAccuracy:
    """Token-accuracy counts from the fused loss, kept on the device until asked for.

    Two independent windows, :attr:`train` and :attr:`eval` (each an :class:`AccuracyWindow`); the loss counts
    into the one of the model's mode (``model.training``). Read a window with ``accuracy.train.compute()`` /
    ``accuracy.eval.compute()``, or ``accuracy.compute("train")`` / ``accuracy.compute("eval")``. Asking an empty
    window while the other one holds counts warns and says which one holds them.
    """

    def __init__(self):
        self.train = AccuracyWindow("train", self)
        self.eval = AccuracyWindow("eval", self)

    def window(self, split: str) -> AccuracyWindow:
        """The window named ``split``, ``"train"`` or ``"eval"``."""
        if split not in _SPLITS:
            raise ValueError(f"TokenAccuracy: split must be one of {_SPLITS}, got {split!r}")
        return self.train if split == "train" else self.eval

    def update(self, num_correct: torch.Tensor, num_tokens: torch.Tensor, split: str = "train") -> None:
        """Add one loss call's counts (0-d integer tensors, any device) to the ``split`` window. No host sync."""
        self.window(split).update(num_correct, num_tokens)

    def reset(self, split: str | None = None) -> None:
        """Forget the counts of ``split`` (both windows when None)."""
        for window in (self.train, self.eval) if split is None else (self.window(split),):
            window.reset()

    def counts(self, split: str = "train", *, reduce: bool = True) -> tuple[int, int]:
        """``(num_correct, num_tokens)`` of the ``split`` window: :meth:`AccuracyWindow.counts`."""
        return self.window(split).counts(reduce=reduce)

    def compute(self, split: str = "train", *, reduce: bool = True, reset: bool = True) -> float | None:
        """Accuracy of the ``split`` window, then reset unless ``reset=False``: :meth:`AccuracyWindow.compute`."""
        return self.window(split).compute(reduce=reduce, reset=reset)

    def __repr__(self):
        parts = [f"{w.split}=" + ("empty" if w.empty else f"{w.calls} call(s) on device")
                 for w in (self.train, self.eval)]
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

    def _split(self) -> str:
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
                      ignore_index=ignore_index, backend=self.backend, accuracy=self.accuracy, split=self._split())


def _describe(x) -> str:
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__}"


def _score(logits, targets, *, shift, num_items_in_batch, ignore_index, backend, accuracy, split):
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
    accuracy.update(out.num_correct, out.num_tokens, split=split)
    return loss


class _Seq2SeqHead(NamedTuple):
    head: str  # the class of the head whose forward computes the loss inline
    no_cache: bool  # its forward turns the KV cache off when given labels (the wrapper does the same)


# How each supported model type computes its LM loss, keyed by model.config.model_type (transformers 5.x).
#
# Encoder-decoder LMs whose forward builds decoder_input_ids from the labels (as their
# prepare_decoder_input_ids_from_labels does) and computes CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))
# inline: apply_fused_loss wraps the forward of that head.
_SEQ2SEQ_INLINE_LOSS = {
    "t5": _Seq2SeqHead("T5ForConditionalGeneration", no_cache=False),
    "mt5": _Seq2SeqHead("MT5ForConditionalGeneration", no_cache=False),
    "umt5": _Seq2SeqHead("UMT5ForConditionalGeneration", no_cache=False),
    "longt5": _Seq2SeqHead("LongT5ForConditionalGeneration", no_cache=False),
    "bart": _Seq2SeqHead("BartForConditionalGeneration", no_cache=True),
    "mbart": _Seq2SeqHead("MBartForConditionalGeneration", no_cache=True),
    "plbart": _Seq2SeqHead("PLBartForConditionalGeneration", no_cache=False),
    "mvp": _Seq2SeqHead("MvpForConditionalGeneration", no_cache=True),
    "marian": _Seq2SeqHead("MarianMTModel", no_cache=True),
    "pegasus": _Seq2SeqHead("PegasusForConditionalGeneration", no_cache=True),
    "pegasus_x": _Seq2SeqHead("PegasusXForConditionalGeneration", no_cache=True),
    "bigbird_pegasus": _Seq2SeqHead("BigBirdPegasusForConditionalGeneration", no_cache=True),
    "led": _Seq2SeqHead("LEDForConditionalGeneration", no_cache=True),
    "encoder-decoder": _Seq2SeqHead("EncoderDecoderModel", no_cache=False),
}
# Encoder-decoder LMs whose forward routes its loss through self.loss_function (the instance's loss_function is
# replaced). Every other encoder-decoder is refused: SwitchTransformers and NLLB-MoE add router losses to the
# cross-entropy, ProphetNet scores n-gram streams with its own smoothing, Whisper, FSMT, M2M100, Blenderbot and
# SeamlessM4T build their decoder inputs in ways prepare_decoder_input_ids_from_labels does not reproduce.
_SEQ2SEQ_LOSS_FUNCTION = frozenset({
    "t5gemma", "t5gemma2", "moonshine", "moonshine_streaming", "florence2", "canary", "cohere_asr", "dia",
    "pp_formulanet",
})
# Decoder-only model types whose causal-LM head computes CrossEntropyLoss inline instead of calling
# self.loss_function: refused. Every other decoder-only head whose loss_type is transformers' causal-LM loss
# routes it through self.loss_function.
_CAUSAL_INLINE_LOSS = frozenset({
    "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "cpmant", "gemma4_assistant",
    "gemma4_unified_assistant", "marian", "mbart", "musicgen", "musicgen_melody", "mvp", "pegasus", "plbart",
    "prophetnet", "trocr", "whisper", "xlm", "xlnet",
})


def _lm_shift(model, name: str, model_type: str, masked_ok: bool) -> bool:
    """Whether the model's self.loss_function shifts (a causal-LM loss) or not (ForMaskedLM, only accepted for
    the encoder-decoders of _SEQ2SEQ_LOSS_FUNCTION, whose decoder inputs are already shifted)."""
    loss_type = getattr(model, "loss_type", None) or "ForCausalLM"  # transformers' own default
    reference = LOSS_MAPPING.get(loss_type)
    if reference is ForCausalLMLoss:
        return True
    if reference is ForMaskedLMLoss and masked_ok:
        return False
    raise TypeError(
        f"apply_fused_loss: {name} is not supported (model_type {model_type!r}): its loss_type {loss_type!r} is "
        "not a language-modelling cross-entropy pyseqpack reproduces (expected a causal-LM head, or a "
        "seq2seq-LM head)"
    )


def apply_fused_loss(model, *, accuracy: TokenAccuracy | None = None, backend: str = "auto") -> TokenAccuracy:
    """Make ``model``'s LM loss pyseqpack's fused cross-entropy; return the :class:`TokenAccuracy` it fills.

    Args:
        model: a transformers ``PreTrainedModel`` with a causal-LM head (``...ForCausalLM``, ``GPT2LMHeadModel``,
            ...) or a seq2seq-LM head of a supported model type (``T5ForConditionalGeneration``,
            ``BartForConditionalGeneration``, ...; see ``_SEQ2SEQ_INLINE_LOSS`` and ``_SEQ2SEQ_LOSS_FUNCTION``).
            Apply it before wrapping the model (DDP, accelerate ``prepare``, PEFT): it changes this instance only.
        accuracy: an existing accumulator to fill (e.g. shared by several models); a new one by default.
        backend: passed to ``pyseqpack.fused_cross_entropy`` (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``).

    Applying it again replaces the previous installation. Raises ``TypeError`` naming the model type for a model
    whose loss is not a token-level LM cross-entropy pyseqpack knows how to reproduce.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise TypeError(f"apply_fused_loss: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    accuracy = TokenAccuracy() if accuracy is None else accuracy
    if not isinstance(accuracy, TokenAccuracy):
        raise TypeError(f"apply_fused_loss: accuracy must be a TokenAccuracy, got {type(accuracy).__name__}")
    remove_fused_loss(model)
    name = type(model).__name__
    model_type = getattr(config, "model_type", None)

    seq2seq = _SEQ2SEQ_INLINE_LOSS.get(model_type)
    if seq2seq is not None and any(cls.__name__ == seq2seq.head for cls in type(model).__mro__):
        loss = FusedLMLoss(shift=False, accuracy=accuracy, model=model, backend=backend)
        model.forward = _seq2seq_forward(model, loss, no_cache=seq2seq.no_cache)
        return accuracy

    if getattr(config, "is_encoder_decoder", False):
        if model_type not in _SEQ2SEQ_LOSS_FUNCTION:
            heads = sorted(f"{h.head} ({t})" for t, h in _SEQ2SEQ_INLINE_LOSS.items())
            raise TypeError(
                f"apply_fused_loss: {name} is not supported (model_type {model_type!r}): pyseqpack reproduces the "
                f"loss of these encoder-decoder heads only: {', '.join(heads)}, and of the model types "
                f"{', '.join(sorted(_SEQ2SEQ_LOSS_FUNCTION))}, whose forward calls self.loss_function"
            )
        shift = _lm_shift(model, name, model_type, masked_ok=True)
    elif model_type in _CAUSAL_INLINE_LOSS:
        raise TypeError(
            f"apply_fused_loss: {name} is not supported (model_type {model_type!r}): its forward computes "
            "CrossEntropyLoss itself instead of calling self.loss_function, so pyseqpack cannot replace it"
        )
    else:
        shift = _lm_shift(model, name, model_type, masked_ok=False)
    loss = FusedLMLoss(shift=shift, accuracy=accuracy, model=model, backend=backend)
    setattr(loss, _MARK, model.__dict__.get("_loss_function", _NOTHING))
    model.loss_function = loss  # transformers' setter stores it on the instance as _loss_function
    return accuracy


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
                       backend=loss.backend, accuracy=loss.accuracy, split=loss._split())
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
        self.accuracy.train.reset()

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        # predict() logs nothing; its counts must not leak into the next evaluate()
        self.accuracy.eval.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            key, window = self.name, self.accuracy.train
        else:
            # evaluate() logs "<prefix>_loss" next to "<prefix>_runtime" (prefix "eval", "eval_<name>", "test");
            # the end-of-training summary has the same shape with the prefix "train", and is no evaluation
            prefixes = [k[: -len("_loss")] for k in logs
                        if k.endswith("_loss") and k[: -len("_loss")] + "_runtime" in logs and k != "train_loss"]
            if not prefixes:
                return
            key, window = f"{prefixes[0]}_{self.name}", self.accuracy.eval
        value = window.compute()
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
