"""Shared test setup.

Triton kernels run on CPU tensors through the interpreter when there is no GPU: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before anything imports it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyseqpack  # noqa: E402
from pyseqpack import _native  # noqa: E402


def pytest_report_header(config):
    return [
        f"pyseqpack {pyseqpack.__version__} from {os.path.dirname(pyseqpack.__file__)}",
        f"native cpu: {_native.cpu_available()}, cuda built: {_native.cuda_built()}, "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
    ]


def pytest_sessionstart(session):
    # A missing C++ extension would silently turn every "cpu" backend test into a skip: refuse instead.
    if not _native.cpu_available() and os.environ.get("PYSEQPACK_ALLOW_NO_NATIVE") != "1":
        raise pytest.UsageError(
            "pyseqpack._C is not importable; install the package first (`pip install .`). "
            f"Diagnostic: {_native._load_cpu()[1]}"
        )


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
