"""The CUDA pad_shift_mask kernel (csrc/pad_shift_mask.cu) run on the CPU, in a host emulation, against torch.

No GPU is needed. A session fixture compiles the very file nvcc builds, csrc/pad_shift_mask.cu (with
csrc/cuda_common.cu), as host C++ with g++, against a shim of the few CUDA pieces it uses
(tests/cuda_host_emulation/: cuda_runtime.h, emulation.cpp). Only its one launch line,
`kernel<<<grid, block, shared, stream>>>(args);`, is rewritten (in a temporary copy), into a call that checks the
launch geometry and then runs every thread of the grid, one after the other. The library is driven through the
real Python launcher (pyseqpack/pad_shift_mask/cuda.py: its checks, its C argument packing, the same ctypes
signature) and, for the op tests, through pad_shift_mask(..., backend="cuda") itself on CPU tensors (only the
device test and the final launch call are redirected). Every output must equal
pad_shift_mask(..., backend="torch") exactly (same dtype, shape and values).

What this proves, for the cases run: the kernel body (the grid mapping b = blockIdx.x, j = blockIdx.y * blockDim.x
+ threadIdx.x; checked_row and its empty rows for windows outside their buffers, on untrusted offsets and
prompt lengths; the j < L and j < Ll guards; the dispatch on the mask / label / extras type codes; the
[E, B, L] extras index; the int64 index math), the argument checks of the C entry point pyseqpack_psm_fill,
and the launch geometry of launch<O, T>: grid (B, ceil(W / threads)) with threads = min(256, W rounded up to
whole warps), W the widest requested output, within the hardware limits (block <= 1024 threads, gridDim.y <=
65535, gridDim.x <= 2^31 - 1) and the kernel's __launch_bounds__, and no launch when there is nothing to write.
The emulation is exact, not approximate, because the kernel's threads never talk to each other: no shared
memory, no __syncthreads, no warp intrinsics, no atomics (the shim declares none of them, so a kernel that starts
using one stops compiling here instead of being emulated wrongly). Blocks run forward and in reverse order (the
launcher grid and the property test): an output element written by two threads with different values would
differ between the two. Every buffer sits between guard bands of poison values: a write next to an output fails
the test, and a value read next to an input is poison, which shows in the outputs it feeds. The library is built with
-fsanitize=undefined: a report (a signed overflow in the index math on untrusted offsets, a misaligned load)
fails the call that first makes it (UBSan reports each code location once per process).

What it cannot prove: anything about the GPU itself. The memory model and caching (__ldg), coalescing and
speed, register use and whether the kernel fits its launch bounds, nvcc's own code generation, launch and driver
errors, and rows far wider than tested here (B * L past 2^31 elements): tests/test_pad_shift_mask_cuda.py on a
GPU. A far out-of-bounds access (past a guard band) is no clean failure here: it crashes the test process
(there is no address sanitizer inside pytest).

PSM_EMU_EXAMPLES=N runs the property test on N examples (default 150).
"""
import contextlib
import ctypes
import dataclasses
import importlib
import os
import random
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_pad_shift_mask_cuda as cases  # the GPU test's case generators (tests/ is on pythonpath)
from pyseqpack.pad_shift_mask import OUTPUT_KEYS, DeviceLaunch, pad_shift_mask
from pyseqpack.pad_shift_mask import cuda as launcher
from pyseqpack.pad_shift_mask import device as device_launch

PSM = importlib.import_module("pyseqpack.pad_shift_mask")  # the module (pyseqpack.pad_shift_mask is the function)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SHIM = Path(__file__).resolve().parent / "cuda_host_emulation"
KERNEL = CSRC / "pad_shift_mask.cu"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SENTINEL = -7  # every output starts as this (the GPU test's fill): a value the kernel forgot to write shows up
LABEL_OUTS = ("labels", "decoder_input_ids", "shift_labels")  # [B, Ll]; the others are [B, L]
GUARD, POISON = 512, 0x5A5A5A5A  # guard bands around every buffer (elements each side) and their value

# A CUDA launch: kernel name, optional template arguments, <<<configuration>>>, (arguments);
_LAUNCH = re.compile(r"(?P<kernel>\b[A-Za-z_]\w*)(?P<targs>\s*<[^<>;]*>)?\s*<<<(?P<config>[^;]*?)>>>\s*"
                     r"\((?P<args>[^;]*)\)\s*;")


# ------------------------------------------------------------------------------------------- the emulated build


def host_source(text: str, path: str) -> str:
    """The .cu source `text` as host C++: its single kernel launch rewritten into pyseqpack_emu::launch (with the
    kernel's __launch_bounds__, 1024 without one). Raises unless there is exactly one launch: a source this does
    not understand must fail the test, not test nothing."""
    launches = list(_LAUNCH.finditer(text))
    if len(launches) != 1 or text.count("<<<") != 1:
        raise AssertionError(f"{path}: expected exactly one kernel launch `kernel<...><<<grid, block, shared, "
                             f"stream>>>(args);` to rewrite for the host emulation, found {len(launches)} (and "
                             f"{text.count('<<<')} `<<<`); update tests/test_pad_shift_mask_cuda_emulated.py")
    m = launches[0]
    kernel = m.group("kernel")
    # `__global__ void __launch_bounds__(max_threads[, min_blocks]) kernel(`
    bound = re.search(r"__launch_bounds__\(\s*([^,()]+?)\s*(?:,[^()]*)?\)\s*" + re.escape(kernel) + r"\s*\(", text)
    if bound is None and "__launch_bounds__" in text:
        raise AssertionError(f"{path}: cannot tell which __launch_bounds__ belongs to {kernel}; update "
                             "tests/test_pad_shift_mask_cuda_emulated.py")
    call = (f"pyseqpack_emu::launch({bound.group(1) if bound else 1024}, {m.group('config').strip()}, "
            f"[&] {{ {kernel}{m.group('targs') or ''}({m.group('args')}); }});")
    line = text.count("\n", 0, m.start()) + 1
    # #line keeps the compiler's messages pointing at the real file and line.
    return (f'#line 1 "{path}"\n' + text[:m.start()] + call + f'\n#line {line + 1} "{path}"\n'
            + text[m.end():].lstrip(" "))


class Emulator:
    """The emulated library, with the launcher's ctypes signature, and the emulation's bookkeeping."""

    def __init__(self, so: Path, log: Path):
        self.lib = launcher._declare(ctypes.CDLL(str(so)))
        self.lib.pyseqpack_emu_reset.argtypes = [ctypes.c_int]
        self.lib.pyseqpack_emu_stats.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]
        self.lib.pyseqpack_emu_stats.restype = ctypes.c_int64
        self.lib.pyseqpack_emu_violation.restype = ctypes.c_char_p
        self.log = log

    def fill(self, c_args: list, reverse: bool = False) -> int:
        """pyseqpack_psm_fill(*c_args, stream NULL) after a reset; fails on any UBSan report it prints."""
        self.lib.pyseqpack_emu_reset(int(reverse))
        with _stderr_to(self.log):
            rc = self.lib.pyseqpack_psm_fill(*c_args, None)
        report = self.log.read_text(errors="replace")
        assert "runtime error" not in report, f"UndefinedBehaviorSanitizer in the kernel:\n{report}"
        return rc

    def stats(self):
        """(admitted launches, threads run, last launch's (grid x y z, block x y z, shared bytes, launch bound))."""
        threads, last = ctypes.c_int64(), (ctypes.c_int64 * 8)()
        launches = self.lib.pyseqpack_emu_stats(ctypes.byref(threads), last)
        return launches, threads.value, tuple(last)

    def error_string(self, rc: int) -> str:
        return self.lib.pyseqpack_cuda_error_string(rc).decode()

    def violation(self) -> str:
        return self.lib.pyseqpack_emu_violation().decode()


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 (where UBSan reports) goes to `path`, emptied first, for the duration."""
    with open(path, "wb") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile_emulation(out_dir: Path) -> Path:
    """Compiles csrc/pad_shift_mask.cu (its launch rewritten) + csrc/cuda_common.cu + the shim into a shared
    library in out_dir, with UndefinedBehaviorSanitizer, and returns its path (about a second). Fails, does not
    skip, without a C++ compiler: CI has one (it builds pyseqpack._C)."""
    cxx = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("the CUDA kernel's host emulation needs a C++ compiler: g++ not found (set CXX)")
    kernel = out_dir / "pad_shift_mask.cu"
    kernel.write_text(host_source(KERNEL.read_text(), str(KERNEL)))
    so = out_dir / "libpsm_emulated.so"
    cmd = [cxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-Wall", f"-I{SHIM}", f"-I{CSRC}", "-x", "c++",
           str(kernel), str(CSRC / "cuda_common.cu"), "-x", "none", str(SHIM / "emulation.cpp"), "-o", str(so)]
    r = subprocess.run(cmd[:1] + ["-fsanitize=undefined"] + cmd[1:], capture_output=True, text=True)
    if r.returncode != 0:
        plain = subprocess.run(cmd, capture_output=True, text=True)
        if plain.returncode != 0:
            pytest.fail(f"compiling the CUDA kernel as host C++ failed:\n{' '.join(cmd)}\n{plain.stdout}{plain.stderr}")
        # A compiler without the UBSan runtime (libubsan): the rest of the emulation holds without it.
        warnings.warn(f"the CUDA kernel's host emulation is built without -fsanitize=undefined:\n{r.stderr}")
        r = plain
    if r.stderr.strip():
        warnings.warn(f"compiling the CUDA kernel as host C++:\n{r.stderr}")
    return so


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("psm_emulated")
    return Emulator(compile_emulation(out), out / "stderr.txt")


# ------------------------------------------------------------------------------------------- the launch


def expected_geometry(args: DeviceLaunch):
    """(grid, block) the kernel must be launched with, or None for no launch: W the widest requested output,
    threads = min(256, W rounded up to whole warps), grid (B, ceil(W / threads))."""
    outs = {k: t for k, t in args.outputs.items() if t is not None}
    narrow = any(k not in LABEL_OUTS for k in outs)  # [B, L] outputs and the [E, B, L] extras
    wide = any(k in LABEL_OUTS for k in outs)
    width = max(args.L if narrow else 0, args.Ll if wide else 0)
    B = args.offsets.shape[0] - 1
    if width == 0 or B == 0:
        return None
    threads = min(256, -(-width // 32) * 32)
    return (B, -(-width // threads), 1), (threads, 1, 1)


def _guarded(t: torch.Tensor):
    """(a larger buffer: GUARD elements of POISON, t's values, GUARD elements of POISON; the view of t in it)."""
    whole = torch.full((t.numel() + 2 * GUARD,), _poison(t.dtype), dtype=t.dtype)
    inner = whole[GUARD:GUARD + t.numel()].view(t.shape)
    inner.copy_(t)
    return whole, inner


def _poison(dtype) -> int:
    return POISON & 0xFF if dtype == torch.uint8 else POISON


def launch_emulated(emu: Emulator, args: DeviceLaunch, reverse: bool = False) -> None:
    """What the CUDA launcher's launch(args) does, on the emulated library: the launcher's checks and
    C arguments, then the call (stream NULL); the outputs land in args.outputs. Also checks the launch geometry,
    and that the kernel writes nothing next to an output: every buffer is copied between guard bands of POISON,
    and an output's bands must stay as they are (a value read from an input's band shows up in the outputs)."""
    launcher.check_launch(args)  # what launch() checks: ValueError naming a bad field
    wholes, copies = [], {}
    for name in ("tokens", "offsets", "loss_masks", "labels", "label_offsets", "prompt_lengths", "extras",
                 "extra_pads"):
        t = getattr(args, name)
        if t is not None:
            copies[name] = _guarded(t)[1]
    outputs = {}
    for key, t in args.outputs.items():
        if t is not None:
            whole, outputs[key] = _guarded(t)
            wholes.append((key, whole))
    c_args = launcher._c_arguments(dataclasses.replace(args, outputs=outputs, **copies))  # what launch() passes
    rc = emu.fill(c_args, reverse)
    assert rc == 0, f"pyseqpack_psm_fill returned {rc} ({emu.error_string(rc)}): {emu.violation()}"
    for key, whole in wholes:
        for band in (whole[:GUARD], whole[GUARD + outputs[key].numel():]):
            assert bool((band == _poison(band.dtype)).all()), f"the kernel wrote outside outputs[{key!r}]"
        args.outputs[key].copy_(outputs[key])
    launches, threads, last = emu.stats()
    want = expected_geometry(args)
    if want is None:
        assert launches == 0, f"a launch with nothing to write: grid {last[:3]}, block {last[3:6]}"
        return
    grid, block = want
    assert launches == 1, launches
    assert (last[:3], last[3:6], last[6]) == (grid, block, 0), \
        f"launch geometry: grid {last[:3]} block {last[3:6]} shared {last[6]}, expected grid {grid} block {block}"
    assert threads == grid[0] * grid[1] * block[0]


@pytest.fixture
def cuda_op_on_cpu(emu, monkeypatch):
    """pad_shift_mask(..., backend="cuda") on CPU tensors: the op's own code builds the DeviceLaunch (host
    packing, widths, outputs), the emulated kernel writes them."""
    runs = []  # the DeviceLaunch of each emulated launch

    def launch(args):
        runs.append(args)
        launch_emulated(emu, args)  # with the launcher's checks

    # The CUDA backend's launcher, its launch emulated: registered for any device, CPU included.
    emulated = SimpleNamespace(run=lambda call: device_launch.run(call, launch))
    monkeypatch.setitem(PSM.DISPATCH._loaders, "cuda", lambda device: emulated)
    return runs


# ------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("form", cases.FORMS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("label_mode", cases.LABEL_MODES)
@pytest.mark.parametrize("truncation", cases.TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", list(cases.SHAPES))
def test_op_matches_torch(cuda_op_on_cpu, shape, side, truncation, label_mode, dtype, form):
    # The GPU test's op grid (B = 1, 3, 29; rows of 0 tokens beside rows of up to four 256-column tiles), on CPU
    # tensors: the op packs every field on the host, so the kernel reads buffers of the output dtype here.
    cases.assert_cuda_matches_torch(cases.make_case(shape, side, truncation, label_mode, dtype, form, "cpu"), "cpu")
    assert len(cuda_op_on_cpu) == 1  # the emulated kernel ran


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_op_only_some_outputs_and_empty_rows(cuda_op_on_cpu, dtype):
    rows = [[], [7, 8, 9], [], []]
    kw = dict(input_ids=rows, labels="input_ids", pad_token_id=0, return_attention_mask=False,
              return_shift_labels=True, dtype=dtype, device="cpu")
    cases.assert_cuda_matches_torch(kw, "cpu")
    kw["input_ids"] = [[], [], []]  # L = 0: empty outputs, no launch
    cases.assert_cuda_matches_torch(kw, "cpu")


# ------------------------------------------------------------------------------------------- the launcher


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("types", cases.BUFFER_TYPES, ids=lambda t: "-".join(str(d)[6:] for d in t))
@pytest.mark.parametrize("label_mode", cases.LABEL_MODES)
@pytest.mark.parametrize("truncation", cases.TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_launch_matches_torch(emu, side, truncation, label_mode, types, reverse):
    # Full buffers and their true offsets (the kernel truncates), every token / output / labels / extras / loss
    # mask type: each mask type with derived labels, each label type with given labels.
    kw, ref, args = cases.launch_case(side, truncation, label_mode, types, "cpu")
    launch_emulated(emu, args, reverse)
    cases._assert_written(args, kw, ref)


@pytest.mark.parametrize("window", ["tokens", "labels"])
@pytest.mark.parametrize("truncation", cases.TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("entry,value", cases.BAD_OFFSETS)
def test_offsets_outside_the_buffer_make_an_empty_row(emu, entry, value, side, truncation, window):
    for kw, expected, args in cases.bad_offsets_cases(entry, value, side, truncation, window, "cpu"):
        launch_emulated(emu, args)
        cases._assert_written(args, kw, expected)


@pytest.mark.parametrize("truncation", cases.TRUNCATIONS)
def test_prompt_lengths_are_clamped(emu, truncation):
    kw, ref, args = cases.clamped_prompts_case(truncation, "cpu")
    launch_emulated(emu, args)
    cases._assert_written(args, kw, ref)


@pytest.mark.parametrize("alone", [None, *OUTPUT_KEYS, "extras"])
@pytest.mark.parametrize("labels_width", ["wider", "narrower"])
def test_each_output_alone_and_label_widths(emu, labels_width, alone):
    # Given labels have their own width Ll, wider or narrower than L: the grid follows the widest requested
    # output, threads past an output's width skip it. Every output once alone (None: all of them), so each one
    # must widen the grid by itself.
    rows = [[1, 2, 3], [4] * 40, []]
    label_rows = [[7] * 300, [8, 9], []] if labels_width == "wider" else [[7], [], [8, 9]]
    kw = cases._op_kwargs(rows, "left", "right", label_rows, [1, 2, 0], 500)
    kw.update(padding="longest", pad_to_multiple_of=None)
    kw["extras"] = {"token_type_ids": ([[0, 1, 1], [1] * 40, []], 9)}
    ref = pad_shift_mask(backend="torch", **kw)
    assert (ref["labels"].shape[1] > ref["input_ids"].shape[1]) == (labels_width == "wider")
    args = cases._device_launch(kw, ref, "cpu", side_dtype=torch.int32)
    if alone is not None:
        args.outputs = {alone: args.outputs[alone]}
        if alone != "extras":
            args.extras = args.extra_pads = None
            kw.pop("extras")
        ref = {k: v for k, v in ref.items() if k in (alone, "token_type_ids")}
    launch_emulated(emu, args)
    cases._assert_written(args, kw, ref)


def test_c_entry_point_refuses_bad_arguments(emu):
    # The GPU test's list of refusals (and accepted calls that launch nothing), on the emulated library: no call
    # may launch.
    launches = []

    class Lib:
        @staticmethod
        def pyseqpack_psm_fill(*c_args):
            rc = emu.fill(list(c_args[:-1]))
            launches.append(emu.stats()[0])
            return rc

    cases.assert_refuses_bad_arguments(Lib)
    assert len(launches) > 20 and not any(launches)


def test_empty_batch_launches_nothing(emu):
    # B = 0: success without a launch (the C entry point returns before reading the offsets).
    args = cases._valid_cpu_args()
    args.offsets = torch.zeros(1, dtype=torch.int64)
    args.prompt_lengths = torch.zeros(0, dtype=torch.int64)
    args.outputs = {k: t.new_empty((0,) + tuple(t.shape[1:])) if k != "extras" else t.new_empty((2, 0, 8))
                    for k, t in args.outputs.items()}
    launch_emulated(emu, args)


# ------------------------------------------------------------------------------------------- random batches


def _window(start, end, limit, max_length, trunc_left):
    """(src, kept, cut) of one example's field, as the kernel must plan it (pad_shift_mask.h's plan_row, then
    checked_row: a window outside [0, limit) is the empty row), in Python integers (no overflow)."""
    n = 0 if end <= start else min(end - start, INT64_MAX)  # span(): saturated
    kept = min(n, max_length) if max_length >= 0 else n
    cut = n - kept if trunc_left else 0
    src = start + cut
    if not (0 <= src and src + kept <= limit):
        return 0, 0, 0
    return src, kept, cut


def _untrusted(rng, offsets, limit):
    """The offsets with one to three entries replaced: near the buffer, far away, or at the int64 extremes."""
    offsets = list(offsets)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(offsets))
        offsets[i] = rng.choice([rng.randint(-3, limit + 3), rng.randint(-3, limit + 3), -(2**62), 2**62, INT64_MIN,
                                 INT64_MAX, INT64_MAX - rng.randint(0, 3)])
    return offsets


@st.composite
def batches(draw):
    """One random batch: ragged rows (now and then one of several 256-column tiles), every option, every buffer
    type, untrusted offsets and prompt lengths now and then, and a random subset of the outputs."""
    seed = draw(st.integers(0, 2**32 - 1))  # of the values (drawn by Hypothesis, they would make it slow)
    B = draw(st.integers(1, 6))
    lengths = [draw(st.integers(0, 12)) for _ in range(B)]
    if draw(st.integers(0, 5)) == 0:
        lengths[draw(st.integers(0, B - 1))] = draw(st.integers(250, 600))
    kind = draw(st.sampled_from([0, 1, 2]))
    truncation = draw(st.sampled_from([None, "right", "left"]))
    max_length = draw(st.sampled_from([0, 1, 2, 5, 9, 300])) if truncation else -1
    ints = st.sampled_from([torch.int64, torch.int32])
    out_t, tok_t, side_t = draw(ints), draw(ints), draw(ints)
    mask_t = draw(st.sampled_from([torch.uint8, torch.int32, torch.int64]))
    return dict(
        seed=seed, lengths=lengths, kind=kind, truncation=truncation, max_length=max_length,
        types=(out_t, tok_t, side_t, mask_t), side=draw(st.sampled_from(["right", "left"])),
        padding=draw(st.sampled_from(["longest", "max_length"])), multiple=draw(st.sampled_from([None, 8, 64])),
        prompts=draw(st.booleans()), masks=kind == 1 and draw(st.booleans()), E=draw(st.integers(0, 2)),
        bad_offsets=draw(st.integers(0, 3)) == 0, bad_labels=kind == 2 and draw(st.integers(0, 3)) == 0,
        bad_prompts=draw(st.integers(0, 3)) == 0, label_pad=draw(st.sampled_from([-100, -1])),
        start=draw(st.sampled_from([5, -100])), drop=[draw(st.booleans()) for _ in OUTPUT_KEYS],
        reverse=draw(st.booleans()))


def _run_batch(emu, seed, lengths, kind, truncation, max_length, types, side, padding, multiple, prompts, masks, E,
               bad_offsets, bad_labels, bad_prompts, label_pad, start, drop, reverse):
    rng = random.Random(seed)
    out_t, tok_t, side_t, mask_t = types
    B, trunc_left = len(lengths), truncation == "left"
    top = 2**31 - 1 if torch.int32 in (out_t, tok_t) else 2**40
    side_top = 2**31 - 1 if torch.int32 in (out_t, side_t) else 2**40

    def buffer(n, low, high):
        return [rng.randint(low, high) for _ in range(n)]

    # Flat buffers with unused values before and after the rows: offsets[0] need not be 0.
    head, tail = rng.randint(0, 3), rng.randint(0, 3)
    T = head + sum(lengths) + tail
    tokens = buffer(T, 0, top)
    offsets = [head]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    mask_buf = buffer(T, 0, 1)
    extra_bufs = [buffer(T, -3, 3) for _ in range(E)]
    extra_pads = [rng.randint(-5, 5) for _ in range(E)]
    label_lengths = [rng.randint(0, 10) for _ in range(B)]
    label_buf = [-100 if rng.random() < 0.2 else v for v in buffer(sum(label_lengths) + 2, 0, side_top)]
    label_offsets = [1]
    for n in label_lengths:
        label_offsets.append(label_offsets[-1] + n)
    prompt_values = [rng.randint(0, n + 2) for n in lengths]
    if bad_offsets:
        offsets = _untrusted(rng, offsets, T)
    if bad_labels:
        label_offsets = _untrusted(rng, label_offsets, len(label_buf))
    if bad_prompts:
        prompt_values = [rng.choice([p, -rng.randint(1, 9), INT64_MIN, INT64_MAX, 2**62]) for p in prompt_values]

    # What the kernel must write: the reference on the rows the (untrusted) offsets really describe.
    rows, row_masks, row_extras, row_prompts, label_rows = [], [], [[] for _ in range(E)], [], []
    for b in range(B):
        src, kept, cut = _window(offsets[b], offsets[b + 1], T, max_length, trunc_left)
        rows.append(tokens[src:src + kept])
        row_masks.append(mask_buf[src:src + kept])
        for e in range(E):
            row_extras[e].append(extra_bufs[e][src:src + kept])
        p = prompt_values[b]
        row_prompts.append(max(p - cut, 0) if kept else 0)  # plan_row: clamp(prompt - cut, 0, kept)
        src, kept, _ = _window(label_offsets[b], label_offsets[b + 1], len(label_buf), max_length, trunc_left)
        label_rows.append(label_buf[src:src + kept])
    longest = max([len(r) for r in rows] + [len(r) for r in label_rows if kind == 2] + [0])
    # The rows are cut already: the reference needs no truncation, only the same width (padded to the longest
    # kept row, or to max_length, as the op pads for the kernel).
    kw = dict(input_ids=rows, labels={0: None, 1: "input_ids", 2: label_rows}[kind], pad_token_id=3,
              label_pad_token_id=label_pad, padding=padding, padding_side=side, pad_to_multiple_of=multiple,
              return_position_ids=True, dtype=out_t)
    if padding == "max_length":
        kw["max_length"] = max_length if max_length > 0 else longest + rng.randint(1, 5)
    if kind:
        kw.update(return_shift_labels=True, decoder_start_token_id=start)
    if prompts and (kind == 1 or rng.random() < 0.5):
        kw.update(prompt_lengths=row_prompts, return_loss_mask=True)
    if masks:
        kw["loss_masks"] = row_masks
    names = [f"extra{e}" for e in range(E)]
    if E:
        kw["extras"] = {n: (row_extras[e], extra_pads[e]) for e, n in enumerate(names)}
    ref = pad_shift_mask(backend="torch", **kw)

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype)

    L = ref["input_ids"].shape[1]
    outputs = {k: torch.full_like(ref[k], SENTINEL) for k, d in zip(OUTPUT_KEYS, drop) if k in ref and not d}
    if E:
        outputs["extras"] = torch.full((E, B, L), SENTINEL, dtype=out_t)
    args = DeviceLaunch(
        tokens=tensor(tokens, tok_t), offsets=tensor(offsets, torch.int64),
        loss_masks=tensor(mask_buf, mask_t) if masks else None,
        labels=tensor(label_buf, side_t) if kind == 2 else None,
        label_offsets=tensor(label_offsets, torch.int64) if kind == 2 else None,
        prompt_lengths=tensor(prompt_values, torch.int64) if "prompt_lengths" in kw else None,
        extras=tensor(extra_bufs, side_t) if E else None, extra_pads=tensor(extra_pads, torch.int64) if E else None,
        outputs=outputs, L=L, Ll=ref["labels"].shape[1] if kind else L,
        max_length=max_length, truncate_left=trunc_left, pad_left=side == "left", labels_kind=kind,
        pad_token_id=3, label_pad_token_id=label_pad, decoder_start_token_id=start if kind else 0)
    launch_emulated(emu, args, reverse)
    for k, got in outputs.items():
        if k == "extras":
            for e, n in enumerate(names):
                assert torch.equal(got[e], ref[n]), (n, got[e], ref[n])
        else:
            assert torch.equal(got, ref[k]), (k, got, ref[k])


@settings(max_examples=int(os.environ.get("PSM_EMU_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches())
def test_property_matches_torch(emu, batch):
    _run_batch(emu, **batch)


# ------------------------------------------------------------------------------------------- the emulation itself


def test_rewrite_refuses_what_it_does_not_understand():
    one = KERNEL.read_text()
    assert "pyseqpack_emu::launch(" in host_source(one, "k.cu")
    with pytest.raises(AssertionError, match="expected exactly one kernel launch"):
        host_source(one.replace("<<<", "<< <"), "k.cu")
    launch = _LAUNCH.search(one).group(0)
    with pytest.raises(AssertionError, match="found 2"):
        host_source(one.replace(launch, launch + "\n  " + launch), "k.cu")
