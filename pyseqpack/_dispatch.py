"""One dispatch mechanism for every op: which backend runs a call, what ``backend="auto"`` falls back to, and
the errors a caller sees.

An op builds one ``Dispatcher`` and registers a loader per native backend. A loader takes the output device and
returns the backend's launcher (a module or object with the op's common launcher signature), or raises
``BackendUnavailable`` saying why it cannot run there. The torch reference is always the last candidate and is
registered like any other backend.

Rules, the same for every op:

* ``backend`` must be ``"auto"`` or a registered name (ValueError otherwise).
* A backend asked for by name runs or raises: ``BackendUnavailable`` when its loader refuses the device, or the
  launch's own error. It never falls back.
* ``"auto"`` tries the device type's preference order (``auto={"cpu": ("cpu",), "cuda": ("cuda", "triton")}``)
  followed by the reference, skipping backends whose loader refuses the device. When a native launch fails with
  anything but the caller's error (``ValueError``, ``TypeError``: bad input raises the same on every backend),
  the failure is warned about once, that backend is skipped for the rest of the process, and the call is run by
  the next candidate. Launchers must therefore validate before writing anything.

Each op has one torch.library registration where torch needs to see it (the cross-entropy, for autograd and
torch.compile); the backend is chosen inside it, here. The collation op takes Python lists and numpy rows, which
a torch.library op cannot, so it calls the dispatcher directly; the choice for a device type is cached, so
``"auto"`` on the CPU costs one dictionary lookup.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import torch

from ._native import BackendUnavailable

__all__ = ["Dispatcher", "REFERENCE"]

REFERENCE = "torch"
_CALLER_ERRORS = (ValueError, TypeError)


class Dispatcher:
    """Backend choice, fallback and errors for one op (``name`` is how messages call it)."""

    def __init__(self, name: str, auto: Dict[str, Tuple[str, ...]]):
        self.name = name
        self._auto = {kind: tuple(order) for kind, order in auto.items()}
        self._loaders: Dict[str, Callable] = {}
        self._broken: Dict[str, BaseException] = {}
        self._auto_cache: Dict[torch.device, tuple] = {}
        self.backends: Tuple[str, ...] = ("auto",)

    def register(self, backend: str, loader: Callable) -> None:
        """``loader(device) -> launcher``; it raises BackendUnavailable when the backend cannot run on device."""
        self._loaders[backend] = loader
        self.backends = ("auto",) + tuple(self._loaders)
        self._auto_cache.clear()

    def _check_name(self, backend) -> None:
        if not isinstance(backend, str) or (backend != "auto" and backend not in self._loaders):
            raise ValueError(f"backend must be one of {self.backends}, got {backend!r}")

    def launcher(self, backend: str, device: torch.device):
        """The launcher of a backend asked for by name; BackendUnavailable saying why when it cannot run."""
        self._check_name(backend)
        if backend == "auto":
            return self.candidates("auto", device)[0][1]
        return self._loaders[backend](device)

    def candidates(self, backend, device: torch.device) -> tuple:
        """((name, launcher), ...) to try in order: one for a backend asked for by name, the usable ones of the
        device type's preference order then the reference for "auto"."""
        if backend != "auto":
            return ((backend, self.launcher(backend, device)),)
        found = self._auto_cache.get(device)
        if found is None:
            found = []
            for name in self._auto.get(device.type, ()) + (REFERENCE,):
                if name in self._broken or name not in self._loaders:
                    continue
                try:
                    found.append((name, self._loaders[name](device)))
                except BackendUnavailable:
                    continue
            found = self._auto_cache[device] = tuple(found)
        return found

    def select(self, backend, device: torch.device) -> tuple:
        """(name, launcher) of the backend that runs a call: the first candidate."""
        self._check_name(backend)
        return self.candidates(backend, device)[0]

    def run(self, backend, device: torch.device, call: Callable):
        """``call(name, launcher)`` on the chosen backend, falling back under "auto" as the module docstring says.
        "auto" on a device seen before costs one dictionary lookup before the call."""
        found = self._auto_cache.get(device) if type(backend) is str and backend == "auto" else None
        if found is None:
            self._check_name(backend)
            found = self.candidates(backend, device)
        name, launcher = found[0]
        try:
            return call(name, launcher)
        except _CALLER_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - a failing native backend under "auto" hands over to the next
            if backend != "auto" or len(found) == 1:
                raise
            self.mark_broken(name, e)
        return self.run(backend, device, call)  # the next candidate: `name` is no longer among them

    def mark_broken(self, name: str, error: BaseException) -> None:
        """Skip ``name`` under "auto" from now on (a compile or launch failure that is not the caller's)."""
        if name in self._broken:
            return
        self._broken[name] = error
        self._auto_cache.clear()
        warnings.warn(f"pyseqpack.{self.name}: backend {name!r} failed ({type(error).__name__}: {error}); "
                      "backend='auto' no longer uses it in this process", RuntimeWarning, stacklevel=4)
