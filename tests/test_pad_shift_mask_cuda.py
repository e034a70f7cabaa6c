"""The CUDA pad_shift_mask backend (csrc/pad_shift_mask.cu via pyseqpack.pad_shift_mask_cuda) against torch.

Every GPU test runs pad_shift_mask(..., backend="cuda") and the plain reference backend="torch" on the same
random ragged batch and requires identical outputs (same keys, dtypes and values): exact integer results, so
no tolerance. Tests that need a CUDA device are skipped without one; the rest run everywhere: the library
exports the entry point, the C entry point refuses bad arguments before any CUDA call, and the launcher
rejects every malformed DeviceLaunch field with a ValueError naming it.

The grid, and why: padding side x truncation (none / right / left) x labels (none / derived with prompt
lengths and loss masks / separate labels) x output dtype x input form. The forms reach each buffer type the
kernel dispatches on: Python lists (packed into one buffer of the output dtype), flat int32 and int64 token
tensors with host offsets (int32 extras and labels beside int64 tokens, bool and int32 loss masks), and flat
int64 tokens with device offsets, which the op plans on the device. The batch shapes put rows of length 0
next to rows that span one, two and four 256-column tiles (B = 1, 3, 29).
"""
import copy
import ctypes
import random

import pytest
import torch

from pyseqpack import _native
from pyseqpack.pad_shift_mask import DeviceLaunch, pad_shift_mask

_GPU = _native.cuda_built() and torch.cuda.is_available()
built = pytest.mark.skipif(not _native.cuda_built(), reason="pyseqpack._cuda was not built (no nvcc at build time)")
needs_gpu = pytest.mark.skipif(
    not _GPU,
    reason="the CUDA pad_shift_mask kernel needs a CUDA device; none is available here"
    if _native.cuda_built() else "pyseqpack._cuda was not built (no nvcc at build time)",
)

PAD, LABEL_PAD, DECODER_START = 3, -100, 5
SHAPES = {"one_row": (1, 5), "few_rows": (3, 300), "many_rows": (29, 1000)}  # (B, longest possible row)
FORMS = ("lists", "flat_int32", "flat_int64", "device_offsets")
TRUNCATIONS = (None, "right", "left")
LABEL_MODES = ("none", "derived", "given")


def _cuda_launcher():
    from pyseqpack import pad_shift_mask_cuda

    return pad_shift_mask_cuda


# ------------------------------------------------------------------------------------------- random batches


def _ragged(rng, B, longest, low, high):
    """B rows of random length in [0, longest] (the first one of length `longest`, and row 1 empty when
    B > 1), values in [low, high]."""
    lengths = [longest] + [0 if b == 1 else rng.randint(0, longest) for b in range(1, B)]
    return [[rng.randint(low, high) for _ in range(n)] for n in lengths]


def _flat(rows, dtype, device, offsets_on_device=False):
    """(flat tensor, offsets) for the rows: the op's flat input form."""
    flat = torch.tensor([v for r in rows for v in r], dtype=dtype, device=device)
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    return flat, (torch.tensor(offsets, device=device) if offsets_on_device else offsets)


def make_case(shape, side, truncation, label_mode, dtype, form, device, seed=0):
    """The keyword arguments of one pad_shift_mask call (without backend) for a random batch."""
    rng = random.Random(f"{shape}-{side}-{truncation}-{label_mode}-{dtype}-{form}-{seed}")
    B, longest = SHAPES[shape]
    top = 2**31 - 1 if dtype == torch.int32 else 2**40  # int64 outputs get values past the int32 range
    if form == "flat_int32":
        top = min(top, 2**31 - 1)
    rows = _ragged(rng, B, longest, 0, top)
    kw = {"pad_token_id": PAD, "label_pad_token_id": LABEL_PAD, "padding_side": side, "dtype": dtype,
          "return_position_ids": True}
    if truncation is not None:
        # max_length cuts the longest row; padding="max_length" pads every row to it
        kw.update(truncation=True, truncation_side=truncation, max_length=max(1, 2 * longest // 3),
                  padding="max_length")
    elif form == "device_offsets":
        kw.update(padding="max_length", max_length=longest, truncation=True)  # device planning needs both
    else:
        kw["pad_to_multiple_of"] = 8

    masks = [[rng.randint(0, 1) for _ in r] for r in rows]
    extras = {"token_type_ids": ([[rng.randint(0, 1) for _ in r] for r in rows], 0),
              "special_tokens_mask": ([[rng.randint(0, 1) for _ in r] for r in rows], 1)}
    label_rows = None
    if label_mode == "derived":
        kw.update(labels="input_ids", prompt_lengths=[rng.randint(0, len(r) + 1) for r in rows],
                  return_shift_labels=True, return_loss_mask=True, decoder_start_token_id=DECODER_START)
    elif label_mode == "given":
        # int32 label buffers beside int64 tokens (see below) hold int32 values; about a fifth are -100 (ignored)
        label_top = 2**31 - 1 if form in ("flat_int64", "device_offsets") else top
        label_rows = [[-100 if rng.random() < 0.2 else v for v in r]
                      for r in _ragged(rng, B, max(1, longest // 2), 0, label_top)]
        kw.update(return_shift_labels=True, decoder_start_token_id=DECODER_START)

    if form == "lists":
        kw["input_ids"] = rows
        kw["device"] = device
        kw["extras"] = extras
        if label_mode == "derived":
            kw["loss_masks"] = masks
        if label_rows is not None:
            kw["labels"] = label_rows
        return kw
    # Flat tensors on the device: int32 tokens come with int32 masks and int64 extras / labels; int64 tokens
    # with bool masks and int32 extras / labels, so each buffer type meets the other token type.
    tok_dtype = torch.int32 if form == "flat_int32" else torch.int64
    side_dtype = torch.int64 if tok_dtype == torch.int32 else torch.int32
    on_device = form == "device_offsets"
    kw["input_ids"], kw["offsets"] = _flat(rows, tok_dtype, device, on_device)
    kw["extras"] = {k: (_flat(v, side_dtype, device)[0], p) for k, (v, p) in extras.items()}
    if label_mode == "derived":
        kw["loss_masks"] = _flat(masks, torch.int32 if tok_dtype == torch.int32 else torch.bool, device)[0]
    if label_rows is not None:
        kw["labels"], kw["label_offsets"] = _flat(label_rows, side_dtype, device, on_device)
    return kw


def _same(a, b) -> bool:
    """Deep equality of nested lists / tuples / dicts of ints and tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def assert_cuda_matches_torch(kw, device):
    before = copy.deepcopy(kw)
    ref = pad_shift_mask(backend="torch", **kw)
    got = pad_shift_mask(backend="cuda", **kw)
    assert list(got) == list(ref)
    for key, r in ref.items():
        g = got[key]
        assert g.device.type == torch.device(device).type and g.dtype == kw["dtype"], (key, g.device, g.dtype)
        assert g.shape == r.shape, (key, g.shape, r.shape)
        assert torch.equal(g.cpu(), r.cpu()), f"{key}:\ncuda  {g.cpu()}\ntorch {r.cpu()}"
    for k, v in before.items():
        assert _same(v, kw[k]), f"the call modified {k}"


# ------------------------------------------------------------------------------------------- the op on a GPU


@needs_gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("label_mode", LABEL_MODES)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_matches_torch(shape, side, truncation, label_mode, dtype, form):
    assert_cuda_matches_torch(make_case(shape, side, truncation, label_mode, dtype, form, "cuda"), "cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_only_some_outputs_and_empty_rows(dtype):
    # Only input_ids, labels and shift_labels are asked for; every row is empty but one.
    rows = [[], [7, 8, 9], [], []]
    kw = dict(input_ids=rows, labels="input_ids", pad_token_id=0, return_attention_mask=False,
              return_shift_labels=True, dtype=dtype, device="cuda")
    assert_cuda_matches_torch(kw, "cuda")
    kw["input_ids"] = [[], [], []]  # L = 0: empty outputs, nothing to launch
    assert_cuda_matches_torch(kw, "cuda")


# ------------------------------------------------------------------------------------------- the launcher on a GPU


def _launch_args(rows, L, device, kind=1, plan_rows=None):
    """A DeviceLaunch for right-padded rows and no prompt (plan per csrc/pad_shift_mask.h), writing every output
    as int64: labels derived from the tokens (kind 1), or given separately as a copy of them (kind 2).
    plan_rows overrides rows of the plan."""
    tokens, offsets = _flat(rows, torch.int64, device)
    plan = [[offsets[b], len(r), 0, 0, 0, offsets[b], len(r), 0] for b, r in enumerate(rows)]
    for b, row in (plan_rows or {}).items():
        plan[b] = row
    outputs = {k: torch.full((len(rows), L), -7, dtype=torch.int64, device=device)
               for k in ("input_ids", "attention_mask", "labels", "decoder_input_ids", "shift_labels",
                         "position_ids", "loss_mask")}
    return DeviceLaunch(plan=torch.tensor(plan, dtype=torch.int64, device=device), tokens=tokens, loss_masks=None,
                        labels=tokens.clone() if kind == 2 else None, extras=None, extra_pads=None, outputs=outputs,
                        L=L, Ll=L, labels_kind=kind, pad_token_id=PAD, label_pad_token_id=LABEL_PAD,
                        decoder_start_token_id=DECODER_START)


def _reference(rows, L, label_rows=None):
    """What _launch_args' plan asks for, by the torch backend (label_rows: the separate labels of kind 2)."""
    return pad_shift_mask(rows, labels="input_ids" if label_rows is None else label_rows,
                          prompt_lengths=[0] * len(rows), pad_token_id=PAD, label_pad_token_id=LABEL_PAD,
                          decoder_start_token_id=DECODER_START, padding="max_length", max_length=L,
                          return_position_ids=True, return_shift_labels=True, return_loss_mask=True, backend="torch")


@needs_gpu
@pytest.mark.parametrize("window", ["tokens", "labels"])
@pytest.mark.parametrize("src,kept", [
    (16, 5),          # runs past the end of the 18-value buffer
    (-1, 3),          # starts before it
    (2**62, 4),       # far outside (src + kept would overflow a careless bound check)
    (0, -5),          # negative count
    (2**63 - 1, 2**63 - 1),
])
def test_plan_rows_outside_the_buffer_are_written_as_padding(window, src, kept):
    rows, L = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34]], 10
    kind = 1 if window == "tokens" else 2
    args = _launch_args(rows, L, "cuda", kind)
    _cuda_launcher().launch(args)
    for key, r in _reference(rows, L, None if kind == 1 else rows).items():  # the hand-made plan is right
        assert torch.equal(args.outputs[key].cpu(), r), key

    # Row 1's token (or label) window leaves its buffer: that row comes out as an empty one (its tokens, or
    # its labels), the other rows as before.
    n1, off1 = len(rows[1]), len(rows[0])
    bad = [src, kept, 0, 0, 0, src, kept, 0] if kind == 1 else [off1, n1, 0, 0, 0, src, kept, 0]
    args = _launch_args(rows, L, "cuda", kind, {1: bad})
    _cuda_launcher().launch(args)
    fixed = [rows[0], [], rows[2]]
    ref = _reference(fixed, L) if kind == 1 else _reference(rows, L, fixed)
    for key, r in ref.items():
        assert torch.equal(args.outputs[key].cpu(), r), key


@needs_gpu
def test_launch_is_capturable_in_a_cuda_graph():
    # No host sync in the launcher or the kernel: it records into a graph, and replays read the buffers anew.
    rows, L = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]], 300
    args = _launch_args(rows, L, "cuda")
    launcher = _cuda_launcher()
    launcher.launch(args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launcher.launch(args)
    new_rows = [[100 + v for v in r] for r in rows]
    args.tokens.copy_(_flat(new_rows, torch.int64, "cuda")[0])
    for t in args.outputs.values():
        t.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    for key, r in _reference(new_rows, L).items():
        assert torch.equal(args.outputs[key].cpu(), r), key


@needs_gpu
@pytest.mark.slow
def test_outputs_past_2_pow_31_elements():
    # [160, 2^24 - 512] int32 input_ids = 2.7e9 elements (10.7 GB): element offsets pass 2^31, so int32 index
    # math would write the last rows to the wrong place. Left padding puts the tokens at the very end. (L is
    # near the widest row one launch takes: 65535 column tiles of 256.)
    B, L = 160, 2**24 - 512
    rng = random.Random(0)
    rows = [[rng.randint(0, 2**31 - 1) for _ in range(rng.randint(0, 50))] for _ in range(B)]
    flat, offsets = _flat(rows, torch.int32, "cuda")
    out = pad_shift_mask(flat, offsets=offsets, pad_token_id=PAD, padding="max_length", max_length=L,
                         padding_side="left", return_attention_mask=False, dtype=torch.int32, backend="cuda")
    ids = out["input_ids"]
    for b in (0, 1, 127, 128, 159):
        n = len(rows[b])
        assert torch.equal(ids[b, L - n:].cpu(), torch.tensor(rows[b], dtype=torch.int32)), b
        assert bool((ids[b, : L - n] == PAD).all()), b


# ------------------------------------------------------------------------------------------- anywhere


@built
def test_library_exports_the_entry_point():
    assert hasattr(_native.cuda_library(), "pyseqpack_psm_fill")
    assert _cuda_launcher().unavailable_reason() is None


@built
def test_c_entry_point_refuses_bad_arguments_before_any_cuda_call():
    lib = _cuda_launcher()._lib()
    invalid = 1  # cudaErrorInvalidValue
    outs = (ctypes.c_void_p * 7)()
    plan = ctypes.c_int64(0)

    def call(B=1, L=4, Ll=4, tokens_code=0, mask=None, mask_code=0, kind=0, labels_code=0, n_extras=0,
             extras_code=0, out_code=0, plan_ptr=ctypes.addressof(plan)):
        return lib.pyseqpack_psm_fill(plan_ptr, B, L, Ll, None, 0, tokens_code, mask, mask_code, kind, None, 0,
                                      labels_code, outs, None, n_extras, extras_code, None, None, 0, -100, 0,
                                      out_code, None)

    assert call() == 0  # nothing requested: nothing to launch
    assert call(B=0, plan_ptr=None) == 0  # an empty batch
    assert call(B=-1) == invalid
    assert call(L=-1) == invalid
    assert call(kind=3) == invalid
    assert call(tokens_code=2) == invalid  # uint8 tokens
    assert call(out_code=5) == invalid
    assert call(mask=ctypes.addressof(plan), mask_code=3) == invalid
    assert call(kind=2, labels_code=2) == invalid  # uint8 labels
    assert call(n_extras=1) == invalid  # extras without buffers
    assert call(L=65535 * 256 + 1) == invalid  # more column tiles than a grid holds
    assert call(plan_ptr=None) == invalid
    outs[2] = ctypes.addressof(plan)
    assert call(kind=0) == invalid  # a labels output without labels


@built
def test_check_return_raises_with_the_cuda_error_string():
    with pytest.raises(RuntimeError, match="pyseqpack_psm_fill failed with CUDA error 1: invalid argument"):
        _cuda_launcher()._check_return(1)


def _valid_cpu_args():
    rows = [[1, 2, 3], [4, 5]]
    args = _launch_args(rows, 4, "cpu")
    args.extras = torch.zeros((2, 5), dtype=torch.int32)
    args.extra_pads = torch.zeros(2, dtype=torch.int64)
    args.outputs["extras"] = torch.zeros((2, 2, 4), dtype=torch.int64)
    args.loss_masks = torch.ones(5, dtype=torch.uint8)
    return args


def _set(**fields):
    def apply(a):
        for k, v in fields.items():
            setattr(a, k, v)
    return apply


def _set_output(key, value):
    def apply(a):
        a.outputs[key] = value
    return apply


@pytest.mark.parametrize("mutate,message", [
    (_set(plan=torch.zeros((2, 7), dtype=torch.int64)), r"plan must have shape \[2, 8\]"),
    (_set(plan=torch.zeros((2, 8), dtype=torch.int32)), "plan must have dtype torch.int64"),
    (_set(plan=torch.zeros((8, 2), dtype=torch.int64).t()), "plan must be contiguous"),
    (_set(mode=1), "mode 1 is not built"),
    (_set(labels_kind=4), "labels_kind must be 0"),
    (_set(L=-1), r"L = -1 is outside \[0,"),
    (_set(Ll=5), "derived labels .* need Ll == L"),
    (_set(tokens=torch.zeros(5, dtype=torch.int16)), "tokens must have dtype torch.int64 or torch.int32"),
    (_set(tokens=torch.zeros((5, 1), dtype=torch.int64)), r"tokens must have shape \[5\]"),
    (_set(loss_masks=torch.ones(4, dtype=torch.uint8)), r"loss_masks must have shape \[5\]"),
    (_set(loss_masks=torch.ones(5, dtype=torch.bool)), "loss_masks must have dtype"),
    (_set(labels=torch.zeros(3, dtype=torch.int64)), "`labels` is only read with labels_kind 2"),
    (_set(labels_kind=2, loss_masks=None), "labels_kind 2 needs the `labels` buffer"),
    (_set(extras=torch.zeros((2, 4), dtype=torch.int32)), r"extras must have shape \[2, 5\]"),
    (_set(extra_pads=torch.zeros(3, dtype=torch.int64)), r"extra_pads must have shape \[2\]"),
    (_set(extra_pads=None), "extra_pads must be a torch.Tensor"),
    (_set_output("extras", None), r"outputs\['extras'\] .* must be given exactly when there are extras"),
    (_set_output("extras", torch.zeros((2, 4, 2), dtype=torch.int64)), r"outputs\['extras'\] must have shape"),
    (_set_output("input_ids", torch.zeros((2, 5), dtype=torch.int64)),
     r"outputs\['input_ids'\] must have shape \[2, 4\]"),
    (_set_output("labels", torch.zeros((2, 4), dtype=torch.int32)), "every output must have the same dtype"),
    (_set_output("shift_labels", torch.zeros((4, 2), dtype=torch.int64).t()), "must be contiguous"),
    (_set_output("input_ids", torch.zeros((2, 4), dtype=torch.float32)), "must have dtype"),
    (_set_output("logits", torch.zeros((2, 4), dtype=torch.int64)), r"unknown keys \['logits'\]"),
    (_set(outputs=[]), "outputs must be a dict"),
    (_set(pad_token_id=2**63), "pad_token_id = .* is outside the output dtype"),
    (_set(label_pad_token_id=None), "label_pad_token_id must be an int"),
    (_set(decoder_start_token_id=True), "decoder_start_token_id must be an int"),
])
def test_launcher_names_the_bad_field(mutate, message):
    args = _valid_cpu_args()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        _cuda_launcher()._arguments(args)


def test_launcher_checks_labels_and_devices():
    args = _valid_cpu_args()
    args.labels_kind, args.loss_masks = 0, None
    with pytest.raises(ValueError, match=r"outputs \[.*'labels'.*\] need labels"):
        _cuda_launcher()._arguments(args)
    for key in ("labels", "decoder_input_ids", "shift_labels"):
        del args.outputs[key]
    _cuda_launcher()._arguments(args)  # valid now
    with pytest.raises(ValueError, match="the CUDA kernel needs CUDA tensors, got plan and buffers on cpu"):
        _cuda_launcher().launch(args)
    if torch.cuda.is_available():
        args.tokens = args.tokens.cuda()
        with pytest.raises(ValueError, match="tokens must be on cpu"):
            _cuda_launcher()._arguments(args)
