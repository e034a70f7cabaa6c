"""The CUDA cross-entropy backend (csrc/cross_entropy.cu via pyseqpack.cross_entropy.cuda) against plain torch.

The reference is fp32 torch on the same (dtype-rounded) logits: F.cross_entropy per row (with torch's own
label smoothing and ignore_index) plus z * lse^2, the gradient by autograd, accuracy by torch.argmax. The
kernel computes in fp32 too, so losses agree to fp32 rounding, and gradients to one rounding into the
output dtype.

Kernel tests need a CUDA device and are skipped without one. Three cheap tests run everywhere: the library
exports its entry points, the C entry points reject bad arguments with a CUDA error code that the launcher
turns into RuntimeError, and the launcher refuses CPU tensors before touching any pointer.

Shapes are chosen for the code paths they reach: V = 1 and 7 (no full 16-byte vector), 4099 (rows not
16-byte aligned: scalar head and tail around the vectors), 32000 (a whole bf16 row cached in shared memory),
151936 (Qwen vocabulary) and 256000 (Gemma): the row is only partly cached and the rest re-read in pass 2;
N = 1, 3, 29. correct=None selects the loss-only instantiation of the kernel (no argmax): same loss, lse and
grad bits.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from pyseqpack import _native

built = pytest.mark.skipif(not _native.cuda_built(), reason="pyseqpack._cuda was not built (no nvcc at build time)")


def needs_gpu(fn):
    """Marks a kernel test: it needs the built library and a CUDA device, and is skipped (with the reason) else."""
    if not _native.cuda_built():
        reason = "pyseqpack._cuda was not built (no nvcc at build time)"
    else:
        reason = "the CUDA cross-entropy kernels need a CUDA device; none is available here"
    ok = _native.cuda_built() and torch.cuda.is_available()
    return pytest.mark.gpu(pytest.mark.skipif(not ok, reason=reason)(fn))


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerance per output dtype: the kernel's fp32 value is rounded once into the dtype, so it can be
# one unit in the last place away from the rounded fp32 reference (2^-7 relative for bf16, 2^-10 for fp16);
# fp32 allows for the order of the sums and exp2 (a few 1e-6 relative), with margin.
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
# fp16 gradients of size ~1/V fall into the subnormal range, where the spacing is 2^-24 in absolute terms.
GRAD_ATOL_FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-24}


def _ce():
    # importlib: the attribute pyseqpack.cross_entropy is the drop-in function, not the package
    return importlib.import_module("pyseqpack.cross_entropy.cuda")


def reference(logits, labels, *, ignore_index=-100, eps=0.0, z=0.0, softcap=0.0, scale=1.0):
    """fp32 torch: (loss, lse, correct, grad) per the row-kernel contract; out-of-range labels count as ignored."""
    x_raw = logits.detach().float().requires_grad_(True)
    x = softcap * torch.tanh(x_raw / softcap) if softcap > 0 else x_raw
    y = labels.long()
    valid = (y != ignore_index) & (y >= 0) & (y < logits.shape[1])
    y_safe = torch.where(valid, y, torch.full_like(y, ignore_index))
    lse = torch.logsumexp(x, dim=-1)
    loss = F.cross_entropy(x, y_safe, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    if z:
        loss = loss + z * lse.square() * valid
    (grad,) = torch.autograd.grad((loss * scale).sum(), x_raw)
    correct = ((x.argmax(dim=-1) == y) & valid).int()
    return loss.detach(), lse.detach(), correct, grad


def run(logits, labels, *, grad="new", ignore_index=-100, eps=0.0, z=0.0, softcap=0.0, scale=1.0, accuracy=True):
    """Calls the CUDA launcher. grad: None (forward only), "new" (a fresh tensor), "inplace" or a tensor;
    accuracy=False passes correct=None (the loss-only kernels), and correct comes back as None."""
    n, dev = logits.shape[0], logits.device
    loss = torch.full((n,), float("nan"), device=dev)
    lse = torch.full((n,), float("nan"), device=dev)
    correct = torch.full((n,), -1, dtype=torch.int32, device=dev) if accuracy else None
    if isinstance(grad, str):
        grad = torch.full_like(logits, float("nan")) if grad == "new" else logits
    grad_scale = torch.tensor([scale], device=dev)
    _ce().fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale,
                  ignore_index=ignore_index, label_smoothing=eps, z_loss=z, softcap=softcap)
    return loss, lse, correct, grad


def assert_matches(out, ref, dtype, v, scale=1.0):
    loss, lse, correct, grad = out
    r_loss, r_lse, r_correct, r_grad = ref
    torch.testing.assert_close(loss, r_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse, r_lse, rtol=1e-5, atol=1e-4)
    if correct is not None:
        assert torch.equal(correct, r_correct), (correct, r_correct)
    if grad is not None:
        # The absolute part covers cancellation in p (1 + 2 z lse) - eps / V, where fp32 noise is ~1e-6 of 1/V.
        atol = 1e-4 * abs(scale) / v + GRAD_ATOL_FLOOR[dtype]
        torch.testing.assert_close(grad.float(), r_grad, rtol=GRAD_RTOL[dtype], atol=atol)


def make_case(n, v, dtype, label_dtype=torch.int64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    if n > 2:
        labels[1] = -100  # one ignored row
    return logits, labels.to(label_dtype)


# ---------------------------------------------------------------- tests that run without a GPU


@built
def test_library_exports_entry_points():
    lib = _native.cuda_library()
    for name in ("pyseqpack_ce_fwd_bwd", "pyseqpack_ce_scale_grad", "pyseqpack_cuda_error_string"):
        assert hasattr(lib, name), name


@built
def test_c_entry_points_reject_bad_arguments_and_launcher_raises():
    ce = _ce()
    lib = ce._lib()
    invalid = 1  # cudaErrorInvalidValue

    def fwd_bwd(dtype, n):
        return lib.pyseqpack_ce_fwd_bwd(None, dtype, n, 8, 8, None, 0, None, None, None, None, 0, None, -100,
                                        0.0, 0.0, 0.0, None)

    # Bad dtype code, negative N and missing pointers are refused before any CUDA call (so no GPU is needed).
    assert fwd_bwd(7, 1) == invalid
    assert fwd_bwd(1, -1) == invalid
    assert fwd_bwd(7, 0) == invalid  # refused even where N == 0 would succeed
    assert fwd_bwd(1, 2) == invalid
    assert lib.pyseqpack_ce_scale_grad(None, 1, 2, 8, 8, None, 0, None) == invalid
    assert lib.pyseqpack_ce_scale_grad(None, 3, 2, 8, 8, None, 0, None) == invalid
    # N == 0 is a no-op success.
    assert fwd_bwd(1, 0) == 0
    with pytest.raises(RuntimeError, match="pyseqpack_ce_fwd_bwd failed with CUDA error 1: invalid argument"):
        ce._check_return(invalid, "pyseqpack_ce_fwd_bwd")


def test_launcher_refuses_cpu_tensors():
    ce = _ce()
    x = torch.randn(3, 5)
    f32 = torch.zeros(3)
    for correct in (torch.zeros(3, dtype=torch.int32), None):
        with pytest.raises(ValueError, match="logits must be a CUDA tensor"):
            ce.fwd_bwd(x, torch.zeros(3, dtype=torch.long), f32, f32.clone(), correct,
                       None, None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=0.0)
    with pytest.raises(ValueError, match="grad must be a CUDA tensor"):
        ce.scale_grad_(x, torch.ones(1))


# ---------------------------------------------------------------- fwd_bwd on a GPU

OPTIONS = {
    "plain": {},
    "smoothing": {"eps": 0.1},
    "z_loss": {"z": 1e-3},
    "softcap": {"softcap": 30.0},
    "all": {"eps": 0.2, "z": 1e-4, "softcap": 15.0},
}


@needs_gpu
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("n,v", [(1, 7), (3, 4099), (29, 32000), (3, 151936), (3, 256000)])
@pytest.mark.parametrize("dtype", DTYPES)
# int64 labels with the sum gradient; int32 labels with a mean-style scale (1 / number of valid tokens).
@pytest.mark.parametrize("label_dtype,scale", [(torch.int64, 1.0), (torch.int32, 1 / 37)])
def test_fwd_bwd_matches_torch(dtype, n, v, option, label_dtype, scale):
    opts = OPTIONS[option]
    logits, labels = make_case(n, v, dtype, label_dtype)
    before = logits.clone()
    out = run(logits, labels, scale=scale, **opts)
    assert_matches(out, reference(logits, labels, scale=scale, **opts), dtype, v, scale)
    assert torch.equal(logits, before), "the logits were modified"
    if n > 2:  # row 1 is ignored: its gradient is exact zeros
        assert torch.count_nonzero(out[3][1]) == 0 and not out[3][1].isnan().any()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 4099, 151936])
def test_forward_only_equals_forward_of_fwd_bwd(dtype, v):
    logits, labels = make_case(3, v, dtype)
    with_grad = run(logits, labels, eps=0.1)
    fwd = run(logits, labels, grad=None, eps=0.1)
    assert fwd[3] is None
    assert torch.equal(with_grad[2], fwd[2])
    for a, b in zip(with_grad[:2], fwd[:2]):
        assert torch.equal(a, b)  # the same kernel with and without a gradient: bit for bit
    assert_matches(fwd, reference(logits, labels, eps=0.1), dtype, v)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad", ["new", None, "inplace"])
@pytest.mark.parametrize("v", [7, 4099, 32000, 151936, 256000])
def test_loss_only_same_bits_as_with_accuracy(dtype, grad, v):
    # correct=None runs the ACC = false instantiation of the same kernel: the argmax is gone,
    # the sums and the gradient are computed the same way, so loss, lse and grad are bit for bit the same.
    logits, labels = make_case(3 if v > 100000 else 29, v, dtype)
    opts = dict(eps=0.1, z=1e-4, softcap=25.0, scale=0.5)
    with_acc = run(logits.clone(), labels, grad=grad, **opts)
    loss_only = run(logits.clone(), labels, grad=grad, accuracy=False, **opts)
    assert loss_only[2] is None
    for a, b in zip(with_acc[:2] + with_acc[3:], loss_only[:2] + loss_only[3:]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_matches(loss_only, reference(logits, labels, **opts), dtype, v, 0.5)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("grad_layout", ["same_strides", "contiguous", "inplace"])
@pytest.mark.parametrize("v", [5000, 151936])
def test_strided_rows(dtype, offset, grad_layout, v):
    # Rows of V inside [N, V + 13]: row starts drift modulo 16 bytes, and the view starts `offset` elements
    # into the buffer. A grad with the same strides takes the vector path with per-row heads; a contiguous
    # grad has other alignments and takes the one-element path of the kernel; in-place writes into the view.
    n = 29
    buf = (torch.randn(n, v + 13, device="cuda") * 3).to(dtype)
    logits = buf[:, offset:offset + v]
    labels = torch.randint(0, v, (n,), device="cuda")
    labels[::5] = -100
    ref = reference(logits, labels, eps=0.05, z=1e-4)
    buf_before = buf.clone()
    if grad_layout == "same_strides":
        gbuf = torch.full_like(buf, 7.0)
        grad = gbuf[:, offset:offset + v]
    elif grad_layout == "contiguous":
        grad = torch.full((n, v), float("nan"), dtype=dtype, device="cuda")
    else:
        grad = logits
    out = run(logits, labels, grad=grad, eps=0.05, z=1e-4)
    assert_matches(out, ref, dtype, v)
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:, offset:offset + v] = False
    if grad_layout == "same_strides":
        assert torch.all(gbuf[mask] == 7.0), "grad written outside its view"
    if grad_layout == "inplace":
        assert torch.equal(buf[mask], buf_before[mask]), "in-place grad written outside the logits view"
    else:
        assert torch.equal(buf, buf_before), "the logits were modified"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [7, 4099, 151936])
def test_grad_in_place(dtype, v):
    logits, labels = make_case(29 if v < 100000 else 3, v, dtype)
    ref = reference(logits, labels, softcap=20.0, eps=0.1, scale=0.5)
    out = run(logits, labels, grad="inplace", softcap=20.0, eps=0.1, scale=0.5)
    assert out[3] is logits
    assert_matches(out, ref, dtype, v, 0.5)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [8, 4099, 151936])
def test_argmax_ties_go_to_the_first_index(dtype, v):
    # Small integers: every row has several positions holding its max. Labels point at the first max, at a
    # later max, or elsewhere; one row is constant (argmax 0) and one has its max at the very last column.
    n = 12
    logits = torch.randint(-3, 3, (n, v), device="cuda").to(dtype)
    logits[:, -1] = torch.where(torch.arange(n, device="cuda") == 5, 3.0, -4.0).to(dtype)
    logits[6] = 1
    maxes = logits.float() == logits.float().amax(dim=1, keepdim=True)
    first = maxes.int().argmax(dim=1)
    last = v - 1 - maxes.flip(1).int().argmax(dim=1)
    labels = torch.where(torch.arange(n, device="cuda") % 3 == 0, first, last)
    labels[2] = (first[2] + 1) % v
    labels[6] = 0
    labels[7] = 1 if v > 1 else 0
    out = run(logits, labels)
    ref = reference(logits, labels)
    assert_matches(out, ref, dtype, v)
    assert out[2][6] == 1 and out[2][0] == 1  # constant row, label 0; a first-max label


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_argmax_ties_far_apart(dtype, offset):
    # Equal maxima far apart in a V = 151936 row: in the scalar head, in the cached part, in the uncached
    # rest and in the scalar tail, found by different threads, so the merge must keep the first index
    # whichever thread found it. Rows sit in [N, V + 1] from `offset`, so their heads and tails vary, and grad
    # has the same strides (the vector path).
    n, v = 6, 151936
    buf = torch.randint(-3, 3, (n, v + 1), device="cuda").to(dtype)
    logits = buf[:, offset:offset + v]
    first, mid, late, last = 3, v // 2 + 1, v - 9, v - 1
    ties = [(first, late), (first, late), (mid, last), (late, last), (last,), (0, last)]
    labels = torch.tensor([first, late, mid, last, last, 0], device="cuda")
    for r, cols in enumerate(ties):
        logits[r, list(cols)] = 5
    grad = torch.full_like(buf, float("nan"))[:, offset:offset + v]
    out = run(logits, labels, grad=grad, eps=0.1)
    assert out[2].tolist() == [1, 0, 1, 0, 1, 1]
    assert_matches(out, reference(logits, labels, eps=0.1), dtype, v)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [4099, 151936])
def test_all_ignored_and_out_of_range_labels(dtype, v):
    logits = (torch.randn(6, v, device="cuda") * 3).to(dtype)
    for labels in (torch.full((6,), -100, device="cuda"),
                   torch.tensor([v, v + 1000, -1, -7, 2**40, -(2**40)], device="cuda")):
        loss, lse, correct, grad = run(logits, labels, eps=0.1, z=1e-3)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(correct, torch.zeros_like(correct))
        assert torch.count_nonzero(grad) == 0 and not grad.isnan().any()
        torch.testing.assert_close(lse, torch.logsumexp(logits.float(), dim=-1), rtol=1e-5, atol=1e-4)


@needs_gpu
def test_custom_ignore_index_and_int32_labels():
    v = 4099
    logits = (torch.randn(7, v, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.tensor([3, 0, 3, 4098, 17, 3, 1], dtype=torch.int32, device="cuda")
    out = run(logits, labels, ignore_index=3)
    assert_matches(out, reference(logits, labels, ignore_index=3), torch.bfloat16, v)
    assert out[0][0] == 0 and out[0][1] > 0


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_minus_inf_columns(dtype):
    # Vocabulary padding masked to -inf, including whole 16-byte vectors at the start of the row: the online
    # max starts at -inf there and must not produce NaN.
    v = 32000
    logits, _ = make_case(5, v, dtype)
    logits[:, :64] = float("-inf")
    logits[:, -37:] = float("-inf")
    labels = torch.randint(64, v - 37, (5,), device="cuda")
    labels[1] = -100
    out = run(logits, labels)
    assert_matches(out, reference(logits, labels), dtype, v)
    assert torch.count_nonzero(out[3][:, :64]) == 0


@needs_gpu
def test_many_rows_and_nondefault_stream():
    v, n = 32000, 257
    logits, labels = make_case(n, v, torch.bfloat16, seed=3)
    ref = reference(logits, labels, z=1e-4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = run(logits, labels, z=1e-4)
    side.synchronize()
    assert_matches(out, ref, torch.bfloat16, v)


@needs_gpu
@pytest.mark.parametrize("v", [4099, 151936])
def test_cuda_graph_capture_reads_scales_on_the_device(v):
    ce = _ce()
    n = 29
    logits, labels = make_case(n, v, torch.bfloat16, seed=4)
    loss = torch.empty(n, device="cuda")
    lse = torch.empty(n, device="cuda")
    correct = torch.empty(n, dtype=torch.int32, device="cuda")
    grad = torch.empty_like(logits)
    grad_scale = torch.ones(1, device="cuda")
    grad_output = torch.ones(1, device="cuda")

    def step():
        ce.fwd_bwd(logits, labels, loss, lse, correct, grad, grad_scale,
                   ignore_index=-100, label_smoothing=0.1, z_loss=0.0, softcap=0.0)
        ce.scale_grad_(grad, grad_output)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (first call sets kernel attributes)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    new_logits, _ = make_case(n, v, torch.bfloat16, seed=5)
    logits.copy_(new_logits)
    grad_scale.fill_(0.25)
    grad_output.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference(new_logits, labels, eps=0.1, scale=0.75)
    # grad went through two roundings into bf16 (kernel, then scale_grad_): allow two units.
    torch.testing.assert_close(grad.float(), ref[3], rtol=2 * GRAD_RTOL[torch.bfloat16], atol=1e-4 * 0.75 / v)
    assert_matches((loss, lse, correct, None), ref, torch.bfloat16, v)


@needs_gpu
@pytest.mark.parametrize("accuracy", [True, False], ids=["accuracy", "loss_only"])
@pytest.mark.parametrize("dtype,v,grad", [
    (torch.bfloat16, 151936, "new"),
    (torch.bfloat16, 256000, "inplace"),
    (torch.bfloat16, 151936, None),  # forward only: one read, nothing cached
    (torch.bfloat16, 32000, "new"),  # the whole row fits the CTA's shared memory
    (torch.float32, 256000, "new"),
])
def test_one_row_kernel_launch_per_call(dtype, v, grad, accuracy):
    # One launch of ce_row_kernel, from the profiler's kernel names, in the instantiation that matches the
    # accuracy request: loss only is the ACC = false one (the last template argument: "false" demangled,
    # "Lb0E" mangled).
    logits, labels = make_case(3, v, dtype)
    run(logits.clone(), labels, grad=grad, accuracy=accuracy)  # first call: per-device setup
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(logits, labels, grad=grad, accuracy=accuracy)
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if "ce_row_kernel" in e.key]
    assert len(names) == 1, names
    acc_arg = ("true>", "Lb1E") if accuracy else ("false>", "Lb0E")
    assert any(a in names[0] for a in acc_arg), names


# ---------------------------------------------------------------- scale_grad_ on a GPU

NAN_BITS = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _nan_payload(shape, dtype):
    # A NaN whose payload any arithmetic would change (x * 1.0 returns the canonical NaN on NVIDIA GPUs): if
    # these bits survive, the kernel did not touch them.
    return torch.full(shape, NAN_BITS[dtype], dtype=INT_VIEW[dtype], device="cuda").view(dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_grad_factor_one_touches_nothing(dtype):
    grad = _nan_payload((5, 4099), dtype)
    bits = grad.view(INT_VIEW[dtype]).clone()
    out = _ce().scale_grad_(grad, torch.ones(1, device="cuda"))
    assert out is grad
    assert torch.equal(grad.view(INT_VIEW[dtype]), bits)
    # The probe itself: any other factor does rewrite these bits.
    _ce().scale_grad_(grad, torch.full((1,), 2.0, device="cuda"))
    assert not torch.equal(grad.view(INT_VIEW[dtype]), bits)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [0.5, 3.0, -1.25, 0.0])
@pytest.mark.parametrize("n,v", [(1, 7), (29, 4099), (3, 151936)])
def test_scale_grad_scalar(dtype, factor, n, v):
    grad = torch.randn(n, v, device="cuda").to(dtype)
    expected = (grad.float() * factor).to(dtype)
    _ce().scale_grad_(grad, torch.tensor([factor], device="cuda"))
    assert torch.equal(grad, expected)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 3])
def test_scale_grad_per_row_strided(dtype, offset):
    # Rows of V = 4099 inside [N, V + 5] starting `offset` elements in; rows whose factor is exactly 1.0 hold
    # NaN payloads that must come back bit for bit; the gap columns must not be touched.
    n, v = 29, 4099
    buf = torch.randn(n, v + 5, device="cuda").to(dtype)
    factors = torch.linspace(-2, 2.5, n, device="cuda")  # no accidental 1.0
    factors[::4] = 1.0
    buf[::4] = _nan_payload((len(range(0, n, 4)), v + 5), dtype)
    grad = buf[:, offset:offset + v]
    before = buf.clone()
    expected = (grad.float() * factors[:, None]).to(dtype)
    _ce().scale_grad_(grad, factors)
    keep = factors != 1.0
    assert torch.equal(grad[keep], expected[keep])
    assert torch.equal(buf[::4].view(INT_VIEW[dtype]), before[::4].view(INT_VIEW[dtype]))
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[:, offset:offset + v] = False
    assert torch.equal(buf[mask].view(INT_VIEW[dtype]), before[mask].view(INT_VIEW[dtype]))


@needs_gpu
def test_scale_grad_rejects_wrong_factor_count():
    grad = torch.zeros(4, 8, device="cuda")
    with pytest.raises(ValueError, match="grad_output must have 1 element or one per row of grad"):
        _ce().scale_grad_(grad, torch.ones(3, device="cuda"))
