"""Shared pieces of the pyseqpack benchmarks: timing, byte counts, inputs and an offline tokenizer.

Every benchmark goes through :func:`measure`, which

* runs the function once untimed (first-call costs: torch.compile, Triton JIT, allocator warm-up),
* on CUDA, measures the peak memory of one call above what was already allocated,
* picks a round count from the cost of one call and of the untimed work before it (fixed budget per case, so
  a run's length is predictable),
* times it with ``benchmark.pedantic``; on CUDA the timed function ends with ``torch.cuda.synchronize()``
  so the time is the device work, not the launch. ``measure(..., cold=True)`` (or ``--cold-l2`` for every
  case) runs a :class:`CacheSweep` in pedantic's ``setup`` before every round: untimed, so each recorded time
  is one call that finds its code, its inputs and the allocator's memory evicted from the caches,
* stores the byte count, GB/s (``bytes / median``) and peak memory in ``benchmark.extra_info``.

``extra_info`` carries everything the report needs (suite, implementation, role, shape), so
``pyseqpack.bench`` builds its tables and plots from the JSON alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

# Roles of an implementation inside its group: the report divides the baseline's median by every other
# median of the group ("speedup"); a "reference" row (memcpy) is shown for its GB/s only.
BASELINE, OURS, OTHER, REFERENCE = "baseline", "ours", "other", "reference"


@dataclass(frozen=True)
class BenchConfig:
    """Options of one benchmark session (set from the pytest command line in conftest.py)."""

    device: torch.device
    mode: str  # "full" | "quick" | "smoke"
    cold_l2: bool
    cpu_threads: int  # torch (and our native) threads of every CPU benchmark

    @property
    def time_budget_s(self) -> float:
        # Seconds of timed rounds per case; a round costs at least one call.
        return {"full": 2.0, "quick": 0.4, "smoke": 0.02}[self.mode]

    @property
    def min_rounds(self) -> int:
        return {"full": 10, "quick": 5, "smoke": 2}[self.mode]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports for cpu0 (sysfs), or 32 MiB when it cannot be read."""
    from pathlib import Path

    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=32 * 2**20)


class CacheSweep:
    """Evicts the caches by writing a buffer several times larger than them (run untimed, before a call).

    On a CPU: 4x the last-level cache (at least 32 MiB), which pushes out every line of L1, L2 and the LLC
    (the benchmark runs with one thread: one core's L1/L2 and the LLC it shares). On a GPU: 256 MiB, above
    the L2 of current GPUs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        nbytes = 256 * 2**20 if device.type == "cuda" else max(4 * last_level_cache_bytes(), 32 * 2**20)
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
        self.value = 0

    def __call__(self):
        self.value ^= 1  # a new value each time: every line is written, never skipped as unchanged
        self.buf.fill_(self.value)
        synchronize(self.device)


def _peak_memory_bytes(fn, device: torch.device, reset):
    """Peak CUDA memory one call allocates beyond what is live before it (None off CUDA: not measured).

    ``reset()`` first frees what the previous call left behind (e.g. a gradient), so that it is counted.
    """
    if device.type != "cuda":
        return None
    if reset is not None:
        reset()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def kernel_device_us(fn, kernel: str, reps: int = 50) -> float:
    """GPU time of one call's kernels whose name contains `kernel`, in microseconds: the mean over `reps` calls
    of the durations torch's profiler (CUPTI) records on the device. Unlike the wall-clock median, it leaves out
    the host (Python, launch latency, the synchronize), i.e. what the kernel itself costs the GPU's stream."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if kernel in e.key]
    if not events:
        raise RuntimeError(f"the profiler recorded no kernel named like {kernel!r}")
    total = sum(getattr(e, "device_time_total", None) or e.cuda_time_total for e in events)
    return total / reps


def measure(benchmark, fn, cfg: BenchConfig, *, nbytes: int, info: dict, reset=None, cold=False):
    """Time ``fn()`` with pytest-benchmark and record bytes, GB/s and peak memory in extra_info.

    nbytes: the bytes one call must move at minimum (the report's GB/s is ``nbytes / median``).
    info:   suite, impl, role and shape fields, copied into ``benchmark.extra_info``.
    reset:  optional, frees what a call leaves alive (untimed, before the peak-memory call).
    cold:   sweep the caches (untimed) before every round, also without --cold-l2; extra_info["cache"] says
            "cold" or "warm" (calls back to back, as pytest-benchmark times them).
    Returns what the last call of ``fn`` returned.
    """
    device = cfg.device

    def timed():
        out = fn()
        synchronize(device)
        return out

    timed()  # first call: compilation, JIT, allocator warm-up
    peak = _peak_memory_bytes(fn, device, reset)
    sweep = CacheSweep(device) if cold or cfg.cold_l2 else None
    t0 = time.perf_counter()
    if sweep is not None:
        sweep()
    timed()
    one = max(time.perf_counter() - t0, 1e-7)  # a round's cost, its untimed sweep included
    rounds = int(min(max(cfg.time_budget_s / one, cfg.min_rounds), 2000))

    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"bytes": int(nbytes), "peak_mem_bytes": peak, "cold_l2": cfg.cold_l2,
                                 "cache": "cold" if sweep is not None else "warm", "device": str(device)})
    result = benchmark.pedantic(timed, setup=sweep, rounds=rounds, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["gbps"] = nbytes / median / 1e9 if median > 0 else None
    return result


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

PAD_ID = 0
VOCAB_SIZE = 32000


def make_tokenizer():
    """A small offline fast tokenizer (WordLevel over ``w0 .. w999``) with a pad token, right padding.

    Only ``tokenizer.pad`` (what the collators call) matters here, so the vocabulary size is irrelevant:
    the token ids fed to the collators are drawn independently.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<unk>": 1, "<eos>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(1000)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="right"
    )


def random_lengths(batch: int, lo: int, hi: int, seed: int) -> list:
    """``batch`` row lengths drawn uniformly from [lo, hi] with a fixed seed (same rows for every impl)."""
    rng = np.random.default_rng(seed)
    return [int(n) for n in rng.integers(lo, hi + 1, size=batch)]


def make_seq2seq_features(lengths, kind: str, seed: int) -> list:
    """Tokenized examples as a datasets pipeline yields them: input_ids, attention_mask, labels.

    kind "list": Python lists of ints (``datasets`` default format);
    kind "numpy": 1-D int64 arrays (``dataset.with_format("numpy")``);
    kind "tensor": 1-D int64 CPU tensors (``dataset.with_format("torch")``).
    Labels are a copy of input_ids with the first quarter (the prompt) set to -100, as SFT data carries them.
    """
    rng = np.random.default_rng(seed)
    feats = []
    for n in lengths:
        ids = rng.integers(3, VOCAB_SIZE, size=n, dtype=np.int64)
        labels = ids.copy()
        labels[: n // 4] = -100
        mask = np.ones(n, dtype=np.int64)
        if kind == "list":
            feats.append({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})
        elif kind == "numpy":
            feats.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        elif kind == "tensor":
            feats.append({k: torch.from_numpy(v) for k, v in (("input_ids", ids), ("attention_mask", mask),
                                                               ("labels", labels))})
        else:
            raise ValueError(f"kind must be 'list', 'numpy' or 'tensor', got {kind!r}")
    return feats


COLLATE_SEED = 1234

# Collation cases timed warm and cold (bench_collate.test_collate_cold, before_after.py): (input kind, batch,
# shortest row, longest row).
COLD_CASES = {
    "full": [("list", 32, 64, 512), ("numpy", 32, 64, 512), ("numpy", 8, 2048, 4096), ("tensor", 32, 64, 512)],
    "smoke": [("list", 4, 8, 32)],
}
COLD_CASES["quick"] = COLD_CASES["full"]


def collate_features(kind: str, batch: int, lo: int, hi: int) -> list:
    """The seq2seq features of one collation case (fixed seeds: the same rows in every benchmark)."""
    return make_seq2seq_features(random_lengths(batch, lo, hi, seed=COLLATE_SEED + batch), kind, seed=COLLATE_SEED)


def output_bytes(batch: dict) -> int:
    """Bytes of every tensor in a collated batch (the bytes a collator must write)."""
    return int(sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor)))


def ce_inputs(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Logits [n_tokens, vocab] (``dtype``, leaf requiring grad) and int64 labels [n_tokens].

    Logits ~ N(0, 2^2), drawn on the device itself (the largest GPU case is 5e9 values); a quarter of the
    labels are -100 (prompt tokens), the rest uniform over the vocabulary.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(n_tokens, vocab, generator=g, device=device, dtype=dtype).mul_(2.0)
    gl = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gl)
    labels[torch.rand(n_tokens, generator=gl) < 0.25] = -100
    return logits.requires_grad_(True), labels.to(device)
