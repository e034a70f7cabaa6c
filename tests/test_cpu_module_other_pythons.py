"""The C++ CPU module (pyseqpack._C) built for and run by CPython versions other than the one running the tests.

Its reading of Python ints has version-specific code (the digits of an int before 3.12, the PyUnstable compact-int
API from 3.12 on; longintrepr.h before 3.11), and the package supports CPython 3.9+, while CI runs one version.
So this builds csrc/*.cpp against the oldest and the newest other CPython found on the machine (on PATH as
python3.X, or under ~/.pyenv/versions) and runs a stdlib-only script there that fills outputs through psm_fill
and compares them with values written out from the definition. The module needs neither torch nor numpy, so a
bare interpreter with its headers is enough. Machines with no other CPython skip, saying so.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

_PROBE = ("import sys, sysconfig, os; inc = sysconfig.get_paths()['include']; "
          "print(sys.version_info[0], sys.version_info[1], inc, sysconfig.get_config_var('EXT_SUFFIX'), "
          "os.path.exists(os.path.join(inc, 'Python.h')))")


def _other_pythons() -> list:
    """[(version, executable, include dir, extension suffix)]: the oldest and the newest CPython >= 3.9 found
    whose minor version differs from this one and whose headers are installed."""
    candidates = [shutil.which(f"python3.{m}") for m in range(9, 16)]
    candidates += glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
    found = {}
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", _PROBE], capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if len(out) != 5 or out[4] != "True":
            continue
        version = (int(out[0]), int(out[1]))
        if version >= (3, 9) and version != sys.version_info[:2]:
            found.setdefault(version, (exe, out[2], out[3]))
    if not found:
        return []
    picks = sorted({min(found), max(found)})
    return [(v, *found[v]) for v in picks]


PYTHONS = _other_pythons()
COMPILER = shutil.which("c++") or shutil.which("g++")

# Run by the other interpreter, with the built module's folder as argv[1]. Stdlib only: array.array outputs
# (their buffer_info() gives the address psm_fill writes to) and array / memoryview rows for the buffer paths.
SCRIPT = textwrap.dedent(r'''
    import array, sys
    sys.path.insert(0, sys.argv[1])
    import _C

    NO_OUT = (0, 0, 0, 0, 0)

    def fill(rows, itemsize=8, pad=7):
        lens, other, longest, shortest, opened = _C.psm_row_lengths(rows, "input_ids")
        assert not other and bytes(lens) == array.array("q", [len(r) for r in rows]).tobytes()
        B, L = len(rows), longest
        ids, att = (array.array("q" if itemsize == 8 else "i", [0]) * (B * L) for _ in range(2))
        addr = (ids.buffer_info()[0], att.buffer_info()[0]) + NO_OUT
        _C.psm_fill(B, L, L, -1, 0, 0, opened, None, 0, None, None, None, None, None, (), addr, (), pad, -100,
                    0, itemsize, 1, 1)
        return [list(ids[b * L:(b + 1) * L]) for b in range(B)], [list(att[b * L:(b + 1) * L]) for b in range(B)]

    def padded(rows, pad=7):
        L = max(len(r) for r in rows)
        return [[int(v) for v in r] + [pad] * (L - len(r)) for r in rows]

    class Index:  # an int-like object: read through __index__
        def __init__(self, v):
            self.v = v
        def __index__(self):
            return self.v

    # Python ints: one-digit (compact) ones, multi-digit ones, both int64 bounds, bool, __index__.
    rows = [[1, 2, 3, -5, 0], [2**40, -(2**40), 2**62, True, False], [Index(4), 2**31, -(2**31) - 1],
            [2**63 - 1, -(2**63)], [], (8, 9)]
    ids, att = fill(rows)
    assert ids == padded(rows), ids
    assert att == [[1] * len(r) + [0] * (5 - len(r)) for r in rows], att

    # Buffers: int32, uint8, a strided int64 view.
    int64 = array.array("q", range(10))
    rows = [array.array("i", [5, -6]), array.array("B", [1, 2, 255]), memoryview(int64)[::3]]
    ids, _ = fill(rows)
    assert ids == padded(rows), ids

    # Errors name the example and the index.
    for rows, itemsize, message in [([[1, 2**63]], 8, "input_ids[0][1]: 9223372036854775808 is out of the int64 range"),
                                    ([[1], [1, 1.5]], 8, "input_ids[1][1]: expected an int, got float"),
                                    ([[None]], 8, "input_ids[0][0]: expected an int, got NoneType"),
                                    ([[2**31]], 4, "input_ids[0][0]: 2147483648 does not fit in the output dtype int32")]:
        try:
            fill(rows, itemsize)
        except (TypeError, ValueError) as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"no error for {rows!r}")
    print("ok", sys.version.split()[0])
''')


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler (c++ / g++) on PATH")
@pytest.mark.parametrize(
    "python", PYTHONS or [pytest.param(None, marks=pytest.mark.skip(reason="no other CPython >= 3.9 with its headers "
                                                                             "on this machine"))],
    ids=[f"py{v[0]}.{v[1]}" for v, *_ in PYTHONS] or ["none"],
)
def test_cpu_module_under_other_python(python, tmp_path):
    version, exe, include, suffix = python
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    build = subprocess.run(
        [COMPILER, "-O1", "-std=c++17", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unused-function",
         f"-I{CSRC}", f"-I{include}", *sources, "-o", str(tmp_path / f"_C{suffix}")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, f"the C++ CPU module does not build for Python {version}:\n{build.stderr[-3000:]}"
    run = subprocess.run([exe, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), (
        f"Python {version} ({exe}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
