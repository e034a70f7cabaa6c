"""Every script in examples/ runs end to end (2-3 steps, CPU) and prints the metrics it promises.

Each runs in a subprocess, as a user would run it; the accelerate example also runs data parallel on two CPU
processes, where its token accuracy is the all-reduced count."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(args, timeout=300):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # CPU: the same run on every machine
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def metric_values(out, name):
    values = [float(v) for v in re.findall(rf"\b{name} ([\d.]+)", out)]
    assert values, out
    assert all(0.0 <= v <= 1.0 for v in values), values
    return values


def test_plain_pytorch_loop():
    out = run([sys.executable, EXAMPLES / "plain_pytorch_sft.py", "--steps", "3", "--log-every", "1",
               "--batch-size", "4", "--device", "cpu"])
    assert len(metric_values(out, "token_accuracy")) == 3


def test_accelerate_loop_one_process():
    pytest.importorskip("accelerate")
    out = run([sys.executable, EXAMPLES / "accelerate_sft.py", "--steps", "2", "--log-every", "1",
               "--batch-size", "4", "--cpu"])
    assert len(metric_values(out, "token_accuracy")) == 2


def test_accelerate_loop_two_processes():
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the accelerate launcher is not installed next to this python")
    out = run([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", EXAMPLES / "accelerate_sft.py", "--steps", "2", "--log-every", "1",
               "--batch-size", "2", "--cpu"])
    assert len(metric_values(out, "token_accuracy")) == 2  # printed by the main process only


def test_trainer_seq2seq():
    out = run([sys.executable, EXAMPLES / "trainer_seq2seq.py", "--steps", "2", "--batch-size", "4", "--cpu"])
    assert len(metric_values(out, "token_accuracy")) >= 1
    assert len(metric_values(out, "eval_token_accuracy")) >= 1


def test_trl_sft():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = run([sys.executable, EXAMPLES / "trl_sft.py", "--steps", "2", "--batch-size", "4", "--cpu"])
    assert len(metric_values(out, "mean_token_accuracy")) == 2
