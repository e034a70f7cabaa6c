"""The one dispatch mechanism both ops use (pyseqpack/_dispatch.py): choice, fallback and errors."""
import warnings

import pytest
import torch

from pyseqpack._dispatch import Dispatcher
from pyseqpack._native import BackendUnavailable

CPU = torch.device("cpu")


class Launcher:
    def __init__(self, name, fail=None):
        self.name, self.fail, self.calls = name, fail, 0

    def run(self, x):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return (self.name, x)


def make(fast_fail=None, refuse=False):
    fast, ref = Launcher("fast", fast_fail), Launcher("torch")

    def load_fast(device):
        if refuse:
            raise BackendUnavailable('backend "fast" cannot run here')
        return fast

    d = Dispatcher("op", auto={"cpu": ("fast",)})
    d.register("fast", load_fast)
    d.register("torch", lambda device: ref)
    return d, fast, ref


def call(d, backend, x=1):
    return d.run(backend, CPU, lambda name, launcher: launcher.run(x))


def test_auto_takes_the_preferred_backend_then_the_reference():
    d, fast, ref = make()
    assert call(d, "auto") == ("fast", 1) and d.select("auto", CPU)[0] == "fast"
    d, fast, ref = make(refuse=True)
    assert call(d, "auto") == ("torch", 1)
    with pytest.raises(BackendUnavailable, match="cannot run here"):
        call(d, "fast")


def test_unknown_backend_names_the_choices():
    d, _, _ = make()
    for bad in ("cuda", None, ["auto"]):
        with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'fast', 'torch'\)"):
            call(d, bad)


def test_launch_failure_falls_back_once_under_auto_and_never_by_name():
    d, fast, ref = make(fast_fail=RuntimeError("no compiler"))
    with pytest.raises(RuntimeError, match="no compiler"):
        call(d, "fast")
    with pytest.warns(RuntimeWarning, match="backend 'fast' failed .*no compiler"):
        assert call(d, "auto") == ("torch", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert call(d, "auto", 2) == ("torch", 2)  # skipped from now on, without another warning
    assert fast.calls == 2 and ref.calls == 2


@pytest.mark.parametrize("error", [ValueError("bad input"), TypeError("bad type")])
def test_caller_errors_are_not_fallen_back_on(error):
    d, fast, ref = make(fast_fail=error)
    with pytest.raises(type(error), match="bad"):
        call(d, "auto")
    assert ref.calls == 0 and d.select("auto", CPU)[0] == "fast"
