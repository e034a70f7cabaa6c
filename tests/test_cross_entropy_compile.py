"""The cross-entropy ops under torch.library.opcheck and torch.compile(fullgraph=True), and CUDA-graph capture.

opcheck checks each op's schema (declared mutations match what the kernel does), its fake implementation
(shapes/dtypes/strides match the real one), the autograd registration, and AOT dispatch. torch.compile runs a
small training step (linear LM head + our loss) with fullgraph=True, which fails on any graph break, and compares
loss and parameter gradients with eager mode. Inductor compiles for CPU here; our ops stay opaque calls that run
the real backend at run time (the Triton interpreter included).
"""
import pytest
import torch

from pyseqpack.cross_entropy import cross_entropy, fused_cross_entropy
from pyseqpack.nn import CrossEntropyLoss

from devices import device_for

OPS = torch.ops.pyseqpack  # registered by importing pyseqpack.cross_entropy

# opcheck's internals use torch.jit.script_method, deprecated in this torch
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


OPCHECKS = {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}


def _opcheck(op, args):
    """Every opcheck test, each of which must succeed."""
    result = torch.library.opcheck(op, args)  # default test_utils: all four
    assert set(result) == OPCHECKS and all(v == "SUCCESS" for v in result.values()), result


def _inputs(backend, shape=(5,), v=11, label_dtype=torch.int64):
    gen = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    logits = torch.randn(*shape, v, generator=gen).to(dev)
    labels = torch.randint(0, v, shape, generator=gen).to(dev, label_dtype)
    labels.view(-1)[2] = -100
    return logits, labels, torch.tensor([0.25], device=dev)


# The ops are kernels: they write the tensors their schema declares mutated and have no autograd formula of
# their own (their autograd is the autograd.Function _CrossEntropyFunction, because the gradient buffer that
# backward scales in place cannot be an op output). Their inputs therefore do not require grad here;
# autograd through them, eager and compiled, is what the torch.compile tests below check.

# (shape, label dtype, gradient buffer, row_weight, class_weight, smoothing, z, softcap)
FWD_BWD_CASES = {
    "forward_only": ((5,), torch.int64, False, False, False, 0.1, 1e-2, 3.0),
    "grad": ((5,), torch.int64, True, False, False, 0.1, 1e-2, 3.0),
    "grad_plain_3d_int32": ((2, 3), torch.int32, True, False, False, 0.0, 0.0, 0.0),
    "grad_row_weight": ((5,), torch.int64, True, True, False, 0.0, 0.0, 0.0),
    "grad_class_weight_smoothing": ((5,), torch.int64, True, False, True, 0.2, 0.0, 0.0),
}


@pytest.mark.parametrize("with_accuracy", [True, False], ids=["accuracy", "loss_only"])
@pytest.mark.parametrize("case", list(FWD_BWD_CASES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_fwd_bwd(backend, case, with_accuracy):
    shape, label_dtype, grad, row_weight, class_weight, eps, z, cap = FWD_BWD_CASES[case]
    if backend == "triton" and class_weight:
        pytest.skip("class weights always run on the reference")
    logits, labels, scale = _inputs(backend, shape, label_dtype=label_dtype)
    rw = torch.rand(shape, device=logits.device) if row_weight else None
    cw = torch.rand(logits.shape[-1], device=logits.device) if class_weight else None
    buffer = torch.empty_like(logits) if grad else None
    _opcheck(OPS.cross_entropy_fwd_bwd.default,
             (logits, labels, scale, rw, cw, buffer, -100, eps, z, cap, with_accuracy, backend))


@pytest.mark.parametrize("with_accuracy", [True, False], ids=["accuracy", "loss_only"])
@pytest.mark.parametrize("shape,options", [((5,), (0.1, 1e-2, 3.0)), ((2, 3), (0.0, 0.0, 0.0))], ids=["1d", "2d"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_inplace(backend, shape, options, with_accuracy):
    logits, labels, scale = _inputs(backend, shape)
    rw = torch.rand(shape, device=logits.device) if shape == (5,) else None
    _opcheck(OPS.cross_entropy_fwd_bwd_inplace.default,
             (logits, labels, scale, rw, -100, *options, with_accuracy, backend))


@pytest.mark.parametrize("grad_shape,factor_shape", [((5, 11), (5,)), ((2, 3, 11), (1,)), ((2, 3, 11), (2, 3)),
                                                     ((11,), ())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_scale_grad(backend, dtype, grad_shape, factor_shape):
    dev = device_for(backend)
    _opcheck(OPS.cross_entropy_scale_grad_.default,
             (torch.randn(grad_shape, device=dev).to(dtype), torch.randn(factor_shape, device=dev), backend))


def _model(seed=0, v=29, device="cpu"):
    torch.manual_seed(seed)
    head = torch.nn.Linear(8, v)
    hidden = torch.randn(2, 6, 8)
    labels = torch.randint(0, v, (2, 6))
    labels[0, :3] = -100
    return head.to(device), hidden.to(device), labels.to(device)


def _eager_vs_compiled(step, head, *inputs):
    """Run step (returns a scalar loss, plus extras) eagerly and compiled with fullgraph=True; backward each."""
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        head.zero_grad()
        out = fn(*inputs)
        out[0].backward()
        results.append(([o.detach() for o in out], head.weight.grad.clone(), head.bias.grad.clone()))
    (eager, gw, gb), (comp, cw, cb) = results
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, cw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, cb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compile_fused_training_step(backend):
    torch._dynamo.reset()
    head, hidden, labels = _model(device=device_for(backend))

    def step(hidden, labels):
        out = fused_cross_entropy(head(hidden), labels, shift=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                  num_items_in_batch=labels.ne(-100).sum(), backend=backend)
        return out.loss, out.num_correct, out.num_tokens, out.accuracy

    _eager_vs_compiled(step, head, hidden, labels)


def test_compile_reduction_none_and_inplace():
    torch._dynamo.reset()
    head, hidden, labels = _model(1)
    weights = torch.rand(2, 6)

    def step_none(hidden, labels):
        out = fused_cross_entropy(head(hidden), labels, reduction="none")
        return (out.loss * weights).sum(), out.accuracy

    def step_inplace(hidden, labels):
        out = fused_cross_entropy(head(hidden), labels, inplace_backward=True)
        return out.loss, out.accuracy

    _eager_vs_compiled(step_none, head, hidden, labels)
    _eager_vs_compiled(step_inplace, head, hidden, labels)


def test_compile_inplace_refuses_overlapping_logits():
    """The overlap check sits in the in-place op itself, so it also holds in a compiled graph."""
    torch._dynamo.reset()
    base = torch.randn(40, requires_grad=True)
    labels = torch.randint(0, 7, (4,))

    def step(base, labels):  # rows 3 elements apart, 7 wide: neighbouring rows share memory
        return fused_cross_entropy(base.mul(2).as_strided((4, 7), (3, 1)), labels, inplace_backward=True).loss

    with pytest.raises(Exception, match="overlap in memory"):
        torch.compile(step, fullgraph=True)(base, labels)


def test_compile_dropins():
    torch._dynamo.reset()
    head, hidden, labels = _model(2)
    weight = torch.rand(29) + 0.5
    module = CrossEntropyLoss(weight=weight, label_smoothing=0.1)

    def step_functional(hidden, labels):
        return (cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), weight=weight),)

    def step_module(hidden, labels):
        return (module(head(hidden).flatten(0, 1), labels.flatten()),)

    _eager_vs_compiled(step_functional, head, hidden, labels)
    _eager_vs_compiled(step_module, head, hidden, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
def test_cuda_graph_capture():
    """Forward + backward captured in a CUDA graph (no host sync anywhere), replayed on new data."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000).cuda().bfloat16()
    hidden = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, 1000, (4, 32), device="cuda")

    def step():
        out = fused_cross_entropy(head(hidden), labels, shift=True)
        out.loss.backward()
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: Triton compiles, allocator settles
            head.zero_grad(set_to_none=False)
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    head.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        out = step()
    hidden.copy_(torch.randn_like(hidden))
    labels.copy_(torch.randint(0, 1000, labels.shape, device="cuda"))
    head.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    expected_grad = head.weight.grad.clone()
    head.zero_grad(set_to_none=False)
    eager = step()
    torch.testing.assert_close(out.loss, eager.loss)
    assert torch.equal(out.num_correct, eager.num_correct)
    torch.testing.assert_close(expected_grad, head.weight.grad, rtol=2**-6, atol=1e-3)


# Compiles the kernels for one architecture and prints ptxas's resource usage; run in a fresh interpreter because
# under TRITON_INTERPRET=1 (set by conftest for this process) @triton.jit functions cannot be compiled.
_AOT_SCRIPT = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyseqpack.kernels import cross_entropy as k

arch = int(sys.argv[1])
target = GPUTarget("cuda", arch, 32)
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
block, warps = k.fwd_bwd_config(151936)
# (HAS_GRAD, HAS_SMOOTHING, HAS_Z, HAS_SOFTCAP, HAS_ACC): everything on; accuracy only; the drop-in's loss only
variants = [("bf16", "i64", (True,) * 5), ("fp32", "i32", (False,) * 4 + (True,)),
            ("bf16", "i64", (True,) + (False,) * 4)]
for dtype, labels, flags in variants:
    signature = {
        "logits_ptr": "*" + dtype, "stride_logits": "i64", "labels_ptr": "*" + labels, "loss_ptr": "*fp32",
        "lse_ptr": "*fp32", "correct_ptr": "*i32", "grad_ptr": "*" + dtype, "stride_grad": "i64",
        "grad_scale_ptr": "*fp32", "V": "i32", "ignore_index": "i32", "label_smoothing": "fp32", "z_loss": "fp32",
        "softcap": "fp32", "HAS_GRAD": "constexpr", "HAS_SMOOTHING": "constexpr", "HAS_Z": "constexpr",
        "HAS_SOFTCAP": "constexpr", "HAS_ACC": "constexpr", "BLOCK": "constexpr",
    }
    constexprs = dict(zip(("HAS_GRAD", "HAS_SMOOTHING", "HAS_Z", "HAS_SOFTCAP", "HAS_ACC"), flags), BLOCK=block)
    kernel = triton.compile(ASTSource(k._ce_fwd_bwd_kernel, signature, constexprs), target=target,
                            options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    print(dtype, [line.strip() for line in out.splitlines() if "REG:" in line][0])
scale_sig = {"grad_ptr": "*bf16", "stride_grad": "i64", "factor_ptr": "*fp32", "stride_factor": "i32", "V": "i32",
             "BLOCK": "constexpr"}
triton.compile(ASTSource(k._scale_grad_kernel, scale_sig, {"BLOCK": 8192}), target=target, options={"num_warps": 16})
print("scale_grad ok")
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu(arch):
    """The interpreter is lenient (loop-carried types, scalar branches): compile the kernels with Triton's real
    NVIDIA backend down to a cubin for sm_80 / sm_90 (no GPU needed: ptxas ships with triton), and require that
    ptxas spills nothing (no stack frame) at the block size fwd_bwd_config picks for V = 151936."""
    import os
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the source tree's pyseqpack/
    # (no compiled modules, no pyseqpack.kernels) would shadow the installed package.
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(arch)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tempfile.gettempdir())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "scale_grad ok" and len(lines) == 4, proc.stdout
    for line in lines[:3]:
        assert "STACK:0 " in line, line
