"""Cross-entropy benchmarks: one LM-loss training step on [N, V] logits, forward + backward + token accuracy.

Groups ``ce N=.. V=.. dtype`` (every implementation side by side, on the bench device):

* torch eager (baseline), as transformers + TRL run it: ``F.cross_entropy(logits.float(), labels)``
  (transformers' ForCausalLMLoss upcasts) and TRL's accuracy ``pred = logits.argmax(-1);
  correct = ((pred == labels) & mask).sum()``, ``correct / mask.sum()`` (a second full read of the logits);
* the same function under ``torch.compile`` (compiled once, before timing);
* ``pyseqpack.fused_cross_entropy`` per backend available here (loss, gradient and accuracy in one pass);
* pyseqpack's ``cross_entropy`` drop-in per backend (``DROPIN_LOSS_ONLY``): the same kernels without the argmax,
  so ``fused_cross_entropy`` against it, backend by backend, is what token accuracy costs pyseqpack;
* on CUDA, when importable: Liger-Kernel's ``LigerCrossEntropyLoss(return_token_accuracy=True)`` (writes the
  gradient into the logits' storage) and quack's ``cross_entropy`` plus the argmax accuracy (quack has none);
* "loss-only" variants of the others (no accuracy): the difference is what accuracy costs each of them.

Logits are a leaf tensor requiring grad; one timed step is ``logits.grad = None; loss, acc = step();
loss.backward()``. GB/s counts one read of the logits and one write of their gradient, 2 * N * V * element
size: the traffic a fused kernel cannot avoid (the eager path moves several times that). Peak memory (CUDA)
is what the step allocates above the live logits and labels.

On a CPU (small shapes only) torch runs with --cpu-threads threads (1 by default); there pyseqpack has only
its torch backend (the fused kernels are CUDA / Triton).

Before timing, each implementation's loss, accuracy and gradient are compared with the eager baseline on a
copy of the first rows of the inputs, so a wrong result fails instead of being reported.
"""
from __future__ import annotations

import functools
import gc
import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

import helpers as H

IGNORE = -100
SEED = 4321

# (tokens N, vocab V) per device kind and mode, times the dtypes.
SHAPES = {
    "cuda": {
        "full": [(n, v) for n in (4096, 16384, 32768) for v in (32000, 128256, 151936)],
        "quick": [(n, v) for n in (4096, 16384) for v in (32000, 128256, 151936)],
        "smoke": [(256, 1000), (256, 4099)],
    },
    "cpu": {
        "full": [(512, 32000), (2048, 32000), (512, 128256)],
        "quick": [(512, 32000), (512, 128256)],
        "smoke": [(32, 1000), (32, 4099)],
    },
}
DTYPES = {"cuda": {"full": ["bf16"], "quick": ["bf16"], "smoke": ["bf16", "fp32"]},
          "cpu": {"full": ["fp32", "bf16"], "quick": ["fp32", "bf16"], "smoke": ["fp32"]}}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The shape the goals are checked on (bf16, a Qwen-sized vocabulary): >= 2.8 TB/s effective, >= 3x eager,
# >= 1.5x Liger with accuracy.
HEADLINE = (16384, 151936, "bf16")
# Label of the loss-only drop-in rows, followed by the backend as in the fused rows' labels: "...[cuda]",
# "...[triton]", "...[torch]". Their ids in IMPLS are the fused rows' ids plus
# "-loss-only" ("pyseqpack-cuda" -> "pyseqpack-cuda-loss-only").
DROPIN_LOSS_ONLY = "pyseqpack cross_entropy (drop-in, loss only)"


def pytest_generate_tests(metafunc):
    if "ce_case" not in metafunc.fixturenames:
        return
    mode = metafunc.config.getoption("--bench-mode")
    dev = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    cases = [(n, v, dt) for dt in DTYPES[dev][mode] for n, v in SHAPES[dev][mode]]
    metafunc.parametrize("ce_case", cases, ids=[f"N{n}-V{v}-{dt}" for n, v, dt in cases])


# ----------------------------------------------------------------------------------------------------
# Implementations: each builder returns step(logits, labels) -> (loss, accuracy or None), differentiable
# in logits; accuracy stays a device tensor (no host sync).
# ----------------------------------------------------------------------------------------------------

def _eager_step(logits, labels, with_acc=True):
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
    if not with_acc:
        return loss, None
    mask = labels != IGNORE
    correct = ((logits.argmax(-1) == labels) & mask).sum()
    return loss, correct / mask.sum()


def _eager(with_acc):
    return lambda device: functools.partial(_eager_step, with_acc=with_acc)


def _compiled(with_acc):
    def build(device):
        if device.type == "cuda":
            pytest.importorskip("triton", reason="torch.compile on CUDA needs triton")
        # Every case compiles afresh (two shapes: the check's slice and the timed one); without the reset the
        # cases' graphs pile up on _eager_step and hit dynamo's recompile limit.
        torch._dynamo.reset()
        return torch.compile(functools.partial(_eager_step, with_acc=with_acc), dynamic=False, fullgraph=True)

    return build


def _pyseqpack(backend, loss_only=False):
    """fused_cross_entropy on ``backend`` or, with ``loss_only``, what the ``cross_entropy`` drop-in runs for
    these inputs (mean over the valid labels, no accuracy) with the backend named."""

    def build(device):
        import pyseqpack
        from pyseqpack import _native

        try:
            fused = pyseqpack.fused_cross_entropy
        except (AttributeError, ImportError) as e:
            pytest.skip(f"pyseqpack.fused_cross_entropy is unavailable: {type(e).__name__}: {e}")
        if device.type == "cpu" and backend == "triton":
            pytest.skip("Triton on CPU tensors only runs in its interpreter: not timed")
        try:  # a tiny call: does this backend run here (built, right device)?
            fused(torch.zeros(2, 8, device=device), torch.zeros(2, dtype=torch.long, device=device), backend=backend)
        except _native.BackendUnavailable as e:
            pytest.skip(f"backend {backend!r} is not available on {device}: {e}")
        ce_mod = importlib.import_module("pyseqpack.cross_entropy")  # the package (the attribute is the function)

        def step(logits, labels):
            out = fused(logits, labels, ignore_index=IGNORE, backend=backend)
            return out.loss, out.accuracy

        def dropin_step(logits, labels):
            # pyseqpack.cross_entropy(logits, labels, ignore_index=IGNORE) takes no backend argument (it is
            # torch's signature), so this is its body for [N, V] logits without class weights, with the backend
            # named: the label check (on a GPU a device-side assert, as in the fused rows), the mean over the
            # valid labels, with_accuracy=False, the loss in the logits' dtype.
            if ce_mod._label_checks_default():
                ce_mod._check_label_range(labels, logits.shape[-1], IGNORE, "target", IndexError)
            valid = labels != IGNORE
            grad_scale = (1.0 / valid.sum().to(torch.float32)).reshape(1)
            rows = ce_mod._rows(logits, labels, grad_scale, None, None, IGNORE, 0.0, 0.0, 0.0, False, False,
                                backend)[0]
            return rows.sum().to(logits.dtype), None

        return dropin_step if loss_only else step

    return build


def _liger(with_acc):
    def build(device):
        if device.type != "cuda":
            pytest.skip("Liger-Kernel runs on CUDA only")
        mod = pytest.importorskip("liger_kernel.transformers")
        loss_fn = mod.LigerCrossEntropyLoss(ignore_index=IGNORE, return_token_accuracy=with_acc)

        def step(logits, labels):
            out = loss_fn(logits, labels)
            return (out.loss, out.token_accuracy) if with_acc else (out, None)

        return step

    return build


def _quack(with_acc):
    def build(device):
        if device.type != "cuda":
            pytest.skip("quack runs on CUDA only")
        ce = pytest.importorskip("quack.cross_entropy").cross_entropy
        # Recent quack takes reduction= (default "mean"); older releases return per-token losses only.
        kw = {"reduction": "none"} if "reduction" in inspect.signature(ce).parameters else {}

        def step(logits, labels):
            # quack's per-token losses (ignored tokens give 0), reduced to the mean over valid tokens.
            mask = labels != IGNORE
            loss = ce(logits, labels, ignore_index=IGNORE, **kw).sum() / mask.sum()
            if not with_acc:
                return loss, None
            return loss, ((logits.argmax(-1) == labels) & mask).sum() / mask.sum()

        return step

    return build


# id -> (label, role, builder)
IMPLS = {
    "eager": ("torch eager (+argmax accuracy)", H.BASELINE, _eager(True)),
    "eager-loss-only": ("torch eager, loss only", H.OTHER, _eager(False)),
    "compile": ("torch.compile (+argmax accuracy)", H.OTHER, _compiled(True)),
    "compile-loss-only": ("torch.compile, loss only", H.OTHER, _compiled(False)),
    "pyseqpack-cuda": ("pyseqpack fused_cross_entropy[cuda]", H.OURS, _pyseqpack("cuda")),
    "pyseqpack-triton": ("pyseqpack fused_cross_entropy[triton]", H.OURS, _pyseqpack("triton")),
    "pyseqpack-torch": ("pyseqpack fused_cross_entropy[torch]", H.OURS, _pyseqpack("torch")),
    "pyseqpack-cuda-loss-only": (f"{DROPIN_LOSS_ONLY}[cuda]", H.OURS, _pyseqpack("cuda", loss_only=True)),
    "pyseqpack-triton-loss-only": (f"{DROPIN_LOSS_ONLY}[triton]", H.OURS, _pyseqpack("triton", loss_only=True)),
    "pyseqpack-torch-loss-only": (f"{DROPIN_LOSS_ONLY}[torch]", H.OURS, _pyseqpack("torch", loss_only=True)),
    "liger": ("Liger LigerCrossEntropyLoss (+token accuracy)", H.OTHER, _liger(True)),
    "liger-loss-only": ("Liger LigerCrossEntropyLoss, loss only", H.OTHER, _liger(False)),
    "quack": ("quack cross_entropy (+argmax accuracy)", H.OTHER, _quack(True)),
    "quack-loss-only": ("quack cross_entropy, loss only", H.OTHER, _quack(False)),
}


def _check(step, logits, labels, dtype, rows=1024):
    """Loss, accuracy and gradient of ``step`` against the eager baseline, on copies of the first ``rows``
    rows (rows are independent; a copy of the largest GPU case would not fit beside it)."""
    logits, labels = logits[:rows], labels[:rows]
    ref_x = logits.detach().clone().requires_grad_(True)
    ref_loss, ref_acc = _eager_step(ref_x, labels)
    ref_loss.backward()
    x = logits.detach().clone().requires_grad_(True)
    loss, acc = step(x, labels)
    loss.backward()
    # fp32: both reduce the same fp32 values in different orders; bf16: the gradient is rounded to bf16.
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=tol, atol=tol)
    grad_scale = ref_x.grad.float().abs().max()
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), rtol=tol, atol=tol * grad_scale)
    if acc is not None:
        # Exact ties between the top logits (common in bf16) may legitimately resolve differently.
        slack = 2.0 / max(int((labels != IGNORE).sum()), 1)
        assert abs(float(acc) - float(ref_acc)) <= slack, f"accuracy {float(acc)} vs eager {float(ref_acc)}"


@pytest.mark.parametrize("impl", list(IMPLS))
def test_cross_entropy(benchmark, bench_cfg, ce_case, impl):
    device = bench_cfg.device
    n, v, dt = ce_case
    dtype = TORCH_DTYPES[dt]
    label, role, build = IMPLS[impl]
    if impl.startswith("compile") and bench_cfg.mode == "smoke":
        pytest.skip("torch.compile takes seconds per shape: not in smoke mode")
    step = build(device)
    benchmark.group = f"ce N={n} V={v} {dt}"
    oom = None
    try:
        logits, labels = H.ce_inputs(n, v, dtype, device, seed=SEED)
        _check(step, logits, labels, dtype)

        def run():
            logits.grad = None
            loss, acc = step(logits, labels)
            loss.backward()
            return loss, acc

        info = {"suite": "ce", "impl": label, "role": role, "tokens": n, "vocab": v, "dtype": dt,
                "accuracy": not impl.endswith("loss-only")}
        # the goals are about the step with token accuracy
        if device.type == "cuda" and role == H.OURS and info["accuracy"] and (n, v, dt) == HEADLINE:
            info["goal"] = [
                {"kind": "gbps_at_least", "value": 2800, "label": "effective bandwidth, bf16 16384 x 151936"},
                {"kind": "speedup_at_least", "value": 3, "label": ">= 3x torch eager (+argmax accuracy)"},
                {"kind": "faster_than", "impl": IMPLS["liger"][0], "value": 1.5,
                 "label": ">= 1.5x Liger with token accuracy"},
                {"kind": "overhead_at_most", "impl": IMPLS[impl + "-loss-only"][0], "value": 0.03,
                 "label": "token accuracy adds <= 3% over the same kernel without it"},
            ]
        H.measure(benchmark, run, bench_cfg, nbytes=2 * n * v * logits.element_size(), info=info,
                  reset=lambda: setattr(logits, "grad", None))
    except torch.cuda.OutOfMemoryError as e:
        oom = str(e).splitlines()[0]
    if oom is not None:
        # Outside the except block: the traceback (and the tensors its frames hold) is gone by now.
        logits = labels = None
        gc.collect()
        torch.cuda.empty_cache()
        pytest.skip(f"{label}: out of memory at N={n} V={v} {dt}: {oom}")
