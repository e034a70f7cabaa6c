"""Tests of the Triton pad_shift_mask kernel (kernels/pad_shift_mask.py), launched directly.

Each test builds a ``DeviceLaunch`` by hand (flat tokens + int64 offsets, as the dispatcher does for data on a
device) and compares what ``launch`` writes with ``pad_shift_mask(..., backend="torch")``, the plain per-row
reference. The kernel plans every example itself from its offsets (psm::plan_row, mirrored), so the tests cover
the planning too: every side of padding and truncation, every kind of labels, rows of length 0 and rows longer
than max_length, extras, and offsets and prompt lengths that are wrong (untrusted device data): a row whose
window leaves its buffer is the empty row, as on CUDA.

Runs on CUDA when present, else on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set by
conftest), which runs each program in numpy: shapes stay small. A last test compiles the kernel with Triton's
real NVIDIA backend (no GPU needed), since the interpreter accepts code the compiler rejects.
"""
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyseqpack import _native
from pyseqpack.pad_shift_mask import DeviceLaunch, pad_shift_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not _native.triton_available(DEVICE),
                                reason="Triton on CPU needs TRITON_INTERPRET=1 before it is imported")

INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)
SENTINEL = 12345  # every output starts as this: a value the kernel forgot to write shows up

ROWS = [[5, 6, 7, 8, 9, 10, 11], [], [12, 13], [14, 15, 16, 17, 18], [19]]
MASKS = [[1, 0, 1, 1, 1, 0, 1], [], [1, 1], [0, 1, 1, 1, 1], [1]]
LABEL_ROWS = [[21, 22], [23, 24, 25, 26, 27, 28], [], [29], [30, 31, 32]]
PROMPTS = [2, 0, 5, 3, 1]  # 5 > len(ROWS[2]): a prompt covering the whole row
EXTRAS = {"token_type_ids": ([[1] * len(r) for r in ROWS], 0),
          "special": ([[i % 2 for i in range(len(r))] for r in ROWS], -1)}


def _flat(rows, dtype=torch.int64):
    """(values back to back, int64 offsets [B + 1]) on DEVICE."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    return torch.tensor([v for r in rows for v in r], dtype=dtype, device=DEVICE), offsets.to(DEVICE)


def _launch(ref: dict, *, tokens, offsets, kind, max_length, truncation_side, padding_side, loss_masks=None,
            labels=None, label_offsets=None, prompt_lengths=None, extras=None, pad=0, label_pad=-100, start=0):
    """Runs the kernel into outputs shaped like the reference's; returns them keyed like the reference."""
    names = list(extras or {})
    outputs = {k: torch.full_like(v, SENTINEL, device=DEVICE) for k, v in ref.items() if k not in names}
    ex = ex_pads = None
    if names:
        ex = torch.stack([extras[n][0] for n in names])
        ex_pads = torch.tensor([extras[n][1] for n in names], dtype=torch.int64, device=DEVICE)
        outputs["extras"] = torch.full((len(names),) + tuple(ref["input_ids"].shape), SENTINEL,
                                       dtype=ref["input_ids"].dtype, device=DEVICE)
    L = ref["input_ids"].shape[1]
    args = DeviceLaunch(
        tokens=tokens, offsets=offsets, loss_masks=loss_masks, labels=labels, label_offsets=label_offsets,
        prompt_lengths=prompt_lengths, extras=ex, extra_pads=ex_pads, outputs=outputs, L=L,
        Ll=ref["labels"].shape[1] if kind == 2 else L, max_length=max_length,
        truncate_left=truncation_side == "left", pad_left=padding_side == "left", labels_kind=kind,
        pad_token_id=pad, label_pad_token_id=label_pad, decoder_start_token_id=start)
    from pyseqpack.kernels import pad_shift_mask as kernel

    kernel.launch(args)
    got = {k: v for k, v in outputs.items() if k != "extras"}
    for e, n in enumerate(names):
        got[n] = outputs["extras"][e]
    return {k: got[k] for k in ref}


def _assert_same(got: dict, ref: dict):
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        assert torch.equal(got[key].cpu(), ref[key]), (key, got[key].tolist(), ref[key].tolist())


def _check(rows, *, kind, label_rows=None, masks=None, prompts=None, extras=None, truncation=None, max_length=None,
           padding="max_length", padding_side="right", multiple=None, dtype=torch.int64, in_dtypes=(torch.int64,) * 4,
           start=1):
    """One batch through the reference and the kernel. truncation: None, "right" or "left". in_dtypes: the
    buffers' dtypes (tokens, loss masks, labels, extras)."""
    tok_t, mask_t, lab_t, ex_t = in_dtypes
    labels = {0: None, 1: "input_ids", 2: label_rows}[kind]
    ref = pad_shift_mask(
        rows, labels=labels, prompt_lengths=prompts, loss_masks=masks, pad_token_id=0,
        padding=padding, max_length=max_length, truncation=truncation is not None,
        truncation_side=truncation or "right", padding_side=padding_side, pad_to_multiple_of=multiple,
        decoder_start_token_id=start if kind else None, return_position_ids=True, return_shift_labels=kind != 0,
        return_loss_mask=prompts is not None, extras=extras, dtype=dtype, backend="torch")
    tokens, offsets = _flat(rows, tok_t)
    lab = lab_off = None
    if kind == 2:
        lab, lab_off = _flat(label_rows, lab_t)
    got = _launch(
        ref, tokens=tokens, offsets=offsets, kind=kind, max_length=max_length if truncation else -1,
        truncation_side=truncation, padding_side=padding_side, loss_masks=masks and _flat(masks, mask_t)[0],
        labels=lab, label_offsets=lab_off,
        prompt_lengths=None if prompts is None else torch.tensor(prompts, dtype=torch.int64, device=DEVICE),
        extras=extras and {n: (_flat(r, ex_t)[0], p) for n, (r, p) in extras.items()}, start=start)
    _assert_same(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# Every side of padding and truncation x every kind of labels x both output dtypes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=["out64", "out32"])
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["no_labels", "derived", "given"])
@pytest.mark.parametrize("truncation", [None, "right", "left"], ids=["no_trunc", "trunc_right", "trunc_left"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_matches_reference(padding_side, truncation, kind, dtype):
    # int32 outputs also read int32 buffers (uint8 loss masks) and pad to the longest row; int64 ones pad to
    # max_length, rounded up to a multiple of 3 under truncation (L = 6 > max_length = 4: columns no row reaches).
    small = dtype == torch.int32
    _check(ROWS, kind=kind, label_rows=LABEL_ROWS, masks=MASKS if kind == 1 else None, prompts=PROMPTS,
           extras=EXTRAS, truncation=truncation, max_length=4 if truncation else 9,
           padding="longest" if small else "max_length", multiple=3 if truncation and not small else None,
           padding_side=padding_side, dtype=dtype,
           in_dtypes=(torch.int32, torch.uint8, torch.int32, torch.int32) if small else (torch.int64,) * 4)


@st.composite
def _problems(draw):
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 9), min_size=B, max_size=B))
    rows = [draw(st.lists(st.integers(-5, 2**31 - 1), min_size=n, max_size=n)) for n in lengths]
    kind = draw(st.sampled_from([0, 1, 2]))
    label_rows = [draw(st.lists(st.integers(-100, 50), max_size=9)) for _ in range(B)] if kind == 2 else None
    masks = [draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)) for n in lengths] if kind == 1 else None
    prompts = draw(st.one_of(st.none(), st.lists(st.integers(0, 12), min_size=B, max_size=B)))
    truncation = draw(st.sampled_from([None, "right", "left"]))
    longest = max(lengths + [len(r) for r in label_rows or []])
    max_length = draw(st.integers(1, 10)) if truncation else draw(st.integers(max(longest, 1), 12))
    return dict(rows=rows, kind=kind, label_rows=label_rows, masks=masks, prompts=prompts,
                extras={"e": ([[v % 7 for v in r] for r in rows], -7)} if draw(st.booleans()) else None,
                truncation=truncation, max_length=max_length, padding=draw(st.sampled_from(["longest", "max_length"])),
                padding_side=draw(st.sampled_from(["right", "left"])), multiple=draw(st.sampled_from([None, 4])),
                dtype=draw(st.sampled_from([torch.int64, torch.int32])),
                in_dtypes=tuple(draw(st.sampled_from(c)) for c in [(torch.int32, torch.int64)] * 4),
                start=draw(st.sampled_from([-100, 3])))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_problems())
def test_property_matches_reference(problem):
    _check(**problem)


# ---------------------------------------------------------------------------------------------------------------
# Untrusted device data: offsets and prompt lengths
# ---------------------------------------------------------------------------------------------------------------

TOKENS = list(range(100, 112))  # 12 tokens
# Row b is TOKENS[o[b] : o[b + 1]]: rows 0, 1, 6 are good (row 1 is longer than max_length = 4), row 7 is a
# legitimately empty window at the very end; every other window leaves [0, 12) under every truncation:
# past the end (2), decreasing from outside (3, 5, 9), a negative start (4), start -2**63 with the count
# saturating at INT64_MAX (8).
OFFSETS = [0, 3, 10, 20, -5, 2**62, 8, 12, INT64_MIN, INT64_MAX, 12]
GOOD = {0: (0, 3), 1: (3, 10), 6: (8, 12)}
LABEL_VALUES = list(range(40, 48))  # 8 labels
# Label rows 0, 3, 7 are good (row 0 is longer than max_length); 1 (past the end), 2 (decreasing from outside),
# 6 (a negative start) and 9 (start -2**63, the count saturating) leave [0, 8); 4, 5 and 8 are empty windows
# inside the buffer (5 and 8 decreasing).
LABEL_OFFSETS = [0, 6, 2**62, 5, 8, 8, -3, 2, 4, INT64_MIN, 8]
LABEL_GOOD = {0: (0, 6), 3: (5, 8), 7: (2, 4)}
# Prompt lengths far outside clamp: -5 and -2**63 like 0 (-2**63 - cut would overflow under left truncation),
# 2**62 like the whole row; B = 10 entries.
UNTRUSTED_PROMPTS = [-5, INT64_MIN, 1, 0, 0, 0, 2**62, 0, 3, INT64_MAX]


@pytest.mark.parametrize("kind", [1, 2], ids=["derived", "given"])
@pytest.mark.parametrize("truncation", [None, "right", "left"], ids=["no_trunc", "trunc_right", "trunc_left"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_untrusted_offsets_give_empty_rows(padding_side, truncation, kind):
    B = len(OFFSETS) - 1
    rows = [TOKENS[slice(*GOOD[b])] if b in GOOD else [] for b in range(B)]
    keep = [int(v % 3 != 0) for v in TOKENS]  # loss masks, aligned with TOKENS (rows 1 and 6 overlap)
    masks = [[keep[v - TOKENS[0]] for v in r] for r in rows]
    label_rows = [LABEL_VALUES[slice(*LABEL_GOOD[b])] if b in LABEL_GOOD else [] for b in range(B)]
    max_length = 4 if truncation else 10
    ref = pad_shift_mask(
        rows, labels="input_ids" if kind == 1 else label_rows, loss_masks=masks if kind == 1 else None,
        prompt_lengths=[max(p, 0) for p in UNTRUSTED_PROMPTS], pad_token_id=0, padding="max_length",
        max_length=max_length, truncation=truncation is not None, truncation_side=truncation or "right",
        padding_side=padding_side, decoder_start_token_id=1, return_position_ids=True, return_shift_labels=True,
        return_loss_mask=True, extras={"e": ([[v + 1000 for v in r] for r in rows], -1)}, backend="torch")
    device_i64 = dict(dtype=torch.int64, device=DEVICE)
    got = _launch(
        ref, tokens=torch.tensor(TOKENS, **device_i64), offsets=torch.tensor(OFFSETS, **device_i64), kind=kind,
        max_length=max_length if truncation else -1, truncation_side=truncation, padding_side=padding_side,
        loss_masks=torch.tensor(keep, dtype=torch.uint8, device=DEVICE) if kind == 1 else None,
        labels=torch.tensor(LABEL_VALUES, **device_i64) if kind == 2 else None,
        label_offsets=torch.tensor(LABEL_OFFSETS, **device_i64) if kind == 2 else None,
        prompt_lengths=torch.tensor(UNTRUSTED_PROMPTS, **device_i64),
        extras={"e": (torch.tensor(TOKENS, **device_i64) + 1000, -1)}, start=1)
    _assert_same(got, ref)


@pytest.mark.parametrize("truncation", [None, "right", "left"], ids=["no_trunc", "trunc_right", "trunc_left"])
def test_saturated_span_mirrors_plan_row(truncation):
    """offsets [-2**63 + 5, 2**63 - 1]: the count end - start = 2**64 - 6 saturates at INT64_MAX (psm::span).
    Keeping the last 4 then starts at -2**63 + 5 + INT64_MAX - 4 = 0, inside the buffer: the row is tokens[0:4],
    with cut = INT64_MAX - 4, so prompt length INT64_MAX - 2 leaves a prompt of 2 kept tokens. Without truncation
    or keeping the first 4, the window starts at -2**63 + 5: the empty row."""
    tokens = list(range(100, 112))
    rows = [tokens[:4] if truncation == "left" else []]
    ref = pad_shift_mask(rows, labels="input_ids", prompt_lengths=[2], pad_token_id=0, padding="max_length",
                         max_length=4, truncation=truncation is not None, truncation_side=truncation or "right",
                         return_position_ids=True, return_shift_labels=True, return_loss_mask=True, backend="torch")
    device_i64 = dict(dtype=torch.int64, device=DEVICE)
    got = _launch(ref, tokens=torch.tensor(tokens, **device_i64),
                  offsets=torch.tensor([INT64_MIN + 5, INT64_MAX], **device_i64), kind=1,
                  max_length=4 if truncation else -1, truncation_side=truncation, padding_side="right",
                  prompt_lengths=torch.tensor([INT64_MAX - 2], **device_i64))
    _assert_same(got, ref)


def test_bad_launch_fields_raise():
    rows = [[1, 2, 3], [4]]
    ref = pad_shift_mask(rows, labels="input_ids", pad_token_id=0, padding="max_length", max_length=4,
                         backend="torch")
    tokens, offsets = _flat(rows)
    good = dict(ref=ref, tokens=tokens, offsets=offsets, kind=1, max_length=-1, truncation_side=None,
                padding_side="right")
    _launch(**good)
    for change, field in [(dict(offsets=offsets.to(torch.int32)), "offsets"),
                          (dict(prompt_lengths=torch.zeros(3, dtype=torch.int64, device=DEVICE)), "prompt_lengths"),
                          (dict(loss_masks=torch.ones(3, dtype=torch.uint8, device=DEVICE)), "loss_masks"),
                          (dict(kind=2), "labels"),
                          (dict(ref=dict(ref, labels=ref["labels"][:, :3])), "outputs\\['labels'\\]")]:
        with pytest.raises(ValueError, match=f"DeviceLaunch.{field}"):
            _launch(**dict(good, **change))


# ---------------------------------------------------------------------------------------------------------------
# The real compiler
# ---------------------------------------------------------------------------------------------------------------

# Compiles the kernel for sm_90 with the NVIDIA backend in a fresh interpreter (under TRITON_INTERPRET=1, set
# for this process, @triton.jit functions cannot be compiled), for the constexpr combinations the interpreter
# cannot vouch for: every branch of the in-kernel planning, every kind of labels.
_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pyseqpack.kernels import pad_shift_mask as k

inputs = ["offsets_ptr", "tok_ptr", "mask_ptr", "lab_ptr", "lab_offsets_ptr", "prompt_ptr", "ex_ptr", "ex_pad_ptr"]
outputs = ["ids_ptr", "attn_ptr", "labels_ptr", "dec_ptr", "shift_ptr", "pos_ptr", "loss_ptr", "ex_out_ptr"]
ints = ["n_tok", "n_lab", "B", "L", "Ll", "max_length", "pad_id", "label_pad", "decoder_start"]
# labels kind, prompt lengths, truncate left, pad left, token dtype, output dtype
combos = [(0, True, False, True, "i32", "i32"), (1, False, True, False, "i64", "i64"),
          (1, True, False, True, "i32", "i32"), (2, False, True, True, "i64", "i64"),
          (2, True, False, False, "i32", "i32")]
for labels, prompt, tleft, pleft, tok, out in combos:
    signature = {p: "*i64" for p in inputs}
    signature.update(tok_ptr="*" + tok, mask_ptr="*u8", lab_ptr="*" + tok, ex_ptr="*" + tok)
    signature.update({p: "*" + out for p in outputs})
    signature.update({n: "i32" for n in ints}, max_length="i64")
    constexprs = dict(LABELS=labels, HAS_MASK=labels == 1, HAS_PROMPT=prompt, NUM_EXTRAS=2, TRUNC_LEFT=tleft,
                      PAD_LEFT=pleft, WRITE_ATTN=True, WRITE_LABELS=labels != 0, WRITE_DEC=labels != 0,
                      WRITE_SHIFT=labels != 0, WRITE_POS=True, WRITE_LOSS=prompt, BLOCK=256)
    signature.update({name: "constexpr" for name in constexprs})
    triton.compile(ASTSource(k._pad_shift_mask_kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
print("ok")
"""


def test_kernel_compiles_for_gpu():
    """The interpreter is lenient (scalar branches, types): compile with Triton's real NVIDIA backend down to a
    cubin for sm_90 (no GPU needed: ptxas ships with triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the checkout: `python -c` puts the cwd first on sys.path, and the source tree's pyseqpack/
    # (no compiled modules, no pyseqpack.kernels) would shadow the installed package.
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tempfile.gettempdir())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
