"""The CUDA pad_shift_mask backend (csrc/pad_shift_mask.cu via pyseqpack/pad_shift_mask/cuda.py) against torch.

Every GPU test compares the CUDA kernel with the plain reference backend="torch" on the same batch and requires
identical outputs (same keys, dtypes and values): exact integer results, so no tolerance. Two ways in: the op,
pad_shift_mask(..., backend="cuda"), and the launcher with a DeviceLaunch built by hand from the op's keyword
arguments (flat buffers and their offsets; the kernel plans every row itself), which also feeds the kernel
untrusted offsets and prompt lengths. Tests that need a CUDA device are skipped without one; the rest run
everywhere: the library exports the entry point, the C entry point refuses bad arguments before any CUDA call,
the launcher rejects every malformed DeviceLaunch field with a ValueError naming it, and it builds the C
arguments in the order of the C signature.

The op grid, and why: padding side x truncation (none / right / left) x labels (none / derived with prompt
lengths and loss masks / separate labels) x output dtype x input form. The forms reach each buffer type the
kernel dispatches on: Python lists (packed into one buffer of the output dtype), flat int32 and int64 token
tensors with host offsets (int32 extras and labels beside int64 tokens, bool and int32 loss masks), and flat
int64 tokens with device offsets, which the kernel plans from directly. The batch shapes put rows of length 0
next to rows that span one, two and four 256-column tiles (B = 1, 3, 29). The launcher grid crosses the same
sides, truncations and labels with every token / output / side buffer / loss mask type.

The case builders here (make_case, launch_case, bad_offsets_cases, clamped_prompts_case, _device_launch,
assert_refuses_bad_arguments, ...) also drive tests/test_pad_shift_mask_cuda_emulated.py, which runs the same
kernel source on the CPU, compiled as host C++, where no GPU is available.
"""
import copy
import ctypes
import random

import pytest
import torch

from pyseqpack import _native
from pyseqpack.pad_shift_mask import OUTPUT_KEYS, DeviceLaunch, pad_shift_mask

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
    from pyseqpack.pad_shift_mask import cuda

    return cuda


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
        kw.update(padding="max_length", max_length=longest, truncation=True)  # device offsets without a sync need both
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


def _offsets(rows):
    return _flat(rows, torch.int64, "cpu")[1]


def _device_launch(kw, ref, device, tok_dtype=torch.int64, side_dtype=torch.int64, mask_dtype=torch.uint8,
                   offsets=None, label_offsets=None, prompt_lengths=None):
    """The DeviceLaunch that asks the kernel for what pad_shift_mask(**kw) returned as `ref` (its keys, shapes
    and dtype), with the op's row inputs as flat buffers on `device`: tokens of tok_dtype, separate labels and
    extras of side_dtype, loss masks of mask_dtype; every output filled with -7 first. offsets, label_offsets
    and prompt_lengths (lists) replace the true ones: the untrusted device values a kernel must survive."""
    rows, labels, masks, extras = kw["input_ids"], kw.get("labels"), kw.get("loss_masks"), kw.get("extras") or {}
    kind = 0 if labels is None else 1 if labels == "input_ids" else 2
    tokens, tok_offsets = _flat(rows, tok_dtype, device, True)
    lab_buf, lab_offsets = _flat(labels, side_dtype, device, True) if kind == 2 else (None, None)

    def on_device(values):
        return None if values is None else torch.tensor(values, dtype=torch.int64, device=device)

    B, L = ref["input_ids"].shape
    outputs = {k: torch.full(ref[k].shape, -7, dtype=ref[k].dtype, device=device) for k in OUTPUT_KEYS if k in ref}
    if extras:
        outputs["extras"] = torch.full((len(extras), B, L), -7, dtype=ref["input_ids"].dtype, device=device)
    return DeviceLaunch(
        tokens=tokens, offsets=tok_offsets if offsets is None else on_device(offsets),
        loss_masks=None if masks is None else _flat(masks, mask_dtype, device)[0],
        labels=lab_buf, label_offsets=lab_offsets if label_offsets is None else on_device(label_offsets),
        prompt_lengths=on_device(kw.get("prompt_lengths") if prompt_lengths is None else prompt_lengths),
        extras=torch.stack([_flat(v, side_dtype, device)[0] for v, _ in extras.values()]) if extras else None,
        extra_pads=on_device([pad for _, pad in extras.values()]) if extras else None,
        outputs=outputs, L=L, Ll=ref["labels"].shape[1] if kind else L,
        max_length=kw["max_length"] if kw.get("truncation") else -1,
        truncate_left=kw.get("truncation_side") == "left", pad_left=kw.get("padding_side") == "left",
        labels_kind=kind, pad_token_id=PAD, label_pad_token_id=LABEL_PAD,
        decoder_start_token_id=DECODER_START if kind else 0,
    )


def _op_kwargs(rows, side, truncation, labels, prompt_lengths, max_length, dtype=torch.int64):
    """pad_shift_mask's keyword arguments (backend aside) asking for every output: padded to max_length, rounded
    up to a multiple of 8 (so L can exceed max_length), and truncated to it when `truncation` is a side."""
    kw = dict(input_ids=rows, labels=labels, prompt_lengths=prompt_lengths, pad_token_id=PAD,
              label_pad_token_id=LABEL_PAD, padding="max_length", max_length=max_length,
              truncation=truncation is not None, truncation_side=truncation or "right", padding_side=side,
              pad_to_multiple_of=8, return_position_ids=True, return_loss_mask=prompt_lengths is not None,
              dtype=dtype)
    if labels is not None:
        kw.update(return_shift_labels=True, decoder_start_token_id=DECODER_START)
    return kw


def _assert_written(args, kw, ref):
    """Every output of the launch equals the reference's."""
    for key in OUTPUT_KEYS:
        if key in ref:
            got = args.outputs[key].cpu()
            assert torch.equal(got, ref[key]), f"{key}:\ncuda  {got}\ntorch {ref[key]}"
    for e, name in enumerate(kw.get("extras") or {}):
        assert torch.equal(args.outputs["extras"][e].cpu(), ref[name]), name


# (output, token, separate labels and extras, loss masks) dtypes: each buffer type meets both token types
BUFFER_TYPES = [
    (torch.int64, torch.int64, torch.int32, torch.uint8),
    (torch.int32, torch.int32, torch.int64, torch.int32),
    (torch.int64, torch.int32, torch.int64, torch.int64),
]


@needs_gpu
@pytest.mark.parametrize("types", BUFFER_TYPES, ids=lambda t: "-".join(str(d)[6:] for d in t))
@pytest.mark.parametrize("label_mode", LABEL_MODES)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_launch_matches_torch(side, truncation, label_mode, types):
    kw, ref, args = launch_case(side, truncation, label_mode, types, "cuda")
    _cuda_launcher().launch(args)
    _assert_written(args, kw, ref)


def launch_case(side, truncation, label_mode, types, device):
    """(op keyword arguments, their torch reference, the DeviceLaunch on `device` that asks for it) for one case
    of test_launch_matches_torch: six rows of 0 to 600 tokens with prompts, extras, loss masks for derived labels,
    buffers of the (output, token, separate labels and extras, loss masks) dtypes `types`."""
    out_dtype, tok_dtype, side_dtype, mask_dtype = types
    rng = random.Random(f"{side}-{truncation}-{label_mode}-{types}")
    top = 2**31 - 1 if torch.int32 in (out_dtype, tok_dtype) else 2**40
    rows = _ragged(rng, 6, 600, 0, top)  # rows of 0 to 600 tokens: up to three 256-column tiles
    labels = {"none": None, "derived": "input_ids",
              "given": _ragged(rng, 6, 300, -100, min(top, 2**31 - 1) if side_dtype == torch.int32 else top)}
    kw = _op_kwargs(rows, side, truncation, labels[label_mode], [rng.randint(0, len(r) + 1) for r in rows],
                    600 if truncation is None else 400, out_dtype)
    kw["extras"] = {"token_type_ids": ([[rng.randint(0, 1) for _ in r] for r in rows], 0),
                    "special_tokens_mask": ([[rng.randint(0, 1) for _ in r] for r in rows], 1)}
    if label_mode == "derived":
        kw["loss_masks"] = [[rng.randint(0, 1) for _ in r] for r in rows]
    ref = pad_shift_mask(backend="torch", **kw)
    return kw, ref, _device_launch(kw, ref, device, tok_dtype, side_dtype, mask_dtype)


# (entry of the offsets, its untrusted value): entry 0 only moves the first row's start, entry -1 only the last
# row's end, so exactly one row reads the bad value. Rows of 5, 9 and 4 values: an 18-value buffer.
BAD_OFFSETS = [
    (-1, 19),           # the last row runs past the end of the buffer
    (0, -1),            # the first row starts before it
    (-1, 2**62),        # far outside: src + kept would overflow a careless bound check
    (-1, 10),           # decreasing: the last row ends before it starts (an empty window)
    (0, 2**63 - 1),     # the first row starts at INT64_MAX, past its end
    (-1, 2**63 - 1),    # the last row spans INT64_MAX - 14 values
    (0, -(2**63)),      # the first row spans more than INT64_MAX values (the span saturates)
]


@needs_gpu
@pytest.mark.parametrize("window", ["tokens", "labels"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("entry,value", BAD_OFFSETS)
def test_offsets_outside_the_buffer_make_an_empty_row(entry, value, side, truncation, window):
    for kw, expected, args in bad_offsets_cases(entry, value, side, truncation, window, "cuda"):
        _cuda_launcher().launch(args)
        _assert_written(args, kw, expected)


def bad_offsets_cases(entry, value, side, truncation, window, device):
    """Two (op keyword arguments, expected outputs, DeviceLaunch on `device`) for one case of
    test_offsets_outside_the_buffer_make_an_empty_row: the true offsets, then offsets whose `entry` is `value`."""
    rows = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27, 28, 29], [31, 32, 33, 34]]
    # Separate labels are a copy of the tokens, so the expected outputs are those of emptied rows either way.
    # max_length 6 keeps the 5 values of the first bad window whole (right truncation to 4 would bring it back
    # inside the buffer) and cuts row 1.
    kw = _op_kwargs(rows, side, truncation, "input_ids" if window == "tokens" else rows, [2, 3, 1],
                    10 if truncation is None else 6)
    ref = pad_shift_mask(backend="torch", **kw)
    yield kw, ref, _device_launch(kw, ref, device)  # the true offsets

    # The bad row comes out as an empty one (its tokens, or its labels), the other rows as before.
    bad = _offsets(rows)
    bad[entry] = value
    empty = 0 if entry == 0 else len(rows) - 1
    fixed = [[] if b == empty else r for b, r in enumerate(rows)]
    expected = pad_shift_mask(backend="torch", **dict(kw, **{"input_ids" if window == "tokens" else "labels": fixed}))
    given = {"offsets": bad} if window == "tokens" else {"label_offsets": bad}
    yield kw, expected, _device_launch(kw, expected, device, **given)


@needs_gpu
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_prompt_lengths_are_clamped(truncation):
    kw, ref, args = clamped_prompts_case(truncation, "cuda")
    _cuda_launcher().launch(args)
    _assert_written(args, kw, ref)


def clamped_prompts_case(truncation, device):
    """(op keyword arguments, expected outputs, DeviceLaunch on `device`) for test_prompt_lengths_are_clamped."""
    # Prompt lengths on the device are not checked either: below 0 they act as 0, past the row as the whole row.
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [15, 16]]
    untrusted = [-5, -(2**63), 2**63 - 1, 2**62]
    kw = _op_kwargs(rows, "right", truncation, "input_ids", [0, 0, 6, 3], 8 if truncation is None else 4)
    ref = pad_shift_mask(backend="torch", **kw)
    return kw, ref, _device_launch(kw, ref, device, prompt_lengths=untrusted)


@needs_gpu
def test_launch_is_capturable_in_a_cuda_graph():
    # No host sync in the launcher or the kernel: it records into a graph, and each replay reads the buffers
    # anew, offsets included (the kernel plans the rows at run time).
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    new_rows = [[101, 102, 103, 104, 105, 106, 107, 108], [], [109, 110, 111]]  # as many tokens, split anew
    kw = _op_kwargs(rows, "right", None, "input_ids", [1, 2, 0], 300)
    ref = pad_shift_mask(backend="torch", **kw)
    args = _device_launch(kw, ref, "cuda")
    launcher = _cuda_launcher()
    launcher.launch(args)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launcher.launch(args)
    new_tokens, new_offsets = _flat(new_rows, torch.int64, "cuda", True)
    args.tokens.copy_(new_tokens)
    args.offsets.copy_(new_offsets)
    for t in args.outputs.values():
        t.fill_(-7)
    graph.replay()
    torch.cuda.synchronize()
    new_kw = dict(kw, input_ids=new_rows)
    _assert_written(args, new_kw, pad_shift_mask(backend="torch", **new_kw))


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
    assert_refuses_bad_arguments(_cuda_launcher()._lib())


def assert_refuses_bad_arguments(lib):
    """The C entry point `lib.pyseqpack_psm_fill` (argtypes set) refuses every bad argument with
    cudaErrorInvalidValue and accepts the calls that launch nothing; none of these calls may launch (no output
    is requested, or the batch is empty), so none reads a buffer."""
    invalid = 1  # cudaErrorInvalidValue
    outs = (ctypes.c_void_p * 7)()
    word = ctypes.c_int64(0)
    addr = ctypes.addressof(word)

    def call(B=1, L=4, Ll=4, offsets=addr, label_offsets=None, tokens=None, n_tokens=0, tokens_code=0, mask=None,
             mask_code=0, kind=0, labels=None, n_labels=0, labels_code=0, outs=outs, extras=None, n_extras=0,
             extras_code=0, extra_pads=None, extras_out=None, out_code=0):
        return lib.pyseqpack_psm_fill(offsets, label_offsets, None, B, L, Ll, -1, 0, 0, tokens, n_tokens, tokens_code,
                                      mask, mask_code, kind, labels, n_labels, labels_code, outs, extras, n_extras,
                                      extras_code, extra_pads, extras_out, 0, -100, 0, out_code, None)

    assert call() == 0  # nothing requested: nothing to launch
    assert call(kind=2, label_offsets=addr) == 0
    assert call(B=0, offsets=None) == 0  # an empty batch reads no offsets
    assert call(L=65535 * 256, Ll=65535 * 256) == 0  # the widest row a grid holds
    assert call(mask_code=3) == 0  # no loss masks: their code is not read
    assert call(n_extras=0, extras_code=2) == 0  # no extras: their code is not read
    assert call(n_extras=1, extra_pads=addr, L=0) == 0  # no tokens, no columns: extras and their output may be NULL
    assert call(B=-1) == invalid
    assert call(B=2**31) == invalid  # more blocks than a grid holds
    assert call(L=-1) == invalid
    assert call(Ll=-1) == invalid
    assert call(n_tokens=-1) == invalid
    assert call(n_labels=-1) == invalid
    assert call(n_extras=-1) == invalid
    assert call(outs=None) == invalid
    assert call(kind=3) == invalid
    assert call(kind=-1) == invalid
    assert call(tokens_code=2) == invalid  # uint8 tokens
    assert call(out_code=5) == invalid
    assert call(out_code=2) == invalid  # uint8 outputs
    assert call(mask=addr, mask_code=3) == invalid
    assert call(kind=2, label_offsets=addr, labels_code=2) == invalid  # uint8 labels
    assert call(n_extras=1) == invalid  # extras without buffers
    assert call(n_extras=1, extra_pads=addr, extras=addr, extras_out=addr, n_tokens=1, tokens=addr,
                extras_code=2) == invalid  # uint8 extras
    assert call(n_extras=1, extra_pads=addr, n_tokens=1, tokens=addr, extras_out=addr) == invalid  # extras NULL
    assert call(n_extras=1, extra_pads=addr, n_tokens=1, tokens=addr, extras=addr) == invalid  # extras_out NULL
    assert call(n_tokens=1) == invalid  # tokens NULL
    assert call(kind=2, label_offsets=addr, n_labels=1) == invalid  # labels NULL
    assert call(L=65535 * 256 + 1) == invalid  # more column tiles than a grid holds
    assert call(kind=2, label_offsets=addr, Ll=65535 * 256 + 1) == invalid
    assert call(offsets=None) == invalid
    assert call(kind=2) == invalid  # separate labels without their offsets
    assert call(kind=1, Ll=5) == invalid  # derived labels share the token columns
    outs[2] = addr
    assert call(kind=0) == invalid  # a labels output without labels


@built
def test_check_return_raises_with_the_cuda_error_string():
    with pytest.raises(RuntimeError, match="pyseqpack_psm_fill failed with CUDA error 1: invalid argument"):
        _cuda_launcher()._check_return(1)


def _valid_cpu_args(kind=1):
    """A valid DeviceLaunch on the CPU (the launcher's checks need no GPU): two rows, derived labels with loss
    masks (kind 1), none (0) or separate labels (2), prompt lengths, two int32 extras, int64 outputs [2, 8]
    (max_length 4, left truncation)."""
    rows = [[1, 2, 3], [4, 5]]
    labels = {0: None, 1: "input_ids", 2: [[7], [8, 9, 10]]}[kind]
    kw = _op_kwargs(rows, "right", "left", labels, [1, 0], 4)
    kw["extras"] = {"token_type_ids": ([[0, 0, 1], [1, 1]], 0), "special_tokens_mask": ([[1, 0, 0], [0, 0]], 1)}
    if kind == 1:
        kw["loss_masks"] = [[1, 0, 1], [1, 1]]
    return _device_launch(kw, pad_shift_mask(backend="torch", **kw), "cpu", side_dtype=torch.int32)


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
    (_set(tokens=[1, 2, 3, 4, 5]), "tokens must be a torch.Tensor, got list"),
    (_set(tokens=torch.zeros(5, dtype=torch.int16)), "tokens must have dtype torch.int64 or torch.int32"),
    (_set(tokens=torch.zeros((5, 1), dtype=torch.int64)), r"tokens must have shape \[5\]"),
    (_set(offsets=torch.zeros((3, 1), dtype=torch.int64)), r"offsets must be a 1-D tensor of B \+ 1 >= 1 entries"),
    (_set(offsets=torch.zeros(1, dtype=torch.int64).expand(2**31 + 1)), "B = 2147483648 rows; one launch takes"),
    (_set(offsets=torch.zeros(3, dtype=torch.int64, device="meta")), "offsets must be on cpu .*, got meta"),
    (_set(offsets=torch.zeros(3, dtype=torch.int32)), "offsets must have dtype torch.int64"),
    (_set(offsets=torch.zeros(6, dtype=torch.int64)[::2]), "offsets must be contiguous"),
    (_set(offsets=torch.zeros(4, dtype=torch.int64), prompt_lengths=None),  # B = 3
     r"outputs\['input_ids'\] must have shape \[3, 8\]"),
    (_set(mode=1), "mode 1 is not built"),
    (_set(labels_kind=4), "labels_kind must be 0"),
    (_set(L=-1), r"L = -1 is outside \[0,"),
    (_set(Ll=5), "derived labels .* need Ll == L"),
    (_set(max_length=-2), r"max_length = -2 is outside \[-1,"),
    (_set(max_length=None), "max_length must be an int"),
    (_set(truncate_left=1), "truncate_left must be a bool, got 1"),
    (_set(pad_left="left"), "pad_left must be a bool"),
    (_set(prompt_lengths=torch.zeros(3, dtype=torch.int64)), r"prompt_lengths must have shape \[2\]"),
    (_set(prompt_lengths=torch.zeros(2, dtype=torch.int32)), "prompt_lengths must have dtype torch.int64"),
    (_set(loss_masks=torch.ones(4, dtype=torch.uint8)), r"loss_masks must have shape \[5\]"),
    (_set(loss_masks=torch.ones(5, dtype=torch.bool)), "loss_masks must have dtype"),
    (_set(labels_kind=2, loss_masks=None), "labels_kind 2 needs the `labels` buffer"),
    (_set(labels_kind=2, loss_masks=None, labels=torch.zeros(3, dtype=torch.int64)),
     "label_offsets must be a torch.Tensor, got NoneType"),
    (_set(labels_kind=2, loss_masks=None, labels=torch.zeros(3, dtype=torch.int64),
          label_offsets=torch.zeros(2, dtype=torch.int64)), r"label_offsets must have shape \[3\]"),
    (_set(labels_kind=2, loss_masks=None, labels=torch.zeros((3, 1), dtype=torch.int64),
          label_offsets=torch.zeros(3, dtype=torch.int64)), r"labels must have shape \[3\]"),
    (_set(labels=torch.zeros(3, dtype=torch.int64)), "`labels` and `label_offsets` are only read with labels_kind 2"),
    (_set(label_offsets=torch.zeros(3, dtype=torch.int64)), "`label_offsets` are only read with labels_kind 2"),
    (_set(extras=torch.zeros((2, 4), dtype=torch.int32)), r"extras must have shape \[2, 5\]"),
    (_set(extra_pads=torch.zeros(3, dtype=torch.int64)), r"extra_pads must have shape \[2\]"),
    (_set(extra_pads=None), "extra_pads must be a torch.Tensor"),
    (_set(extras=None), "extra_pads is only read with extras"),
    (_set_output("extras", None), r"outputs\['extras'\] .* must be given exactly when there are extras"),
    (_set_output("extras", torch.zeros((2, 8, 2), dtype=torch.int64)), r"outputs\['extras'\] must have shape"),
    (_set_output("input_ids", torch.zeros((2, 5), dtype=torch.int64)),
     r"outputs\['input_ids'\] must have shape \[2, 8\]"),
    (_set_output("labels", torch.zeros((2, 8), dtype=torch.int32)), "every output must have the same dtype"),
    (_set_output("shift_labels", torch.zeros((8, 2), dtype=torch.int64).t()), "must be contiguous"),
    (_set_output("input_ids", torch.zeros((2, 8), dtype=torch.float32)), "must have dtype"),
    (_set_output("logits", torch.zeros((2, 8), dtype=torch.int64)), r"unknown keys \['logits'\]"),
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
    with pytest.raises(ValueError, match="the CUDA kernel needs CUDA tensors, got tokens and buffers on cpu"):
        _cuda_launcher().launch(args)
    if torch.cuda.is_available():
        args.offsets = args.offsets.cuda()
        with pytest.raises(ValueError, match="offsets must be on cpu"):
            _cuda_launcher()._arguments(args)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_c_arguments_follow_the_c_signature(kind):
    # launch() checks the DeviceLaunch, then builds this list: the arguments it hands the C entry point, against
    # the C signature's arguments written out by name.
    launcher = _cuda_launcher()
    args = _valid_cpu_args(kind)
    c_args = [tuple(v) if isinstance(v, ctypes.Array) else v for v in launcher._c_arguments(args)]

    def ptr(t):
        return None if t is None else t.data_ptr()

    lab, out = args.labels, args.outputs
    assert c_args == [
        ptr(args.offsets), ptr(args.label_offsets), ptr(args.prompt_lengths), 2,  # B
        8, args.Ll, 4, True, False,  # L (max_length 4 rounded up to 8), Ll, max_length, trunc_left, pad_left
        ptr(args.tokens), 5, 0,  # tokens, n_tokens, int64
        ptr(args.loss_masks), 2 if kind == 1 else 0,  # uint8 masks
        kind, ptr(lab), 0 if lab is None else lab.numel(), 1 if kind == 2 else 0,  # int32 labels
        tuple(ptr(out.get(k)) for k in OUTPUT_KEYS),
        ptr(args.extras), 2, 1, ptr(args.extra_pads), ptr(out["extras"]),  # 2 int32 extras
        PAD, LABEL_PAD, args.decoder_start_token_id,
        0,  # int64 outputs
    ]
    if _native.cuda_built():
        assert len(launcher._lib().pyseqpack_psm_fill.argtypes) == len(c_args) + 1  # + the stream
