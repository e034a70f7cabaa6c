"""`python -m pyseqpack [env|demo|bench] ...`

* ``env`` (the default): an environment report: versions, backends built, backends usable here, device.
* ``demo``: the main job, trains tiny models both ways and compares (see ``pyseqpack/demo.py``).
* ``bench``: runs the ``bench/`` comparisons and writes JSON, markdown and a plot (``pyseqpack/bench.py``).
"""
from __future__ import annotations

import importlib
import platform
import sys


def _version(name):
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report, never fail
        return f"not usable ({type(e).__name__})"
    return getattr(mod, "__version__", "?")


def env_report() -> str:
    import torch

    import pyseqpack
    from pyseqpack import _native

    lines = [f"pyseqpack {pyseqpack.__version__} ({pyseqpack.__file__})"]
    lines.append(f"python {platform.python_version()} on {platform.machine()} {platform.system()}")
    for name in ("torch", "triton", "numpy", "transformers", "trl", "accelerate", "liger_kernel"):
        lines.append(f"  {name:<13} {_version(name)}")
    info = _native.build_info()
    lines.append(f"build: {info if info else 'not built (source tree)'}")
    built = []
    for name, ok in (("cpu (C++)", _native.cpu_available()), ("cuda", _native.cuda_built())):
        built.append(f"{name}: {'yes' if ok else 'no'}")
    lines.append("native modules: " + ", ".join(built))
    if not _native.cpu_available():
        lines.append("  cpu: " + _native._load_cpu()[1])
    else:
        fast = _native.cpu_module().numpy_rows_fast()
        lines.append("  numpy rows: " + ("read from numpy's array fields (layout checked)" if fast else
                                         "read through the buffer protocol (numpy's layout check failed)"))
    if not _native.cuda_built():
        lines.append("  cuda: " + _native._load_cuda()[1])
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        lines.append(f"device: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    else:
        dev = torch.device("cpu")
        lines.append(f"device: cpu ({torch.get_num_threads()} torch threads), no CUDA device")
    lines.append(f"TRITON_INTERPRET: {'on' if _native.triton_interpret() else 'off'}")
    lines.append(f"usable backends on {dev.type}: {', '.join(_native.available_backends(dev))}")
    if dev.type == "cuda":
        lines.append(f"usable backends on cpu: {', '.join(_native.available_backends('cpu'))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and not argv[0].startswith("-") else "env"
    if cmd == "env":
        print(env_report())
        return 0
    if cmd in ("demo", "bench"):
        return importlib.import_module(f"pyseqpack.{cmd}").main(argv)
    print(f"usage: python -m pyseqpack [env|demo|bench] ...  (unknown command {cmd!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
