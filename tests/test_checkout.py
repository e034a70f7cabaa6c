"""The checkout works wherever a user stands: Python run in the repository's root imports the installed,
compiled pyseqpack (never the source folder, which has no compiled modules), the PyPI package `kernels` (never
the Triton sources in kernels/), and the sdist carries everything the build and the tests need."""
import os
import subprocess
import sys
import tarfile

import pytest

import pyseqpack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CHECKOUT = os.path.exists(os.path.join(ROOT, "setup.py")) and os.path.isdir(os.path.join(ROOT, "pyseqpack"))
needs_checkout = pytest.mark.skipif(not IN_CHECKOUT, reason="the tests do not run from a pyseqpack checkout")


def _python(code, cwd, *args):
    return subprocess.run([sys.executable, *args, "-c", code] if code else [sys.executable, *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@needs_checkout
def test_import_in_the_root_uses_the_installed_package():
    installed = os.path.dirname(os.path.abspath(pyseqpack.__file__))
    proc = _python("import pyseqpack, sys; from pyseqpack import _native; "
                   "print(pyseqpack.__file__); print(sys.modules['pyseqpack'] is pyseqpack); "
                   "print(_native.cpu_available()); print(pyseqpack.pad_shift_mask([[1, 2]])['input_ids'].tolist())",
                   ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    file, same, native, ids = proc.stdout.split("\n")[:4]
    assert os.path.dirname(os.path.abspath(file)) == installed
    assert same == "True" and ids == "[[1, 2]]"
    assert native == str(pyseqpack._native.cpu_available())


@needs_checkout
def test_python_m_in_the_root_uses_the_installed_package():
    proc = _python(None, ROOT, "-m", "pyseqpack", "env")
    assert proc.returncode == 0, proc.stderr[-3000:]
    installed = os.path.dirname(os.path.abspath(pyseqpack.__file__))
    assert f"({os.path.join(installed, '__init__.py')})" in proc.stdout.splitlines()[0]
    if pyseqpack._native.cpu_available():
        assert "cpu (C++): yes" in proc.stdout


@needs_checkout
def test_import_kernels_in_the_root_is_never_the_triton_sources():
    proc = _python("import importlib.util as u; s = u.find_spec('kernels'); "
                   "print(s.origin if s else None); print(list(s.submodule_search_locations or []) if s else [])",
                   ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin, locations = proc.stdout.split("\n")[:2]
    ours = os.path.join(ROOT, "kernels")
    assert not origin.startswith(ours), origin
    try:
        import importlib.metadata as md

        md.version("kernels")
    except Exception:  # noqa: BLE001 - the PyPI package is not installed: our folder is at most a namespace portion
        return
    assert origin not in ("None", "") and ours not in locations, proc.stdout


@needs_checkout
def test_source_folder_without_an_install_names_the_fix(tmp_path):
    """With no installed pyseqpack anywhere on sys.path, the source folder refuses to be imported and says how to
    install (a copy of the checkout's package, run with an interpreter that sees only it)."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "pyseqpack"), tmp_path / "pyseqpack",
                    ignore=shutil.ignore_patterns("_build_info.py", "*.so", "__pycache__"))
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", "import pyseqpack"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "holds no compiled modules" in proc.stderr and f"pip install {tmp_path}" in proc.stderr


@needs_checkout
def test_sdist_carries_sources_kernels_data_and_tests(tmp_path):
    pytest.importorskip("build")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check", "--outdir", str(tmp_path),
                           ROOT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sdist,) = list(tmp_path.glob("pyseqpack-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for path in ("setup.py", "pyproject.toml", "README.md", "csrc/pad_shift_mask.h", "csrc/pad_shift_mask_cpu.cpp",
                 "csrc/pad_shift_mask.cu", "csrc/cross_entropy.cu", "csrc/cuda_common.cuh",
                 "kernels/pad_shift_mask.py", "kernels/cross_entropy.py", "pyseqpack/data/tiny_instructions.txt",
                 "tests/conftest.py", "tests/cuda_host_emulation/cuda_runtime.h"):
        assert path in names, path
    assert "kernels/__init__.py" not in names
    assert not any(n.endswith(".so") for n in names)
