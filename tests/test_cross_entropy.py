"""pyseqpack.fused_cross_entropy on every backend against a plain fp32 torch reference written here.

The reference (``reference`` below) is the textbook formula: fp32 log_softmax, gather of the label, masks for
ignore_index, autograd for the gradient, torch.argmax for accuracy. It receives the *same* dtype-rounded logits
as the kernels (upcast to fp32), so:
* losses, lse and counts agree to fp32 rounding (sums in another order, exp2-based exp/tanh): LOSS_TOL;
* gradients are one rounding into the logits' dtype away from the fp32 reference: GRAD_TOL, the dtype's
  half-ulp relative step with margin. In addition ``test_grad_error_at_most_2x_torch`` checks the flash-attention
  rule: our gradient error vs the fp32 reference is at most 2x that of torch's own computation in the dtype.

Backends: "torch" (the CPU path), "triton" (on the GPU when there is one, else on CPU tensors through
TRITON_INTERPRET=1, set by conftest: see devices.py), "cuda" (only with a GPU). Shapes are small because the
Triton interpreter runs each program in numpy; the vocabulary sizes of real models (151936, 256000) run with 2
rows.

The row-kernel contract that both native backends implement is tested directly in ``test_contract_*``.
"""
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import pyseqpack
from pyseqpack import _native
from pyseqpack.cross_entropy import CrossEntropyOutput, fused_cross_entropy

from devices import TRITON_DEVICE, device_for

# the package (``pyseqpack.cross_entropy`` the attribute is the drop-in function) and its torch backend
ce_mod = importlib.import_module("pyseqpack.cross_entropy")
reference_mod = importlib.import_module("pyseqpack.cross_entropy.reference")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = [
    "torch",
    "triton",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() and _native.cuda_built()),
                                                    reason="the cuda backend needs a GPU and the built library")],
    ),
]

# Loss / lse: fp32 math on identical inputs, only the summation order and exp2/tanh approximations differ.
LOSS_TOL = dict(rtol=2e-5, atol=2e-5)
# Gradient: the fp32 value rounded into the logits' dtype once by the forward, and once more when backward scales
# it by a grad_output != 1 (reduction="none"): 2 roundings of at most half a unit in the last place each, i.e.
# 2 * 2^-8 relative for bf16 (8 significant bits), 2 * 2^-11 for fp16 (11 bits); tolerances are twice that.
# fp32 allows for the differences above. fp16 gradients ~1/V can be subnormal (spacing 2^-24), hence its atol.
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-6, atol=1e-6),
    torch.float16: dict(rtol=2**-9, atol=2**-20),
}


def reference(logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
              softcap=None, shift=False, num_items_in_batch=None):
    """Plain fp32 torch: (loss, num_correct, num_tokens). Differentiable w.r.t. ``logits``."""
    x = logits.float()
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    logp = torch.log_softmax(x, dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    valid = labels != ignore_index
    y = torch.where(valid, labels, torch.zeros_like(labels)).long()
    nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)  # = lse - mean(x)
    per_token = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse**2
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    num_tokens = valid.sum()
    if num_items_in_batch is not None:
        loss = per_token.sum() / num_items_in_batch
    elif reduction == "mean":
        loss = per_token.sum() / max(int(num_tokens), 1)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token
    num_correct = ((x.argmax(-1) == labels) & valid).sum()
    return loss, num_correct, num_tokens


def run_both(logits, labels, backend, **opts):
    """(ours, reference) outputs and gradients for the same logits."""
    ours_in = logits.detach().clone().requires_grad_(True)
    ref_in = logits.detach().float().requires_grad_(True)  # same values, exact fp32 gradient
    out = fused_cross_entropy(ours_in, labels, backend=backend, **opts)
    ref = reference(ref_in, labels, **opts)
    # a non-trivial upstream gradient for reduction="none"; 1.0 (the device-side skip) for scalars
    g = torch.randn_like(out.loss) if out.loss.dim() else torch.ones_like(out.loss)
    out.loss.backward(g)
    ref[0].backward(g)
    return out, ours_in.grad, ref, ref_in.grad


def check(out, grad, ref, ref_grad, dtype):
    assert isinstance(out, CrossEntropyOutput)
    assert out.loss.dtype == torch.float32
    assert out.num_correct.dtype == torch.int64 and out.num_tokens.dtype == torch.int64
    torch.testing.assert_close(out.loss, ref[0].detach(), **LOSS_TOL)
    assert int(out.num_correct) == int(ref[1]) and int(out.num_tokens) == int(ref[2])
    expected_acc = int(ref[1]) / int(ref[2]) if int(ref[2]) else 0.0
    assert out.accuracy.dtype == torch.float32 and math.isclose(float(out.accuracy), expected_acc, rel_tol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOL[dtype])


def make_inputs(shape, v, dtype, device, *, ignore_frac=0.25, scale=3.0, seed=0, label_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, v, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = -100
    # make some tokens correct so accuracy is not trivially 0
    hit = torch.rand(shape, generator=gen) < 0.3
    labels = torch.where(hit & (labels != -100), logits.float().argmax(-1), labels)
    return logits.to(device), labels.to(label_dtype).to(device)


# (id, options, label dtype): every option alone, then combinations
OPTIONS = [
    ("mean", {}, torch.int64),
    ("sum", {"reduction": "sum"}, torch.int64),
    ("none", {"reduction": "none"}, torch.int64),
    ("smoothing", {"label_smoothing": 0.1}, torch.int64),
    ("z_loss", {"z_loss": 1e-3}, torch.int64),
    ("softcap", {"softcap": 2.5}, torch.int64),
    ("shift", {"shift": True}, torch.int64),
    ("num_items_int", {"num_items_in_batch": 7}, torch.int64),
    ("num_items_tensor", {"num_items_in_batch": torch.tensor(5)}, torch.int64),
    ("int32_labels", {}, torch.int32),
    ("ignore_index_3", {"ignore_index": 3}, torch.int64),
    ("all_options_sum", {"reduction": "sum", "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0, "shift": True},
     torch.int64),
    ("all_options_none", {"reduction": "none", "label_smoothing": 1.0, "z_loss": 1e-3, "softcap": 1.5}, torch.int32),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,opts,label_dtype", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_matches_reference(name, opts, label_dtype, dtype, backend):
    logits, labels = make_inputs((2, 7), 37, dtype, device_for(backend), label_dtype=label_dtype)
    if "ignore_index" in opts:
        labels[labels == -100] = opts["ignore_index"]
    check(*run_both(logits, labels, backend, **opts), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(reduction, backend):
    """Zero valid tokens: loss 0 (not NaN), gradient exactly 0, accuracy 0."""
    logits, _ = make_inputs((3, 5), 11, torch.bfloat16, device_for(backend))
    labels = torch.full((3, 5), -100, device=logits.device)
    out, grad, ref, ref_grad = run_both(logits, labels, backend, reduction=reduction, label_smoothing=0.1,
                                        z_loss=1e-2)
    assert torch.equal(out.loss, torch.zeros_like(out.loss))
    assert torch.equal(grad, torch.zeros_like(grad))
    assert int(out.num_tokens) == 0 and int(out.num_correct) == 0 and float(out.accuracy) == 0.0
    check(out, grad, ref, ref_grad, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 29])
def test_odd_vocab_and_rows(rows, dtype, backend):
    """V = 4099 (not a power of two, not a multiple of any block: a masked tail chunk); 1, 3, 29 rows."""
    logits, labels = make_inputs((rows,), 4099, dtype, device_for(backend), seed=rows)
    check(*run_both(logits, labels, backend, label_smoothing=0.05), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [151936, 256000])
def test_real_vocab_sizes(v, backend):
    """Qwen's and Gemma's vocabularies: many chunks per row (online max/sum across chunks), bf16, few rows."""
    logits, labels = make_inputs((2,), v, torch.bfloat16, device_for(backend), ignore_frac=0.0, seed=v)
    labels[1] = logits[1].float().argmax()  # one correct token
    check(*run_both(logits, labels, backend, softcap=30.0, z_loss=1e-4), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_logits_slice_of_wider_tensor(backend):
    """Row stride > V (a vocab slice of a padded lm_head output): used through its strides, not copied."""
    wide, labels = make_inputs((2, 5), 64, torch.bfloat16, device_for(backend))
    logits = wide[..., :50]
    labels = labels.clamp(max=49)
    assert logits.stride(-2) == 64
    check(*run_both(logits, labels, backend, reduction="sum"), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pre_sliced_logits_equal_shift(backend):
    """logits[:, :-1] with labels[:, 1:] (a [B, T-1, V] view whose rows do not merge into one stride) gives the
    same loss, counts and gradient as shift=True on the full logits."""
    full, labels = make_inputs((3, 6), 40, torch.float32, device_for(backend))
    a = full.clone().requires_grad_(True)
    b = full.clone().requires_grad_(True)
    out_a = fused_cross_entropy(a[:, :-1], labels[:, 1:], backend=backend)
    out_b = fused_cross_entropy(b, labels, shift=True, backend=backend)
    out_a.loss.backward()
    out_b.loss.backward()
    torch.testing.assert_close(out_a.loss, out_b.loss, **LOSS_TOL)
    assert int(out_a.num_correct) == int(out_b.num_correct) and int(out_a.num_tokens) == int(out_b.num_tokens)
    torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL[torch.float32])
    assert torch.equal(b.grad[:, -1], torch.zeros_like(b.grad[:, -1]))  # the last position counts for nothing
    check(*run_both(full[:, :-1], labels[:, 1:], backend), torch.float32)


def test_row_views_share_storage():
    """The [B, T-1, V] slice is split into B strided views of the caller's storage (no copy)."""
    full = torch.randn(3, 6, 10)
    pieces = ce_mod._row_views(full[:, :-1])
    assert [r0 for r0, _ in pieces] == [0, 5, 10]
    for i, (_, view) in enumerate(pieces):
        assert view.shape == (5, 10) and view.data_ptr() == full[i].data_ptr()
    (r0, whole), = ce_mod._row_views(full)
    assert whole.shape == (18, 10) and whole.data_ptr() == full.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_single_token(reduction, backend):
    """logits [V] with a 0-dim label: one row; reduction "none" keeps the label's (empty) shape."""
    logits, labels = make_inputs((), 19, torch.float32, device_for(backend), ignore_frac=0.0)
    out, grad, ref, ref_grad = run_both(logits, labels, backend, reduction=reduction)
    assert out.loss.shape == () and grad.shape == (19,)
    check(out, grad, ref, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_does_not_touch_inputs(backend):
    logits, labels = make_inputs((2, 5), 13, torch.float32, device_for(backend))
    logits_before, labels_before = logits.clone(), labels.clone()
    fused_cross_entropy(logits.requires_grad_(True), labels, shift=True, backend=backend).loss.backward()
    assert torch.equal(logits.detach(), logits_before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_index_ties(backend):
    """bf16 logits with tied maxima: argmax is the first index (torch.argmax), within a chunk, across chunks of
    the Triton kernel (columns 100 and BLOCK + 100), and for an all-equal row."""
    from pyseqpack.kernels.cross_entropy import fwd_bwd_config

    v = 20000
    far = fwd_bwd_config(v)[0] + 100
    logits = torch.zeros(4, v, dtype=torch.bfloat16)
    logits[0, [3, 10]] = 5.0  # tie inside one chunk
    logits[1, [100, far]] = 5.0  # tie across chunks
    logits[2, [far, 100]] = 5.0
    # row 3: all equal -> argmax 0
    logits = logits.to(device_for(backend))
    first = torch.tensor([3, 100, 100, 0], device=logits.device)
    second = torch.tensor([10, far, far, 1], device=logits.device)
    assert torch.equal(logits.float().argmax(-1), first)
    assert int(fused_cross_entropy(logits, first, backend=backend).num_correct) == 4
    assert int(fused_cross_entropy(logits, second, backend=backend).num_correct) == 0
    check(*run_both(logits, first, backend), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only(backend):
    """No grad needed (eval): the gradient is not computed, nothing is saved, the results are the same."""
    logits, labels = make_inputs((2, 4), 21, torch.float16, device_for(backend))
    with torch.no_grad():
        out = fused_cross_entropy(logits.clone().requires_grad_(True), labels, backend=backend)
    assert out.loss.grad_fn is None
    ref = reference(logits, labels)
    torch.testing.assert_close(out.loss, ref[0], **LOSS_TOL)
    assert int(out.num_correct) == int(ref[1])


def test_torch_backend_chunks(monkeypatch):
    """The torch backend works in chunks of rows: a chunk size of 3 rows gives the same results."""
    logits, labels = make_inputs((5, 4), 97, torch.float32, "cpu")
    monkeypatch.setattr(reference_mod, "CHUNK_BYTES", 3 * 97 * 4)
    check(*run_both(logits, labels, "torch", label_smoothing=0.1, softcap=3.0), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_grad_error_at_most_2x_torch(dtype):
    """Our gradient error vs the fp32 reference is at most 2x torch's own (F.cross_entropy in the dtype)."""
    logits, labels = make_inputs((8,), 1000, dtype, "cpu", scale=4.0)
    exact = logits.float().requires_grad_(True)
    F.cross_entropy(exact, labels).backward()
    theirs = logits.clone().requires_grad_(True)
    F.cross_entropy(theirs, labels).backward()
    for backend in ("torch", "triton"):
        dev = device_for(backend)
        ours = logits.to(dev, copy=True).requires_grad_(True)
        fused_cross_entropy(ours, labels.to(dev), backend=backend).loss.backward()
        err_ours = (ours.grad.float().cpu() - exact.grad).abs().max()
        err_torch = (theirs.grad.float() - exact.grad).abs().max()
        assert err_ours <= 2 * err_torch, (backend, float(err_ours), float(err_torch))


def test_backward_through_double_use():
    """The loss used twice in the graph: backward scales the saved gradient by the summed grad_output (2.0)."""
    logits, labels = make_inputs((2, 3), 9, torch.float32, "cpu")
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    loss = fused_cross_entropy(a, labels).loss
    (loss + loss).backward()
    (2 * reference(b, labels)[0]).backward()
    torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL[torch.float32])


def test_second_backward_raises():
    """The gradient is scaled in place by backward: a second backward through the same graph raises instead of
    scaling it twice."""
    logits, labels = make_inputs((2, 3), 9, torch.float32, "cpu")
    x = logits.clone().requires_grad_(True)
    loss = fused_cross_entropy(x, labels).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------------------------------------------
# inplace_backward
# ------------------------------------------------------------------------------------------------------------


def _lm_head(seed=0, v=33, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    head = torch.nn.Linear(8, v).to(dtype)
    hidden = torch.randn(2, 5, 8, dtype=dtype)
    labels = torch.randint(0, v, (2, 5))
    labels[0, :2] = -100
    return head.to(device), hidden.to(device), labels.to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_same_gradients(dtype, backend):
    head, hidden, labels = _lm_head(dtype=dtype, device=device_for(backend))
    grads = []
    for inplace in (False, True):
        head.zero_grad()
        logits = head(hidden)
        out = fused_cross_entropy(logits, labels, shift=True, z_loss=1e-3, inplace_backward=inplace, backend=backend)
        out.loss.backward()
        grads.append((out.loss.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
        if inplace:
            # the documented hazard: the logits' memory now holds d loss / d logits
            ref_in = head(hidden).detach().float().requires_grad_(True)
            reference(ref_in, labels, shift=True, z_loss=1e-3)[0].backward()
            torch.testing.assert_close(logits.detach().float(), ref_in.grad.float(), **GRAD_TOL[dtype])
    for a, b in zip(grads[0], grads[1]):
        assert torch.equal(a, b)


def test_inplace_backward_version_counter_protects_other_users():
    """Another autograd node that saved the logits (sin saves its input) makes backward raise, instead of
    silently differentiating through gradient values."""
    head, hidden, labels = _lm_head()
    logits = head(hidden)
    aux = logits.sin().sum()
    version = logits._version
    out = fused_cross_entropy(logits, labels, inplace_backward=True)
    assert logits._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.loss + aux).backward()


def test_inplace_backward_refusals():
    leaf = torch.randn(4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (4,))
    with pytest.raises(ValueError, match="leaf tensor"):
        fused_cross_entropy(leaf, labels, inplace_backward=True)
    big = torch.randn(4, 9, requires_grad=True)
    with pytest.raises(ValueError, match="view of a leaf"):
        fused_cross_entropy(big[:, :7], labels, inplace_backward=True)
    expanded = torch.randn(1, 7, requires_grad=True).mul(2).expand(4, 7)
    with pytest.raises(ValueError, match="overlap in memory"):
        fused_cross_entropy(expanded, labels, inplace_backward=True)
    # rows 3 elements apart in a 7-wide row: neighbouring rows share 4 elements
    base = torch.randn(40, requires_grad=True).mul(2)
    with pytest.raises(ValueError, match="overlap in memory"):
        fused_cross_entropy(base.as_strided((4, 7), (3, 1)), labels, inplace_backward=True)
    # non-overlapping views of non-leaf logits are accepted: row-strided and padded-row ones
    for view in (base.as_strided((4, 7), (9, 1)), torch.randn(4, 9, requires_grad=True).mul(2)[:, 1:8]):
        fused_cross_entropy(view, labels, inplace_backward=True)

    # without a gradient to compute, inplace_backward does nothing and the logits are untouched
    x = torch.randn(4, 7)
    before = x.clone()
    fused_cross_entropy(x, labels, inplace_backward=True)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape, strides, overlaps", [
    ((4, 7), (7, 1), False), ((4, 7), (1, 4), False), ((4, 7), (0, 1), True), ((4, 7), (6, 1), True),
    ((4, 7), (3, 1), True), ((2, 3, 5), (15, 5, 1), False), ((2, 3, 5), (5, 10, 1), False),
    ((2, 3, 5), (4, 5, 1), True), ((1, 7), (0, 1), False), ((4, 1), (1, 0), False), ((3, 2), (1, 2), True), ((3, 2), (1, 3), False),
])
def test_may_overlap(shape, strides, overlaps):
    from pyseqpack.cross_entropy import _may_overlap

    t = torch.empty(200).as_strided(shape, strides)
    assert _may_overlap(t) is overlaps
    # the brute-force answer: distinct offsets for distinct elements
    offsets = torch.arange(200).as_strided(shape, strides).reshape(-1)
    assert (offsets.unique().numel() < offsets.numel()) is overlaps


# ------------------------------------------------------------------------------------------------------------
# The row-kernel contract, called directly (what the CUDA backend implements too)
# ------------------------------------------------------------------------------------------------------------


def _contract_module(backend):
    return ce_mod.DISPATCH.launcher(backend, device_for(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_contract_fwd_bwd(dtype, backend):
    """Per-row loss / lse / correct / scaled gradient; lse for ignored rows too; out-of-range labels count as
    ignored (no out-of-bounds read); forward-only and in-place gradient give the same numbers; row stride > V."""
    mod = _contract_module(backend)
    dev = device_for(backend)
    n, v = 6, 300
    wide = (torch.randn(n, v + 20) * 2).to(dtype).to(dev)
    logits = wide[:, :v]
    labels = torch.tensor([5, -100, v, -1, 7, 0], dtype=torch.int32, device=dev)  # v and -1: out of range
    labels[4] = logits[4].float().argmax()
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)

    def outputs():
        return (torch.empty(n, device=dev), torch.empty(n, device=dev),
                torch.empty(n, dtype=torch.int32, device=dev))

    scale = torch.tensor([0.25], device=dev)
    loss, lse, correct = outputs()
    grad = torch.empty(n, v, dtype=dtype, device=dev)
    mod.fwd_bwd(logits, labels, loss, lse, correct, grad, scale, **opts)

    x = logits.detach().float().requires_grad_(True)
    xs = 20.0 * torch.tanh(x / 20.0)
    ok = torch.tensor([True, False, False, False, True, True], device=dev)
    y = torch.where(ok, labels.long(), 0)
    ref_lse = torch.logsumexp(xs, -1)
    ref_loss = (0.9 * F.cross_entropy(xs, y, reduction="none") + 0.1 * (ref_lse - xs.mean(-1))
                + 1e-3 * ref_lse**2) * ok
    (0.25 * ref_loss.sum()).backward()
    torch.testing.assert_close(loss, ref_loss.detach(), **LOSS_TOL)
    torch.testing.assert_close(lse, ref_lse.detach(), **LOSS_TOL)
    assert correct.tolist() == [int(a) for a in ((xs.argmax(-1) == labels) & ok).tolist()]
    assert correct[4] == 1
    torch.testing.assert_close(grad.float(), x.grad, **GRAD_TOL[dtype])
    assert torch.equal(grad[~ok], torch.zeros_like(grad[~ok]))

    loss2, lse2, correct2 = outputs()
    mod.fwd_bwd(logits, labels, loss2, lse2, correct2, None, scale, **opts)
    assert torch.equal(loss2, loss) and torch.equal(lse2, lse) and torch.equal(correct2, correct)

    inplace = logits.clone()
    loss3, lse3, correct3 = outputs()
    mod.fwd_bwd(inplace, labels, loss3, lse3, correct3, inplace, scale, **opts)
    assert torch.equal(loss3, loss) and torch.equal(inplace, grad)


# The Triton interpreter runs the kernel's -inf arithmetic (log2(0), -inf - -inf in a discarded branch) in numpy,
# which warns; the values are checked below.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contract_rows_of_minus_inf(dtype, backend):
    """-inf logits (masked vocabulary): a row whose first columns are all -inf (the whole first Triton chunk)
    is finite and exact; a row of -inf only has lse = -inf, and when ignored loss 0 and an exactly zero gradient
    (valid rows with finite logits are unaffected)."""
    mod = _contract_module(backend)
    dev = device_for(backend)
    n, v = 3, 20000
    x = (torch.randn(n, v, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    x[0, :9000] = float("-inf")
    x[1] = float("-inf")
    logits = x.to(dev)
    labels = torch.tensor([12345, -100, 17], device=dev)
    loss, lse = torch.empty(n, device=dev), torch.empty(n, device=dev)
    correct = torch.empty(n, dtype=torch.int32, device=dev)
    grad = torch.full((n, v), 7.0, dtype=dtype, device=dev)
    mod.fwd_bwd(logits, labels, loss, lse, correct, grad, torch.ones(1, device=dev), ignore_index=-100,
                label_smoothing=0.0, z_loss=0.0, softcap=0.0)

    finite = [0, 2]
    ref_x = logits[finite].float().requires_grad_(True)
    ref_loss = F.cross_entropy(ref_x, labels[finite], reduction="none")
    ref_loss.sum().backward()
    torch.testing.assert_close(loss[finite], ref_loss.detach(), **LOSS_TOL)
    torch.testing.assert_close(lse[finite], torch.logsumexp(ref_x.detach(), -1), **LOSS_TOL)
    torch.testing.assert_close(grad[finite].float(), ref_x.grad, **GRAD_TOL[dtype])
    assert correct.tolist() == [int(logits[0].float().argmax() == 12345), 0, int(logits[2].float().argmax() == 17)]
    assert lse[1].item() == float("-inf") and loss[1].item() == 0.0
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v,opts", [
    (300, dict(label_smoothing=0.1, z_loss=1e-3, softcap=20.0)),
    (20000, dict(label_smoothing=0.0, z_loss=0.0, softcap=0.0)),  # several Triton chunks per row
])
@pytest.mark.parametrize("grad_mode", ["new", "none", "inplace"])
def test_contract_loss_only_same_bits(grad_mode, v, opts, dtype, backend):
    """correct=None (loss only: the kernels compiled without the argmax) gives the same loss, lse and gradient,
    bit for bit, as the run with accuracy, with a new gradient, forward only, and the gradient in place; ignored
    and out-of-range labels included."""
    mod = _contract_module(backend)
    dev = device_for(backend)
    n = 5
    logits = (torch.randn(n, v, generator=torch.Generator().manual_seed(v)) * 3).to(dtype).to(dev)
    labels = torch.tensor([5, -100, v, 0, 7], device=dev)
    labels[3] = logits[3].float().argmax()
    scale = torch.tensor([0.5], device=dev)
    opts = dict(ignore_index=-100, **opts)
    results = []
    for correct in (torch.full((n,), -1, dtype=torch.int32, device=dev), None):
        x = logits.clone()
        grad = {"new": torch.empty_like(x), "none": None, "inplace": x}[grad_mode]
        loss, lse = torch.empty(n, device=dev), torch.empty(n, device=dev)
        mod.fwd_bwd(x, labels, loss, lse, correct, grad, scale, **opts)
        results.append((loss, lse, grad, correct))
    (loss_a, lse_a, grad_a, correct_a), (loss_b, lse_b, grad_b, _) = results
    assert correct_a.tolist() == [0, 0, 0, 1, 0]
    assert torch.equal(loss_a, loss_b) and torch.equal(lse_a, lse_b)
    if grad_mode != "none":
        assert torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_op_with_accuracy_false(inplace, backend):
    """The ops with with_accuracy=False: an empty int32 correct, and loss / lse / gradient identical to
    with_accuracy=True."""
    dev = device_for(backend)
    logits, labels = make_inputs((3, 4), 41, torch.bfloat16, dev)
    scale = torch.tensor([0.25], device=dev)
    args = (-100, 0.1, 1e-3, 4.0)
    outs = []
    for with_accuracy in (True, False):
        x = logits.clone()
        if inplace:
            loss, lse, correct = torch.ops.pyseqpack.cross_entropy_fwd_bwd_inplace(
                x, labels, scale, None, *args, with_accuracy, backend)
            grad = x
        else:
            grad = torch.full_like(x, float("nan"))
            loss, lse, correct = torch.ops.pyseqpack.cross_entropy_fwd_bwd(
                x, labels, scale, None, None, grad, *args, with_accuracy, backend)
        outs.append((loss, lse, grad, correct))
    (loss_a, lse_a, grad_a, correct_a), (loss_b, lse_b, grad_b, correct_b) = outs
    assert correct_a.shape == (12,) and int(correct_a.sum()) > 0
    assert correct_b.shape == (0,) and correct_b.dtype == torch.int32
    assert torch.equal(loss_a, loss_b) and torch.equal(lse_a, lse_b) and torch.equal(grad_a, grad_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_contract_scale_grad(dtype, backend):
    mod = _contract_module(backend)
    dev = device_for(backend)
    wide = torch.randn(5, 40, device=dev).to(dtype)
    grad = wide[:, :33]  # row stride 40: the columns past 33 must stay untouched
    before, pad = grad.clone(), wide[:, 33:].clone()
    mod.scale_grad_(grad, torch.ones(1, device=dev))
    assert torch.equal(grad, before)
    mod.scale_grad_(grad, torch.tensor([-0.5], device=dev))
    assert torch.equal(grad, (before.float() * -0.5).to(dtype))  # a power of two: exact in any dtype
    factors = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0], device=dev)
    base = grad.clone()
    mod.scale_grad_(grad, factors)
    # x3 rounds in bf16; the Triton *interpreter* truncates fp32 -> bf16 instead of rounding to nearest (the GPU
    # rounds), so allow one unit in the last place (2^-7 relative)
    tol = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(grad, (base.float() * factors[:, None]).to(dtype), **tol)
    assert torch.equal(wide[:, 33:], pad)


# ------------------------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------------------------


def test_auto_uses_torch_on_cpu():
    assert ce_mod.DISPATCH.select("auto", torch.device("cpu"))[0] == "torch"
    names = [name for name, _ in ce_mod.DISPATCH.candidates("auto", torch.device("cuda"))]
    assert names[-1] == "torch" and ("triton" in names) == _native.triton_available(torch.device("cuda"))
    assert ("cuda" in names) == _native.cuda_built()


def test_launchers_share_one_signature():
    """Every backend's launcher module exposes fwd_bwd / scale_grad_ with the same parameters (the reference adds
    class_weight, which only it implements)."""
    import inspect

    cuda_launcher = importlib.import_module("pyseqpack.cross_entropy.cuda")
    triton_launcher = importlib.import_module("pyseqpack.cross_entropy.triton")

    for name in ("fwd_bwd", "scale_grad_"):
        expected = list(inspect.signature(getattr(cuda_launcher, name)).parameters)
        assert list(inspect.signature(getattr(triton_launcher, name)).parameters) == expected
        ref = list(inspect.signature(getattr(reference_mod, name)).parameters)
        assert ref[:len(expected)] == expected and ref[len(expected):] in ([], ["class_weight"])


def test_auto_falls_back_on_launch_error(monkeypatch):
    """A backend that fails at launch (e.g. no C compiler for Triton) makes "auto" warn and use the next one."""
    triton_launcher = importlib.import_module("pyseqpack.cross_entropy.triton")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(triton_launcher, "fwd_bwd", broken)
    # a dispatcher that prefers triton on every device, so that the fallback is reached on this machine too
    monkeypatch.setattr(ce_mod, "DISPATCH", ce_mod._dispatcher({"cpu": ("triton",), "cuda": ("triton",)}))
    logits, labels = make_inputs((2, 3), 17, torch.float32, TRITON_DEVICE)
    with pytest.warns(RuntimeWarning, match="simulated launch failure"):
        out = fused_cross_entropy(logits, labels)
    torch.testing.assert_close(out.loss, reference(logits, labels)[0], **LOSS_TOL)
    with pytest.raises(RuntimeError, match="simulated launch failure"):
        fused_cross_entropy(logits, labels, backend="triton")


def test_named_backend_unavailable_is_explained(monkeypatch):
    logits, labels = make_inputs((2,), 5, torch.float32, "cpu")
    with pytest.raises(pyseqpack.BackendUnavailable, match='backend "cuda"'):
        fused_cross_entropy(logits, labels, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(pyseqpack.BackendUnavailable, match="TRITON_INTERPRET"):
        fused_cross_entropy(logits, labels, backend="triton")


# ------------------------------------------------------------------------------------------------------------
# Errors: every bad input names the argument and what was expected
# ------------------------------------------------------------------------------------------------------------

_L = torch.zeros(2, 3, 5)
_Y = torch.zeros(2, 3, dtype=torch.int64)

BAD = [
    ("logits int", dict(logits=_L.long()), TypeError, "logits must be float32, bfloat16 or float16"),
    ("logits bool", dict(logits=_L.bool()), TypeError, "logits must be float32"),
    ("logits float64", dict(logits=_L.double()), TypeError, "logits must be float32"),
    ("logits list", dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
    ("labels float", dict(labels=_Y.float()), TypeError, "labels must be int64 or int32"),
    ("labels int16", dict(labels=_Y.short()), TypeError, "labels must be int64 or int32"),
    ("shape mismatch", dict(labels=_Y[:, :2]), ValueError, r"labels must have the shape of logits.*\(2, 3\)"),
    ("labels with V dim", dict(labels=torch.zeros(2, 3, 5, dtype=torch.int64)), ValueError, "labels must have"),
    ("V == 0", dict(logits=torch.zeros(2, 3, 0), labels=_Y), ValueError, "V >= 1"),
    ("column stride", dict(logits=torch.zeros(2, 5, 3).transpose(1, 2)), ValueError, r"stride\(-1\) == 1"),
    ("bad reduction", dict(reduction="avg"), ValueError, "reduction must be one of"),
    ("smoothing < 0", dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a float in \[0, 1\]"),
    ("smoothing > 1", dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    ("softcap 0", dict(softcap=0.0), ValueError, "softcap must be None or a finite float > 0"),
    ("softcap < 0", dict(softcap=-30.0), ValueError, "softcap"),
    ("z_loss < 0", dict(z_loss=-1.0), ValueError, "z_loss must be"),
    ("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ("num_items 0", dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0"),
    ("num_items str", dict(num_items_in_batch="7"), TypeError, "num_items_in_batch must be"),
    ("num_items shape", dict(num_items_in_batch=torch.ones(2)), ValueError, "1-element tensor"),
    ("num_items none", dict(num_items_in_batch=3, reduction="none"), ValueError, 'not "none"'),
    ("bad backend", dict(backend="gpu"), ValueError, "backend must be one of"),
    ("shift 0-dim", dict(logits=torch.zeros(5), labels=torch.tensor(1), shift=True), ValueError, "shift=True"),
    ("label too big", dict(labels=_Y.clone().index_fill_(1, torch.tensor([2]), 5)), ValueError,
     r"labels\[0, 2\] = 5 is out of range.*\[0, 5\)"),
    ("label negative", dict(labels=_Y.clone().index_fill_(0, torch.tensor([1]), -1)), ValueError,
     r"labels\[1, 0\] = -1 is out of range"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, kwargs, exc, match):
    kw = dict(kwargs)
    logits = kw.pop("logits", _L)
    labels = kw.pop("labels", _Y)
    with pytest.raises(exc, match=match):
        fused_cross_entropy(logits, labels, **kw)


def test_labels_after_shift_named():
    labels = _Y.clone()
    labels[1, 2] = 9
    with pytest.raises(ValueError, match=r"labels \(after shift\)\[1, 1\] = 9"):
        fused_cross_entropy(_L, labels, shift=True)


def test_devices_differ():
    if not torch.cuda.is_available():
        # without a GPU, a meta tensor stands in for "another device"
        labels = torch.zeros(2, 3, dtype=torch.int64, device="meta")
    else:
        labels = _Y.cuda()
    with pytest.raises(ValueError, match="same device"):
        fused_cross_entropy(_L, labels)


def test_label_check_can_be_skipped(monkeypatch):
    """check_labels=False (or PYSEQPACK_CHECK_LABELS=0) skips the host sync; bad labels then count as ignored."""
    labels = _Y.clone()
    labels[0, 0] = 99
    out = fused_cross_entropy(_L, labels, check_labels=False)
    assert int(out.num_tokens) == 5
    monkeypatch.setenv("PYSEQPACK_CHECK_LABELS", "0")
    assert int(fused_cross_entropy(_L, labels).num_tokens) == 5


def test_public_names():
    assert pyseqpack.fused_cross_entropy is fused_cross_entropy
    assert pyseqpack.CrossEntropyOutput is CrossEntropyOutput
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # importing the module registers the ops without warnings
        assert torch.ops.pyseqpack.cross_entropy_fwd_bwd.default is not None


def test_op_refuses_a_gradient_buffer_it_cannot_fill():
    """cross_entropy_fwd_bwd writes the gradient into `grad`: it must be a contiguous tensor shaped like the
    logits, with their dtype, and not the logits' own memory (that is the in-place op)."""
    logits, labels = make_inputs((4,), 9, torch.float32, "cpu")
    scale = torch.ones(1)
    args = (-100, 0.0, 0.0, 0.0, True, "torch")
    for grad in (torch.empty(4, 10), torch.empty(4, 9, dtype=torch.bfloat16), torch.empty(9, 4).t()):
        with pytest.raises(ValueError, match="grad must be a contiguous torch.float32 tensor of the logits' shape"):
            torch.ops.pyseqpack.cross_entropy_fwd_bwd(logits, labels, scale, None, None, grad, *args)
    with pytest.raises(ValueError, match="grad shares memory with logits"):
        torch.ops.pyseqpack.cross_entropy_fwd_bwd(logits, labels, scale, None, None, logits, *args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows(backend):
    """[0, V] logits: no token, loss 0 and an empty gradient, as the reference gives."""
    logits = torch.zeros(0, 7, device=device_for(backend))
    labels = torch.zeros(0, dtype=torch.int64, device=logits.device)
    out, grad, ref, ref_grad = run_both(logits, labels, backend)
    assert grad.shape == (0, 7) and int(out.num_tokens) == 0
    check(out, grad, ref, ref_grad, torch.float32)
