"""Tests of pyseqpack.pad_shift_mask.

Three layers of checking:
1. the torch reference (backend="torch") against independently written per-row Python and against the real
   transformers code it mirrors (tokenizer.pad, DataCollatorForSeq2Seq, BART's shift_tokens_right, verl's
   loss-mask formula), on hand-picked cases;
2. every other backend available here ("cpu" = C++, "triton" through the interpreter on CPU, "cuda" on a GPU)
   against the reference: fixed cases over every input form, and Hypothesis property tests over random ragged
   batches and options;
3. every bad input raises a clear error naming the argument / example, identically on every backend, and the
   caller's data is never modified.

Shapes stay small (B <= 8, lengths <= 40): the Triton interpreter runs each program in numpy.
"""
import copy
import gc
import importlib
import re
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyseqpack import BackendUnavailable, _native, pad_shift_mask

M = importlib.import_module("pyseqpack.pad_shift_mask")

CPU = torch.device("cpu")
HAS_GPU = torch.cuda.is_available()


def _backends():
    out = [pytest.param("cpu", CPU, id="cpu")]
    if _native.triton_available(CPU):
        out.append(pytest.param("triton", CPU, id="triton-interpreter"))
    else:
        out.append(pytest.param("triton", CPU, id="triton-interpreter",
                                marks=pytest.mark.skip(reason="Triton on CPU needs TRITON_INTERPRET=1 before import")))
    gpu_skip = pytest.mark.skip(reason="no CUDA device")
    out.append(pytest.param("triton", torch.device("cuda"), id="triton-cuda", marks=() if HAS_GPU else gpu_skip))
    cuda_why = M.cuda.unavailable_reason()
    cuda_marks = gpu_skip if not HAS_GPU else (pytest.mark.skip(reason=cuda_why) if cuda_why else ())
    out.append(pytest.param("cuda", torch.device("cuda"), id="cuda", marks=cuda_marks))
    return out


BACKENDS = _backends()


def assert_same(out: dict, ref: dict):
    assert list(out) == list(ref)
    for key in ref:
        assert out[key].dtype == ref[key].dtype, key
        assert out[key].shape == ref[key].shape, (key, out[key].shape, ref[key].shape)
        assert torch.equal(out[key].cpu(), ref[key].cpu()), (key, out[key].tolist(), ref[key].tolist())


# ---------------------------------------------------------------------------------------------------------------
# 1. The reference against independent per-row Python and the real transformers code
# ---------------------------------------------------------------------------------------------------------------

def naive(rows, *, pad, label_pad=-100, labels=None, prompt=None, masks=None, padding="longest", max_length=None,
          truncation=False, tside="right", pside="right", multiple=None):
    """Plain list code written from the definitions, one example at a time."""

    def window(seq):
        seq = list(seq)
        if truncation and len(seq) > max_length:
            cut = len(seq) - max_length if tside == "left" else 0
            return seq[cut:cut + max_length], cut
        return seq, 0

    def padded(longest):
        n = max_length if padding == "max_length" else longest
        return -(-n // multiple) * multiple if multiple else n

    def place(seq, n, value):
        fill = [value] * (n - len(seq))
        return seq + fill if pside == "right" else fill + seq

    kept = [window(r) for r in rows]
    L = padded(max(len(k) for k, _ in kept))
    out = {"input_ids": [place(k, L, pad) for k, _ in kept],
           "attention_mask": [place([1] * len(k), L, 0) for k, _ in kept]}
    if labels == "input_ids":
        out["labels"] = []
        for b, (k, cut) in enumerate(kept):
            lab = [t if cut + i >= (prompt[b] if prompt else 0) and (masks is None or masks[b][cut + i]) else label_pad
                   for i, t in enumerate(k)]
            out["labels"].append(place(lab, L, label_pad))
    elif labels is not None:
        lk = [window(r)[0] for r in labels]
        Ll = padded(max(len(k) for k in lk))
        out["labels"] = [place(k, Ll, label_pad) for k in lk]
    positions = []
    for mask in out["attention_mask"]:  # clip(cumsum(mask) - 1, 0), written as a running count
        count, row = 0, []
        for m in mask:
            count += m
            row.append(max(count - 1, 0))
        positions.append(row)
    out["position_ids"] = positions
    if "labels" in out:
        out["shift_labels"] = [lab[1:] + [label_pad] for lab in out["labels"]]
    return out


def verl_loss_mask(attention_mask, prompt_len, response_len):
    """verl SFTDataset, verbatim in spirit (right padding): per example, on the padded attention mask."""
    loss_mask = list(attention_mask)
    L = len(loss_mask)
    if prompt_len > 1:
        for i in range(min(prompt_len, L) - 1):
            loss_mask[i] = 0
    loss_mask[min(prompt_len + response_len, L) - 1] = 0
    return loss_mask


ROWS = [[5, 6, 7, 8], [9], [], [10, 11, 12, 13, 14, 15, 16]]

HAND_CASES = [
    dict(),
    dict(pside="left"),
    dict(multiple=4),
    dict(padding="max_length", max_length=9),
    dict(truncation=True, max_length=5),
    dict(truncation=True, max_length=5, tside="left", pside="left"),
    dict(labels="input_ids", prompt=[2, 0, 0, 3]),
    dict(labels="input_ids", prompt=[2, 1, 0, 9], truncation=True, max_length=3, tside="left"),
    dict(labels="input_ids", masks=[[1, 0, 1, 1], [0], [], [1, 1, 0, 0, 1, 1, 1]], pside="left"),
    dict(labels=[[1, 2], [3, 4, 5, 6, 7], [-100], [8]], multiple=4, pside="left"),
]


@pytest.mark.parametrize("case", HAND_CASES, ids=[str(c) for c in HAND_CASES])
def test_reference_matches_per_row_python(case):
    expected = naive(ROWS, pad=0, **case)
    out = pad_shift_mask(
        ROWS, pad_token_id=0, labels=case.get("labels"), prompt_lengths=case.get("prompt"),
        loss_masks=case.get("masks"), padding=case.get("padding", "longest"), max_length=case.get("max_length"),
        truncation=case.get("truncation", False), truncation_side=case.get("tside", "right"),
        padding_side=case.get("pside", "right"), pad_to_multiple_of=case.get("multiple"),
        return_position_ids=True, return_shift_labels="labels" in expected, backend="torch")
    assert {k: v.tolist() for k, v in out.items()} == expected


def test_reference_left_padding_position_ids():
    out = pad_shift_mask([[1, 2, 3], [4]], pad_token_id=0, padding_side="left", return_position_ids=True,
                         backend="torch")
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    out = pad_shift_mask([[1, 2, 3], [4], []], pad_token_id=0, return_position_ids=True, backend="torch")
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 0]]


def test_reference_verl_loss_mask():
    # prompt + response (ending with EOS), right padded to max_length, as verl's SFT dataset builds them
    prompts, responses = [[1, 2, 3], [4], [], [5, 6]], [[7, 8, 2], [9, 2], [2], [10, 11, 12, 13, 2]]
    rows = [p + r for p, r in zip(prompts, responses)]
    p_len = [len(p) for p in prompts]
    out = pad_shift_mask(rows, pad_token_id=0, padding="max_length", max_length=8, prompt_lengths=p_len,
                         return_loss_mask=True, return_position_ids=True, backend="torch")
    for b, row in enumerate(rows):
        attention = out["attention_mask"][b].tolist()
        assert out["loss_mask"][b].tolist() == verl_loss_mask(attention, p_len[b], len(responses[b]))
        positions = np.clip(np.cumsum(attention) - 1, 0, None).tolist()  # verl's compute_position_id_with_mask
        assert out["position_ids"][b].tolist() == positions
    # right truncation: verl masks by column, which is the same thing when the kept tokens start at column 0
    out = pad_shift_mask(rows, pad_token_id=0, truncation=True, max_length=4, padding="max_length",
                         prompt_lengths=p_len, return_loss_mask=True, backend="torch")
    for b in range(len(rows)):
        expected = verl_loss_mask(out["attention_mask"][b].tolist(), p_len[b], len(responses[b]))
        assert out["loss_mask"][b].tolist() == expected


def _tokenizer(side="right"):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    tok.padding_side = side
    return tok


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding,max_length,multiple", [("longest", None, None), ("longest", None, 3),
                                                         ("max_length", 8, None), ("max_length", 7, 4)])
def test_reference_matches_tokenizer_pad(side, padding, max_length, multiple):
    tok = _tokenizer(side)
    rows = [r for r in ROWS]
    hf = tok.pad([{"input_ids": r} for r in rows], padding=True if padding == "longest" else padding,
                 max_length=max_length, pad_to_multiple_of=multiple, return_tensors="pt")
    out = pad_shift_mask(rows, pad_token_id=tok.pad_token_id, padding=padding, max_length=max_length,
                         pad_to_multiple_of=multiple, padding_side=side, backend="torch")
    assert torch.equal(out["input_ids"], hf["input_ids"])
    assert torch.equal(out["attention_mask"], hf["attention_mask"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_matches_seq2seq_collator_and_bart_shift(side):
    from transformers import BartConfig, BartForConditionalGeneration, DataCollatorForSeq2Seq

    tok = _tokenizer(side)
    config = BartConfig(vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                        decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, max_position_embeddings=32,
                        pad_token_id=1, decoder_start_token_id=2)
    model = BartForConditionalGeneration(config)
    labels = [[3, 4], [5, 6, 7, 8, 9], [-100, 10], [11]]
    features = [{"input_ids": r, "labels": lab} for r, lab in zip(ROWS, labels)]
    hf = DataCollatorForSeq2Seq(tok, model=model, pad_to_multiple_of=3)(copy.deepcopy(features))
    out = pad_shift_mask(ROWS, labels=labels, pad_token_id=tok.pad_token_id, padding_side=side, pad_to_multiple_of=3,
                         decoder_start_token_id=2, backend="torch")
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(out[key], hf[key]), key
    # the collator's decoder_input_ids come from the model's pad (1), ours from pad_token_id: redo with it
    expected_dec = model.prepare_decoder_input_ids_from_labels(labels=out["labels"])
    out = pad_shift_mask(ROWS, labels=labels, pad_token_id=1, padding_side=side, pad_to_multiple_of=3,
                         decoder_start_token_id=2, backend="torch")
    assert torch.equal(out["decoder_input_ids"], expected_dec)


# ---------------------------------------------------------------------------------------------------------------
# 2. Backends against the reference
# ---------------------------------------------------------------------------------------------------------------

FORMS = ["list", "tuple", "np32", "np64", "tensor_rows", "flat_np", "flat_tensor", "flat_tensor_offsets_tensor"]


def as_form(rows, form, device=CPU):
    """(value, offsets) holding `rows` in one of the accepted input forms."""
    if form == "list":
        return [list(r) for r in rows], None
    if form == "tuple":
        return tuple(tuple(r) for r in rows), None
    if form in ("np32", "np64"):
        return [np.array(r, dtype=np.int32 if form == "np32" else np.int64) for r in rows], None
    if form == "tensor_rows":
        return [torch.tensor(r, dtype=torch.int64, device=device) for r in rows], None
    flat = [v for r in rows for v in r]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    if form == "flat_np":
        return np.array(flat, dtype=np.int64), offsets.tolist()
    t = torch.tensor(flat, dtype=torch.int64, device=device)
    return t, (torch.from_numpy(offsets) if form == "flat_tensor_offsets_tensor" else offsets)


def call_forms(rows, form, *, loss_masks=None, extras=None, device=CPU, **kw):
    value, offsets = as_form(rows, form, device)
    if loss_masks is not None:
        loss_masks = as_form(loss_masks, form, device)[0]
    if extras is not None:
        extras = {k: (as_form(v, form, device)[0], pad) for k, (v, pad) in extras.items()}
    return pad_shift_mask(value, offsets=offsets, loss_masks=loss_masks, extras=extras, device=device, **kw)


FULL = dict(labels="input_ids", prompt_lengths=[1, 0, 3, 2], loss_masks=[[1, 1, 0, 1], [1], [], [1] * 7],
            pad_token_id=0, return_position_ids=True, return_shift_labels=True, return_loss_mask=True,
            decoder_start_token_id=7, extras={"token_type_ids": ([[1] * len(r) for r in ROWS], 0),
                                              "special": ([[0, 1, 0, 1], [1], [], [1, 0, 0, 0, 0, 0, 1]], 1)})


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_matches_reference_every_form(backend, device, form):
    for options in (dict(FULL), dict(FULL, padding_side="left", truncation=True, max_length=3, truncation_side="left"),
                    dict(pad_token_id=0, labels=[[1], [2, 3], [], [4, 5, 6, 7, 8, 9, 10, 11]],
                         decoder_start_token_id=0, return_shift_labels=True, pad_to_multiple_of=4,
                         dtype=torch.int32)):
        ref = call_forms(ROWS, form, backend="torch", **options)
        out = call_forms(ROWS, form, backend=backend, device=device, **options)
        assert_same(out, ref)
        assert all(v.device.type == device.type for v in out.values())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backend_two_dim_and_flat_labels(backend, device):
    ids = torch.arange(12).reshape(3, 4)
    labels = np.array([5, 6, 7, 8, 9, 10])
    kw = dict(labels=labels, label_offsets=[0, 1, 1, 6], pad_token_id=0, decoder_start_token_id=0,
              return_shift_labels=True, padding_side="left")
    assert_same(pad_shift_mask(ids, backend=backend, device=device, **kw), pad_shift_mask(ids, backend="torch", **kw))
    # equal-length rows need no pad token
    out = pad_shift_mask(ids.numpy(), backend=backend, device=device)
    assert torch.equal(out["input_ids"].cpu(), ids) and out["attention_mask"].all()


def test_cpu_threads_and_first_error_row():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 50000, size=rng.integers(0, 40)).astype(dt) for dt in
            [np.int64, np.int32, np.uint16, np.int64, np.int8, np.uint32, np.int64]]
    rows[3] = rows[3][::2]  # a strided view
    kw = dict(pad_token_id=0, labels="input_ids", return_position_ids=True, extras={"x": (rows, 3)},
              dtype=torch.int32, padding_side="left")
    ref = pad_shift_mask(rows, backend="torch", **kw)
    for threads in (1, 3, 7):
        assert_same(pad_shift_mask(rows, backend="cpu", num_threads=threads, **kw), ref)
    bad = [r.astype(np.int64) for r in rows]
    bad[2][0] = 2**40
    bad[5] = np.array([1, 2**41])
    with pytest.raises(ValueError, match=r"input_ids\[2\]\[0\]: 1099511627776 does not fit in the output dtype int32"):
        pad_shift_mask(bad, pad_token_id=0, dtype=torch.int32, backend="cpu", num_threads=3)


@pytest.mark.parametrize("out_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("row_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.bool_])
def test_narrow_row_dtypes(row_dtype, out_dtype):
    """Rows of every narrower integer type, contiguous and strided, into both output dtypes: the reference's
    values; and a uint32 value above int32 is still caught for int32 outputs."""
    info = np.iinfo(row_dtype) if row_dtype is not np.bool_ else np.iinfo(np.uint8)
    hi = 1 if row_dtype is np.bool_ else min(info.max, 2**31 - 1)
    lo = 0 if row_dtype is np.bool_ else max(info.min, -(2**31))
    rng = np.random.default_rng(1)
    rows = [rng.integers(lo, hi, size=n, endpoint=True).astype(row_dtype) for n in (5, 0, 17, 3)]
    rows.append(rng.integers(lo, hi, size=12, endpoint=True).astype(row_dtype)[::3])  # strided
    kw = dict(pad_token_id=0, labels="input_ids", dtype=out_dtype)
    assert_same(pad_shift_mask(rows, backend="cpu", **kw), pad_shift_mask(rows, backend="torch", **kw))
    if row_dtype is np.uint32 and out_dtype == torch.int32:
        with pytest.raises(ValueError, match=r"input_ids\[1\]\[2\]: 2147483648 does not fit in the output dtype"):
            pad_shift_mask([rows[0], np.array([1, 2, 2**31], dtype=np.uint32)], backend="cpu", **kw)


@pytest.mark.skipif(not _native.cpu_available(), reason="the C++ CPU module is not built")
def test_numpy_rows_read_from_their_fields():
    """With this numpy, the C++ module reads numpy rows from the array's fields (its layout check passed): the
    tests above then check those reads. Arrays it declines (subclasses, other byte orders, 2-D) go through the
    buffer protocol, with its errors. A row stays alive while it is read, even if the batch drops it."""
    assert _native.cpu_module().numpy_rows_fast()
    rows = [np.arange(5, dtype=np.int16), np.arange(12, dtype=np.uint64)[::4], np.arange(3).view(np.memmap),
            np.arange(2, dtype=">i4")]
    assert pad_shift_mask(rows, pad_token_id=9, backend="cpu")["input_ids"].tolist() == [
        [0, 1, 2, 3, 4], [0, 4, 8, 9, 9], [0, 1, 2, 9, 9], [0, 1, 9, 9, 9]]
    with pytest.raises(TypeError, match=r"input_ids\[1\]: expected integer values, got a float32 array"):
        pad_shift_mask([np.arange(2), np.arange(2, dtype=np.float32)], pad_token_id=0, backend="cpu")
    with pytest.raises(TypeError, match=r"input_ids\[0\]: expected a 1-D sequence, got a 0-D array"):
        pad_shift_mask([np.array(5)], pad_token_id=0, backend="cpu")

    batch = []

    class DropsTheBatch:  # runs while row 0 is read, before row 1 (a numpy row) is
        def __index__(self):
            batch.clear()
            gc.collect()
            return 1

    batch[:] = [[DropsTheBatch(), 2], np.arange(100, 103)]
    out = pad_shift_mask(batch, pad_token_id=0, backend="cpu")
    assert out["input_ids"].tolist() == [[1, 2, 0], [100, 101, 102]]


def _unaligned(values, dtype):
    """A numpy array of `values` whose data starts one byte past an aligned address."""
    raw = np.zeros(1 + len(values) * np.dtype(dtype).itemsize, dtype=np.uint8)
    raw[1:] = np.asarray(values, dtype=dtype).view(np.uint8)
    out = raw[1:].view(dtype)
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_numpy_rows_of_any_layout(backend, device):
    """numpy rows in every memory layout numpy makes (unaligned, big-endian, reversed, a field of a record
    array, read-only) read as the same values as Python lists of them, as input_ids and as labels."""
    rng = np.random.default_rng(7)
    records = np.zeros(6, dtype=[("flag", "u1"), ("token", "<i8")])  # packed: the token field is unaligned
    records["token"] = rng.integers(0, 1000, 6)
    frozen = rng.integers(0, 1000, 4)
    frozen.setflags(write=False)
    rows = [_unaligned(rng.integers(0, 1000, 5), np.int64), _unaligned(rng.integers(0, 1000, 3), np.int32),
            rng.integers(0, 1000, 7).astype(">i8"), rng.integers(0, 1000, 2).astype(">u2"),
            rng.integers(0, 1000, 6).astype(">i4")[::-2], rng.integers(0, 1000, 9)[::-1], records["token"], frozen,
            np.array([2**63 - 1], dtype=">u8")]
    lists = [[int(v) for v in r] for r in rows]
    kw = dict(pad_token_id=0, labels=rows[::-1], prompt_lengths=[1] * len(rows), return_loss_mask=True,
              return_position_ids=True, device=device)
    ref = pad_shift_mask(lists, backend="torch", **{**kw, "labels": lists[::-1]})
    assert_same(pad_shift_mask(rows, backend=backend, **kw), ref)
    assert_same(pad_shift_mask(rows, backend=backend, **{**kw, "labels": "input_ids"}),
                pad_shift_mask(lists, backend="torch", **{**kw, "labels": "input_ids"}))
    # and their values are checked as any row's
    with pytest.raises(ValueError, match=r"input_ids\[1\]\[0\]: 9223372036854775808 is out of the int64 range"):
        pad_shift_mask([[1], np.array([2**63], dtype=">u8")], pad_token_id=0, backend=backend, device=device)
    with pytest.raises(ValueError, match=r"input_ids\[0\]\[1\]: 2147483648 does not fit in the output dtype"):
        pad_shift_mask([np.array([1, 2**31], dtype=">i8")], pad_token_id=0, backend=backend, device=device,
                       dtype=torch.int32)


def test_no_native_fallbacks(monkeypatch):
    """Without pyseqpack._C: auto uses the reference, and the device path packs host rows in Python."""
    monkeypatch.setattr(_native, "cpu_available", lambda: False)
    monkeypatch.setattr(M.DISPATCH, "_auto_cache", {})  # the backends "auto" found usable before
    kw = dict(FULL)
    ref = pad_shift_mask(ROWS, backend="torch", **kw)
    assert_same(pad_shift_mask(ROWS, **kw), ref)
    if _native.triton_available(CPU):
        assert_same(pad_shift_mask(ROWS, backend="triton", **kw), ref)
    with pytest.raises(TypeError, match=r"input_ids\[1\]\[0\]: expected an int, got float"):
        pad_shift_mask([[1], [2.0]], pad_token_id=0, backend="triton" if _native.triton_available(CPU) else "torch")


# Hypothesis: random ragged batches and options, every backend against the reference.

@st.composite
def problems(draw):
    B = draw(st.integers(1, 8))
    token = st.one_of(st.integers(0, 1000), st.just(-100), st.integers(-(2**31), 2**31 - 1))
    lengths = draw(st.lists(st.integers(0, 40), min_size=B, max_size=B))
    rows = [draw(st.lists(token, min_size=n, max_size=n)) for n in lengths]
    kind = draw(st.sampled_from([None, "input_ids", "given"]))
    kw = dict(pad_token_id=draw(st.integers(-5, 5)), label_pad_token_id=draw(st.sampled_from([-100, -1, 0])),
              padding_side=draw(st.sampled_from(["right", "left"])),
              truncation_side=draw(st.sampled_from(["right", "left"])),
              pad_to_multiple_of=draw(st.one_of(st.none(), st.integers(1, 8))),
              dtype=draw(st.sampled_from([torch.int64, torch.int32])),
              return_attention_mask=draw(st.booleans()), return_position_ids=draw(st.booleans()))
    label_rows = None
    if kind == "given":
        label_rows = [draw(st.lists(token, min_size=0, max_size=40)) for _ in range(B)]
        kw["labels"] = label_rows
    elif kind == "input_ids":
        kw["labels"] = "input_ids"
        if draw(st.booleans()):
            kw["loss_masks"] = [draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)) for n in lengths]
    if kind is not None:
        kw["return_shift_labels"] = draw(st.booleans())
        kw["decoder_start_token_id"] = draw(st.one_of(st.none(), st.integers(-100, 10)))
    if kind == "input_ids" or draw(st.booleans()):
        kw["prompt_lengths"] = draw(st.lists(st.integers(0, 45), min_size=B, max_size=B))
        kw["return_loss_mask"] = kind != "input_ids" or draw(st.booleans())
    kw["truncation"] = draw(st.booleans())
    kw["padding"] = draw(st.sampled_from(["longest", "max_length"]))
    longest = max(lengths + [len(r) for r in label_rows or []])
    if kw["truncation"] or kw["padding"] == "max_length":
        ml = draw(st.integers(1, 48))
        kw["max_length"] = ml if kw["truncation"] else max(ml, longest, 1)
    if draw(st.booleans()):
        kw["extras"] = {f"x{e}": ([draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)) for n in lengths],
                                  draw(st.integers(-3, 3))) for e in range(draw(st.integers(1, 2)))}
    if kw["dtype"] == torch.int32:  # values must fit the output dtype: keep the wide ones out
        rows = [[max(min(v, 2**31 - 1), -(2**31)) for v in r] for r in rows]
    form = draw(st.sampled_from(FORMS))
    return rows, form, kw


def _check_problem(problem, backend, device):
    rows, form, kw = problem
    if kw.get("labels") not in (None, "input_ids"):
        kw = dict(kw, labels=as_form(kw["labels"], "list" if form in ("list", "tuple") else "np64")[0])
    ref = call_forms(rows, form, backend="torch", **kw)
    assert_same(call_forms(rows, form, backend=backend, device=device, **kw), ref)


HYPOTHESIS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=200, **HYPOTHESIS)
@given(problems())
def test_property_cpu_matches_reference(problem):
    _check_problem(problem, "cpu", CPU)


@pytest.mark.skipif(not _native.triton_available(CPU), reason="Triton on CPU needs TRITON_INTERPRET=1")
@settings(max_examples=50, **HYPOTHESIS)
@given(problems())
def test_property_triton_matches_reference(problem):
    _check_problem(problem, "triton", CPU)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@settings(max_examples=60, **HYPOTHESIS)
@given(problems())
def test_property_gpu_backends_match_reference(problem):
    for backend in ("triton",) + (("cuda",) if M.cuda.unavailable_reason() is None else ()):
        _check_problem(problem, backend, torch.device("cuda"))


# The collation calls of backend "cpu" (host rows straight to the C++ calls), valid or not, against the
# reference: the same outputs, or the same error. Values are read in a different order (C++ reads every field of
# an example before the next example; the reference each field whole), so where two values are bad each
# backend may name a different one: such errors agree on their type and form.

def _row_in_form(draw, row):
    form = draw(st.sampled_from(["list", "tuple", "np32", "np64", "list", "tuple", "np32", "np64", "tensor"]))
    if form in ("np32", "np64", "tensor"):
        row = [max(min(v, 2**31 - 1), -(2**31)) for v in row] if form == "np32" else row
        arr = np.array(row, dtype=np.int32 if form == "np32" else np.int64)
        return torch.from_numpy(arr) if form == "tensor" else arr
    return tuple(row) if form == "tuple" else list(row)


BAD_ROWS = [[1, 2.5], "abc", np.zeros((2, 2), dtype=np.int64), np.array([1.5]), 7, [2**63]]


@st.composite
def collation_calls(draw):
    B = draw(st.integers(1, 6))
    token = st.one_of(st.integers(-100, 50), st.integers(-(2**40), 2**40))
    lengths = draw(st.lists(st.integers(0, 12), min_size=B, max_size=B))

    def rarely(bad, good):  # one draw in twenty or so (a middle value: Hypothesis favours the bounds)
        return bad if draw(st.integers(0, 19)) == 7 else good

    def rows_of(lens, values=token):
        rows = [_row_in_form(draw, draw(st.lists(values, min_size=n, max_size=n))) for n in lens]
        if rarely(True, False):  # a row that is not a row of ints
            rows[draw(st.integers(0, len(rows) - 1))] = draw(st.sampled_from(BAD_ROWS))
        return rows if draw(st.booleans()) else tuple(rows)

    labels = draw(st.sampled_from([None, "input_ids", "given"]))
    kw = dict(pad_token_id=rarely(None, draw(st.integers(-3, 3))), label_pad_token_id=rarely(None, -100),
              padding=draw(st.sampled_from(["longest", "max_length"])), truncation=draw(st.booleans()),
              truncation_side=draw(st.sampled_from(["right", "left"])),
              padding_side=draw(st.sampled_from(["right", "left"])),
              pad_to_multiple_of=draw(st.one_of(st.none(), st.integers(1, 5))),
              return_attention_mask=draw(st.booleans()), return_position_ids=draw(st.booleans()),
              dtype=draw(st.sampled_from([torch.int64, torch.int32])),
              backend=draw(st.sampled_from(["auto", "cpu"])), device=draw(st.sampled_from([None, "cpu", CPU])))
    needs_labels = labels is None
    kw["return_shift_labels"] = draw(st.booleans()) and rarely(True, not needs_labels)
    kw["decoder_start_token_id"] = rarely(draw(st.integers(-100, 3)), None if needs_labels else draw(
        st.one_of(st.none(), st.integers(-100, 3))))
    if labels == "given":
        B_labels = rarely(B + 1, B)
        labels = rows_of(draw(st.lists(st.integers(0, 12), min_size=B_labels, max_size=B_labels)))
    kw["labels"] = rarely("tokens", labels)
    derived = labels == "input_ids"
    if derived or rarely(True, False):  # completion-only / multi-turn masks (a rule broken now and then)
        if draw(st.booleans()):
            kw["prompt_lengths"] = rarely([-1] * B, draw(st.lists(st.integers(0, 14), min_size=B, max_size=B)))
            kw["return_loss_mask"] = draw(st.booleans())
        else:
            kw["return_loss_mask"] = rarely(True, False)
        if draw(st.booleans()):
            kw["loss_masks"] = rows_of(rarely([n + 1 for n in lengths], lengths), st.integers(0, rarely(2, 1)))
    if kw["truncation"] or kw["padding"] == "max_length":
        ml = draw(st.integers(1, 14))
        kw["max_length"] = ml if kw["truncation"] else rarely(ml, max(ml, 12))
    if draw(st.booleans()):
        extras = {}
        for e in range(draw(st.integers(1, 2))):
            lens = rarely([n + 1 for n in lengths], list(lengths))
            pad = rarely(draw(st.sampled_from([2**40, True, 1.5])), draw(st.integers(-3, 3)))
            spec = (rows_of(lens, st.integers(-3, 3)), pad)
            extras[rarely("labels", f"x{e}")] = rarely(list(spec), spec)
        kw["extras"] = extras
    return rows_of(lengths), kw


def _outcome(fn):
    """A call's outputs as plain lists (with dtypes), or its error as (type, message)."""
    try:
        out = fn()
    except (TypeError, ValueError, RuntimeError) as e:
        return type(e), str(e)
    return [(k, v.dtype, v.shape, v.tolist()) for k, v in out.items()]


@pytest.mark.skipif(not _native.cpu_available(), reason="the C++ CPU module is not built")
@settings(max_examples=300, **HYPOTHESIS)
@given(collation_calls())
def test_property_collation_calls_match_reference(call):
    rows, kw = call
    got = _outcome(lambda: pad_shift_mask(rows, **kw))
    ref = _outcome(lambda: pad_shift_mask(rows, **dict(kw, backend="torch")))
    if isinstance(got, list) or isinstance(ref, list) or got[1] == ref[1]:
        assert got == ref
    else:  # two bad values, found in a different order
        value_error = r"^[\w ]+\[\d+\]\[\d+\]: "
        assert got[0] == ref[0] and re.match(value_error, got[1]) and re.match(value_error, ref[1]), (got, ref)


@pytest.mark.skipif(not _native.cpu_available(), reason="the C++ CPU module is not built")
def test_collation_calls_run_the_cpu_backend():
    """The calls the drop-in collators make run the C++ backend under "auto" (the property test above is not
    empty)."""
    taken = []
    real = M.cpu.run

    def spy(call):
        out = real(call)
        taken.append(True)
        return out

    rows = [np.arange(5), np.arange(3)]
    with mock.patch.object(M.cpu, "run", spy):
        pad_shift_mask(rows, labels=[[1, 2], [3]], pad_token_id=0)
        pad_shift_mask([[1, 2], [3]], labels="input_ids", pad_token_id=0, padding_side="left", device="cpu",
                       extras={"token_type_ids": ([[1, 1], [1]], 0)}, return_attention_mask=False)
        pad_shift_mask(rows, labels=[[1, 2], [3]], pad_token_id=0, decoder_start_token_id=0, dtype=torch.int32,
                       padding="max_length", max_length=4, truncation=True, backend="cpu", pad_to_multiple_of=8)
        pad_shift_mask([torch.arange(4), torch.arange(2)], labels="input_ids", prompt_lengths=[2, 1],  # SFT
                       loss_masks=[[1, 1, 0, 1], [1, 1]], return_loss_mask=True, return_position_ids=True,
                       pad_token_id=0)
    assert taken == [True, True, True, True]


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("padding", ["longest", "max_length"])
def test_gpu_device_offsets(padding):
    """Tokens and offsets already on the GPU; max_length plans on the device (no sync), longest on the host."""
    dev = torch.device("cuda")
    flat, offsets = as_form(ROWS, "flat_tensor_offsets_tensor", dev)
    kw = dict(FULL, padding=padding, truncation=True, max_length=5, offsets=offsets.to(dev))
    kw["loss_masks"] = as_form(kw["loss_masks"], "flat_tensor", dev)[0]
    kw["extras"] = {k: (as_form(v, "flat_tensor", dev)[0], p) for k, (v, p) in kw["extras"].items()}
    ref = pad_shift_mask(flat.cpu(), **dict(kw, offsets=offsets, loss_masks=kw["loss_masks"].cpu(),
                                            extras={k: (v.cpu(), p) for k, (v, p) in kw["extras"].items()}),
                         backend="torch")
    assert_same(pad_shift_mask(flat, **kw), ref)


# ---------------------------------------------------------------------------------------------------------------
# 3. Bad input, dispatch, and the caller's data
# ---------------------------------------------------------------------------------------------------------------

VALIDATING = ["torch", "cpu"] + (["triton"] if _native.triton_available(CPU) else [])

BAD_VALUES = [
    (dict(input_ids=[[1, 2], [3, 4.0]]), TypeError, r"input_ids\[1\]\[1\]: expected an int, got float"),
    (dict(input_ids=[[1, "a"]]), TypeError, r"input_ids\[0\]\[1\]: expected an int, got str"),
    (dict(input_ids=[[1], [None]]), TypeError, r"input_ids\[1\]\[0\]: expected an int, got NoneType"),
    (dict(input_ids=[[1], np.array([1.5])]), TypeError, r"input_ids\[1\]: expected integer values, got a float64 array"),
    (dict(input_ids=[[1], 5]), TypeError, r"input_ids\[1\]: expected a sequence of ints"),
    (dict(input_ids=[[1], {2, 3}]), TypeError, r"input_ids\[1\]: expected a sequence of ints .* got set"),
    (dict(input_ids=[np.zeros((2, 2), dtype=np.int64)]), TypeError, r"input_ids\[0\]: expected a 1-D sequence"),
    (dict(input_ids=[[1, 2**63]]), ValueError, r"input_ids\[0\]\[1\]: 9223372036854775808 is out of the int64 range"),
    (dict(input_ids=[np.array([1, 2**64 - 1], dtype=np.uint64)]), ValueError,
     r"input_ids\[0\]\[1\]: 18446744073709551615 is out of the int64 range"),
    (dict(input_ids=[[1], [2, 2**31]], dtype=torch.int32), ValueError,
     r"input_ids\[1\]\[1\]: 2147483648 does not fit in the output dtype int32"),
    (dict(input_ids=[[1, 2]], labels=[[3, -(2**31) - 1]], dtype=torch.int32), ValueError,
     r"labels\[0\]\[1\]: -2147483649 does not fit in the output dtype int32"),
    (dict(input_ids=[[1, 2]], labels="input_ids", loss_masks=[[1, 2]]), ValueError,
     r"loss_masks\[0\]\[1\]: expected 0 or 1, got 2"),
    (dict(input_ids=[[1, 2]], extras={"tt": ([[0, 1.5]], 0)}), TypeError, r"tt\[0\]\[1\]: expected an int, got float"),
]


@pytest.mark.parametrize("backend", VALIDATING)
@pytest.mark.parametrize("kwargs,error,message", BAD_VALUES, ids=[m for _, _, m in BAD_VALUES])
def test_bad_values_name_the_element(backend, kwargs, error, message):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        pad_shift_mask(kwargs.pop("input_ids"), pad_token_id=0, backend=backend, **kwargs)


def test_only_kept_tokens_are_read():
    for backend in VALIDATING:
        out = pad_shift_mask([[1, 2, "junk"], [3]], pad_token_id=0, truncation=True, max_length=2, backend=backend)
        assert out["input_ids"].tolist() == [[1, 2], [3, 0]]


def test_other_sequences():
    import array

    rows = [range(3), array.array("q", [7, 8]), (4,), bytearray(b"\x05\x06")]
    for backend in VALIDATING:
        out = pad_shift_mask(rows, pad_token_id=0, labels="input_ids", backend=backend)
        assert out["input_ids"].tolist() == [[0, 1, 2], [7, 8, 0], [4, 0, 0], [5, 6, 0]], backend


def test_bools_and_numpy_scalars_are_ints():
    rows = [[True, np.int64(5), np.uint8(7)], np.array([True, False])]
    for backend in VALIDATING:
        assert pad_shift_mask(rows, pad_token_id=0, backend=backend)["input_ids"].tolist() == [[1, 5, 7], [1, 0, 0]]


BAD_ARGS = [
    (dict(input_ids=[]), ValueError, r"input_ids: the batch is empty \(B = 0\)"),
    (dict(input_ids=np.zeros((0, 3), dtype=np.int64)), ValueError, r"B = 0"),
    (dict(input_ids=np.arange(4), offsets=[0]), ValueError, r"offsets: expected B \+ 1 >= 2 entries"),
    (dict(input_ids=np.arange(4), offsets=[1, 4]), ValueError, r"offsets\[0\] must be 0, got 1"),
    (dict(input_ids=np.arange(4), offsets=[0, 3, 2, 4]), ValueError,
     r"offsets must be non-decreasing: offsets\[2\] = 2 < offsets\[1\] = 3"),
    (dict(input_ids=np.arange(4), offsets=[0, 2, 3]), ValueError, r"offsets\[-1\] = 3 but input_ids holds 4 values"),
    (dict(input_ids=np.arange(4), offsets=[0.0, 4.0]), TypeError, r"offsets: expected a 1-D sequence of ints"),
    (dict(input_ids=torch.arange(4.0), offsets=[0, 4]), TypeError,
     r"input_ids: expected integer values, got a torch.float32 tensor"),
    (dict(input_ids=np.arange(4)), TypeError, r"input_ids: a 1-D ndarray must be 2-D \[B, n\], or flat 1-D with offsets"),
    (dict(input_ids="abc"), TypeError, r"input_ids: expected a list of sequences"),
    (dict(input_ids=torch.arange(4, device="meta"), offsets=[0, 4], device="cpu"), ValueError,
     r"input_ids is on meta but the output device is cpu"),
    (dict(input_ids=torch.arange(4), offsets=torch.tensor([0, 4], device="meta")), ValueError,
     r"offsets is on meta but input_ids is on cpu"),
    (dict(labels=[[1]]), ValueError, r"labels has 1 examples but input_ids has B = 2"),
    (dict(labels=np.arange(3), label_offsets=[0, 3]), ValueError, r"labels has 1 examples but input_ids has B = 2"),
    (dict(label_offsets=[0, 1, 2]), ValueError, r"label_offsets is given but labels is None"),
    (dict(labels="tokens"), ValueError, r"labels must be None, 'input_ids' or sequences"),
    (dict(labels="input_ids", prompt_lengths=[1]), ValueError,
     r"prompt_lengths has 1 entries but input_ids has B = 2 examples"),
    (dict(labels="input_ids", prompt_lengths=[1, -2]), ValueError, r"prompt_lengths\[1\] = -2 is negative"),
    (dict(labels="input_ids", prompt_lengths=[1.0, 2.0]), TypeError, r"prompt_lengths: expected a 1-D sequence of ints"),
    (dict(prompt_lengths=[1, 1]), ValueError, r"prompt_lengths applies to labels='input_ids' or return_loss_mask=True"),
    (dict(return_loss_mask=True), ValueError, r"return_loss_mask=True needs prompt_lengths"),
    (dict(labels="input_ids", loss_masks=[[1, 1, 1], [1]]), ValueError,
     r"loss_masks\[1\] has 1 values but input_ids\[1\] has 2 tokens"),
    (dict(labels="input_ids", loss_masks=[[1, 1, 1]]), ValueError, r"loss_masks has 1 examples but input_ids has 2"),
    (dict(labels="input_ids", loss_masks=np.ones(5, dtype=np.int64)), TypeError,
     r"loss_masks: a 1-D ndarray must be 2-D \[B, n\], or flat 1-D with offsets"),
    (dict(labels="input_ids", loss_masks=np.ones((2, 3), dtype=np.int64)), TypeError,
     r"loss_masks: must have the same form as input_ids \(a list of rows\)"),
    (dict(loss_masks=[[1, 1, 1], [1, 1]]), ValueError, r"loss_masks apply to derived labels"),
    (dict(pad_token_id=None), ValueError, r"pad_token_id is None but input_ids\[1\] needs padding \(2 tokens, padded length 3\)"),
    (dict(padding="max_length", max_length=2), ValueError,
     r"input_ids\[0\] has 3 tokens, more than the padded length: padding='max_length' pads to 2"),
    (dict(labels=[[1, 2, 3, 4], [1]], padding="max_length", max_length=3), ValueError,
     r"labels\[0\] has 4 labels, more than the padded length: padding='max_length' pads to 3"),
    (dict(padding="longer"), ValueError, r"padding must be one of \('longest', 'max_length'\), got 'longer'"),
    (dict(padding=True), ValueError, r"padding must be one of"),
    (dict(padding_side="center"), ValueError, r"padding_side must be one of \('right', 'left'\)"),
    (dict(truncation_side="middle"), ValueError, r"truncation_side must be one of"),
    (dict(dtype=torch.float32), ValueError, r"dtype must be torch.int64 or torch.int32"),
    (dict(dtype=torch.int16), ValueError, r"dtype must be torch.int64 or torch.int32"),
    (dict(pad_to_multiple_of=0), ValueError, r"pad_to_multiple_of must be a positive int, got 0"),
    (dict(pad_to_multiple_of=-8), ValueError, r"pad_to_multiple_of must be a positive int"),
    (dict(truncation=True), ValueError, r"truncation=True needs max_length"),
    (dict(padding="max_length"), ValueError, r"padding='max_length' needs max_length"),
    (dict(max_length=0, truncation=True), ValueError, r"max_length must be a positive int"),
    (dict(pad_token_id=1.5), TypeError, r"pad_token_id must be an int or None, got float"),
    (dict(pad_token_id=2**40, dtype=torch.int32), ValueError, r"pad_token_id=1099511627776 does not fit"),
    (dict(labels="input_ids", label_pad_token_id=None), ValueError, r"label_pad_token_id must be an int"),
    (dict(return_shift_labels=True), ValueError, r"need labels"),
    (dict(decoder_start_token_id=0), ValueError, r"need labels"),
    (dict(labels="input_ids", decoder_start_token_id=0, pad_token_id=None), ValueError,
     r"decoder_start_token_id needs pad_token_id"),
    (dict(extras={"labels": ([[1, 1, 1], [1, 1]], 0)}), ValueError, r"extras: name 'labels' must be a str other than"),
    (dict(extras={"tt": [[1, 1, 1], [1, 1]]}), TypeError, r"extras\['tt'\]: expected \(sequences, pad_value\)"),
    (dict(extras={"tt": ([[1, 1, 1], [1]], 0)}), ValueError, r"tt\[1\] has 1 values but input_ids\[1\] has 2 tokens"),
    (dict(extras=[1]), TypeError, r"extras must be a dict"),
    (dict(backend="gpu"), ValueError, r"backend must be one of"),
    (dict(backend=np.array(["cpu", "cpu"])), ValueError, r"backend must be one of"),
    (dict(num_threads=0), ValueError, r"num_threads must be a positive int or None, got 0"),
    (dict(num_threads=True), ValueError, r"num_threads must be a positive int or None, got True"),
    (dict(num_threads=2.0), TypeError, r"num_threads must be an int or None, got float"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGS, ids=[m[:60] for _, _, m in BAD_ARGS])
def test_bad_arguments(kwargs, error, message):
    kwargs = dict(kwargs)
    input_ids = kwargs.pop("input_ids", [[1, 2, 3], [4, 5]])
    kwargs.setdefault("pad_token_id", 0)
    with pytest.raises(error, match=message):
        pad_shift_mask(input_ids, **kwargs)


@pytest.mark.parametrize("backend", VALIDATING)
def test_aligned_fields_of_mixed_row_types(backend):
    """Rows measured in C++ (numpy) beside rows converted in Python (tensors): the lengths still compare."""
    ids = [np.array([1, 2, 3]), np.array([4, 5])]
    out = pad_shift_mask(ids, pad_token_id=0, labels="input_ids", backend=backend,
                         loss_masks=[torch.tensor([0, 1, 1]), torch.tensor([1, 0])],
                         extras={"tt": ([torch.tensor([7, 7, 7]), torch.tensor([8, 8])], 0)})
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["tt"].tolist() == [[7, 7, 7], [8, 8, 0]]
    with pytest.raises(ValueError, match=r"tt\[1\] has 1 values but input_ids\[1\] has 2 tokens"):
        pad_shift_mask(ids, pad_token_id=0, backend=backend,
                       extras={"tt": ([torch.tensor([7, 7, 7]), torch.tensor([8])], 0)})


@pytest.mark.parametrize("backend", VALIDATING)
def test_tensor_rows(backend):
    """Rows that are all tensors are concatenated into one buffer: the same outputs as the same rows as lists
    (whose path does not concatenate), beside fields of other forms, and the same errors naming the row."""
    rows = [[5, 6, 7, 8], [9], [], [10, 11, 12]]
    dtypes = [torch.int64, torch.int32, torch.bool, torch.uint8]
    t_rows = [torch.tensor(r, dtype=dt) if dt != torch.bool else torch.tensor(r) % 2 == 1
              for r, dt in zip(rows, dtypes)]
    as_lists = [r.tolist() for r in t_rows]
    masks = [[1, 0, 1, 1], [1], [], [0, 1, 1]]
    for kw in (dict(labels="input_ids", loss_masks=masks, extras={"tt": ([[2] * len(r) for r in rows], 0)}),
               dict(labels="input_ids", loss_masks=[torch.tensor(m, dtype=torch.int64) for m in masks],
                    padding_side="left", truncation=True, max_length=3, truncation_side="left",
                    return_position_ids=True),
               dict(labels=[torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([], dtype=torch.int64),
                            torch.tensor([4, 5, 6, 7])], decoder_start_token_id=0, dtype=torch.int32)):
        plain = {k: [x.tolist() if isinstance(x, torch.Tensor) else x for x in v]
                 if k in ("labels", "loss_masks") and not isinstance(v, str) else v for k, v in kw.items()}
        want = pad_shift_mask(as_lists, pad_token_id=0, backend=backend, **plain)
        assert_same(pad_shift_mask(t_rows, pad_token_id=0, backend=backend, **kw), want)
    # rows cat cannot join (uint16 with int64) are read one by one
    mixed = [torch.tensor([1, 2], dtype=torch.uint16), torch.tensor([3])]
    assert pad_shift_mask(mixed, pad_token_id=0, backend=backend)["input_ids"].tolist() == [[1, 2], [3, 0]]
    with pytest.raises(TypeError, match=r"input_ids\[1\]: expected integer values, got a"):
        pad_shift_mask([torch.tensor([1]), torch.tensor([1.5])], pad_token_id=0, backend=backend)
    with pytest.raises(TypeError, match=r"input_ids\[1\]: expected a 1-D sequence, got a 2-D"):
        pad_shift_mask([torch.tensor([1, 2]), torch.tensor([[1, 2]])], pad_token_id=0, backend=backend)
    with pytest.raises(ValueError, match=r"input_ids\[1\]\[1\]: 4294967296 does not fit in the output dtype int32"):
        pad_shift_mask([torch.tensor([1]), torch.tensor([3, 2**32])], pad_token_id=0, dtype=torch.int32,
                       backend=backend)
    with pytest.raises(ValueError, match=r"loss_masks\[2\] has 1 values but input_ids\[2\] has 0 tokens"):
        pad_shift_mask(t_rows, labels="input_ids", loss_masks=[torch.tensor(m) for m in masks[:2]] + [[1], [1, 1, 1]],
                       pad_token_id=0, backend=backend)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_gpu_tensor_rows():
    """Rows on the GPU: joined by torch.cat on the device; rows of dtypes cat cannot join (uint16 beside int64)
    are cast to int64 first; rows beside host rows are an error naming both."""
    dev = torch.device("cuda")
    rows = [torch.tensor([1, 2], device=dev), torch.tensor([3], dtype=torch.int32, device=dev)]
    assert pad_shift_mask(rows, pad_token_id=0)["input_ids"].tolist() == [[1, 2], [3, 0]]
    mixed = [torch.tensor([1, 2], dtype=torch.uint16, device=dev), torch.tensor([3], device=dev)]
    assert pad_shift_mask(mixed, pad_token_id=0)["input_ids"].tolist() == [[1, 2], [3, 0]]
    with pytest.raises(ValueError, match=r"rows on a CUDA device must all be tensors on that one device"):
        pad_shift_mask([rows[0], [3]], pad_token_id=0)


@pytest.mark.skipif(not _native.cpu_available(), reason="the C++ CPU module is not built")
def test_row_shrunk_while_read_is_an_error():
    """An __index__ that empties its own row while the C++ backend reads it: a clear error, no stale read."""
    row = [1, 2, 3, 4]

    class Shrinks:
        def __index__(self):
            del row[1:]
            return 5

    row[0] = Shrinks()
    with pytest.raises(RuntimeError, match=r"input_ids\[0\]: the data does not match its length"):
        pad_shift_mask([row, [6]], pad_token_id=0, backend="cpu")


def test_pad_token_only_needed_for_padding():
    out = pad_shift_mask([[1, 2], [3, 4]], pad_token_id=None, backend="cpu")
    assert out["input_ids"].tolist() == [[1, 2], [3, 4]]


def test_backend_selection():
    assert M.DISPATCH.select("auto", CPU)[0] == ("cpu" if _native.cpu_available() else "torch")
    with pytest.raises(BackendUnavailable, match=r'backend "cuda" needs a CUDA output device'):
        pad_shift_mask([[1]], backend="cuda")
    with pytest.raises(BackendUnavailable, match=r'backend "cpu" writes CPU tensors'):
        pad_shift_mask([[1]], backend="cpu", device="meta")
    if not HAS_GPU:
        with pytest.raises(BackendUnavailable, match=r'backend "cuda"'):
            M.DISPATCH.select("cuda", torch.device("cuda", 0))


@pytest.mark.parametrize("backend", VALIDATING)
def test_inputs_are_not_mutated(backend):
    rows = [[5, 6, 7, 8], [9], [10, 11, 12]]
    np_rows = [np.array(r) for r in rows]
    t_rows = [torch.tensor(r) for r in rows]
    flat = torch.tensor([v for r in rows for v in r])
    offsets = [0, 4, 5, 8]
    masks = [[1, 0, 1, 1], [1], [0, 1, 1]]
    prompt = np.array([2, 0, 1])
    labels = [[1, -100], [2, 3, 4], []]
    kw = dict(pad_token_id=0, truncation=True, max_length=3, truncation_side="left", padding_side="left",
              return_position_ids=True, return_loss_mask=True, return_shift_labels=True, backend=backend)
    keep = copy.deepcopy((rows, masks, prompt, labels))
    saved = ([a.copy() for a in np_rows], [t.clone() for t in t_rows], flat.clone())
    for value, off in ((rows, None), (np_rows, None), (t_rows, None), (flat, offsets)):
        pad_shift_mask(value, offsets=off, labels="input_ids", prompt_lengths=prompt,
                       loss_masks=masks if off is None else torch.tensor([v for m in masks for v in m]), **kw)
        pad_shift_mask(value, offsets=off, labels=labels, prompt_lengths=prompt, decoder_start_token_id=0, **kw)
    assert (rows, masks, labels) == (keep[0], keep[1], keep[3]) and np.array_equal(prompt, keep[2])
    assert all(np.array_equal(a, b) for a, b in zip(np_rows, saved[0]))
    assert all(torch.equal(a, b) for a, b in zip(t_rows, saved[1])) and torch.equal(flat, saved[2])
    assert offsets == [0, 4, 5, 8]
