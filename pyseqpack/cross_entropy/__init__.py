"""Fused cross-entropy: loss, gradient and token-accuracy counts from one pass over the logits.

Semantics: docs/semantics.md, "Cross-entropy, as pyseqpack defines it".

Public API
----------
* ``fused_cross_entropy(logits, labels, ...) -> CrossEntropyOutput(loss, num_correct, num_tokens, accuracy)``:
  pyseqpack's own op (ignore_index, label smoothing, z-loss, softcap, shift, transformers' num_items_in_batch),
  with token accuracy computed in the same kernel (TRL's ``mean_token_accuracy`` without the extra argmax pass).
* ``cross_entropy(input, target, weight=None, ...)``: drop-in for ``torch.nn.functional.cross_entropy`` on
  [N, C] inputs with class-index targets (class weights and label smoothing included, NaN for a mean over zero
  valid targets, as torch). Anything else goes to torch itself. It returns no accuracy, so it runs the kernels'
  loss-only variant (no argmax).

For a row x of V logits in fp32 and label y:
    x <- softcap * tanh(x / softcap)                         (when softcap is given)
    lse = log(sum(exp(x)))
    loss = (1 - eps) * (lse - x[y]) + eps * (lse - mean(x)) + z * lse^2     (eps = label_smoothing, z = z_loss)
A label equal to ignore_index counts for nothing (loss 0, gradient 0, not counted). Reductions: "mean" = sum /
number of valid tokens (0 when there are none, with a zero gradient), "sum", "none" (shaped like labels);
``num_items_in_batch`` = sum / that count. Accuracy: argmax(x) == y over valid tokens, ties to the first index.

How it runs
-----------
The gradient is computed in the forward, by the same kernel that computes the loss (the row was just read, so
the second sweep that writes the gradient mostly hits L2 on a GPU). ``grad_scale`` (1/num_valid, ...) is a
device tensor read by the kernel: nothing here syncs with the host (on a GPU the eager-mode label range check
is a device-side assert; only an explicit ``check_labels=True`` syncs), so a training step can be captured in a
CUDA graph. backward() then only multiplies the saved gradient by the incoming grad_output, in place, and skips
even that on the device when the factor is exactly 1.0 (the usual ``loss.backward()``).

Backends (one launcher module each, same ``fwd_bwd`` / ``scale_grad_`` signature), chosen by ``DISPATCH``
(pyseqpack/_dispatch.py) inside the torch.library ops:
* "cuda"   ``pyseqpack.cross_entropy.cuda`` (csrc/cross_entropy.cu; needs the library built with nvcc)
* "triton" ``pyseqpack.cross_entropy.triton`` (the kernels of ``pyseqpack.kernels.cross_entropy``; CUDA tensors,
           and CPU tensors under TRITON_INTERPRET=1)
* "torch"  ``pyseqpack.cross_entropy.reference``, the reference and the CPU path, in chunks of rows so that no
           fp32 copy of the whole logits is ever held
* "auto"   CUDA tensor: cuda if built, else triton, else torch (also on a launch failure); CPU tensor: torch.

The ops ``pyseqpack::cross_entropy_fwd_bwd`` (writes the gradient into a buffer it is given),
``pyseqpack::cross_entropy_fwd_bwd_inplace`` (writes the gradient into the logits) and
``pyseqpack::cross_entropy_scale_grad_`` have fake implementations, and their autograd is an autograd.Function
(``_CrossEntropyFunction``), so ``torch.compile(fullgraph=True)`` traces through ``fused_cross_entropy`` and
``cross_entropy`` without a graph break.
"""
from __future__ import annotations

import importlib
import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _native
from .._dispatch import Dispatcher
from . import reference

__all__ = ["CrossEntropyOutput", "fused_cross_entropy", "cross_entropy"]

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LABEL_DTYPES = (torch.int64, torch.int32)
_REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyOutput(NamedTuple):
    """Result of ``fused_cross_entropy``; every field is a tensor on the logits' device (no host sync).

    loss         float32: scalar for reduction "mean"/"sum", shaped like labels for "none"
    num_correct  int64 scalar: valid tokens whose argmax equals the label
    num_tokens   int64 scalar: valid tokens (label != ignore_index)
    accuracy     float32 scalar: num_correct / num_tokens, 0 when num_tokens == 0
    """

    loss: Tensor
    num_correct: Tensor
    num_tokens: Tensor
    accuracy: Tensor


def _label_checks_default() -> bool:
    return os.environ.get("PYSEQPACK_CHECK_LABELS", "1").strip().lower() not in ("0", "false", "off", "no")


# ---------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------


def _load_torch(device):
    return reference


def _load_triton(device):
    _native.require_triton(device)
    return importlib.import_module(".triton", __name__)


def _load_cuda(device):
    _native.cuda_library()  # BackendUnavailable saying why the library is missing
    if device.type != "cuda":
        raise _native.BackendUnavailable(f'backend "cuda" needs CUDA tensors, got logits on {device}')
    return importlib.import_module(".cuda", __name__)


def _dispatcher(auto) -> Dispatcher:
    """A Dispatcher with this op's backends registered and the given "auto" preference order per device type."""
    dispatch = Dispatcher("cross_entropy", auto=auto)
    dispatch.register("cuda", _load_cuda)
    dispatch.register("triton", _load_triton)
    dispatch.register("torch", _load_torch)
    return dispatch


# Backend choice of every call (the reference runs CPU tensors under "auto").
DISPATCH = _dispatcher({"cuda": ("cuda", "triton")})


def _row_views(t: Tensor, row0: int = 0) -> list:
    """(first row, [rows, V] view) pieces covering ``t`` [..., V] in row-major order, without copying.

    One piece when the leading dims merge into a single row stride (any contiguous tensor, or a slice
    ``big[:, :V]``); otherwise (e.g. ``logits[:, :-1]`` of a [B, T, V] tensor) one piece per index of the
    leading dims that do not merge, each a launch over uniformly strided rows.
    """
    v = t.shape[-1]
    if t.dim() == 1:
        return [(row0, t.unsqueeze(0))]
    try:
        return [(row0, t.view(-1, v))]
    except RuntimeError:
        pieces, per = [], math.prod(t.shape[1:-1])
        for i in range(t.shape[0]):
            pieces += _row_views(t[i], row0 + i * per)
        return pieces


def _run(logits, labels, grad, grad_scale, row_weight, class_weight, ignore_index, label_smoothing, z_loss,
         softcap, with_accuracy, backend):
    """Fill per-row loss (scaled by grad_scale and row_weight), lse, correct, and ``grad`` when given.

    ``with_accuracy`` False: the kernels run without the argmax and ``correct`` is an empty int32 tensor."""
    n, v = labels.numel(), logits.shape[-1]
    dev = logits.device
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    correct = torch.empty(n if with_accuracy else 0, dtype=torch.int32, device=dev)
    flat_labels = labels.reshape(-1).contiguous()
    pieces = _row_views(logits)
    # a separate gradient buffer is contiguous (checked by the op): its rows line up with the logits' pieces
    grad2d = None if grad is None or grad is logits else grad.view(-1, v)
    scale = grad_scale.reshape(1).to(torch.float32)
    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)

    def run(name, launcher):
        for r0, x2 in pieces:
            r1 = r0 + x2.shape[0]
            g2 = x2 if grad is logits else (None if grad2d is None else grad2d[r0:r1])
            launcher.fwd_bwd(x2, flat_labels[r0:r1], loss[r0:r1], lse[r0:r1],
                             correct[r0:r1] if with_accuracy else None, g2, scale, **opts)

    if class_weight is None:
        DISPATCH.run(backend, dev, run)
    else:
        opts["class_weight"] = class_weight  # torch's weighted smoothing term: only the reference has it
        run("torch", reference)
    loss = loss * scale
    if row_weight is not None:
        loss = loss * row_weight.reshape(-1)
    return loss, lse, correct


# ---------------------------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------------------------


# The three ops are kernels: they compute, and write only the tensors their schema declares as mutated. The
# gradient lives in a buffer that the op fills in the forward and backward scales in place, so it is an input
# of the op (mutated), never an output: an output that a later backward changes is no function of the op's
# inputs, and AOTAutograd could not give the forward graph such an output. Autograd is _CrossEntropyFunction
# below, which torch.compile traces like any autograd.Function.


@torch.library.custom_op("pyseqpack::cross_entropy_fwd_bwd", mutates_args=("grad",))
def _fwd_bwd_op(
    logits: Tensor,
    labels: Tensor,
    grad_scale: Tensor,
    row_weight: Optional[Tensor],
    class_weight: Optional[Tensor],
    grad: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    with_accuracy: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, lse and correct, and the gradient of the loss w.r.t. the logits written into ``grad``.

    logits [..., V] fp32/bf16/fp16 (stride(-1) == 1), labels [...] int64/int32, grad_scale [1] fp32 (device),
    row_weight [...] fp32 or None (per-row factor: class weights of the targets), class_weight [V] or None
    (reference backend), grad (logits' shape and dtype, contiguous) or None (forward only): receives
    grad_scale * d loss_i / d logits, *without* row_weight, which backward applies. Returns loss [N] fp32 =
    grad_scale * row_weight * per-row loss, lse [N] fp32, correct [N] int32 (with_accuracy; without it the
    kernels skip the argmax and correct is an empty [0] int32 tensor: same schema, and its sum is still 0).
    loss, lse and grad do not depend on with_accuracy.
    """
    if grad is not None:
        if grad.shape != logits.shape or grad.dtype != logits.dtype or grad.device != logits.device \
                or not grad.is_contiguous():
            raise ValueError(
                f"grad must be a contiguous {logits.dtype} tensor of the logits' shape {tuple(logits.shape)} on "
                f"{logits.device}, got {grad.dtype} {tuple(grad.shape)} on {grad.device} with strides {grad.stride()}")
        if logits.numel() and grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            raise ValueError("grad shares memory with logits: use cross_entropy_fwd_bwd_inplace for that")
    return _run(logits, labels, grad, grad_scale, row_weight, class_weight, ignore_index, label_smoothing, z_loss,
                softcap, with_accuracy, backend)


def _fake_rows(logits, labels, with_accuracy):
    """Fake (loss, lse, correct) of both ops: correct is [0] without accuracy."""
    n = labels.numel()
    return (
        logits.new_empty(n, dtype=torch.float32),
        logits.new_empty(n, dtype=torch.float32),
        logits.new_empty(n if with_accuracy else 0, dtype=torch.int32),
    )


@_fwd_bwd_op.register_fake
def _(logits, labels, grad_scale, row_weight, class_weight, grad, ignore_index, label_smoothing, z_loss, softcap,
      with_accuracy, backend):
    return _fake_rows(logits, labels, with_accuracy)


@torch.library.custom_op("pyseqpack::cross_entropy_fwd_bwd_inplace", mutates_args=("logits",))
def _fwd_bwd_inplace_op(
    logits: Tensor,
    labels: Tensor,
    grad_scale: Tensor,
    row_weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    with_accuracy: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """As cross_entropy_fwd_bwd, but the gradient overwrites ``logits`` (each row is read before it is written).
    The dispatcher bumps the logits' version counter, so autograd refuses a backward through anything else that
    saved them. Checked here, not in _validate, so that it also holds under torch.compile (metadata only)."""
    if _may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True: logits overlap in memory (an expanded or as_strided tensor, shape "
            f"{tuple(logits.shape)}, strides {tuple(logits.stride())}), so they cannot hold a gradient per "
            "element. Use inplace_backward=False, or contiguous logits"
        )
    return _run(logits, labels, logits, grad_scale, row_weight, None, ignore_index, label_smoothing, z_loss,
                softcap, with_accuracy, backend)


@_fwd_bwd_inplace_op.register_fake
def _(logits, labels, grad_scale, row_weight, ignore_index, label_smoothing, z_loss, softcap, with_accuracy,
      backend):
    return _fake_rows(logits, labels, with_accuracy)


@torch.library.custom_op("pyseqpack::cross_entropy_scale_grad_", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_output: Tensor, backend: str) -> None:
    """grad [..., V] *= grad_output ([...] or 1 element, any float dtype), in place; rows whose factor is
    exactly 1.0 are skipped on the device."""
    f = grad_output.reshape(-1)
    if f.numel() > 1 and f.stride(0) == 0:
        f = f[:1]  # the expanded ones of sum()'s backward: one scalar, not N copies
    f = f.to(torch.float32).contiguous()

    def run(name, launcher):
        for r0, g2 in _row_views(grad):
            launcher.scale_grad_(g2, f if f.numel() == 1 else f[r0:r0 + g2.shape[0]])

    DISPATCH.run(backend, grad.device, run)


@_scale_grad_op.register_fake
def _(grad, grad_output, backend):
    return None


class _CrossEntropyFunction(torch.autograd.Function):
    """Autograd of the fused loss: the forward computes the gradient (into a new buffer, or into the logits with
    ``inplace``), backward scales it by grad_output (and the per-row weights) in place and hands it over.

    The in-place scaling bumps the gradient's version, so a second backward through the same graph
    (retain_graph=True) raises instead of scaling it twice. Under torch.compile, functionalization turns it into
    a copy of the saved gradient and a scaling of the copy (one extra read and write of it, in the same memory);
    eager mode has none.
    """

    @staticmethod
    def forward(ctx, logits, labels, grad_scale, row_weight, class_weight, ignore_index, label_smoothing, z_loss,
                softcap, inplace, with_accuracy, backend):
        options = (ignore_index, label_smoothing, z_loss, softcap, with_accuracy, backend)
        if inplace:
            loss, lse, correct = torch.ops.pyseqpack.cross_entropy_fwd_bwd_inplace(
                logits, labels, grad_scale, row_weight, *options)
            grad = logits  # the logits now hold the gradient
        else:
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            loss, lse, correct = torch.ops.pyseqpack.cross_entropy_fwd_bwd(
                logits, labels, grad_scale, row_weight, class_weight, grad, *options)
        ctx.backend = backend
        ctx.save_for_backward(grad, row_weight)
        ctx.mark_non_differentiable(lse, correct)
        # Without this, autograd would hand backward materialized zeros for the lse and correct outputs.
        ctx.set_materialize_grads(False)
        return loss, lse, correct

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_correct):
        if g_loss is None:
            return (None,) * 12
        grad, row_weight = ctx.saved_tensors
        factor = g_loss if row_weight is None else g_loss * row_weight.reshape(g_loss.shape)
        torch.ops.pyseqpack.cross_entropy_scale_grad_(grad, factor, ctx.backend)
        return (grad,) + (None,) * 11


def _rows(logits, labels, grad_scale, row_weight, class_weight, ignore_index, label_smoothing, z_loss, softcap,
          inplace, with_accuracy, backend):
    """(loss, lse, correct) per row, differentiable w.r.t. the logits when grad mode needs it (the gradient is
    then computed in the same pass); the forward-only kernels otherwise."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return _CrossEntropyFunction.apply(logits, labels, grad_scale, row_weight, class_weight, ignore_index,
                                           label_smoothing, z_loss, softcap, inplace, with_accuracy, backend)
    return torch.ops.pyseqpack.cross_entropy_fwd_bwd(logits, labels, grad_scale, row_weight, class_weight, None,
                                                     ignore_index, label_smoothing, z_loss, softcap, with_accuracy,
                                                     backend)


# ---------------------------------------------------------------------------------------------------------------
# Validation (eager mode only: under torch.compile / CUDA-graph capture the checks are skipped)
# ---------------------------------------------------------------------------------------------------------------


def _eager() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_label_range(labels: Tensor, v: int, ignore_index: int, name: str, exc=ValueError,
                       how_to_skip="pass check_labels=False or set PYSEQPACK_CHECK_LABELS=0",
                       sync: bool = False) -> None:
    """Labels outside [0, V) that are not ignore_index (eager mode only).

    On the CPU, or with sync=True (``check_labels=True``), a host-side check raises `exc` naming the first bad
    position. On a GPU by default the check stays on the device (``torch._assert_async``, no host sync, as
    torch's own cross_entropy): a bad label fails the step with a device-side assert instead.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
    if labels.device.type != "cpu" and not sync:
        torch._assert_async(
            ~bad.any(), f"{name}: a class index is outside [0, {v}) and is not ignore_index={ignore_index}"
        )
        return
    if bool(bad.any()):
        pos = tuple(int(i) for i in torch.nonzero(bad)[0])
        where = f"{name}[{', '.join(map(str, pos))}]" if pos else name
        raise exc(
            f"{where} = {int(labels[pos])} is out of range: class indices must be in [0, {v}) (the size of the "
            f"last dim of the logits) or equal ignore_index={ignore_index}. This check syncs with the host; to "
            f"skip it, {how_to_skip} (out-of-range labels then count as ignored)."
        )


def validate_options(ignore_index, reduction, label_smoothing, z_loss, softcap, backend) -> None:
    """The non-tensor options of ``fused_cross_entropy`` (also checked once by ``nn.FusedCrossEntropyLoss``)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    DISPATCH._check_name(backend)  # ValueError naming the registered backends


def _validate(logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, shift,
              num_items_in_batch, inplace_backward, backend):
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dtype not in _LABEL_DTYPES:
        raise TypeError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of logits without the last (class) dim: logits {tuple(logits.shape)} "
            f"-> labels {tuple(logits.shape[:-1])}, got labels {tuple(labels.shape)}"
        )
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        raise ValueError(
            f"logits must have stride(-1) == 1 (classes contiguous in memory), got strides {tuple(logits.stride())};"
            " pass logits.contiguous() (a copy) or produce them class-contiguous"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}: put them on the same device")
    validate_options(ignore_index, reduction, label_smoothing, z_loss, softcap, backend)
    if shift and labels.dim() < 1:
        raise ValueError("shift=True needs labels with a sequence dim ([..., T]) and logits [..., T, V]")
    if num_items_in_batch is not None:
        if reduction == "none":
            raise ValueError('num_items_in_batch divides the summed loss: use reduction "sum" or "mean", not "none"')
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a 1-element tensor, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise TypeError(f"num_items_in_batch must be an int, a 1-element tensor or None, "
                            f"got {type(num_items_in_batch).__name__}")
        elif not num_items_in_batch > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
    if backend != "auto":
        DISPATCH.launcher(backend, logits.device)  # raises BackendUnavailable with the reason
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        if logits.is_leaf:
            raise ValueError(
                "inplace_backward=True: logits is a leaf tensor that requires grad; its gradient would overwrite "
                "its own values (and alias its .grad). Use it on logits computed by the model (e.g. lm_head output)"
            )
        if logits._is_view() and logits._base.is_leaf and logits._base.requires_grad:
            raise ValueError(
                "inplace_backward=True: logits is a view of a leaf tensor that requires grad; writing the gradient "
                "into it would overwrite that leaf. Use inplace_backward=False"
            )


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of `t` may share memory: False is certain. The dims of more than one element, by
    increasing stride, must each step past everything the smaller ones span (stride_k > sum_j<k (size_j - 1) *
    stride_j); every view of one tensor's own memory made by slicing, transposing or reshaping passes, while
    expand (stride 0) and as_strided rows that overlap (0 < row stride < V) fail. Metadata only."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _shift_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """labels[..., t + 1] at position t, ignore_index at the last position. A new (small) tensor: the
    caller's labels are not modified, and the logits are not touched."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _num_items_scale(num_items_in_batch, device) -> Tensor:
    if isinstance(num_items_in_batch, Tensor):
        return (1.0 / num_items_in_batch.to(device=device, dtype=torch.float32)).reshape(1)
    return torch.full((1,), 1.0 / num_items_in_batch, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def fused_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    shift: bool = False,
    num_items_in_batch=None,
    inplace_backward: bool = False,
    backend: str = "auto",
    check_labels: Optional[bool] = None,
) -> CrossEntropyOutput:
    """Cross-entropy loss, its gradient and token-accuracy counts from one fused pass over the logits.

    Semantics: docs/semantics.md, "Cross-entropy, as pyseqpack defines it".

    Args:
        logits: [..., V] float32/bfloat16/float16, stride(-1) == 1, any other strides. Never copied (not with
            ``shift=True`` either: the labels are shifted instead).
        labels: [...] (logits' shape without V) int64 or int32 class indices; ``ignore_index`` marks tokens that
            count for nothing.
        ignore_index: label value to ignore (-100, as transformers / torch).
        reduction: "mean" (over valid tokens; 0 with a zero gradient when there are none), "sum", or "none"
            (float32, shaped like labels).
        label_smoothing: eps in [0, 1], torch's definition: (1 - eps) * nll + eps * (lse - mean(x)).
        z_loss: coefficient z >= 0 of z * lse^2 per valid token (PaLM's auxiliary loss).
        softcap: c > 0 applies x <- c * tanh(x / c) first (Gemma 2 final-logit softcapping), or None.
        shift: score position t against label t + 1 (causal LM with unshifted labels); the last position of
            each sequence counts for nothing.
        num_items_in_batch: divide the summed loss by this (Python number or 1-element tensor, read on the device)
            instead of by the local count: transformers' gradient-accumulation rule.
        inplace_backward: write the gradient into the logits' memory instead of a new buffer: saves N x V
            elements. *** DANGER ***: after this call ``logits`` hold the gradient, not the logits. Anything else
            that reads them later gets gradients. The kernel's store is invisible to autograd, so pyseqpack bumps
            the logits' version counter through the op: an autograd node that saved the logits (or a view of
            them) then fails at backward with "modified by an inplace operation" instead of silently using
            gradients; code that keeps its own reference outside autograd (a logging hook, a cache) is NOT
            protected. Refused for leaf tensors, views of leaves, and overlapping (expanded) logits. Only has an
            effect when a gradient is computed (grad enabled and logits.requires_grad).
        backend: "auto", "cuda", "triton" or "torch" (see the docstring of pyseqpack/cross_entropy/__init__.py).
        check_labels: validate in eager mode that every label is in [0, V) or ignore_index. None (default):
            on unless the environment sets PYSEQPACK_CHECK_LABELS=0; on CPU tensors it raises ValueError naming
            the position, on a GPU it is a device-side assert (no host sync). True: the host-side check with the
            message on any device (one host sync). Skipped under torch.compile and CUDA
            graph capture; unchecked out-of-range labels are treated as ignored.

    Returns:
        CrossEntropyOutput(loss, num_correct, num_tokens, accuracy): device tensors, no host sync. ``loss`` is
        float32 and differentiable w.r.t. ``logits`` (the gradient has the logits' dtype). backward() can run
        once per forward (the saved gradient is scaled in place).
    """
    eager = _eager()
    if eager:
        _validate(logits, labels, ignore_index, reduction, label_smoothing, z_loss, softcap, shift,
                  num_items_in_batch, inplace_backward, backend)
    v = logits.shape[-1]
    if shift:
        labels = _shift_labels(labels, ignore_index)
    if eager and (_label_checks_default() if check_labels is None else check_labels):
        _check_label_range(labels, v, ignore_index, "labels (after shift)" if shift else "labels",
                           sync=check_labels is True)
    dev = logits.device
    valid = (labels != ignore_index) & (labels >= 0) & (labels < v)
    num_tokens = valid.sum()
    if num_items_in_batch is not None:
        grad_scale = _num_items_scale(num_items_in_batch, dev)
    elif reduction == "mean":
        grad_scale = (1.0 / num_tokens.clamp(min=1).to(torch.float32)).reshape(1)
    else:
        grad_scale = torch.ones(1, dtype=torch.float32, device=dev)
    cap = float(softcap) if softcap is not None else 0.0
    rows, _, correct = _rows(logits, labels, grad_scale, None, None, int(ignore_index), float(label_smoothing),
                             float(z_loss), cap, bool(inplace_backward), True, backend)
    loss = rows.reshape(labels.shape) if reduction == "none" else rows.sum()
    num_correct = correct.sum(dtype=torch.int64)
    accuracy = num_correct.to(torch.float32) / num_tokens.clamp(min=1).to(torch.float32)
    return CrossEntropyOutput(loss, num_correct, num_tokens, accuracy)


def _dropin_supported(input, target, weight, reduction, label_smoothing) -> bool:
    """The [N, C] (or [C]) class-index case that the fused op covers; everything else goes to torch (which
    computes it or raises its own error)."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return False
    if input.dtype not in _LOGIT_DTYPES or target.dtype != torch.int64 or input.device != target.device:
        return False
    if input.dim() not in (1, 2) or target.dim() != input.dim() - 1 or input.shape[-1] < 1:
        return False
    if input.dim() == 2 and (target.shape[0] != input.shape[0] or input.shape[0] == 0):
        return False
    if input.stride(-1) != 1 and input.shape[-1] > 1:
        return False
    if reduction not in _REDUCTIONS or not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing <= 1):
        return False
    if weight is not None and not (
        isinstance(weight, Tensor) and weight.dim() == 1 and weight.shape[0] == input.shape[-1]
        and weight.dtype == input.dtype and weight.device == input.device
    ):
        return False
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return False  # torch's loss is not differentiable w.r.t. the weights: torch raises its own error
    return True


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Drop-in for ``torch.nn.functional.cross_entropy`` (same signature and results), fused.

    Semantics: torch's own (docs/semantics.md, "Cross-entropy, as pyseqpack defines it", last point).

    [N, C] (or [C]) logits with int64 class-index targets run through the fused op: same values (in the
    input's dtype, computed in fp32) and gradients as torch, including class ``weight`` (the mean divides by the
    summed weights of the valid targets), label smoothing (torch's weighted formula when both are given), and NaN
    for a mean over zero valid targets. A ``weight`` that requires grad raises torch's own error (torch's loss
    is not differentiable w.r.t. it). Out-of-range targets raise IndexError in eager mode, as torch does
    (PYSEQPACK_CHECK_LABELS=0 skips that host sync). Every other form (probability targets, [N, C, d1, ...]
    inputs, other dtypes, invalid arguments) is handed to torch itself, which computes it or raises its own
    error.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if not _dropin_supported(input, target, weight, reduction, label_smoothing):
        return F.cross_entropy(input, target, weight, None, ignore_index, None, reduction, label_smoothing)
    squeeze = input.dim() == 1
    x = input.unsqueeze(0) if squeeze else input
    t = target.reshape(1) if squeeze else target
    c = x.shape[-1]
    if _eager() and _label_checks_default():
        _check_label_range(t, c, ignore_index, "target", IndexError, "set PYSEQPACK_CHECK_LABELS=0")
    valid = (t != ignore_index) & (t >= 0) & (t < c)
    row_weight = class_weight = None
    if weight is None:
        denom = valid.sum().to(torch.float32)
    else:
        w_rows = torch.where(valid, weight.gather(0, t.clamp(0, c - 1)).to(torch.float32), 0.0)
        denom = w_rows.sum()
        if label_smoothing > 0:
            class_weight = weight  # torch's weighted smoothing term: torch backend
        else:
            row_weight = w_rows  # a per-row factor on the fused kernel's loss and gradient
    if reduction == "mean":
        grad_scale = (1.0 / denom).reshape(1)  # inf for zero valid targets: NaN loss, as torch
    else:
        grad_scale = torch.ones(1, dtype=torch.float32, device=x.device)
    # with_accuracy=False: torch's function returns no accuracy, so the kernels skip the argmax
    rows, _, _ = _rows(x, t, grad_scale, row_weight, class_weight, int(ignore_index), float(label_smoothing), 0.0,
                       0.0, False, False, "auto")
    if reduction == "none":
        out = rows.reshape(()) if squeeze else rows
    else:
        out = rows.sum()
    return out.to(input.dtype)
