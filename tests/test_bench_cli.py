"""`python -m pyseqpack bench`: the report math on hand-made pytest-benchmark JSON, the error for a missing
bench/ folder, and one end-to-end run of the real benchmarks on tiny shapes (--smoke, about 10 s)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyseqpack import bench

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def _bench(group, impl, role, median, *, nbytes=None, suite="collate", **info):
    extra = {"suite": suite, "impl": impl, "role": role, "bytes": nbytes, **info}
    return {"group": group, "name": f"test[{impl}]", "extra_info": extra,
            "stats": {"median": median, "iqr": 0.0, "rounds": 5}}


def _raw():
    return {
        "pyseqpack": {"device": "test device", "date": "2025-01-01T00:00:00+00:00",
                      "command": "python -m pyseqpack bench --quick", "versions": {"torch": "9.9"}},
        "benchmarks": [
            _bench("g1", "hf", "baseline", 2e-3, nbytes=10**6, max_len=512, input="list"),
            _bench("g1", "ours", "ours", 5e-4, nbytes=10**6, max_len=512, input="list",
                   goal={"kind": "speedup_at_least", "value": 20, "target": 30, "label": "drop-in"}),
            _bench("g1", "memcpy", "reference", 1e-4, nbytes=10**6),
            _bench("g2", "kernel", "ours", 4e-5, nbytes=None, max_len=4096, input="flat",
                   goal={"kind": "median_below_us", "value": 50}),
            _bench("g2", "launch", "ours", 6e-5, nbytes=None, max_len=4096, input="flat", device_us=12.5,
                   goal=[{"kind": "median_below_us", "value": 50, "label": "wall"},
                         {"kind": "device_time_below_us", "value": 20, "label": "gpu"}]),
            _bench("ce1", "eager", "baseline", 0.3, nbytes=4 * 10**9, suite="ce", vocab=32000, tokens=512,
                   dtype="fp32"),
            _bench("ce1", "fused", "ours", 0.1, nbytes=4 * 10**9, suite="ce", vocab=32000, tokens=512,
                   dtype="fp32", goal=[{"kind": "gbps_at_least", "value": 50, "label": "bandwidth"},
                                       {"kind": "faster_than", "impl": "liger", "value": 1.5, "label": "vs liger"},
                                       {"kind": "speedup_at_least", "value": 2.5, "label": "vs eager"},
                                       {"kind": "overhead_at_most", "impl": "fused loss only", "value": 0.03,
                                        "label": "accuracy overhead"}]),
            _bench("ce1", "fused loss only", "ours", 0.098, nbytes=4 * 10**9, suite="ce", vocab=32000, tokens=512,
                   dtype="fp32"),
            _bench("ce1", "liger", "other", 0.14, nbytes=4 * 10**9, suite="ce", vocab=32000, tokens=512,
                   dtype="fp32"),
        ],
    }


def test_summary_speedup_gbps_and_goals():
    s = bench.summarize(_raw())
    rows = {(r["group"], r["impl"]): r for r in s["rows"]}
    # speedup = baseline median / median; GB/s = bytes / median / 1e9
    assert rows["g1", "ours"]["speedup"] == pytest.approx(2e-3 / 5e-4)
    assert rows["g1", "hf"]["speedup"] == pytest.approx(1.0)
    assert rows["g1", "ours"]["gbps"] == pytest.approx(10**6 / 5e-4 / 1e9)
    assert rows["ce1", "fused"]["gbps"] == pytest.approx(40.0)
    assert rows["ce1", "fused"]["speedup"] == pytest.approx(3.0)
    assert rows["g2", "kernel"]["speedup"] is None  # no baseline in its group
    assert rows["g2", "kernel"]["gbps"] is None  # no byte count
    goals = {g["impl"]: g for g in s["goals"]}
    assert goals["ours"]["met"] is False  # 4x < 20x
    assert goals["kernel"]["met"] is True  # 40 us < 50 us
    launch = {g["goal"]: g for g in s["goals"] if g["impl"] == "launch"}
    assert launch["wall"]["met"] is False  # 60 us of wall clock
    assert launch["gpu"]["met"] is True and launch["gpu"]["measured"] == "12.5 us of GPU time"  # 12.5 < 20
    # a list of goals on one row, each judged on its own
    fused = {g["goal"]: g for g in s["goals"] if g["impl"] == "fused"}
    assert fused["bandwidth"]["met"] is False  # 40 GB/s < 50
    assert fused["vs liger"]["met"] is False and fused["vs liger"]["measured"].startswith("1.40x")  # 0.14 / 0.1
    assert fused["vs eager"]["met"] is True  # 3.0x >= 2.5
    assert fused["accuracy overhead"]["met"] is True and fused["accuracy overhead"]["measured"].startswith("+2.0%")


def test_bandwidth_fit_splits_fixed_and_per_byte_costs():
    # a numpy series at three sizes: ours takes 8 us + bytes at 40 GB/s, memcpy 1 us + bytes at 50 GB/s; the
    # list series has two sizes only (no fit); rows without bytes or outside any series are left out.
    raw = {"pyseqpack": {}, "benchmarks": []}
    for nbytes in (4 * 10**5, 8 * 10**5, 6 * 10**6):
        g = f"numpy {nbytes}"
        raw["benchmarks"] += [_bench(g, "ours", "ours", 8e-6 + nbytes / 40e9, nbytes=nbytes, fit_series="numpy"),
                              _bench(g, "memcpy", "reference", 1e-6 + nbytes / 50e9, nbytes=nbytes,
                                     fit_series="numpy"),
                              _bench(g, "no bytes", "other", 1e-3, fit_series="numpy"),
                              _bench(g, "not in a series", "other", 1e-3, nbytes=nbytes)]
    for nbytes in (10**5, 10**6):
        raw["benchmarks"].append(_bench(f"list {nbytes}", "ours", "ours", 1e-4, nbytes=nbytes, fit_series="list"))
    fits = {(f["series"], f["impl"]): f for f in bench.summarize(raw)["fits"]}
    assert set(fits) == {("numpy", "ours"), ("numpy", "memcpy")}
    ours = fits["numpy", "ours"]
    assert ours["gbps"] == pytest.approx(40.0) and ours["fixed_s"] == pytest.approx(8e-6)
    assert ours["vs_reference"] == pytest.approx(0.8) and ours["max_deviation"] == pytest.approx(0, abs=1e-9)
    assert ours["sizes"] == 3
    md = bench.render_markdown(bench.summarize(raw))
    assert "| numpy | ours | 3 | 40.0 | 80% | 8.0 us | 0% |" in md


def test_warm_and_cold_side_by_side():
    # warm group g: transformers 5 ms, ours 50 us; cold group: transformers 6 ms, ours 100 us
    raw = {"pyseqpack": {}, "benchmarks": [
        _bench("g", "hf", "baseline", 5e-3, input="list"),
        _bench("g", "ours", "ours", 5e-5, input="list"),
        _bench("g cold", "hf", "baseline", 6e-3, input="list", cache="cold", warm_group="g"),
        _bench("g cold", "ours", "ours", 1e-4, input="list", cache="cold", warm_group="g"),
        _bench("g cold", "new", "ours", 2e-4, input="list", cache="cold", warm_group="g"),  # no warm row
    ]}
    s = bench.summarize(raw)
    wc = {w["impl"]: w for w in s["warm_cold"]}
    assert set(wc) == {"hf", "ours", "new"}
    ours = wc["ours"]
    assert (ours["case"], ours["warm_s"], ours["cold_s"]) == ("g", 5e-5, 1e-4)
    assert ours["cold_over_warm"] == pytest.approx(2.0)
    assert ours["speedup_warm"] == pytest.approx(100.0) and ours["speedup_cold"] == pytest.approx(60.0)
    assert wc["new"]["warm_s"] is None and wc["new"]["speedup_cold"] == pytest.approx(30.0)
    md = bench.render_markdown(s)
    assert "## Warm and cold" in md
    assert "| g | ours | 50.0 us | 100.0 us | 2.00 | 100.0x | 60.0x |" in md
    assert "| g | hf (baseline) | 5.00 ms | 6.00 ms | 1.20 | 1.0x | 1.0x |" in md
    assert "| g | new | - | 200.0 us | - | - | 30.0x |" in md


def test_plot_panels_split_suites_and_series():
    # one collation group with 11 implementations besides its baseline, memcpy and the clone row; cross-entropy
    # rows of two dtypes; cold rows
    rows = [_bench("collate[list] B=32 len=64-512", "hf", "baseline", 1e-2, input="list", batch=32, len_lo=64,
                   len_hi=512),
            _bench("collate[list] B=32 len=64-512", "memcpy", "reference", 1e-5, input="list", batch=32),
            _bench("collate[list] B=32 len=64-512", "clone of the finished batch", "other", 2e-5, input="list",
                   batch=32)]
    rows += [_bench("collate[list] B=32 len=64-512", f"impl{i:02d}", "ours" if i % 2 else "other", 1e-3 / (i + 1),
                    input="list", batch=32) for i in range(11)]
    rows += [_bench(f"ce N=512 V=32000 {d}", "eager", "baseline", 1.0, suite="ce", dtype=d, tokens=512, vocab=32000)
             for d in ("fp32", "bf16")]
    rows += [_bench(f"ce N=512 V=32000 {d}", "fused", "ours", 0.5, suite="ce", dtype=d, tokens=512, vocab=32000)
             for d in ("fp32", "bf16")]
    rows += [_bench("collate[list] B=32 len=64-512 cold", "hf", "baseline", 2e-2, input="list", cache="cold"),
             _bench("collate[list] B=32 len=64-512 cold", "ours", "ours", 1e-4, input="list", cache="cold")]
    panels = bench._plot_panels(bench.summarize({"pyseqpack": {}, "benchmarks": rows}))
    titles = [p[1] for p in panels]
    assert titles == ["collation, Python list rows (1/2)", "collation, Python list rows (2/2)",
                      "collation, cold calls (caches swept before each call)",
                      "cross-entropy, forward + backward, bf16 logits",
                      "cross-entropy, forward + backward, fp32 logits"]
    for suite, title, categories, series, kinds, baselines in panels:
        assert len(series) <= bench.MAX_SERIES
        assert "hf" not in series and "eager" not in series  # the baseline is the 1x line, not a series
    first, second = panels[0], panels[1]
    # memcpy and the clone row are drawn as references in both halves; the 11 others are split between them
    for p in (first, second):
        assert p[4]["memcpy"] == p[4]["clone of the finished batch"] == "reference"
        assert p[5] == ["hf"]
    split = [n for p in (first, second) for n in p[3] if p[4][n] != "reference"]
    assert sorted(split) == [f"impl{i:02d}" for i in range(11)]
    assert first[4]["impl01"] == "ours" and second[4]["impl10"] == "other"
    assert panels[3][3] == {"fused": [("N=512\nV=32000", 2.0)]}

    # a dtype with more than MAX_SERIES cross-entropy rows: the rows with accuracy apart from the loss-only ones
    g = "ce N=512 V=32000 bf16"
    ce = [_bench(g, "eager", "baseline", 1.0, suite="ce", dtype="bf16", tokens=512, vocab=32000)]
    ce += [_bench(g, f"fused[{b}]", "ours", 0.2, suite="ce", dtype="bf16", tokens=512, vocab=32000) for b in "abcde"]
    ce += [_bench(g, f"drop-in, loss only[{b}]", "ours", 0.2, suite="ce", dtype="bf16", tokens=512, vocab=32000)
           for b in "abcde"]
    panels = bench._plot_panels(bench.summarize({"pyseqpack": {}, "benchmarks": ce}))
    assert [(p[1], sorted(p[3])) for p in panels] == [
        ("cross-entropy, forward + backward, bf16 logits: with token accuracy", [f"fused[{b}]" for b in "abcde"]),
        ("cross-entropy, forward + backward, bf16 logits: loss only", [f"drop-in, loss only[{b}]" for b in "abcde"])]


def test_summary_rejects_two_baselines():
    raw = _raw()
    raw["benchmarks"].append(_bench("g1", "torch", "baseline", 1e-3))
    with pytest.raises(ValueError, match="g1.*two baselines"):
        bench.summarize(raw)


def test_markdown_and_plot_carry_the_metadata(tmp_path):
    s = bench.write_reports(_raw(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    for text in ("test device", "2025-01-01", "`python -m pyseqpack bench --quick`", "torch 9.9", "4.00x",
                 "| **no** |", "![speedup](speedup.png)"):
        assert text in md, text
    assert (tmp_path / "speedup.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((tmp_path / "summary.json").read_text())["meta"] == s["meta"]


def test_missing_bench_dir_is_a_clear_error(tmp_path, capsys):
    assert bench.main(["--bench-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--bench-dir" in err and str(tmp_path / "nowhere") in err and "bench_collate.py" in err


def test_smoke_run_end_to_end(tmp_path):
    out = tmp_path / "res"
    argv = ["--suite", "all", "--smoke", "--out", str(out), "--bench-dir", str(REPO / "bench"), "--label", "test box"]
    assert bench.main(argv) == 0
    raw = json.loads((out / "benchmark.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    meta = summary["meta"]
    assert meta["command"] == "python -m pyseqpack bench " + " ".join(argv[:7]) + " --label 'test box'"
    assert meta["versions"]["torch"] and meta["date"] and meta["device"] and meta["label"] == "test box"

    # Every speedup recomputed from pytest-benchmark's own medians.
    medians = {(b["group"], b["extra_info"]["impl"]): b["stats"]["median"] for b in raw["benchmarks"]}
    base = {b["group"]: b["stats"]["median"] for b in raw["benchmarks"] if b["extra_info"]["role"] == "baseline"}
    for r in summary["rows"]:
        assert r["speedup"] == pytest.approx(base[r["group"]] / medians[r["group"], r["impl"]])

    impls = {r["impl"] for r in summary["rows"]}
    for expected in ("transformers DataCollatorForSeq2Seq", "torch pad_sequence collator",
                     "pyseqpack DataCollatorForSeq2Seq", "pyseqpack pad_shift_mask[cpu]",
                     "pyseqpack pad_shift_mask[torch]", "torch ops (split + pad_sequence + masks)",
                     "torch eager (+argmax accuracy)", "pyseqpack fused_cross_entropy[torch]"):
        assert expected in impls, f"{expected!r} did not run (skipped?); ran: {sorted(impls)}"
    md = (out / "results.md").read_text()
    assert meta["command"] in md and "test box" in md
    # the cold cases ran, each beside its warm row
    cold = {w["impl"]: w for w in summary["warm_cold"]}
    assert set(cold) == {"transformers DataCollatorForSeq2Seq", "pyseqpack DataCollatorForSeq2Seq",
                         "pyseqpack pad_shift_mask[cpu]"}
    assert all(w["warm_s"] and w["cold_s"] and w["speedup_cold"] for w in cold.values())
    assert "## Warm and cold" in md
    assert (out / "speedup.png").read_bytes()[:8] == PNG_MAGIC

    # --from-json re-renders the same summary without running anything.
    again = tmp_path / "again"
    assert bench.main(["--from-json", str(out / "benchmark.json"), "--out", str(again)]) == 0
    assert json.loads((again / "summary.json").read_text())["rows"] == summary["rows"]


def test_before_after_table_on_tiny_cases():
    # bench/before_after.py's timing and table, with the installed pyseqpack on both sides (building an older
    # commit needs the repository's history and a compiler: the script's own run covers that)
    import importlib.util

    import pyseqpack

    spec = importlib.util.spec_from_file_location("before_after", REPO / "bench" / "before_after.py")
    ba = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ba)
    printed = []
    lines = ba.run(pyseqpack, pyseqpack, mode="smoke", blocks=3, cold_rounds=3, out=printed.append)
    assert lines[0].startswith("| case | call | warm before | warm after | cold before | cold after |")
    rows = [line.split(" | ") for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("| list B=4 len=8-32", "pad_shift_mask[cpu]"),
                                            ("| list B=4 len=8-32", "DataCollatorForSeq2Seq")]
    for r in rows:
        assert all(cell.endswith((" us", " ms")) for cell in r[2:8]), r
        assert "x -> " in r[8] and "x -> " in r[9], r
    assert printed[:len(lines)] == lines


def test_bench_dir_is_found_from_the_checkout(monkeypatch):
    # Editable install: next to the package; installed copy (CI): ./bench of the checkout being tested.
    monkeypatch.chdir(REPO)
    assert bench.find_bench_dir() == (REPO / "bench").resolve()
