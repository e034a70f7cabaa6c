"""The torch backend of the fused cross-entropy: the reference every other backend is tested against, and the
path CPU tensors take.

It implements the launcher contract of the native backends (``fwd_bwd`` / ``scale_grad_``, documented on
``pyseqpack.kernels.cross_entropy``) with torch operations, CHUNK_BYTES of fp32 rows at a time, so no fp32 copy
of the whole logits is ever held. Math: docs/semantics.md, "Cross-entropy, as pyseqpack defines it".
"""
from __future__ import annotations

import torch

__all__ = ["fwd_bwd", "scale_grad_", "CHUNK_BYTES", "DEVICE_CHUNK_BYTES"]

# Bytes of logits rows upcast to fp32 at a time (the temporaries of a chunk are about three times that): memory
# stays bounded whatever N is, and a chunk is large enough that the fixed cost of each op (a parallel region on
# the CPU, a launch on a GPU) stays small against its work. On the CPU a chunk's temporaries also stay below
# glibc's largest mmap threshold (32 MB): a larger block is a fresh mapping on every call, whose page faults
# touch every page again, a cost the math does not have.
CHUNK_BYTES = 4 << 20  # CPU
DEVICE_CHUNK_BYTES = 32 << 20  # CUDA and other devices: a caching allocator reuses its blocks, no such cost


def fwd_bwd(
    logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap,
    class_weight=None,
):
    """Per-row loss, lse, accuracy (``correct``; None: loss only) and the scaled gradient (``grad``; None:
    forward only), in chunks of CHUNK_BYTES of fp32 rows.

    The launcher contract every backend implements (arguments as on ``pyseqpack.kernels.cross_entropy.fwd_bwd``),
    plus ``class_weight`` ([V] float, or None): torch's weighted formula, which only this backend implements; the
    ``cross_entropy`` drop-in needs it when class weights meet label smoothing:
        loss = (1 - eps) * w[y] * (lse - x[y]) + eps / V * sum_c w[c] * (lse - x[c])
        d/dx = (1 - eps) * w[y] * (p - onehot(y)) + eps / V * (sum(w) * p - w)
    Each chunk is upcast once; its gradient is written only after everything it needs was computed, so
    ``grad is logits`` is safe. Full passes per chunk: the fp32 upcast (bf16 / fp16 logits), argmax, softmax
    (torch's fused kernel, written straight into an fp32 gradient), one scale in place, and the conversion
    into a bf16 / fp16 gradient; the rest are per-row gathers. Few large ops rather than many small ones: each
    op on the CPU starts a parallel region, a fixed cost that small chunks would pay many times.
    """
    n, v = logits.shape
    eps, z = float(label_smoothing), float(z_loss)
    cap = float(softcap) if softcap is not None and softcap > 0 else None
    chunk = CHUNK_BYTES if logits.device.type == "cpu" else DEVICE_CHUNK_BYTES
    rows = max(1, chunk // (4 * max(v, 1)))  # `chunk` bytes of fp32 rows per chunk
    w = w_sum = None
    if class_weight is not None:
        w = class_weight.to(torch.float32)
        w_sum = w.sum()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = logits[r0:r1].float()  # for fp32 logits this aliases them: x is only read
        if cap is not None:
            t = torch.tanh(x / cap)
            x = t * cap
        y = labels[r0:r1].long()
        valid = (y != ignore_index) & (y >= 0) & (y < v)
        y0 = torch.where(valid, y, 0)
        # The first index of the max, the exact lse anchor below: computed in loss-only mode too (an exact anchor
        # needs a reduction over x either way), so there the torch backend skips only the accuracy compare/store.
        arg = x.argmax(dim=-1)
        out = grad[r0:r1] if grad is not None else None
        # p = softmax(x), into the fp32 gradient's memory when there is one (x is read by nothing after it but
        # the row gathers below, done first when x aliases that memory).
        x_arg = x.gather(1, arg[:, None])[:, 0]
        x_y = x.gather(1, y0[:, None])[:, 0]
        mean_x = x.mean(-1) if eps != 0 and w is None else None
        x_w = x @ w if w is not None and eps != 0 else None
        fp32_out = out is not None and out.dtype == torch.float32
        p = torch.softmax(x, dim=-1, out=out) if fp32_out else torch.softmax(x, dim=-1)
        # lse = x_j - log p_j for any j; at the argmax p_j >= 1 / V, so the log is exact even where the row holds
        # -inf or tiny probabilities (nll = lse - x_y never takes the log of an underflowed p_y)
        lse_c = x_arg - torch.log(p.gather(1, arg[:, None])[:, 0])
        # A row of -inf only has a NaN softmax: its lse is -inf (as the kernels give), and an ignored one gets
        # exact zeros below (a valid one stays NaN, as in torch). Rows with any finite logit are untouched.
        dead = x_arg == float("-inf")
        lse_c = torch.where(dead, x_arg, lse_c)
        nll = lse_c - x_y
        if w is None:
            row_loss = nll if eps == 0 else (1 - eps) * nll + eps * (lse_c - mean_x)
        else:
            w_y = w[y0]
            row_loss = (1 - eps) * w_y * nll + ((eps / v) * (w_sum * lse_c - x_w) if eps != 0 else 0.0)
        if z != 0:
            row_loss = row_loss + z * lse_c * lse_c
        loss[r0:r1] = torch.where(valid, row_loss, 0.0)
        lse[r0:r1] = lse_c
        if correct is not None:
            correct[r0:r1] = (valid & (arg == y)).to(torch.int32)
        if grad is None:
            continue
        # g = p * a - b - hot * onehot(y) (- eps / V * w with class weights), per row:
        #   a = 1 + 2 z lse (unweighted) or (1 - eps) w[y] + eps / V * sum(w) + 2 z lse,  b = eps / V or 0,
        #   hot = 1 - eps or (1 - eps) w[y]; everything times grad_scale, and 0 on ignored rows.
        scale = torch.where(valid, grad_scale, 0.0)  # exact zeros for ignored rows, whatever grad_scale is
        a = 1 + 2 * z * lse_c if w is None else (1 - eps) * w_y + (eps / v) * w_sum + 2 * z * lse_c
        hot = torch.full_like(lse_c, 1 - eps) if w is None else (1 - eps) * w_y
        coef = torch.where(valid, a * grad_scale, 0.0)[:, None]  # not a * scale: a is NaN on a row of -inf
        if logits.device.type != "cpu" or bool(dead.any()):  # on CPU the check is free; elsewhere no sync
            p.masked_fill_((dead & ~valid)[:, None], 0.0)
        g = p.mul_(coef)
        if eps != 0:
            g -= (eps / v) * scale[:, None] if w is None else (eps / v) * scale[:, None] * w
        g.scatter_add_(1, y0[:, None], -(hot * scale)[:, None])
        if cap is not None:
            g *= t.square_().neg_().add_(1)  # the softcap chain factor 1 - tanh^2, in t's memory
        if g is not out:
            out.copy_(g)


def scale_grad_(grad, grad_output):
    """grad *= grad_output (1 element, or one per row), the contract of ``scale_grad_`` in plain torch."""
    f = grad_output.reshape(-1)
    if grad.device.type == "cpu" and bool((f == 1).all()):
        return  # a CPU "sync" is free; on other devices we multiply rather than ask the host
    grad.mul_(f[:, None] if f.numel() > 1 else f)
