"""Drop-ins against the real torch classes: pyseqpack.cross_entropy vs torch.nn.functional.cross_entropy,
pyseqpack.nn.CrossEntropyLoss vs torch.nn.CrossEntropyLoss, and nn.FusedCrossEntropyLoss vs the function it wraps.

Values and gradients are compared with torch run on the same inputs in the same dtype. fp32 agrees to fp32
rounding. In bf16/fp16 torch itself rounds its intermediate log-probabilities (and its loss) to the dtype while
we compute in fp32 and round at the end, so the two differ by a few units in the last place: we compare both
against torch in fp32 and require our error to be at most 2x torch's own, plus the conversions of our result
into the dtype (see ROUNDING).

The fused path is checked on the torch backend and, by forcing "auto" to pick it, on the Triton kernel (on the
GPU when there is one, else CPU tensors through the interpreter: devices.py), so class weights (a per-row factor
on the kernel's loss and gradient) are exercised on a kernel too.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import pyseqpack
from pyseqpack.cross_entropy import cross_entropy, fused_cross_entropy
from pyseqpack.nn import CrossEntropyLoss, FusedCrossEntropyLoss

from devices import device_for

ce_mod = importlib.import_module("pyseqpack.cross_entropy")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Our result reaches the dtype through two conversions (the forward's store, then backward's scaling by a
# grad_output != 1), each within one unit in the last place: 2^-7 relative in bf16 (the Triton *interpreter*
# truncates fp32 -> bf16, the GPU rounds to nearest, i.e. half that), 2^-10 in fp16. The 2x-torch rule gets
# this relative slack on top.
ROUNDING = {torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


@pytest.fixture(params=["torch", "triton"])
def auto_backend(request, monkeypatch):
    """Make backend="auto" (what the drop-ins use) resolve to the given backend; inputs go on its test device."""
    auto = {} if request.param == "torch" else {"cpu": (request.param,), "cuda": (request.param,)}
    monkeypatch.setattr(ce_mod, "DISPATCH", ce_mod._dispatcher(auto))
    assert ce_mod.DISPATCH.select("auto", torch.device(device_for(request.param)))[0] == request.param
    return request.param


def inputs(n, c, dtype, *, seed=0, ignore=True, weight=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=gen) * 2).to(dtype)
    t = torch.randint(0, c, (n,), generator=gen)
    if ignore:
        t[::3] = -100
    w = (torch.rand(c, generator=gen) + 0.1).to(dtype) if weight else None
    return x.to(device), t.to(device), None if w is None else w.to(device)


def both(fn_ours, fn_torch, x, *args, grad_seed=1, **kwargs):
    """(value, grad) for ours and torch's on the same input; a random upstream gradient for reduction none."""
    results = []
    for fn in (fn_ours, fn_torch):
        xi = x.detach().clone().requires_grad_(True)
        out = fn(xi, *args, **kwargs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
        out.backward(g)
        results.append((out.detach(), xi.grad))
    return results


def assert_matches_torch(ours, theirs, exact, dtype):
    """ours / theirs: (value, grad) in the dtype; exact: torch's (value, grad) in fp32 on the upcast input."""
    for k in range(2):
        assert ours[k].dtype == theirs[k].dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6)
            continue
        err_ours = (ours[k].float() - exact[k]).abs()
        err_torch = (theirs[k].float() - exact[k]).abs()
        slack = ROUNDING[dtype] * exact[k].abs() + 1e-6
        assert bool((err_ours <= 2 * err_torch.max() + slack).all()), (k, float(err_ours.max()), float(err_torch.max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
def test_functional_matches_torch(weighted, label_smoothing, reduction, dtype, auto_backend):
    x, t, w = inputs(10, 23, dtype, weight=weighted, device=device_for(auto_backend))
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    ours, theirs = both(cross_entropy, F.cross_entropy, x, t, **kw)
    exact = both(F.cross_entropy, F.cross_entropy, x.float(), t, weight=None if w is None else w.float(),
                 reduction=reduction, label_smoothing=label_smoothing)[0]
    assert_matches_torch(ours, theirs, exact, dtype)


@pytest.mark.parametrize("weighted", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_over_zero_valid_targets_is_nan_like_torch(label_smoothing, weighted, auto_backend):
    x, _, w = inputs(4, 7, torch.float32, weight=weighted, device=device_for(auto_backend))
    t = torch.full((4,), -100, device=x.device)
    ours, theirs = both(cross_entropy, F.cross_entropy, x, t, weight=w, label_smoothing=label_smoothing)
    assert torch.isnan(ours[0]) and torch.isnan(theirs[0])
    assert torch.equal(ours[1], theirs[1])  # torch's gradient there: zeros


def test_custom_ignore_index_and_single_sample(auto_backend):
    x, t, _ = inputs(6, 5, torch.float32, ignore=False, device=device_for(auto_backend))
    ours, theirs = both(cross_entropy, F.cross_entropy, x, t, ignore_index=2, label_smoothing=0.2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # [C] input with a 0-dim target, every reduction
    for reduction in ("mean", "sum", "none"):
        ours, theirs = both(cross_entropy, F.cross_entropy, x[0], t[0], reduction=reduction)
        assert ours[0].shape == theirs[0].shape == ()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
def test_positional_arguments_follow_torch():
    """torch's positional order: (input, target, weight, size_average, ignore_index, reduce, reduction,
    label_smoothing); the legacy size_average / reduce flags map to a reduction as in torch."""
    x, t, w = inputs(12, 6, torch.float32, weight=True, ignore=False)
    assert {1, 2} <= set(t.tolist())  # the ignore_index values below do hit targets
    for args in [(w, None, 1, None, "sum", 0.1), (w, False, -100, None), (None, None, -100, False), (w, True, 2)]:
        torch.testing.assert_close(cross_entropy(x, t, *args), F.cross_entropy(x, t, *args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["k_dim", "probabilities", "probabilities_bf16", "empty_batch"],
)
def test_other_forms_fall_back_to_torch(case):
    """Forms the fused op does not cover go to torch itself: identical results."""
    gen = torch.Generator().manual_seed(3)
    if case == "k_dim":
        x, t = torch.randn(3, 5, 4, generator=gen), torch.randint(0, 5, (3, 4), generator=gen)
    elif case.startswith("probabilities"):
        x, t = torch.randn(3, 5, generator=gen), torch.softmax(torch.randn(3, 5, generator=gen), -1)
        if case.endswith("bf16"):
            x, t = x.bfloat16(), t.bfloat16()
    else:
        x, t = torch.randn(0, 5), torch.zeros(0, dtype=torch.int64)
    ours, theirs = both(cross_entropy, F.cross_entropy, x, t, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,args,kwargs",
    [
        ("int32 target", (torch.randn(3, 5), torch.zeros(3, dtype=torch.int32)), {}),
        ("weight dtype", (torch.randn(3, 5).bfloat16(), torch.zeros(3, dtype=torch.int64)),
         {"weight": torch.ones(5)}),
        ("weight size", (torch.randn(3, 5), torch.zeros(3, dtype=torch.int64)), {"weight": torch.ones(4)}),
        ("batch mismatch", (torch.randn(3, 5), torch.zeros(4, dtype=torch.int64)), {}),
        ("bad reduction", (torch.randn(3, 5), torch.zeros(3, dtype=torch.int64)), {"reduction": "avg"}),
        ("smoothing > 1", (torch.randn(3, 5), torch.zeros(3, dtype=torch.int64)), {"label_smoothing": 1.5}),
    ],
)
def test_invalid_input_raises_like_torch(name, args, kwargs):
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(*args, **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        cross_entropy(*args, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_out_of_range_target_raises_index_error():
    x = torch.randn(4, 6)
    t = torch.tensor([0, 6, -100, 1])
    with pytest.raises(IndexError):
        F.cross_entropy(x, t)
    with pytest.raises(IndexError, match=r"target\[1\] = 6 is out of range"):
        cross_entropy(x, t)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_requiring_grad_raises_torchs_error(reduction, label_smoothing):
    """torch's loss is not differentiable w.r.t. the class weights: a weight that requires grad raises torch's own
    error (same type, same message) from the function and the module; without grad mode both compute."""
    x, t, w = inputs(6, 9, torch.float32, weight=True)
    x.requires_grad_(True)
    w.requires_grad_(True)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    with pytest.raises(Exception) as theirs:
        F.cross_entropy(x, t, w, **kwargs)
    assert "not differentiable with respect to argument 'weight'" in str(theirs.value)
    for ours_fn in (lambda: cross_entropy(x, t, w, **kwargs), lambda: CrossEntropyLoss(weight=w, **kwargs)(x, t)):
        with pytest.raises(Exception) as ours:
            ours_fn()
        assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)
    with torch.no_grad():
        torch.testing.assert_close(cross_entropy(x, t, w, **kwargs), F.cross_entropy(x, t, w, **kwargs),
                                   rtol=1e-5, atol=1e-6)


def test_inputs_not_mutated(auto_backend):
    x, t, w = inputs(5, 9, torch.bfloat16, weight=True, device=device_for(auto_backend))
    x.requires_grad_(True)
    before = (x.detach().clone(), t.clone(), w.clone())
    cross_entropy(x, t, w, label_smoothing=0.1).backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(t, before[1]) and torch.equal(w, before[2])


def test_dropins_skip_the_argmax(monkeypatch, auto_backend):
    """The drop-ins return no accuracy, so they call the backend with correct=None (the kernels' loss-only
    variant); fused_cross_entropy, whose output has the counts, passes a correct buffer."""
    mod = ce_mod.DISPATCH.launcher(auto_backend, torch.device(device_for(auto_backend)))
    real = mod.fwd_bwd
    loss_only = []

    def spy(logits, labels, loss, lse, correct, *args, **kwargs):
        loss_only.append(correct is None)
        return real(logits, labels, loss, lse, correct, *args, **kwargs)

    monkeypatch.setattr(mod, "fwd_bwd", spy)
    x, t, _ = inputs(6, 9, torch.float32, device=device_for(auto_backend))
    x.requires_grad_(True)
    cross_entropy(x, t, label_smoothing=0.1).backward()
    CrossEntropyLoss(reduction="sum")(x, t).backward()
    fused_cross_entropy(x, t).loss.backward()
    assert loss_only == [True, True, False]


# ------------------------------------------------------------------------------------------------------------
# nn modules
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize(
    "ctor",
    [
        {},
        {"reduction": "sum", "ignore_index": 4},
        {"reduction": "none", "label_smoothing": 0.1},
        {"weight": "w", "label_smoothing": 0.2},
        {"weight": "w", "size_average": False},
    ],
    ids=["default", "sum_ignore4", "none_smooth", "weight_smooth", "legacy_size_average"],
)
def test_module_matches_torch(ctor, auto_backend):
    x, t, w = inputs(9, 8, torch.float32, weight=True, device=device_for(auto_backend))
    t[t == -100] = ctor.get("ignore_index", -100)
    kwargs = {k: (w if v == "w" else v) for k, v in ctor.items()}
    ours_mod, torch_mod = CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
    assert isinstance(ours_mod, torch.nn.CrossEntropyLoss)
    assert repr(ours_mod) == repr(torch_mod)
    assert ours_mod.state_dict().keys() == torch_mod.state_dict().keys()
    assert ours_mod.reduction == torch_mod.reduction
    ours, theirs = both(ours_mod, torch_mod, x, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_public_module_names():
    assert pyseqpack.cross_entropy is cross_entropy  # the function, not the submodule of the same name
    assert pyseqpack.CrossEntropyLoss is CrossEntropyLoss
    assert pyseqpack.FusedCrossEntropyLoss is FusedCrossEntropyLoss


def test_fused_module_wraps_function():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    opts = dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, softcap=5.0, shift=True)
    mod = FusedCrossEntropyLoss(**opts)
    assert "shift=True" in repr(mod) and "softcap=5.0" in repr(mod)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    out = mod(a, labels, num_items_in_batch=4)
    ref = fused_cross_entropy(b, labels, num_items_in_batch=4, **opts)
    out.loss.backward()
    ref.loss.backward()
    for field in ("loss", "num_correct", "num_tokens", "accuracy"):
        assert torch.equal(getattr(out, field), getattr(ref, field))
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"label_smoothing": 2.0}, "label_smoothing"),
        ({"softcap": 0}, "softcap"),
        ({"backend": "gpu"}, "backend must be one of"),
        ({"z_loss": -1.0}, "z_loss"),
    ],
)
def test_fused_module_validates_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedCrossEntropyLoss(**kwargs)
