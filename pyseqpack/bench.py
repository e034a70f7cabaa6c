"""`python -m pyseqpack bench [--suite collate|ce|all] [--quick] [--out DIR] ...`

Runs the benchmark files of the ``bench/`` folder of a pyseqpack checkout through pytest-benchmark (all
implementations of a comparison in one run), then turns pytest-benchmark's JSON into

* ``summary.json``   every measurement with its speedup over the group's baseline and GB/s, the goals, the
                     bandwidth fits (time against bytes over the sizes of a series, e.g. numpy collation), and
                     each cold collation row beside its warm row,
* ``results.md``     the same as markdown tables,
* ``speedup.png``    speedup over the baseline per group shape: one panel per suite and input kind (collation)
                     or dtype (cross-entropy), at most MAX_SERIES series in each,

next to the raw ``benchmark.json``, in ``--out`` (default ``bench/results/<device>-<date>/``). All of them
carry the device, library versions, date and the exact command.

Each benchmark's ``extra_info`` (written by ``bench/helpers.py``) holds its suite, implementation, role
(``baseline`` / ``ours`` / ``other`` / ``reference``), shape fields and byte count: everything here is
computed from that JSON, so a JSON from another machine can be re-rendered with ``--from-json``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

SUITE_FILES = {"collate": ["bench_collate.py", "bench_collators.py"], "ce": ["bench_cross_entropy.py"]}
SUITE_FILES["all"] = SUITE_FILES["collate"] + SUITE_FILES["ce"]

# Distributions whose versions every result records (read from metadata: nothing is imported).
VERSIONED = ("pyseqpack", "torch", "triton", "numpy", "transformers", "tokenizers", "trl", "liger-kernel",
             "quack-kernels", "pytest-benchmark", "matplotlib")


class BenchError(RuntimeError):
    """A problem with the command line or the benchmark folder; main() prints it and returns 2."""


# ----------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device=None) -> dict:
    """Device, versions and date of this run, as recorded in every output file.

    device: "cpu", "cuda" or None (CUDA when available).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(device).split(":")[0]
    cores = os.cpu_count() or 1
    cpu = f"{_cpu_model()}, {cores} cores"
    if kind == "cuda":
        name = torch.cuda.get_device_name(0)
        desc, slug = f"{name} (CUDA {torch.version.cuda}); host CPU {cpu}", _slug(name)
    else:
        desc, slug = f"CPU only: {cpu}", f"cpu-{cores}cores"
    versions = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "device": desc,
        "device_kind": kind,
        "device_slug": slug,
        "cpu": cpu,
        "torch_default_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings: the 1/5/15-minute load averages when this was written.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        # glibc's malloc settings can change CPU collation timings at large batches (freed big tensors may go
        # back to the OS and be page-faulted in again on the next call; these keep them): recorded when set.
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ----------------------------------------------------------------------------------------------------
# From pytest-benchmark's JSON to rows, goals, markdown and a plot
# ----------------------------------------------------------------------------------------------------

def summarize(raw: dict) -> dict:
    """Rows (one per benchmark) with speedup over their group's baseline and GB/s, plus the goals.

    raw: pytest-benchmark's JSON (``{"benchmarks": [...], "pyseqpack": {...}}``).
    speedup = baseline median / median (same group); gbps = extra_info bytes / median / 1e9.
    """
    rows = []
    for b in raw.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        st = b["stats"]
        median = float(st["median"])
        nbytes = info.get("bytes")
        rows.append({
            "suite": info.get("suite", "?"),
            "group": b.get("group") or b["name"],
            "name": b["name"],
            "impl": info.get("impl", b["name"]),
            "role": info.get("role", "other"),
            "median_s": median,
            "min_s": float(st.get("min", median)),
            "iqr_s": float(st.get("iqr", 0.0)),
            "rounds": int(st.get("rounds", 0)),
            "bytes": nbytes,
            "gbps": (nbytes / median / 1e9) if nbytes and median > 0 else None,
            "peak_mem_bytes": info.get("peak_mem_bytes"),
            "info": info,
        })
    baselines = {}
    for r in rows:
        if r["role"] == "baseline":
            if r["group"] in baselines:
                raise ValueError(f"group {r['group']!r} has two baselines: {baselines[r['group']]['name']!r} "
                                 f"and {r['name']!r}")
            baselines[r["group"]] = r
    references = {r["group"]: r for r in rows if r["role"] == "reference"}
    for r in rows:
        base = baselines.get(r["group"])
        r["baseline"] = base["impl"] if base else None
        r["speedup"] = base["median_s"] / r["median_s"] if base and r["median_s"] > 0 else None
    by_group = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    goals = [_goal(r, g, references.get(r["group"]), by_group[r["group"]]) for r in rows for g in _declared(r)]
    return {"meta": raw.get("pyseqpack", {}), "rows": rows, "goals": goals, "fits": bandwidth_fits(rows),
            "warm_cold": warm_cold(rows)}


def warm_cold(rows: list) -> list:
    """Each cold row beside the same implementation's warm row.

    A cold row (extra_info["cache"] == "cold") names its warm group in extra_info["warm_group"]: the same
    inputs timed back to back. Each entry has both medians and IQRs, cold / warm, and the speedup over each
    group's own baseline (transformers' collator timed warm, and cold).
    """
    by_key = {(r["group"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        group = r["info"].get("warm_group")
        if r["info"].get("cache") != "cold" or not group:
            continue
        warm = by_key.get((group, r["impl"]))
        out.append({
            "case": group, "impl": r["impl"], "role": r["role"], "baseline": r["baseline"],
            "warm_s": warm["median_s"] if warm else None, "warm_iqr_s": warm["iqr_s"] if warm else None,
            "cold_s": r["median_s"], "cold_iqr_s": r["iqr_s"],
            "cold_over_warm": r["median_s"] / warm["median_s"] if warm and warm["median_s"] > 0 else None,
            "speedup_warm": warm["speedup"] if warm else None, "speedup_cold": r["speedup"],
        })
    return out


def bandwidth_fits(rows: list) -> list:
    """How an implementation's time grows with the bytes it writes: the least-squares line
    median = fixed + bytes / bandwidth  through its rows of one series (3 or more sizes). A benchmark puts a
    row in a series with extra_info["fit_series"] (the collation benchmark: the numpy groups).

    A per-call GB/s mixes two costs: moving the bytes, and a fixed cost per call (argument handling, output
    allocations) that dominates small batches. The fit separates them: `gbps` is the rate of each extra byte,
    compared with the series' reference row's own fit (`vs_reference`, memcpy), and `fixed_s` the cost of a
    call that writes nothing. It only means that where time is close to linear in bytes, i.e. where per-row
    and per-element costs are small beside them (numpy rows, not Python lists); `max_deviation`, the largest
    |fit - median| / median over the sizes, shows how close.
    """
    series = {}
    for r in rows:
        kind = r["info"].get("fit_series")
        if kind and r["bytes"] and r["median_s"] > 0:
            series.setdefault((kind, r["impl"]), []).append(r)
    fits = []
    for (kind, impl), rs in series.items():
        x = [float(r["bytes"]) for r in rs]
        y = [r["median_s"] for r in rs]
        if len(set(x)) < 3:
            continue
        mx, my = sum(x) / len(x), sum(y) / len(y)
        slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
        fixed = my - slope * mx
        fits.append({
            "series": kind, "impl": impl, "role": rs[0]["role"], "sizes": len(x),
            "gbps": 1 / slope / 1e9 if slope > 0 else None,
            "fixed_s": fixed,
            "max_deviation": max(abs(fixed + slope * a - b) / b for a, b in zip(x, y)),
        })
    reference = {f["series"]: f["gbps"] for f in fits if f["role"] == "reference"}
    for f in fits:
        ref = reference.get(f["series"])
        f["vs_reference"] = f["gbps"] / ref if f["gbps"] and ref else None
    return fits


def _declared(row: dict) -> list:
    """The goals a benchmark declared in extra_info["goal"]: one dict, or a list of them."""
    g = row["info"].get("goal")
    return [] if not g else [g] if isinstance(g, dict) else list(g)


def _goal(row: dict, g: dict, reference, group: list) -> dict:
    """Evaluate one goal of a benchmark row.

    kinds: "speedup_at_least" (value, optional target): speedup over the baseline >= value;
           "median_below_us" (value): median time below value microseconds;
           "device_time_below_us" (value): the kernel's GPU time (info["device_us"], from the profiler) below
                                           value microseconds;
           "gbps_at_least" (value): effective GB/s >= value;
           "faster_than" (impl, value): the median of row `impl` of the same group / this median >= value;
           "overhead_at_most" (impl, value): this median / the median of row `impl` - 1 <= value (a fraction);
           "vs_reference_gbps": GB/s as a fraction of the group's reference row (memcpy); reported, no verdict.
    """
    out = {"group": row["group"], "impl": row["impl"], "goal": g.get("label", g["kind"])}
    if g["kind"] == "speedup_at_least":
        s = row["speedup"]
        out["measured"] = None if s is None else f"{s:.1f}x vs {row['baseline']}"
        target = f", target {g['target']}x" if g.get("target") else ""
        out["wanted"] = f">= {g['value']}x{target}"
        out["met"] = None if s is None else s >= g["value"]
    elif g["kind"] == "median_below_us":
        us = row["median_s"] * 1e6
        out["measured"] = f"{us:.1f} us"
        out["wanted"] = f"< {g['value']} us"
        out["met"] = us < g["value"]
    elif g["kind"] == "device_time_below_us":
        us = row["info"].get("device_us")
        out["measured"] = None if us is None else f"{us:.1f} us of GPU time"
        out["wanted"] = f"< {g['value']} us"
        out["met"] = None if us is None else us < g["value"]
    elif g["kind"] == "gbps_at_least":
        out["measured"] = None if row["gbps"] is None else f"{row['gbps']:.0f} GB/s"
        out["wanted"] = f">= {g['value']} GB/s"
        out["met"] = None if row["gbps"] is None else row["gbps"] >= g["value"]
    elif g["kind"] == "faster_than":
        other = next((r for r in group if r["impl"] == g["impl"]), None)
        ratio = other["median_s"] / row["median_s"] if other is not None and row["median_s"] > 0 else None
        out["measured"] = None if ratio is None else f"{ratio:.2f}x vs {g['impl']}"
        out["wanted"] = f">= {g['value']}x vs {g['impl']}"
        out["met"] = None if ratio is None else ratio >= g["value"]
    elif g["kind"] == "overhead_at_most":
        other = next((r for r in group if r["impl"] == g["impl"]), None)
        extra = row["median_s"] / other["median_s"] - 1 if other is not None and other["median_s"] > 0 else None
        out["measured"] = None if extra is None else f"{100 * extra:+.1f}% vs {g['impl']}"
        out["wanted"] = f"<= {100 * g['value']:.0f}% over {g['impl']}"
        out["met"] = None if extra is None else extra <= g["value"]
    elif g["kind"] == "vs_reference_gbps":
        if reference is None or not reference["gbps"] or row["gbps"] is None:
            out["measured"] = None
        else:
            out["measured"] = (f"{row['gbps']:.2f} GB/s = {100 * row['gbps'] / reference['gbps']:.0f}% of "
                               f"{reference['impl']} ({reference['gbps']:.2f} GB/s)")
        out["wanted"] = "near memcpy speed (reported)"
        out["met"] = None
    else:
        raise ValueError(f"unknown goal kind {g['kind']!r} in benchmark {row['name']!r}")
    return out


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def render_markdown(summary: dict, plot_name=None) -> str:
    meta = summary["meta"]
    lines = [f"# pyseqpack benchmarks: {meta.get('label') or meta.get('device', '?')}", ""]
    if meta.get("label"):
        lines.append(f"- machine: {meta['label']}")
    lines.append(f"- device: {meta.get('device', '?')}")
    lines.append(f"- date: {meta.get('date', '?')}")
    lines.append(f"- command: `{meta.get('command', '?')}`")
    if meta.get("pytest_command"):
        lines.append(f"- pytest command: `{meta['pytest_command']}`")
    lines.append(f"- mode: {meta.get('mode', '?')}, cold L2: {meta.get('cold_l2', '?')}, "
                 f"CPU threads of the benchmarks: {meta.get('cpu_threads', '?')}")
    for key, when in (("load_average_start", "start"), ("load_average", "end")):
        if meta.get(key):
            lines.append(f"- load average at the {when} (1/5/15 min): " + " / ".join(f"{x:.2f}" for x in meta[key]))
    if meta.get("malloc_env"):
        lines.append("- malloc environment: " + ", ".join(f"{k}={v}" for k, v in meta["malloc_env"].items()))
    vers = meta.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if v))
    lines.append("")
    lines.append("Speedup = the group's baseline median / this median (higher is better). GB/s = the bytes "
                 "listed in each suite's notes / median. Peak memory: CUDA only, above the live inputs. "
                 "The minimum shows how far other load on the machine pushed the median.")
    if summary["goals"]:
        lines += ["", "## Goals", "", "| goal | implementation | measured | wanted | met |", "|---|---|---|---|---|"]
        for g in summary["goals"]:
            met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
            lines.append(f"| {g['goal']} | {g['impl']} | {g['measured'] or 'not measured'} | {g['wanted']} | {met} |")
    if summary.get("fits"):
        lines += ["", "## Bandwidth fit", "",
                  "Each implementation's medians over the sizes of one series (the numpy collation groups), "
                  "fitted as median = fixed + bytes / bandwidth (least squares). GB/s here is the rate of each "
                  "extra byte; \"vs reference\" compares it with the reference row's own fit (memcpy); \"fixed\" "
                  "is the cost of a call that writes nothing (argument handling, allocations). A large "
                  "deviation means time is not linear in bytes and the line says little.", "",
                  "| series | implementation | sizes | GB/s per extra byte | vs reference | fixed per call "
                  "| max deviation |", "|---|---|---:|---:|---:|---:|---:|"]
        for f in sorted(summary["fits"], key=lambda f: (f["series"], _ROLE_ORDER.get(f["role"], 9), f["impl"])):
            vs = f["vs_reference"]
            lines.append(f"| {f['series']} | {f['impl']} | {f['sizes']} | {_fmt(f['gbps'], '.1f')} "
                         f"| {_fmt(None if vs is None else 100 * vs, '.0f')}{'%' if vs is not None else ''} "
                         f"| {f['fixed_s'] * 1e6:.1f} us | {100 * f['max_deviation']:.0f}% |")
    if summary.get("warm_cold"):
        lines += ["", "## Warm and cold", "",
                  "Warm: the same call back to back (the collation groups above). Cold: one call per round after "
                  "an untimed sweep of the caches (the \"cold\" groups), as a call in a training loop finds "
                  "them after the step's other work. Speedups are over transformers' collator timed the same "
                  "way on the same inputs.", "",
                  "| case | implementation | warm median | cold median | cold / warm | speedup warm | speedup cold |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for w in sorted(summary["warm_cold"], key=lambda w: (w["case"], _ROLE_ORDER.get(w["role"], 9), w["impl"])):
            warm = "-" if w["warm_s"] is None else _fmt_time(w["warm_s"])
            lines.append(f"| {w['case']} | {w['impl']}{' (baseline)' if w['role'] == 'baseline' else ''} "
                         f"| {warm} | {_fmt_time(w['cold_s'])} | {_fmt(w['cold_over_warm'], '.2f')} "
                         f"| {_fmt(w['speedup_warm'], '.1f')}{'x' if w['speedup_warm'] is not None else ''} "
                         f"| {_fmt(w['speedup_cold'], '.1f')}{'x' if w['speedup_cold'] is not None else ''} |")
    notes = {
        "collate": "bytes = output bytes (every tensor of the batch); the list/numpy groups run on the CPU.",
        "ce": "bytes = one read of the logits + one write of their gradient (2 x N x V x element size); "
              "every row is forward + backward (+ token accuracy unless marked loss-only).",
    }
    suites = {r["suite"] for r in summary["rows"]}
    for suite in [s for s in ("collate", "ce") if s in suites] + sorted(suites - {"collate", "ce"}):
        lines += ["", f"## {suite}", ""]
        if suite in notes:
            lines += [notes[suite], ""]
        lines += ["| group | implementation | median | min | IQR | speedup | GB/s | peak mem |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in summary["rows"] if r["suite"] == suite), key=_row_order):
            peak = r["peak_mem_bytes"]
            lines.append(
                f"| {r['group']} | {r['impl']}{' (baseline)' if r['role'] == 'baseline' else ''} "
                f"| {_fmt_time(r['median_s'])} | {_fmt_time(r['min_s'])} | {_fmt_time(r['iqr_s'])} "
                f"| {_fmt(r['speedup'], '.2f')}{'x' if r['speedup'] is not None else ''} "
                f"| {_fmt(r['gbps'], '.2f')} | {_fmt(None if peak is None else peak / 2**20, '.0f')}"
                f"{' MiB' if peak is not None else ''} |"
            )
    if plot_name:
        lines += ["", f"![speedup]({plot_name})"]
    return "\n".join(lines) + "\n"


_ROLE_ORDER = {"baseline": 0, "ours": 1, "other": 2, "reference": 3}


def _row_order(r):
    """Groups by kind, then by size (longest row; tokens, then vocab), then baseline first."""
    i = r["info"]
    return (i.get("order", 0), i.get("max_len", 0), i.get("tokens", 0), i.get("vocab", 0), r["group"],
            _ROLE_ORDER.get(r["role"], 9), r["impl"])


# Plot: one figure, panels of at most MAX_SERIES series each (a suite's rows are split by input kind, dtype, ...).
MAX_SERIES = 8

_INPUT_TITLES = {
    "list": "Python list rows", "numpy": "numpy rows", "tensor": "CPU tensor rows",
    "flat-cpu": "flat int64 buffer + offsets, CPU", "flat-cuda": "flat int64 buffer + offsets, GPU",
}


def _panel_of(row: dict):
    """(suite, panel title) of a row: collation split by input kind (cold calls and the drop-ins apart),
    cross-entropy by dtype."""
    info, suite = row["info"], row["suite"]
    if suite == "collate":
        if info.get("cache") == "cold":
            return suite, "collation, cold calls (caches swept before each call)"
        if row["group"].startswith("collators"):
            return suite, "each drop-in collator vs the class it replaces, Python lists"
        kind = info.get("input")
        return suite, f"collation, {_INPUT_TITLES.get(kind, kind)}"
    if suite == "ce":
        return suite, f"cross-entropy, forward + backward, {info.get('dtype', '?')} logits"
    return suite, suite


def _category(row: dict) -> str:
    """The x tick of a row: its group's shape, short."""
    info = row["info"]
    if row["suite"] == "collate":
        if row["group"].startswith("collators"):
            return _wrap(row["group"].split()[1].replace("_", " ").replace("+", " + "), 10)
        shape = f"B={info.get('batch', '?')}\n{info.get('len_lo', '?')}-{info.get('len_hi', '?')}"
        return f"{info.get('input')} {shape}" if info.get("cache") == "cold" else shape
    if row["suite"] == "ce":
        return f"N={info.get('tokens', '?')}\nV={info.get('vocab', '?')}"
    return row["group"]


_XLABELS = {("collate", False): "batch size B, row lengths (tokens, uniform)",
            ("collate", True): "B=32 rows of 64-512 tokens; collator", ("ce", False): "tokens N, vocabulary size V"}


def _series_of(row: dict) -> str:
    if row["group"].startswith("collators") and row["role"] == "ours":
        return "pyseqpack's drop-in of that class"
    return row["impl"]


def _is_reference(row: dict) -> bool:
    """Rows that bound what an implementation can do rather than compete: memcpy (role "reference") and the
    clone of the finished batch (the least a collator returning fresh tensors does)."""
    return row["role"] == "reference" or row["impl"].startswith("clone of")


def _plot_panels(summary: dict) -> list:
    """[(suite, title, categories, {series: [(category, speedup)]}, {series: kind}, baselines)], every panel at
    most MAX_SERIES series; kind is "ours", "other" or "reference"."""
    grouped = {}
    suites = {"collate": 0, "ce": 1}
    for r in sorted(summary["rows"], key=lambda r: (suites.get(r["suite"], 2), r["suite"], _row_order(r))):
        if r["speedup"] is None:
            continue
        grouped.setdefault(_panel_of(r), []).append(r)
    panels = []
    for (suite, title), rows in grouped.items():
        categories = list(dict.fromkeys(_category(r) for r in rows))
        baselines = sorted({r["impl"] for r in rows if r["role"] == "baseline"})
        series, kinds = {}, {}
        for r in rows:
            if r["role"] == "baseline":
                continue
            name = _series_of(r)
            series.setdefault(name, []).append((_category(r), r["speedup"]))
            kinds[name] = "reference" if _is_reference(r) else "ours" if r["role"] == "ours" else "other"
        if not series:
            continue
        refs = [n for n in series if kinds[n] == "reference"]
        rest = sorted((n for n in series if kinds[n] != "reference"), key=lambda n: (kinds[n] != "ours", n))
        parts = [("", rest)]
        if suite == "ce" and len(series) > MAX_SERIES:
            # every implementation with token accuracy in one panel, loss-only rows in the other
            parts = [(": with token accuracy", [n for n in rest if "loss only" not in n]),
                     (": loss only", [n for n in rest if "loss only" in n])]
        room = max(MAX_SERIES - len(refs), 1)
        for what, names in parts:
            chunks = [names[i:i + room] for i in range(0, len(names), room)] or [[]]
            for i, chunk in enumerate(chunks):
                part = f" ({i + 1}/{len(chunks)})" if len(chunks) > 1 else ""
                chosen = chunk + refs
                panels.append((suite, title + what + part, categories, {n: series[n] for n in chosen},
                               {n: kinds[n] for n in chosen}, baselines))
    return panels


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def plot(summary: dict, path) -> bool:
    """Speedup over each group's baseline, one panel per suite and input kind / dtype (split so that no panel
    holds more than MAX_SERIES series); x = the groups' shapes. False if there is nothing to plot.

    pyseqpack's rows: coloured solid lines, filled markers. Other implementations: coloured dashed lines, hollow
    markers. References (memcpy, the clone row): grey dotted lines, hollow markers. The baseline: the grey
    dashed line at 1x. Within a suite an implementation keeps its colour in every panel (when the suite has 10
    or fewer), and within a panel no two share one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = _plot_panels(summary)
    if not panels:
        return False
    colors = plt.get_cmap("tab10").colors
    greys = [("0.45", "s", ":"), ("0.2", "D", "-."), ("0.6", "^", (0, (1, 1)))]
    suite_colors = {}
    for suite in dict.fromkeys(p[0] for p in panels):
        names = list(dict.fromkeys(n for p in panels if p[0] == suite for n, k in p[4].items() if k != "reference"))
        names.sort(key=lambda n: next(p[4][n] != "ours" for p in panels if p[0] == suite and n in p[4]))
        suite_colors[suite] = {n: colors[i] for i, n in enumerate(names)} if len(names) <= len(colors) else None

    # Each suite starts a new row of two panels.
    ncols, cells, row_of = min(2, len(panels)), [], 0
    for suite in dict.fromkeys(p[0] for p in panels):
        mine = [p for p in panels if p[0] == suite]
        for i, p in enumerate(mine):
            cells.append((row_of + i // ncols, i % ncols, p))
        row_of += (len(mine) + ncols - 1) // ncols
    nrows = row_of
    # Under each row of plots, a row of legends as tall as its longest legend (in text lines).
    line_in = 0.25
    legend_lines = [1] * nrows
    for r, c, p in cells:
        lines = sum(_wrap(n, 46).count("\n") + 1 for n in p[3]) + 2
        legend_lines[r] = max(legend_lines[r], lines)
    plot_in = 4.6
    heights = [h for r in range(nrows) for h in (plot_in, line_in * legend_lines[r] + 0.3)]
    fig, grid = plt.subplots(2 * nrows, ncols, figsize=(6.8 * ncols, sum(heights) + 0.8), squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": heights})
    for row in grid:
        for a in row:
            a.axis("off")
    for r, c, (suite, title, categories, series, kinds, baselines) in cells:
        ax = grid[2 * r][c]
        ax.axis("on")
        palette = suite_colors[suite] or {}
        spare = iter(col for col in colors if col not in {palette.get(n) for n in series})
        n = len(series)
        step = min(0.09, 0.5 / max(n, 1))
        grey = iter(greys)
        for i, (name, pts) in enumerate(series.items()):
            pos = {cat: j for j, cat in enumerate(categories)}
            pts = sorted(pts, key=lambda p: pos[p[0]])
            xs = [pos[p[0]] + (i - (n - 1) / 2) * step for p in pts]
            ys = [p[1] for p in pts]
            kind = kinds[name]
            if kind == "reference":
                color, marker, ls = next(grey, greys[-1])
                style = dict(color=color, marker=marker, ls=ls, lw=1.6, mfc="white", mew=1.6, ms=8)
            else:
                color = palette.get(name) or next(spare, "black")
                style = dict(color=color, marker="o" if kind == "ours" else "s", ls="-" if kind == "ours" else "--",
                             lw=2.2 if kind == "ours" else 1.6, ms=8,
                             mfc=color if kind == "ours" else "white", mew=1.6)
            label = f"{name} (reference)" if kind == "reference" else name
            ax.plot(xs, ys, label=_wrap(label, 46), **style)
        base = "; ".join(baselines)
        if suite == "collate" and title.startswith("each drop-in"):
            base = "the transformers / TRL class each replaces"
        ax.axhline(1.0, color="0.35", lw=1.4, ls="--", label=_wrap(f"baseline = 1x: {base}", 46))
        ax.set_yscale("log")
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, fontsize=12)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_xlabel(_XLABELS.get((suite, title.startswith("each drop-in")), ""), fontsize=12)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.tick_params(axis="y", labelsize=12)
        ax.set_ylabel("speedup over the baseline (median time)", fontsize=12)
        ax.set_title(_wrap(title, 52), fontsize=14, fontweight="bold")
        ax.grid(True, which="major", alpha=0.35)
        handles, labels = ax.get_legend_handles_labels()
        grid[2 * r + 1][c].legend(handles, labels, fontsize=12, loc="upper center", ncol=1, frameon=False)
    meta = summary["meta"]
    fig.suptitle(f"pyseqpack: {meta.get('label') or meta.get('device', '?')}, {meta.get('date', '?')[:10]}\n"
                 f"{_wrap(meta.get('command', ''), 62 * ncols)}", fontsize=12)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_reports(raw: dict, out: Path) -> dict:
    """summary.json, results.md and speedup.png in ``out``; returns the summary."""
    summary = summarize(raw)
    has_plot = plot(summary, out / "speedup.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "results.md").write_text(render_markdown(summary, "speedup.png" if has_plot else None))
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def find_bench_dir(explicit=None) -> Path:
    """The bench/ folder: --bench-dir, else next to the package's source checkout, else ./bench."""
    if explicit is not None:
        cands = [Path(explicit)]
    else:
        cands = [Path(__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for c in cands:
        if all((c / f).is_file() for f in SUITE_FILES["all"] + ["conftest.py"]):
            return c.resolve()
    tried = ", ".join(str(c) for c in cands)
    where = "--bench-dir" if explicit is not None else "the bench/ folder"
    raise BenchError(
        f"{where} not found: looked for {', '.join(SUITE_FILES['all'])} and conftest.py in {tried}. "
        "The benchmarks live in the pyseqpack source checkout (they are not installed with the package): "
        "run from the checkout or pass --bench-dir PATH/TO/pyseqpack/bench."
    )


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m pyseqpack bench",
        description="Run pyseqpack's benchmarks (pytest-benchmark) and write JSON, markdown and a plot.",
        epilog="Arguments after `--` go to pytest unchanged (e.g. -- -k numpy).",
    )
    p.add_argument("--suite", choices=sorted(SUITE_FILES), default="all", help="which benchmarks (default all)")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="fewer shapes and rounds (a few minutes on CPU)")
    speed.add_argument("--smoke", action="store_true",
                       help="tiny shapes, few rounds: checks the harness, the numbers mean nothing")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/<device>-<date>/)")
    p.add_argument("--bench-dir", type=Path, help="the bench/ folder (default: next to the source checkout)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="device of the device benchmarks (default: cuda if available)")
    p.add_argument("--cold-l2", action="store_true", help="flush the caches before every timed round")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch / native threads of the CPU benchmarks (default 1: one DataLoader worker's share)")
    p.add_argument("--label", help="what the machine is, in words, printed in every report")
    p.add_argument("--from-json", type=Path, help="only re-render reports from an existing benchmark.json")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python -m pyseqpack bench" + ("" if not argv else " " + shlex.join(argv))
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    try:
        return _run(args, extra, command)
    except BenchError as e:
        print(f"pyseqpack bench: error: {e}", file=sys.stderr)
        return 2


def _run(args, extra, command) -> int:
    if args.from_json is not None:
        if not args.from_json.is_file():
            raise BenchError(f"--from-json {args.from_json}: no such file")
        raw = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
        out.mkdir(parents=True, exist_ok=True)
        write_reports(raw, out)
        print(f"pyseqpack bench: reports written to {out}")
        return 0

    import torch

    if args.cpu_threads < 1:
        raise BenchError(f"--cpu-threads must be >= 1, got {args.cpu_threads}")
    bench_dir = find_bench_dir(args.bench_dir)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device here")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    out = args.out or bench_dir / "results" / f"{env['device_slug']}-{env['date'][:10]}"
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "benchmark.json"
    if raw_path.exists():
        raw_path.unlink()  # never report a stale JSON if this run writes none
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    cmd = [sys.executable, "-m", "pytest", *[str(bench_dir / f) for f in SUITE_FILES[args.suite]],
           "-c", str(bench_dir / "pytest.ini"), "--rootdir", str(bench_dir), "-p", "no:cacheprovider",
           f"--benchmark-json={raw_path}", "--benchmark-group-by=group", "--benchmark-sort=name",
           "--benchmark-columns=median,iqr,rounds", f"--bench-mode={mode}", f"--bench-device={device}"]
    if args.cold_l2:
        cmd.append("--cold-l2")
    cmd.append(f"--cpu-threads={args.cpu_threads}")
    cmd += extra
    child_env = dict(os.environ)
    # Under TRITON_INTERPRET=1 Triton would "run" on CPU tensors through its interpreter: timings of that
    # are meaningless, so the benchmarks never run with it (the test suite sets it for correctness only).
    child_env.pop("TRITON_INTERPRET", None)
    child_env["PYSEQPACK_BENCH_COMMAND"] = command
    if args.label:
        child_env["PYSEQPACK_BENCH_LABEL"] = args.label
    print(f"pyseqpack bench: {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=str(bench_dir), env=child_env).returncode
    if not raw_path.is_file():
        print(f"pyseqpack bench: pytest exited with {rc} and wrote no {raw_path}", file=sys.stderr)
        return rc or 1
    raw = json.loads(raw_path.read_text())
    summary = write_reports(raw, out)
    print()
    print(render_markdown(summary))
    print(f"pyseqpack bench: wrote {raw_path.name}, summary.json, results.md, speedup.png in {out}")
    if rc != 0:
        print(f"pyseqpack bench: pytest exited with {rc} (failures above); the reports cover what ran",
              file=sys.stderr)
    return rc
