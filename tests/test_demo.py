"""`python -m pyseqpack demo`: it runs, both sides agree step by step, a disagreement is caught, bad flags are
refused; and the shipped dataset and the offline tokenizer behave as documented."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from pyseqpack import demo  # noqa: E402

STEP_LINE = re.compile(r"^\s*(\d+) \|\s+([\d.]+)\s+([\d.]+) \|\s+([\d.]+)\s+([\d.]+) \| (.*)$")


def step_lines(text):
    return [m.groups() for m in map(STEP_LINE.match, text.splitlines()) if m]


def test_python_m_pyseqpack_demo_runs_and_both_sides_agree():
    proc = subprocess.run(
        [sys.executable, "-m", "pyseqpack", "demo", "--steps", "3", "--batch-size", "4", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "== t5:" in out and "== llama:" in out
    rows = step_lines(out)
    assert len(rows) == 6, out
    for step, loss_a, loss_b, acc_a, acc_b, flag in rows:
        # the printed numbers themselves agree (the demo's own check is tested separately below)
        assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-4)
        assert float(acc_b) == pytest.approx(float(acc_a), abs=1e-3)
        assert flag == "ok"
    assert out.count("agreement: all steps agree") == 2
    timings = re.findall(r"^\s+(collate|loss|both)\s+([\d.]+) ms\s+([\d.]+) ms\s+(.+)$", out, re.M)
    assert [t[0] for t in timings] == ["collate", "loss", "both"] * 2, out
    # 3 steps, 2 of them warm-up: one timed step is too few for a verdict, and the demo says so
    assert out.count("median per step over steps 2-2 (steps 0-1: warm-up, not timed)") == 2, out
    assert all(t[3].startswith("too few timed steps to judge (1;") for t in timings), out
    assert out.count("the two runs' losses differ by at most") == 2


def test_demo_flags_a_disagreement(monkeypatch, capsys):
    # A pyseqpack side that is 1% off must be reported, and the exit status must say so.
    real = demo._fused_loss

    def off_by_one_percent(kind):
        fn = real(kind)

        def loss_fn(logits, labels):
            loss, correct, total = fn(logits, labels)
            return loss * 1.01, correct, total

        return loss_fn

    monkeypatch.setattr(demo, "_fused_loss", off_by_one_percent)
    rc = demo.main(["--model", "llama", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--no-progress",
                    "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "MISMATCH: fused loss" in out and "on the same logits" in out
    assert "2 step(s) MISMATCHED" in out


def test_judge_gives_a_ratio_only_when_the_timings_carry_it():
    ms = 1e-3
    # clear: 5 ms against 1 ms, quartile spreads far below the 4 ms between them
    a = [5 * ms + i * 0.01 * ms for i in range(10)]
    b = [1 * ms + i * 0.002 * ms for i in range(10)]
    ratio, why = demo.judge(a, b)
    assert why is None and ratio == pytest.approx(statistics.median(a) / statistics.median(b))
    # overlapping: medians 1.1 vs 1.0 ms, but each side's quartiles spread over 0.5 ms
    a = [(1.1 + 0.12 * (i % 5 - 2)) * ms for i in range(10)]
    b = [(1.0 + 0.12 * (i % 5 - 2)) * ms for i in range(10)]
    ratio, why = demo.judge(a, b)
    assert ratio is None and why.startswith("too noisy to judge: a quartile spread of")
    # the medians (3 vs 1.5 ms) differ by more than the quartiles spread (1 ms), but the halves disagree (the
    # load changed during the run): 3x in the first half, 1.5x in the second
    ratio, why = demo.judge([3 * ms] * 12, [1 * ms] * 6 + [2 * ms] * 6)
    assert ratio is None and "the first and second half of the steps give 3.00x and 1.50x" in why
    # halves on both sides of 1
    ratio, why = demo.judge([1 * ms] * 6 + [4 * ms] * 6, [2 * ms] * 12)
    assert ratio is None and why.startswith("too noisy to judge")
    # too few steps
    ratio, why = demo.judge([1 * ms] * 5, [2 * ms] * 5)
    assert ratio is None and why.startswith("too few timed steps to judge (5;")


@pytest.mark.parametrize("argv, message", [
    (["--warmup", "3", "--steps", "3"], "--warmup (3) must be below --steps (3)"),
    (["--device", "nonsense"], "is not a torch device"),
    pytest.param(["--device", "cuda"], "torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_demo_refuses_bad_arguments(argv, message, capsys):
    assert demo.main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_argparse_checks_counts():
    with pytest.raises(SystemExit) as e:
        demo.main(["--steps", "0"])
    assert e.value.code == 2


def test_shipped_dataset_and_offline_tokenizer():
    pairs = demo.load_pairs()
    assert len(pairs) >= 100
    assert all(a.strip() and b.strip() for a, b in pairs)
    tok = demo.build_tokenizer(pairs, vocab_size=512)
    assert len(tok) == 512
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.padding_side == "right"
    for text in (pairs[0][0], pairs[-1][1]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids).strip() == text
    feats = demo.causal_features(tok, pairs[:4], max_length=10)
    for f, (prompt, _) in zip(feats, pairs[:4]):
        assert f["input_ids"][0] == tok.bos_token_id and len(f["input_ids"]) <= 10
        assert f["prompt_length"] == min(1 + len(tok(prompt, add_special_tokens=False)["input_ids"]), 10)
    base = demo.baseline_sft_features(feats)
    for f, b in zip(feats, base):
        n = f["prompt_length"]
        assert b["labels"] == [-100] * n + f["input_ids"][n:]
