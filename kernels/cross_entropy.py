"""Triton kernels of the fused cross-entropy: loss, lse, accuracy counts and gradient of a row in one launch.

Why a fused kernel
------------------
For logits ``x`` [N, V] (bf16, N = 16384 tokens, V = 151936 vocab: 5 GB) the LM loss is dominated by memory
traffic. torch eager (``log_softmax`` -> ``nll_loss`` -> backward) reads the logits once for the max/sum, writes an
fp32 or bf16 log-prob tensor, reads it back for the gather, and in backward reads it again and writes the
gradient: >= 4 full passes over N*V elements plus a saved N*V tensor. Logging token accuracy (TRL) adds an
``argmax`` pass: one more full read.

This kernel does, per row, in one program:

  sweep 1 (read x once):   online max / sum-exp over V in BLOCK-wide chunks, fp32 accumulators
                           m = running max, s = sum exp(x - m), rescaled by exp(m_old - m_new) when the max
                           grows; the argmax rides along (first index of each chunk's max, kept only when a later
                           chunk's max is strictly larger -> ties go to the first index, as torch.argmax);
                           sum(x) too when label smoothing needs mean(x). lse = m + log(s).
  sweep 2 (read x again,   p = exp(x - lse) and the gradient, written in the logits' dtype, walking the row
   write grad once):       backwards: on a GPU the row (300 KB in bf16 at V = 151936) was just read, so this
                           re-read hits L2 as long as the rows in flight fit there (see fwd_bwd_config), and the
                           chunks read last are the first re-read.

DRAM traffic per row ~ one read of V elements + one write of V elements (+ a few scalars), against >= 4 reads,
>= 2 writes and an fp32 copy for the unfused path. Reading the row only once would need the whole row in
registers / shared memory (quack does that with thread-block clusters); Triton cannot hold 300 KB per program,
so sweep 2 relies on L2.

Costs that are not memory: one exp per element per sweep (exp2 with a pre-scaled argument, i.e. the hardware
ex2.approx), one max-reduction, one sum-reduction and one min-reduction (the argmax) per chunk. Accuracy costs
the min-reduction (and an index compare-select per element) only; ``fwd_bwd(..., correct=None)`` compiles the
kernel without it (HAS_ACC=False), for callers that need no accuracy (the ``cross_entropy`` drop-in).

The contract (shared with the CUDA backend, ``pyseqpack.cross_entropy.cuda``, and the reference,
``pyseqpack.cross_entropy.reference``) is documented on ``fwd_bwd`` and ``scale_grad_``; the math is
docs/semantics.md, "Cross-entropy, as pyseqpack defines it". The kernels run on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (tests). They use only long-stable ``tl`` APIs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fwd_bwd", "scale_grad_", "fwd_bwd_config"]

# exp(a) = 2^(a * log2(e)): exp2 maps to the hardware ex2.approx instruction without the extra range handling.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _tanh(a):
    """tanh from exp2, stable for any fp32 ``a``: e = exp(-2|a|) is in (0, 1], so nothing overflows.

    tanh(|a|) = (1 - e) / (1 + e). Absolute error ~1e-7 (the subtraction 1 - e near a = 0), i.e. a few 1e-6 on
    softcap * tanh(x / softcap) for softcap ~ 30: far inside the fp32 test tolerance, and bf16 inputs carry 4e-3.
    """
    e = tl.exp2(tl.abs(a) * (-2.0 * _LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.0, -t, t)


@triton.jit
def _ce_fwd_bwd_kernel(
    logits_ptr,
    stride_logits,
    labels_ptr,
    loss_ptr,
    lse_ptr,
    correct_ptr,
    grad_ptr,
    stride_grad,
    grad_scale_ptr,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_GRAD: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per row.

    logits_ptr    [N, V] fp32 / bf16 / fp16, row stride ``stride_logits`` (elements), column stride 1
    labels_ptr    [N] int64 or int32
    loss_ptr      [N] fp32 out: unscaled per-row loss, 0 for ignored rows
    lse_ptr       [N] fp32 out: log-sum-exp of the (softcapped) row, for every row
    correct_ptr   [N] int32 out: 1 when the label is valid and argmax == label; unused unless HAS_ACC (then the
                  argmax is not tracked at all)
    grad_ptr      [N, V] logits' dtype out, row stride ``stride_grad`` (may alias logits_ptr); unused unless HAS_GRAD
    grad_scale_ptr [1] fp32: multiplies the gradient (1/num_valid, 1/num_items_in_batch or 1), read on the device
    V             int: number of classes;  ignore_index: int
    label_smoothing, z_loss, softcap: fp32 scalars (the HAS_* flags say which are active)
    """
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 for real N x V: int64 offsets
    x_row = logits_ptr + row * stride_logits
    y = tl.load(labels_ptr + row).to(tl.int64)
    # Out-of-range labels are rejected by the caller in eager mode; here they are treated as ignored so that
    # nothing is ever read out of bounds.
    valid = (y != ignore_index) & (y >= 0) & (y < V)
    # column offsets stay int32 (V < 2^31) so the per-thread index registers are half as many; the int64 row
    # base pointer carries the large offset
    cols0 = tl.arange(0, BLOCK)
    inv_softcap = 1.0 / softcap

    # ---- sweep 1: running max m, running sum s of exp(x - m), first argmax (HAS_ACC), sum of x ----
    m = -float("inf")
    s = 0.0
    sum_x = 0.0
    if HAS_ACC:
        arg = tl.zeros([], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        mask = cols < V
        x = tl.load(x_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            # masked lanes would become -softcap: put them back to -inf so they never win the max
            x = tl.where(mask, softcap * _tanh(x * inv_softcap), -float("inf"))
        blk_max = tl.max(x, axis=0)
        if HAS_ACC:
            # first column of this chunk that holds its max (V as the "none" sentinel)
            blk_arg = tl.min(tl.where(x == blk_max, cols, V), axis=0)
            arg = tl.where(blk_max > m, blk_arg, arg)  # strictly greater: an earlier chunk keeps a tie
        m_new = tl.maximum(m, blk_max)
        # rescale the old sum to the new max. While every x so far is -inf, m_new is -inf too and x - m_new
        # would be NaN: the offset 0 then gives exp2(-inf) = 0 for every term (s stays 0, and lse = -inf for an
        # all -inf row), and the first finite max rescales s = 0 harmlessly.
        off = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp2((m - off) * _LOG2E) + tl.sum(tl.exp2((x - off) * _LOG2E), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            sum_x += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log2(s) * _LN2

    # x[y]: a single scalar load (the row was just read, so it is a cache hit on a GPU)
    y32 = tl.where(valid, y, 0).to(tl.int32)  # in [0, V): int32 like the column offsets
    x_y = tl.load(x_row + y32).to(tl.float32)
    if HAS_SOFTCAP:
        x_y = softcap * _tanh(x_y * inv_softcap)
    loss = lse - x_y
    if HAS_SMOOTHING:
        # (1 - eps) * (lse - x[y]) + eps * (lse - mean(x))
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_x / V)
    if HAS_Z:
        loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if HAS_ACC:
        tl.store(correct_ptr + row, (valid & (arg == y32)).to(tl.int32))

    # ---- sweep 2: gradient ----
    # d loss / d x_j = (1 - eps)(p_j - [j == y]) + eps (p_j - 1/V) + 2 z lse p_j
    #                = p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == y]
    # then times the softcap chain factor d(c tanh(x/c))/dx = 1 - tanh^2, and times grad_scale.
    if HAS_GRAD:
        g_row = grad_ptr + row * stride_grad
        if valid:
            scale = tl.load(grad_scale_ptr)
            p_coef = scale
            if HAS_Z:
                p_coef = scale * (1.0 + 2.0 * z_loss * lse)
            hot = scale * (1.0 - label_smoothing)  # label_smoothing is 0.0 unless HAS_SMOOTHING
            flat = scale * label_smoothing / V
            # last chunk first: those are the columns sweep 1 read most recently, the likeliest still in L2
            n_chunks = tl.cdiv(V, BLOCK)
            for k in range(0, n_chunks):
                cols = (n_chunks - 1 - k) * BLOCK + cols0
                mask = cols < V
                x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x * inv_softcap)
                    x = softcap * t
                p = tl.exp2((x - lse) * _LOG2E)
                g = p * p_coef - tl.where(cols == y32, hot, 0.0)
                if HAS_SMOOTHING:
                    g -= flat
                if HAS_SOFTCAP:
                    g *= 1.0 - t * t
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # ignored row: exact zeros, without reading the logits
            zero = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK):
                cols = start + cols0
                tl.store(g_row + cols, zero, mask=cols < V)


@triton.jit
def _scale_grad_kernel(grad_ptr, stride_grad, factor_ptr, stride_factor, V, BLOCK: tl.constexpr):
    """grad[row, block] *= factor[row]; programs whose factor is exactly 1.0 return without touching grad.

    grid (N, cdiv(V, BLOCK)).  grad_ptr [N, V] fp32/bf16/fp16, row stride ``stride_grad``, column stride 1;
    factor_ptr fp32, ``stride_factor`` 0 (one scalar for all rows) or 1 (one factor per row).
    """
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(factor_ptr + row * stride_factor)
    # The usual backward of a scalar loss has factor 1.0: this costs one 4-byte load per program, no traffic
    # on grad, and the decision is made on the device (no host sync).
    if f != 1.0:
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < V
        ptrs = grad_ptr + row * stride_grad + cols
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (g * f).to(grad_ptr.dtype.element_ty), mask=mask)


def fwd_bwd_config(V: int) -> tuple:
    """(BLOCK, num_warps) for a row of V classes: chunks of at most 8192 columns, 16 columns per thread.

    ptxas for sm_90 (Triton 3.9, all options off / on), registers per thread and stack bytes:
        BLOCK 32768, 32 warps (Liger's setting):  64 regs, 270-450 B stack (spills)
        BLOCK 16384, 16 warps:                   128 regs,  32-48 B stack (spills)
        BLOCK  8192, 16 warps:                    83-116 regs, no stack
        BLOCK  4096,  8 warps:                    80-110 regs, no stack
    16 columns per thread is the most that stays in registers. Between the two spill-free settings the L2
    decides: sweep 2 re-reads the row sweep 1 just read, and that re-read is only cheap while every row in
    flight stays in L2 (50 MB on an sm_90 part with 132 SMs). (8192, 16) uses 512 threads x ~100 registers, so
    one program per SM: 132 rows x 300 KB (bf16, V = 151936) = 40 MB in flight, which fits; (4096, 8) would fit
    two per SM and double that. Each thread issues two 16-byte bf16 loads per chunk. Smaller V: one chunk
    covering the row, fewer warps.
    """
    block = min(8192, triton.next_power_of_2(max(int(V), 16)))
    return block, max(4, min(16, block // 512))


def _check_rows(name, t, n, v):
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] != v or (n > 0 and v > 1 and t.stride(1) != 1):
        raise ValueError(
            f"{name} must be [{n}, {v}] with stride(1) == 1, got shape {tuple(t.shape)} strides {tuple(t.stride())}"
        )


def _check_vec(name, t, n, dtypes):
    if t.shape != (n,) or not t.is_contiguous() or t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(
            f"{name} must be a contiguous [{n}] {names} tensor, got shape {tuple(t.shape)} dtype {t.dtype}"
        )


def fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale, *, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss, lse, accuracy (optionally) and the scaled gradient (optionally), in one launch.

    logits     [N, V] float32/bfloat16/float16, stride(1) == 1, any stride(0) >= V. Never copied.
    labels     [N] int64 or int32, contiguous (shift already applied by the caller).
    loss       [N] float32 out: unscaled per-row loss, 0.0 where the label is ignored.
    lse        [N] float32 out: log-sum-exp of the (softcapped) row, for every row.
    correct    [N] int32 out: 1 where the label is valid and argmax(x) == label (first index on ties), else 0;
               or None (loss only): the kernel is compiled without the argmax and writes no accuracy.
               loss, lse and grad are the same bits either way.
    grad       [N, V] logits' dtype, stride(1) == 1, or None (forward only). May be ``logits`` itself.
               grad[i] = grad_scale * d loss_i / d logits_i; exact zeros for ignored rows.
    grad_scale [1] float32 on the logits' device, read by the kernel (no host sync).
    ignore_index (int), label_smoothing (float in [0, 1]), z_loss (float >= 0), softcap (float; <= 0 means off).
    Labels outside [0, V) that are not ignore_index are treated as ignored (the caller validates in eager mode).
    """
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be float32/bfloat16/float16, got {logits.dtype}")
    n, v = logits.shape[0], logits.shape[-1]
    _check_rows("logits", logits, n, v)
    _check_vec("labels", labels, n, (torch.int64, torch.int32))
    _check_vec("loss", loss, n, (torch.float32,))
    _check_vec("lse", lse, n, (torch.float32,))
    if correct is not None:
        _check_vec("correct", correct, n, (torch.int32,))
    _check_vec("grad_scale", grad_scale, 1, (torch.float32,))
    if grad is not None:
        _check_rows("grad", grad, n, v)
        if grad.dtype != logits.dtype:
            raise ValueError(f"grad must have the logits' dtype {logits.dtype}, got {grad.dtype}")
    if n == 0:
        return
    block, num_warps = fwd_bwd_config(v)
    has_softcap = softcap is not None and softcap > 0
    _ce_fwd_bwd_kernel[(n,)](
        logits,
        logits.stride(0),
        labels,
        loss,
        lse,
        correct if correct is not None else loss,  # never written when HAS_ACC is False
        grad if grad is not None else logits,  # never written when HAS_GRAD is False
        grad.stride(0) if grad is not None else 0,
        grad_scale,
        v,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        float(softcap) if has_softcap else 1.0,
        HAS_GRAD=grad is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_Z=z_loss != 0,
        HAS_SOFTCAP=has_softcap,
        HAS_ACC=correct is not None,
        BLOCK=block,
        num_warps=num_warps,
    )


def scale_grad_(grad, grad_output):
    """In place, grad *= grad_output.

    grad        [N, V] float32/bfloat16/float16, stride(1) == 1 (any stride(0)).
    grad_output float32 on grad's device, 1 element (scalar loss) or N elements (one factor per row, contiguous).
    Rows whose factor is exactly 1.0 are left untouched, decided on the device.
    """
    n, v = grad.shape[0], grad.shape[-1]
    _check_rows("grad", grad, n, v)
    if grad_output.dtype != torch.float32 or grad_output.numel() not in (1, n) or not grad_output.is_contiguous():
        raise ValueError(
            f"grad_output must be a contiguous float32 tensor of 1 or {n} elements, "
            f"got shape {tuple(grad_output.shape)} dtype {grad_output.dtype}"
        )
    if n == 0 or v == 0:
        return
    block = min(8192, triton.next_power_of_2(v))
    _scale_grad_kernel[(n, triton.cdiv(v, block))](
        grad,
        grad.stride(0),
        grad_output,
        0 if grad_output.numel() == 1 else 1,
        v,
        BLOCK=block,
        num_warps=max(4, min(16, block // 512)),
    )
