"""Lazy loading of pyseqpack's native code, and which backends are usable here.

Nothing native is imported when ``pyseqpack`` is imported. Each loader runs on first use and caches
its result; a failure is remembered and re-raised, with a diagnostic, only when the backend is asked
for by name. ``backend="auto"`` silently falls back to the next backend instead.

* ``cpu_module()``    -> the CPython extension ``pyseqpack._C`` (C++ CPU kernels)
* ``cuda_library()``  -> a ``ctypes.CDLL`` of ``pyseqpack._cuda`` (CUDA kernels, C ABI, no torch headers)
* ``triton_available()`` -> whether ``triton`` imports and can run on the given device
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import os

__all__ = [
    "BackendUnavailable",
    "cpu_module",
    "cuda_library",
    "triton_available",
    "triton_interpret",
    "build_info",
    "available_backends",
]


class BackendUnavailable(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and how to fix it."""


_REBUILD_HINT = (
    "Reinstall with `pip install --no-build-isolation --no-deps .` from the pyseqpack checkout "
    "(set PYSEQPACK_CUDA=1 to force the CUDA build)."
)


def build_info() -> dict:
    """The metadata setup.py wrote next to the modules, or {} for a source tree that was never built."""
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return {}
    return dict(BUILD_INFO)


@functools.lru_cache(maxsize=None)
def _load_cpu():
    try:
        mod = importlib.import_module("pyseqpack._C")
    except ImportError as e:
        return None, f"the C++ extension pyseqpack._C is not importable ({e}). {_REBUILD_HINT}"
    from . import __version__

    built = build_info().get("version")
    if built is not None and built != __version__:
        return None, (
            f"pyseqpack._C was built for pyseqpack {built} but this is {__version__} (stale build). {_REBUILD_HINT}"
        )
    return mod, None


def cpu_module():
    """The C++ CPU extension module. Raises BackendUnavailable with a diagnostic when it is missing."""
    mod, err = _load_cpu()
    if mod is None:
        raise BackendUnavailable(f'backend "cpu" is unavailable: {err}')
    return mod


def cpu_available() -> bool:
    return _load_cpu()[0] is not None


def cpu_module_or_none():
    """The C++ CPU extension module, or None when it is missing (hot paths: one call instead of two)."""
    return _load_cpu()[0]


@functools.lru_cache(maxsize=None)
def _load_cuda():
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.find_spec("pyseqpack._cuda")
    if spec is None or spec.origin is None:
        why = "pyseqpack was built without CUDA kernels"
        info = build_info()
        if info and not info.get("cuda_built"):
            why += " (nvcc was not found or PYSEQPACK_CUDA=0 at build time)"
        return None, f"{why}; looked in {here}. {_REBUILD_HINT}"
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as e:
        return None, f"could not load {spec.origin}: {e}"
    return lib, None


def cuda_library():
    """The CUDA kernel library (ctypes.CDLL). Raises BackendUnavailable with a diagnostic when missing."""
    lib, err = _load_cuda()
    if lib is None:
        raise BackendUnavailable(f'backend "cuda" is unavailable: {err}')
    return lib


def cuda_built() -> bool:
    return _load_cuda()[0] is not None


def device_guard(device):
    """The context a launch on `device` runs in: `torch.cuda.device(device)` when it is a CUDA device other than
    the current one, else nothing (the usual case costs no device switch, two driver calls each way)."""
    import torch

    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"triton is not importable ({type(e).__name__}: {e}); `pip install triton`"
    return True, None


def triton_available(device=None) -> bool:
    """Triton runs CUDA tensors on a GPU, and CPU tensors only under TRITON_INTERPRET=1."""
    ok, _ = _load_triton()
    if not ok:
        return False
    if device is None:
        return True
    kind = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.is_available()
    return kind == "cpu" and triton_interpret()


def require_triton(device) -> None:
    ok, err = _load_triton()
    if not ok:
        raise BackendUnavailable(f'backend "triton" is unavailable: {err}')
    if not triton_available(device):
        raise BackendUnavailable(
            f'backend "triton" cannot run on device {device}: Triton needs a CUDA device that torch can use, or '
            "CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        )


def available_backends(device=None) -> list:
    """Backends that can run on `device` here (the torch reference always can)."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    if dev.type == "cuda" and cuda_built() and torch.cuda.is_available():
        out.append("cuda")
    if dev.type == "cpu" and cpu_available():
        out.append("cpu")
    if triton_available(dev):
        out.append("triton")
    out.append("torch")
    return out
