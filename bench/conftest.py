"""pytest setup of the benchmarks: options, the session config, and the metadata of the JSON.

Options (``python -m pyseqpack bench`` passes them; plain ``pytest bench/...`` works too):
  --bench-mode full|quick|smoke   shapes and time budget (smoke: tiny shapes, checks the harness only)
  --bench-device cpu|cuda         device of the device benchmarks (default: cuda when available)
  --cold-l2                       flush the caches (untimed) before every timed round
  --cpu-threads N                 torch (and pyseqpack native) threads of the CPU benchmarks (default 1)
"""
from __future__ import annotations

import os
import shlex
import sys

import pytest
import torch

from helpers import BenchConfig


def pytest_addoption(parser):
    g = parser.getgroup("pyseqpack benchmarks")
    g.addoption("--bench-mode", choices=["full", "quick", "smoke"], default="full",
                help="shapes and time budget per case (default full)")
    g.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                help="device of the device benchmarks (default: cuda when available)")
    g.addoption("--cold-l2", action="store_true", help="flush the caches before every timed round")
    g.addoption("--cpu-threads", type=int, default=1,
                help="torch/native threads of the CPU benchmarks (default 1: a DataLoader worker's share, and "
                     "robust against other load on the machine)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: torch sees no CUDA device here")
    return torch.device(name)


def pytest_configure(config):
    config._pyseqpack_load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter runs Triton kernels as numpy loops: timing them measures nothing.
        raise pytest.UsageError("unset TRITON_INTERPRET before running the benchmarks (it is for tests only)")
    if config.getoption("--cpu-threads") < 1:
        raise pytest.UsageError("--cpu-threads must be >= 1")


@pytest.fixture(scope="session")
def bench_cfg(pytestconfig) -> BenchConfig:
    return BenchConfig(
        device=_device(pytestconfig),
        mode=pytestconfig.getoption("--bench-mode"),
        cold_l2=pytestconfig.getoption("--cold-l2"),
        cpu_threads=pytestconfig.getoption("--cpu-threads"),
    )


@pytest.fixture(autouse=True)
def _cpu_threads(bench_cfg):
    """Every benchmark runs with --cpu-threads torch threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(bench_cfg.cpu_threads)
    yield
    torch.set_num_threads(before)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from pyseqpack.bench import environment

    meta = environment(str(_device(config)))
    pytest_command = shlex.join([os.path.basename(sys.executable), "-m", "pytest", *sys.argv[1:]])
    meta.update({
        "command": os.environ.get("PYSEQPACK_BENCH_COMMAND") or pytest_command,
        "pytest_command": pytest_command,
        "label": os.environ.get("PYSEQPACK_BENCH_LABEL"),
        "mode": config.getoption("--bench-mode"),
        "cold_l2": config.getoption("--cold-l2"),
        "cpu_threads": config.getoption("--cpu-threads"),
        "load_average_start": config._pyseqpack_load_start,
    })
    output_json["pyseqpack"] = meta
    # Every round's time would make the file megabytes; the statistics (min, median, IQR, ...) stay.
    for bench in output_json["benchmarks"]:
        bench["stats"].pop("data", None)


def pytest_terminal_summary(terminalreporter, config):
    """Speedups over each group's baseline (pytest-benchmark's own table only compares to the fastest)."""
    session = getattr(config, "_benchmarksession", None)
    done = [b for b in getattr(session, "benchmarks", []) if not getattr(b, "has_error", False)]
    if not done:
        return
    from pyseqpack.bench import summarize

    rows = summarize({"benchmarks": [b.as_dict(include_data=False) for b in done]})["rows"]
    tr = terminalreporter
    tr.section("speedup over each group's baseline")
    for r in sorted(rows, key=lambda r: (r["group"], r["role"] != "baseline", r["impl"])):
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        gbps = "-" if r["gbps"] is None else f"{r['gbps']:.2f} GB/s"
        tr.write_line(f"{r['group']:<44} {r['impl']:<44} {r['median_s'] * 1e6:>12.1f} us {speed:>9} {gbps:>12}")
