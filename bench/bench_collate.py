"""Collation benchmarks: pyseqpack vs transformers' DataCollatorForSeq2Seq vs a plain torch collator.

Groups (one pytest-benchmark group per input kind x shape, every implementation side by side):

* ``collate[list|numpy|tensor] B=.. len=lo-hi`` (always on the CPU, where DataLoader workers collate):
  features ``{"input_ids", "attention_mask", "labels"}`` with random row lengths in [lo, hi] (fixed seed),
  as Python lists, int64 numpy arrays or int64 CPU tensors (``dataset.with_format("torch")``). Output:
  input_ids, attention_mask, labels, padded right.
    - transformers.DataCollatorForSeq2Seq                         (baseline)
    - torch: torch.tensor per row + pad_sequence + a length mask  (what one writes by hand)
    - pyseqpack.DataCollatorForSeq2Seq                            (the drop-in)
    - pyseqpack.pad_shift_mask, one row per backend that runs on the CPU
    - memcpy of the output bytes                                  (reference: the speed limit)
    - clone of the finished batch: one fresh tensor per output + memcpy into it, i.e. the least any collator
      that returns new tensors does (each output costs an allocation too)
  The headline runs with one CPU thread (a DataLoader worker is one process per core): torch.set_num_threads(1)
  (conftest's --cpu-threads) and ``pad_shift_mask(..., num_threads=1)``. The drop-in has no thread argument;
  its automatic choice (one thread per 2^19 output elements, at most torch.get_num_threads()) is then one
  thread too.
  The largest numpy shape writes 6 MB per batch. Under glibc's malloc, fresh outputs that big may cost page
  faults on every call, depending on the process's heap (freed big blocks can go back to the OS and be faulted
  in again); MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ keep freed memory for reuse, and the report
  records them when set. The clone row shows what any collator returning new tensors pays.
* ``collate[list|numpy|tensor] B=.. len=lo-hi cold``: warm and cold calls. The groups above time "warm"
  calls: the same call back to back, as pytest-benchmark runs it, with the call's code, its inputs and the
  allocator's blocks in the caches. In a training loop each collation follows other work (the model's step,
  the DataLoader's reads), so it finds them evicted: a cold call. These groups time cold calls of
  transformers' DataCollatorForSeq2Seq (their baseline), pyseqpack's drop-in and pad_shift_mask[cpu] on the
  cases of ``helpers.COLD_CASES``: before every round, pytest-benchmark's pedantic ``setup`` (untimed) writes a
  buffer 4x the last-level cache (``helpers.CacheSweep``), so each recorded time is that one call and nothing
  of the eviction. (Timing the sweep with the call and subtracting the sweep's own time would leave the
  sweep's variance in every figure.) The report puts each cold row beside its warm row and both beside
  transformers' ("Warm and cold"). ``bench/before_after.py`` times the same cases for two builds of pyseqpack.
* ``collate[flat <device>] B=64 len=1024-4096`` on the bench device: all tokens in one flat int64 tensor
  already on the device, plus offsets, to the padded [B, 4096] input_ids, attention_mask, labels (causal,
  pads -100), position_ids and shift_labels. Baseline: the same with torch ops (split + pad_sequence +
  masks), given the row lengths on the host. On a CPU, --cpu-threads threads (1 by default) for torch and
  for pad_shift_mask. On a GPU the goal is well under 50 us for the fused kernels, timed two ways: the whole
  op call (argument checks, output allocations, launch), and the kernel launch alone with the arguments the
  op built (``launch only``), which tells the kernel's cost from the Python around it. Both are wall clock with a
  synchronize per call; the launch-only rows also record the kernel's GPU time from torch's profiler (CUPTI),
  the figure without the host.

GB/s = output bytes / median (the bytes a collator must write; the inputs are read once too). The numpy groups
form one fit series: the report fits each implementation's medians over them as fixed + bytes / bandwidth, which
tells its rate per byte (against memcpy's) from its fixed cost per call.
Before timing, every implementation's output is checked against the baseline's, so a fast wrong
result fails the benchmark instead of being reported.
"""
from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import helpers as H

# (batch, shortest row, longest row); "smoke" only checks the harness.
SHAPES = {
    "full": [(32, 64, 512), (16, 512, 2048), (8, 2048, 4096)],
    "quick": [(32, 64, 512), (8, 2048, 4096)],
    "smoke": [(4, 8, 32)],
}
# A large batch, numpy inputs only (lists of that size are the small shapes' story, only slower): 6 MB of
# output, where the fixed cost per call fades (and where fresh outputs may page-fault: see the docstring).
NUMPY_ONLY_SHAPES = {"full": [(64, 2048, 4096)], "quick": [(64, 2048, 4096)], "smoke": []}
FLAT_SHAPES = {"full": [(64, 1024, 4096)], "quick": [(64, 1024, 4096)], "smoke": [(4, 8, 32)]}
KINDS = ["list", "numpy", "tensor"]
KEYS = ("input_ids", "attention_mask", "labels")
KERNEL_NAMES = {"cuda": "psm_kernel", "triton": "_pad_shift_mask_kernel"}  # as the profiler names them
SEED = H.COLLATE_SEED
COLD_IMPLS = ["hf", "pyseqpack", "psm-cpu"]  # timed cold too (test_collate_cold)


def _pyseqpack(name):
    """A public pyseqpack name, or skip this case saying why it is unavailable."""
    import pyseqpack

    try:
        return getattr(pyseqpack, name)
    except (AttributeError, ImportError) as e:
        pytest.skip(f"pyseqpack.{name} is unavailable: {type(e).__name__}: {e}")


def _thread_kwargs(fn, threads):
    """{"num_threads": threads} if ``fn`` takes that argument (our native ops may), else {}."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"num_threads": threads} if "num_threads" in params else {}


def _backends(device):
    from pyseqpack import _native

    # Triton on CPU tensors only runs under the interpreter, which conftest refuses: never timed.
    return [b for b in _native.available_backends(device) if not (device.type == "cpu" and b == "triton")]


# ----------------------------------------------------------------------------------------------------
# The implementations: each builder returns a zero-argument function producing the batch dict.
# ----------------------------------------------------------------------------------------------------

def _hf(features, tokenizer, threads):
    from transformers import DataCollatorForSeq2Seq

    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return lambda: collator(features)


def _torch(features, tokenizer, threads):
    pad = tokenizer.pad_token_id
    # numpy rows are wrapped without a copy (torch.from_numpy), lists are converted (torch.tensor).
    first = features[0]["input_ids"]
    to_tensor = (torch.from_numpy if isinstance(first, np.ndarray) else
                 (lambda t: t) if isinstance(first, torch.Tensor) else torch.tensor)

    def collate():
        ids = [to_tensor(f["input_ids"]) for f in features]
        labels = [to_tensor(f["labels"]) for f in features]
        input_ids = pad_sequence(ids, batch_first=True, padding_value=pad)
        lengths = torch.tensor([len(r) for r in ids])
        attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "labels": pad_sequence(labels, batch_first=True, padding_value=-100)}

    return collate


def _dropin(features, tokenizer, threads):
    cls = _pyseqpack("DataCollatorForSeq2Seq")
    collator = cls(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt",
                   **_thread_kwargs(cls, threads))
    return lambda: collator(features)


def _psm(backend):
    def build(features, tokenizer, threads):
        op = _pyseqpack("pad_shift_mask")
        if backend not in _backends(torch.device("cpu")):
            pytest.skip(f"pad_shift_mask backend {backend!r} is not available on the CPU")
        kw = _thread_kwargs(op, threads)
        pad = tokenizer.pad_token_id

        def collate():
            return op([f["input_ids"] for f in features], labels=[f["labels"] for f in features],
                      pad_token_id=pad, label_pad_token_id=-100, backend=backend, **kw)

        return collate

    return build


def _clone(features, tokenizer, threads):
    done = _hf(features, tokenizer, threads)()
    batch = {k: done[k] for k in KEYS}
    return lambda: {k: v.clone() for k, v in batch.items()}


# id -> (label, role, builder)
IMPLS = {
    "hf": ("transformers DataCollatorForSeq2Seq", H.BASELINE, _hf),
    "torch": ("torch pad_sequence collator", H.OTHER, _torch),
    "pyseqpack": ("pyseqpack DataCollatorForSeq2Seq", H.OURS, _dropin),
    "psm-cpu": ("pyseqpack pad_shift_mask[cpu]", H.OURS, _psm("cpu")),
    "psm-torch": ("pyseqpack pad_shift_mask[torch]", H.OURS, _psm("torch")),
    "memcpy": ("memcpy of the output bytes", H.REFERENCE, None),
    "clone": ("clone of the finished batch (fresh outputs + memcpy)", H.OTHER, _clone),
}


def pytest_generate_tests(metafunc):
    mode = metafunc.config.getoption("--bench-mode")
    if "collate_shape" in metafunc.fixturenames:
        cases = [(k, shape) for k in KINDS for shape in SHAPES[mode]]
        cases += [("numpy", shape) for shape in NUMPY_ONLY_SHAPES[mode]]
        metafunc.parametrize("kind,collate_shape", cases,
                             ids=[f"{k}-B{b}-len{lo}-{hi}" for k, (b, lo, hi) in cases])
    if "cold_case" in metafunc.fixturenames:
        cases = H.COLD_CASES[mode]
        metafunc.parametrize("cold_case", cases, ids=[f"{k}-B{b}-len{lo}-{hi}" for k, b, lo, hi in cases])
    if "flat_shape" in metafunc.fixturenames:
        shapes = FLAT_SHAPES[mode]
        metafunc.parametrize("flat_shape", shapes, ids=[f"B{b}-len{lo}-{hi}" for b, lo, hi in shapes])


@pytest.fixture(scope="module")
def tokenizer():
    return H.make_tokenizer()


@pytest.mark.parametrize("impl", list(IMPLS))
def test_collate(benchmark, bench_cfg, tokenizer, kind, collate_shape, impl):
    batch, lo, hi = collate_shape
    label, role, build = IMPLS[impl]
    features = H.collate_features(kind, batch, lo, hi)
    lengths = [len(f["input_ids"]) for f in features]
    benchmark.group = _group(kind, batch, lo, hi)

    threads = bench_cfg.cpu_threads
    expected = _hf(features, tokenizer, threads)()
    out_bytes = H.output_bytes({k: expected[k] for k in KEYS})
    if build is None:  # memcpy reference: copy a buffer of the output's size
        src = torch.ones(out_bytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        fn = build(features, tokenizer, threads)
        got = fn()
        for k in KEYS:
            assert torch.equal(got[k], expected[k]), f"{label}: {k!r} differs from transformers' output"

    info = {"suite": "collate", "impl": label, "role": role, "input": kind, "batch": batch,
            "len_lo": lo, "len_hi": hi, "max_len": max(lengths), "tokens": sum(lengths),
            "threads": threads, "order": KINDS.index(kind)}
    if impl == "pyseqpack" and kind == "list" and batch == 32:
        info["goal"] = {"kind": "speedup_at_least", "value": 20, "target": 30,
                        "label": "drop-in vs transformers, B=32 list inputs, 1 thread"}
    if kind == "numpy":
        # The report fits time against bytes over the numpy shapes (bench.bandwidth_fits): numpy rows cost
        # little per row, so the line splits each implementation's per-byte rate from its fixed cost per call.
        info["fit_series"] = "numpy collation"
        if impl in ("pyseqpack", "psm-cpu"):
            info["goal"] = {"kind": "vs_reference_gbps", "label": f"numpy inputs near memcpy, B={batch}"}
    H.measure(benchmark, fn, bench_cfg, nbytes=out_bytes, info=info)


def _group(kind, batch, lo, hi):
    return f"collate[{kind}] B={batch} len={lo}-{hi}"


@pytest.mark.parametrize("impl", COLD_IMPLS)
def test_collate_cold(benchmark, bench_cfg, tokenizer, cold_case, impl):
    """One cold call per round: the caches are swept (untimed, pedantic's setup) before each."""
    kind, batch, lo, hi = cold_case
    label, role, build = IMPLS[impl]
    features = H.collate_features(kind, batch, lo, hi)
    lengths = [len(f["input_ids"]) for f in features]
    warm_group = _group(kind, batch, lo, hi)
    benchmark.group = f"{warm_group} cold"
    threads = bench_cfg.cpu_threads
    expected = _hf(features, tokenizer, threads)()
    fn = build(features, tokenizer, threads)
    got = fn()
    for k in KEYS:
        assert torch.equal(got[k], expected[k]), f"{label}: {k!r} differs from transformers' output"
    info = {"suite": "collate", "impl": label, "role": role, "input": kind, "batch": batch, "len_lo": lo,
            "len_hi": hi, "max_len": max(lengths), "tokens": sum(lengths), "threads": threads,
            "order": KINDS.index(kind), "warm_group": warm_group}
    H.measure(benchmark, fn, bench_cfg, nbytes=H.output_bytes({k: expected[k] for k in KEYS}), info=info, cold=True)


# ----------------------------------------------------------------------------------------------------
# Flat buffer on the bench device
# ----------------------------------------------------------------------------------------------------

def _flat_torch(flat, lengths, length, pad):
    """The flat-buffer workload with plain torch ops (host-side ``lengths``, as a hand-written one needs)."""
    lens = torch.tensor(lengths, device=flat.device)

    def collate():
        input_ids = pad_sequence(flat.split(lengths), batch_first=True, padding_value=pad)
        input_ids = F.pad(input_ids, (0, length - input_ids.shape[1]), value=pad)
        valid = torch.arange(length, device=flat.device) < lens[:, None]
        labels = input_ids.masked_fill(~valid, -100)
        return {
            "input_ids": input_ids,
            "attention_mask": valid.long(),
            "labels": labels,
            "position_ids": (valid.long().cumsum(-1) - 1).clamp(min=0),
            "shift_labels": F.pad(labels[:, 1:], (0, 1), value=-100),
        }

    return collate


def _launch_only(call, backend):
    """The kernel launch alone: one op call builds the DeviceLaunch (captured at the device backends' shared
    run in pyseqpack/pad_shift_mask/device.py), then each timed call re-launches the kernel on those arguments
    into the same outputs."""
    D = sys.modules["pyseqpack.pad_shift_mask.device"]
    captured, run_device = {}, D.run

    def grab(c, launch):
        return run_device(c, lambda args: (captured.setdefault("args", args), launch(args)))

    D.run = grab
    try:
        call()
    finally:
        D.run = run_device
    args = captured["args"]
    if backend == "cuda":
        from pyseqpack.pad_shift_mask import cuda as launcher

        launch = lambda: launcher.launch(args)  # noqa: E731
    else:
        from pyseqpack.kernels import pad_shift_mask as triton_kernel

        launch = lambda: triton_kernel.launch(args)  # noqa: E731
    keys = [k for k in args.outputs if k != "extras"]

    def fn():
        launch()
        return {k: args.outputs[k] for k in keys}

    return fn


@pytest.mark.parametrize("impl", ["torch-ops", "psm-cuda", "psm-triton", "psm-cpu", "psm-torch", "psm-cuda-launch",
                                  "psm-triton-launch"])
def test_collate_flat(benchmark, bench_cfg, flat_shape, impl):
    device = bench_cfg.device
    batch, lo, hi = flat_shape
    length = hi  # padded to max_length = hi: a fixed [B, hi] batch
    lengths = H.random_lengths(batch, lo, hi, seed=SEED + 7)
    g = torch.Generator().manual_seed(SEED)
    flat = torch.randint(3, H.VOCAB_SIZE, (sum(lengths),), generator=g).to(device)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64, device=device)
    benchmark.group = f"collate[flat {device.type}] B={batch} len={lo}-{hi} pad={length}"

    baseline = _flat_torch(flat, lengths, length, H.PAD_ID)
    expected = baseline()
    if impl == "torch-ops":
        label, role, fn = "torch ops (split + pad_sequence + masks)", H.BASELINE, baseline
    else:
        launch_only = impl.endswith("-launch")
        backend = impl.removeprefix("psm-").removesuffix("-launch")
        if backend not in _backends(device) or (launch_only and device.type != "cuda"):
            pytest.skip(f"pad_shift_mask backend {backend!r} is not available on {device}")
        op = _pyseqpack("pad_shift_mask")
        kw = _thread_kwargs(op, bench_cfg.cpu_threads) if device.type == "cpu" else {}

        def fn():
            # Offsets on the device with padding="max_length" and truncation: no host sync, one launch.
            return op(flat, offsets=offsets, labels="input_ids", pad_token_id=H.PAD_ID, padding="max_length",
                      max_length=length, truncation=True, return_position_ids=True, return_shift_labels=True,
                      backend=backend, **kw)

        label, role = f"pyseqpack pad_shift_mask[{backend}]", H.OURS
        if launch_only:
            fn, label = _launch_only(fn, backend), f"{label} kernel launch only (arguments prebuilt)"
        got = fn()
        for k, v in expected.items():
            assert torch.equal(got[k], v), f"{label}: {k!r} differs from the torch-ops output"

    info = {"suite": "collate", "impl": label, "role": role, "input": f"flat-{device.type}", "batch": batch,
            "len_lo": lo, "len_hi": hi, "max_len": length, "tokens": sum(lengths), "order": 2,
            "threads": bench_cfg.cpu_threads if device.type == "cpu" else None}
    if device.type == "cuda" and impl.startswith("psm-") and backend in ("cuda", "triton"):
        what = "kernel launch" if launch_only else "whole op call"
        info["goal"] = [{"kind": "median_below_us", "value": 50,
                         "label": f"flat-buffer kernel B={batch} x {length} ({what}, wall clock)"}]
        if launch_only:  # the kernel alone, as the GPU's profiler sees it
            info["device_us"] = H.kernel_device_us(fn, KERNEL_NAMES[backend])
            info["goal"].append({"kind": "device_time_below_us", "value": 50,
                                 "label": f"flat-buffer kernel B={batch} x {length} (GPU time)"})
    H.measure(benchmark, fn, bench_cfg, nbytes=H.output_bytes(expected), info=info)
