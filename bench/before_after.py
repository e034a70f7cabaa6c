"""Warm and cold collation timings of two builds of pyseqpack in one process, interleaved.

    python bench/before_after.py --before COMMIT [--repo PATH] [--build-dir DIR] [--quick]

"before" is COMMIT of the repository: its tree (``git archive``) with the package renamed ``pyseqpack_before``
(a word-bounded rename of ``pyseqpack`` in every text file: imports, the C extension's module name, the
``torch.library`` namespace ``pyseqpack::``, the distribution's name; C symbols such as ``pyseqpack_ce_fwd_bwd``
keep theirs), built without CUDA and installed with ``pip install --target`` into ``--build-dir`` (reused when
that commit is already built there). "after" is the ``pyseqpack`` this Python imports (put an install first on
PYTHONPATH to choose it). Both load side by side in this process.

The cases are bench_collate's cold cases (``helpers.COLD_CASES``): pad_shift_mask[cpu] and
DataCollatorForSeq2Seq of each build, and transformers' DataCollatorForSeq2Seq on the same inputs, with one
CPU thread. Every output is first checked against transformers'. Then, per case, the sides take turns, in a
rotating order, so that a change in the machine's load falls on all of them alike:

* warm: a block of back-to-back calls of one side (the first call of the block, which follows another side's,
  is not recorded), then the next side's block;
* cold: one call per turn after an untimed sweep of the caches (``helpers.CacheSweep``: a buffer 4x the
  last-level cache written just before); only the call itself is timed.

It prints a markdown table: per case and call, the warm and cold medians before and after, transformers'
warm and cold medians, and the speedup over transformers warm and cold (before -> after). Cells whose
quartile spread exceeds a quarter of their median are listed under the table: there the machine's other
load blurs the figure.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import helpers as H  # noqa: E402

NAME = "pyseqpack_before"
NOISY = 0.25  # a cell whose IQR / median exceeds this is listed as noisy


# ----------------------------------------------------------------------------------------------------
# The "before" build
# ----------------------------------------------------------------------------------------------------

def _git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def build_before(repo: Path, commit: str, build_dir: Path) -> Path:
    """Install COMMIT's tree, renamed to pyseqpack_before, into build_dir/site; return that folder."""
    sha = _git(repo, "rev-parse", "--verify", f"{commit}^{{commit}}")
    site = build_dir / "site"
    stamp = site / f".built-{sha}"
    if stamp.is_file():
        return site
    shutil.rmtree(build_dir, ignore_errors=True)
    src = build_dir / "src"
    src.mkdir(parents=True)
    with tempfile.TemporaryFile() as tar:
        subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", sha], check=True, stdout=tar)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as t:
            t.extractall(src, filter="data") if hasattr(tarfile, "data_filter") else t.extractall(src)
    for extra in ("tests", "bench", "examples"):
        shutil.rmtree(src / extra, ignore_errors=True)
    (src / "pyseqpack").rename(src / NAME)
    word = re.compile(r"\bpyseqpack\b")
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        renamed = word.sub(NAME, text)
        if renamed != text:
            path.write_text(renamed, encoding="utf-8")
    env = dict(os.environ, PYSEQPACK_CUDA="0")
    print(f"before_after: building {sha[:12]} as {NAME} into {site}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                           "--target", str(site), str(src)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"before_after: building {commit} failed:\n{proc.stdout}\n{proc.stderr}")
    stamp.write_text(sha + "\n")
    return site


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------

def _threads(fn) -> dict:
    try:
        return {"num_threads": 1} if "num_threads" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


def _calls(pkg, features, tokenizer) -> dict:
    """{call name: zero-argument function} of one build of pyseqpack."""
    op = pkg.pad_shift_mask
    kw = _threads(op)
    collator = pkg.DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return {
        "pad_shift_mask[cpu]": lambda: op([f["input_ids"] for f in features], labels=[f["labels"] for f in features],
                                          pad_token_id=tokenizer.pad_token_id, label_pad_token_id=-100,
                                          backend="cpu", **kw),
        "DataCollatorForSeq2Seq": lambda: collator(features),
    }


def _median_iqr(xs):
    q = statistics.quantiles(xs, n=4)
    return statistics.median(xs), q[2] - q[0]


def time_sides(sides: dict, sweep, *, blocks: int, cold_rounds: int) -> dict:
    """{side: {"warm": (median, iqr), "cold": (median, iqr)}}, the sides taking turns in a rotating order."""
    names = list(sides)
    warm = {n: [] for n in names}
    cold = {n: [] for n in names}
    per_call = {}
    for n, fn in sides.items():  # a block of warm calls lasts about 20 ms (at least 3 calls, at most 50)
        t0 = time.perf_counter()
        fn()
        per_call[n] = time.perf_counter() - t0
    sizes = {n: max(3, min(50, int(0.02 / max(per_call[n], 1e-7)))) for n in names}
    clock = time.perf_counter
    for rep in range(max(blocks, cold_rounds)):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if rep < blocks:
            for n in order:
                fn = sides[n]
                fn()  # follows another side's block: not recorded
                for _ in range(sizes[n]):
                    t0 = clock()
                    fn()
                    warm[n].append(clock() - t0)
        if rep < cold_rounds:
            for n in order:
                sweep()
                t0 = clock()
                sides[n]()
                cold[n].append(clock() - t0)
    return {n: {"warm": _median_iqr(warm[n]), "cold": _median_iqr(cold[n])} for n in names}


def _us(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def run(before, after, *, mode: str, blocks: int, cold_rounds: int, out=print) -> list:
    """Time every case with one torch thread; print and return the markdown table's lines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # transformers' collator warns about its numpy path on every call: that slowness is what is timed.
            warnings.filterwarnings("ignore", message="Creating a tensor from a list of numpy.ndarrays")
            return _run(before, after, mode=mode, blocks=blocks, cold_rounds=cold_rounds, out=out)
    finally:
        torch.set_num_threads(threads)


def _run(before, after, *, mode, blocks, cold_rounds, out):
    from transformers import DataCollatorForSeq2Seq

    tokenizer = H.make_tokenizer()
    sweep = H.CacheSweep(torch.device("cpu"))
    hf_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    lines = ["| case | call | warm before | warm after | cold before | cold after | transformers warm "
             "| transformers cold | vs transformers warm (before -> after) | vs transformers cold (before -> after) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    noisy = []
    for kind, batch, lo, hi in H.COLD_CASES[mode]:
        case = f"{kind} B={batch} len={lo}-{hi}"
        features = H.collate_features(kind, batch, lo, hi)
        hf = lambda: hf_collator(features)  # noqa: E731
        expected = hf()
        sides = {"transformers": hf}
        for tag, pkg in (("before", before), ("after", after)):
            for call, fn in _calls(pkg, features, tokenizer).items():
                got = fn()
                for k in ("input_ids", "attention_mask", "labels"):
                    if not torch.equal(got[k], expected[k]):
                        raise SystemExit(f"before_after: {tag} {call} on {case}: {k!r} differs from transformers'")
                sides[f"{tag} {call}"] = fn
        gc.collect()
        t = time_sides(sides, sweep, blocks=blocks, cold_rounds=cold_rounds)
        for name, res in t.items():
            for cache in ("warm", "cold"):
                median, iqr = res[cache]
                if median > 0 and iqr / median > NOISY:
                    noisy.append(f"{case}, {name}, {cache}: IQR {_us(iqr)} on a median of {_us(median)}")
        hw, hc = t["transformers"]["warm"][0], t["transformers"]["cold"][0]
        for call in ("pad_shift_mask[cpu]", "DataCollatorForSeq2Seq"):
            b, a = t[f"before {call}"], t[f"after {call}"]
            lines.append(
                f"| {case} | {call} | {_us(b['warm'][0])} | {_us(a['warm'][0])} | {_us(b['cold'][0])} "
                f"| {_us(a['cold'][0])} | {_us(hw)} | {_us(hc)} "
                f"| {hw / b['warm'][0]:.1f}x -> {hw / a['warm'][0]:.1f}x "
                f"| {hc / b['cold'][0]:.1f}x -> {hc / a['cold'][0]:.1f}x |")
    for line in lines:
        out(line)
    if noisy:
        out("")
        out(f"Noisy cells (quartile spread above {NOISY:.0%} of the median):")
        for n in noisy:
            out(f"- {n}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/before_after.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the older commit (any git revision), e.g. a short hash")
    p.add_argument("--repo", type=Path, default=HERE.parent, help="the git repository (default: this checkout)")
    p.add_argument("--build-dir", type=Path,
                   help="where the before build goes (default: <tmp>/pyseqpack-before-<commit hash>)")
    p.add_argument("--quick", action="store_true", help="fewer rounds (a harness check)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few rounds: checks the harness only")
    args = p.parse_args(argv)
    try:
        sha = _git(args.repo, "rev-parse", "--verify", f"{args.before}^{{commit}}")
    except subprocess.CalledProcessError as e:
        print(f"before_after: --before {args.before!r} is not a commit of {args.repo}: {e.stderr.strip()}",
              file=sys.stderr)
        return 2
    build_dir = args.build_dir or Path(tempfile.gettempdir()) / f"pyseqpack-before-{sha[:12]}"
    site = build_before(args.repo, sha, build_dir)
    sys.path.append(str(site))
    before = importlib.import_module(NAME)
    after = importlib.import_module("pyseqpack")
    mode = "smoke" if args.smoke else "full"
    blocks, cold_rounds = (3, 3) if args.smoke else (8, 20) if args.quick else (20, 60)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"before: {args.before} ({sha[:12]}) as {NAME}, from {Path(before.__file__).parent}")
    print(f"after:  pyseqpack from {Path(after.__file__).parent}")
    sweep_mib = H.CacheSweep(torch.device("cpu")).buf.numel() * 4 >> 20
    print(f"torch {torch.__version__}, one CPU thread; cold = after a {sweep_mib} MiB cache sweep; "
          f"warm blocks {blocks}, cold rounds {cold_rounds} per side and case"
          + (f"; load average {load[0]:.2f}" if load else ""))
    print()
    run(before, after, mode=mode, blocks=blocks, cold_rounds=cold_rounds)
    if load:
        print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
