"""What the device backends ("cuda", "triton") share: the DeviceLaunch a kernel takes, its one validation
(check_launch, run by every device launcher before it launches), and run(), which turns a planned Call into a
DeviceLaunch and hands it to a backend's launch function.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional

import numpy as np
import torch

from .. import _native
from .plan import (LABELS_DERIVED, LABELS_GIVEN, LABELS_NONE, MODE_PADDED, Call, Options, Seqs, kept_counts,
                   label_width, offsets_of, output_keys)
from .reference import kept_window, row_values

__all__ = ["DeviceLaunch", "check_launch", "run"]


@dataclasses.dataclass
class DeviceLaunch:
    """Everything a device kernel gets for one call; both the Triton and the CUDA launcher take it.

    Each kernel plans every example itself, from its offsets, with plan_row() of csrc/pad_shift_mask.h (the
    Triton kernel mirrors it), so nothing is computed on the device before the launch.
    Tensors are on the output device, contiguous, int64 buffers 16-byte aligned (Triton mis-loads others).
    tokens          int32 / int64 [T]
    offsets         int64 [B + 1]: example b's tokens are tokens[offsets[b] : offsets[b + 1]] (not trusted: a
                    kernel keeps every load inside its buffer whatever they hold)
    loss_masks      None or uint8 / int32 / int64 [T], aligned with tokens (0 drops a derived label)
    labels          None or int32 / int64 [Tl], separate labels (labels_kind == 2) ...
    label_offsets   ... and their int64 [B + 1] offsets (None otherwise)
    prompt_lengths  None or int64 [B]: tokens of original index < prompt_lengths[b] are the prompt
    extras          None or [E, T] (int32 / int64), aligned with tokens; extra_pads int64 [E]
    outputs         {key: tensor} for the requested output keys ([B, L] or [B, Ll], dtype int32/int64), plus
                    "extras": [E, B, L] when E > 0
    L, Ll           widths of the outputs;  max_length: truncation to it, -1 for none
    truncate_left   truncation keeps the last max_length values;  pad_left: padding goes on the left
    labels_kind     0 none, 1 derived from tokens, 2 given;  mode: 0 (padded; 1 = packed is reserved)
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    loss_masks: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    label_offsets: Optional[torch.Tensor]
    prompt_lengths: Optional[torch.Tensor]
    extras: Optional[torch.Tensor]
    extra_pads: Optional[torch.Tensor]
    outputs: dict
    L: int
    Ll: int
    max_length: int
    truncate_left: bool
    pad_left: bool
    labels_kind: int
    pad_token_id: int
    label_pad_token_id: int
    decoder_start_token_id: int
    mode: int = MODE_PADDED


# ---------------------------------------------------------------------------------------------------------------
# Validation: what keeps a kernel's raw-pointer loads and stores inside their buffers, and its types right
# ---------------------------------------------------------------------------------------------------------------

_INTS = (torch.int64, torch.int32)
_MASK_TYPES = (torch.uint8,) + _INTS
_RANGES = {dt: (torch.iinfo(dt).min, torch.iinfo(dt).max) for dt in _INTS}
_INT64_MAX = 2**63 - 1
# The CUDA kernel tiles columns by 256 threads and its grid has at most 65535 tiles (csrc/pad_shift_mask.cu);
# the Triton kernel's grid has the same limit on its second dimension.
MAX_WIDTH = 65535 * 256


def _error(msg: str) -> ValueError:
    return ValueError(f"pad_shift_mask DeviceLaunch.{msg}")


# Each message is formatted only once its check has failed: the checks run before every launch.

def _require_tensor(name: str, t, device: torch.device, dtypes: tuple, shape: tuple) -> None:
    """`t` is a C-contiguous tensor of `shape` with one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise _error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise _error(f"{name} must be on {device} (the device of tokens), got {t.device}")
    if t.dtype not in dtypes:
        raise _error(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.shape != shape:
        raise _error(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise _error(f"{name} must be contiguous, got strides {t.stride()}")


def _require_int(name: str, value, lo: int, hi: int, what: str) -> int:
    """`value` (an int, numpy integers too, not a bool) as an int, checked to lie in [lo, hi]."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise _error(f"{name} must be an int, got {value!r}")
    value = operator.index(value)
    if not lo <= value <= hi:
        raise _error(f"{name} = {value} is outside {what}")
    return value


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise _error(f"{name} must be a bool, got {value!r}")


def check_launch(a: DeviceLaunch) -> None:
    """Checks every field of a DeviceLaunch that a kernel's memory safety and types depend on; ValueError naming
    the field. Every device launcher runs it before it launches. Offsets and prompt lengths are not read (on a
    device that would sync): the kernels make a row whose window leaves its buffer an empty row."""
    tokens = a.tokens
    if not isinstance(tokens, torch.Tensor):
        raise _error(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    device = tokens.device
    n = tokens.numel()
    _require_tensor("tokens", tokens, device, _INTS, (n,))
    offsets = a.offsets
    if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1 or offsets.shape[0] < 1:
        raise _error("offsets must be a 1-D tensor of B + 1 >= 1 entries, got "
                     f"{list(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets).__name__}")
    B = offsets.shape[0] - 1
    if B >= 2**31:
        raise _error(f"offsets describe B = {B} rows; one launch takes at most 2**31 - 1")
    _require_tensor("offsets", offsets, device, (torch.int64,), (B + 1,))
    if a.mode != MODE_PADDED:
        raise _error(f"mode: mode {a.mode!r} is not built: only mode 0 (padded) is")
    kind = a.labels_kind
    if kind not in (LABELS_NONE, LABELS_DERIVED, LABELS_GIVEN):
        raise _error(f"labels_kind must be 0 (none), 1 (derived) or 2 (given), got {kind!r}")
    L = _require_int("L", a.L, 0, MAX_WIDTH, f"[0, {MAX_WIDTH}]")
    Ll = _require_int("Ll", a.Ll, 0, MAX_WIDTH, f"[0, {MAX_WIDTH}]")
    if kind == LABELS_DERIVED and Ll != L:
        raise _error(f"Ll: derived labels (labels_kind 1) need Ll == L, got L={L}, Ll={Ll}")
    _require_int("max_length", a.max_length, -1, _INT64_MAX, "[-1, 2**63 - 1] (-1: no truncation)")
    _require_bool("truncate_left", a.truncate_left)
    _require_bool("pad_left", a.pad_left)
    if a.prompt_lengths is not None:
        _require_tensor("prompt_lengths", a.prompt_lengths, device, (torch.int64,), (B,))

    masks = a.loss_masks
    if masks is not None:
        if kind != LABELS_DERIVED:
            raise _error(f"loss_masks apply to derived labels (labels_kind 1), got labels_kind {kind}")
        _require_tensor("loss_masks", masks, device, _MASK_TYPES, (n,))
    labels = a.labels
    if kind == LABELS_GIVEN:
        if labels is None:
            raise _error("labels: labels_kind 2 needs the `labels` buffer")
        _require_tensor("labels", labels, device, _INTS, (labels.numel() if isinstance(labels, torch.Tensor) else -1,))
        _require_tensor("label_offsets", a.label_offsets, device, (torch.int64,), (B + 1,))
    elif labels is not None or a.label_offsets is not None:
        raise _error(f"labels: `labels` and `label_offsets` are only read with labels_kind 2, got labels_kind {kind}")

    outputs = a.outputs
    if not isinstance(outputs, dict):
        raise _error(f"outputs must be a dict {{key: tensor}}, got {type(outputs).__name__}")
    keys = output_keys()
    unknown = set(outputs) - set(keys) - {"extras"}
    if unknown:
        raise _error(f"outputs has unknown keys {sorted(unknown)}; expected keys from {list(keys)} and 'extras'")
    given = [k for k in keys if label_width(k) and outputs.get(k) is not None]
    if kind == LABELS_NONE and given:
        raise _error(f"outputs {given} need labels (labels_kind 1 or 2), got labels_kind 0")
    extras, E = a.extras, 0
    if extras is not None:
        E = extras.shape[0] if isinstance(extras, torch.Tensor) and extras.dim() == 2 else -1
        _require_tensor("extras", extras, device, _INTS, (E, n))
        _require_tensor("extra_pads", a.extra_pads, device, (torch.int64,), (E,))
    elif a.extra_pads is not None:
        raise _error("extra_pads is only read with extras, got extras None")
    if (outputs.get("extras") is not None) != (E > 0):
        raise _error(f"outputs['extras'] ([E, B, L]) must be given exactly when there are extras (E = {E})")
    # Every output the kernel writes; they share one dtype.
    out_dtype = None
    for k, t in outputs.items():
        if t is None:
            continue
        shape = (E, B, L) if k == "extras" else (B, Ll) if label_width(k) else (B, L)
        _require_tensor(f"outputs[{k!r}]", t, device, _INTS, shape)
        if out_dtype is None:
            out_dtype = t.dtype
        elif t.dtype != out_dtype:
            raise _error(f"outputs[{k!r}]: every output must have the same dtype, got {out_dtype} and {t.dtype}")
    lo, hi = _RANGES[out_dtype or torch.int64]
    for name in ("pad_token_id", "label_pad_token_id", "decoder_start_token_id"):
        _require_int(name, getattr(a, name), lo, hi, f"the output dtype {out_dtype or torch.int64}")


# ---------------------------------------------------------------------------------------------------------------
# From a planned call to a launch
# ---------------------------------------------------------------------------------------------------------------

def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To `device` without a host sync: a host tensor goes through pinned memory, asynchronously."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _gather_host(seqs: Seqs, kept: np.ndarray, opts: Options, is_mask: bool, pin: bool) -> torch.Tensor:
    """Every example's kept values back to back, in the output dtype, validated (`kept`: how many each keeps).
    `pin`: into pinned memory, ready for an asynchronous copy to the GPU."""
    if _native.cpu_available():
        from .cpu import gather

        return gather(seqs, int(kept.sum()), opts, is_mask, pin)
    parts = []
    for b in range(seqs.B):
        obj = seqs.row(b)
        s, e = kept_window(len(obj), opts)
        parts.append(row_values(obj, seqs.name, b, s, e, opts.value_range, is_mask))
    return torch.cat(parts).to(opts.dtype)


def build_launch(call: Call, outputs: dict) -> DeviceLaunch:
    """The kernel's inputs on the device. Fields on the host are packed (kept values only, one asynchronous copy
    each) with offsets of their own; fields already on the device are used in place, with their offsets (copied
    there when they are host metadata)."""
    src, lab, masks, opts, device = call.src, call.lab, call.masks, call.opts, call.device
    kind, prompt = call.kind, call.prompt
    pin = device.type == "cuda"

    def field(seqs, kept, is_mask):
        if seqs.on_host:  # host data implies host offsets
            return _to_device(_gather_host(seqs, kept, opts, is_mask, pin), device)
        flat = seqs.flat
        if flat.dtype == torch.bool and is_mask:
            flat = flat.view(torch.uint8)
        elif flat.dtype not in (torch.int32, torch.int64) and not (is_mask and flat.dtype == torch.uint8):
            flat = flat.to(torch.int64)  # the kernels read int32 / int64 (and uint8 masks)
        return _aligned(flat)

    def offsets(seqs, kept):
        off = offsets_of(kept) if seqs.on_host else seqs.offsets
        if not isinstance(off, torch.Tensor):
            off = torch.from_numpy(np.asarray(off, dtype=np.int64))
        return _aligned(_to_device(off, device))

    kept = kept_counts(src.lengths, opts) if src.on_host else None
    lab_kept = kept_counts(lab.lengths, opts) if kind == LABELS_GIVEN and lab.on_host else None
    if prompt is not None and src.on_host and opts.truncation and opts.truncation_side == "left":
        # The packed tokens are already cut: plan_row then sees cut = 0, so the prompt moves by the cut.
        cut = src.lengths - kept
        prompt = prompt - (torch.from_numpy(cut).to(prompt.device) if isinstance(prompt, torch.Tensor) else cut)
    if isinstance(prompt, np.ndarray):
        prompt = torch.from_numpy(prompt)
    extras_t = pads = None
    if call.extras:
        flats = [field(seqs, kept, False) for seqs, _ in call.extras.values()]
        if len({f.dtype for f in flats}) > 1:
            flats = [f.to(torch.int64) for f in flats]
        extras_t = _aligned(torch.stack(flats))
        pads = _to_device(torch.tensor([pad for _, pad in call.extras.values()], dtype=torch.int64), device)
    given = kind == LABELS_GIVEN
    max_length, trunc_left, pad_left = opts.layout
    pad, label_pad, decoder_start, _ = opts.fills
    return DeviceLaunch(
        tokens=field(src, kept, False), offsets=offsets(src, kept),
        loss_masks=field(masks, kept, True) if masks is not None else None,
        labels=field(lab, lab_kept, False) if given else None,
        label_offsets=offsets(lab, lab_kept) if given else None,
        prompt_lengths=_aligned(_to_device(prompt, device)) if prompt is not None else None,
        extras=extras_t, extra_pads=pads, outputs=outputs, L=call.L, Ll=call.Ll, max_length=max_length,
        truncate_left=trunc_left, pad_left=pad_left, labels_kind=kind, pad_token_id=pad,
        label_pad_token_id=label_pad, decoder_start_token_id=decoder_start)


def run(call: Call, launch: Callable[[DeviceLaunch], None]) -> dict:
    """A device backend's run(call): allocates the outputs, builds the DeviceLaunch (host data packed and
    validated on the way) and hands it to `launch`, which checks it (check_launch) before it launches."""
    B, L, Ll, dtype, device = call.B, call.L, call.Ll, call.opts.dtype, call.device
    outs = {key: torch.empty(B, Ll if wide else L, dtype=dtype, device=device) for key, wide, _ in call.want}
    outputs = dict(outs)
    if call.extras:
        outputs["extras"] = torch.empty((len(call.extras), B, L), dtype=dtype, device=device)
    launch(build_launch(call, outputs))
    for e, name in enumerate(call.extras):
        outs[name] = outputs["extras"][e]
    return outs
