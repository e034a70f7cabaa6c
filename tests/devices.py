"""Where the tests run each backend.

"triton" runs on the GPU when there is one (real compiled kernels), else on CPU tensors through the interpreter
(TRITON_INTERPRET=1, which conftest sets before triton is imported when there is no GPU). The same parity tests
thus check the interpreter in CI and the real kernels on a GPU machine.
"""
import torch

from pyseqpack import _native

TRITON_DEVICE = torch.device("cpu" if _native.triton_available("cpu") else "cuda")


def device_for(backend: str) -> torch.device:
    """The device whose tensors `backend` is tested on."""
    if backend == "triton":
        return TRITON_DEVICE
    return torch.device("cuda" if backend == "cuda" else "cpu")
