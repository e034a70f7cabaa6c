"""Build pyseqpack's native code without torch.

Two native artifacts, both optional at run time (the torch path always works):

* ``pyseqpack._C``     CPython extension, plain C++ (CPU kernels). Built whenever a C++ compiler exists.
* ``pyseqpack._cuda``  shared library of CUDA kernels with a C ABI (loaded with ctypes). Kernels take raw
                        device pointers, sizes, strides and a ``cudaStream_t``; no torch headers, so one
                        build works with any torch. Built when ``nvcc`` is found.

Environment switches:
  PYSEQPACK_CUDA=0          skip the CUDA build
  PYSEQPACK_CUDA=1          force it (fail if nvcc is missing or the build fails)
  PYSEQPACK_CUDA_ARCH="80;90"   SM architectures (default 80;90; the last one also embeds PTX)
  PYSEQPACK_NVCC=/path/nvcc     nvcc to use (else $CUDA_HOME/bin/nvcc, then PATH)
  MAX_JOBS=N                parallel nvcc jobs (default: number of CPUs)
"""
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
VERSION = "0.1.0"


def _cuda_mode():
    v = os.environ.get("PYSEQPACK_CUDA", "").strip().lower()
    if v in ("0", "false", "off", "no"):
        return "skip"
    if v in ("1", "true", "on", "yes", "force"):
        return "force"
    return "auto"


def _find_nvcc():
    cand = os.environ.get("PYSEQPACK_NVCC")
    if cand:
        return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _sources(suffix):
    return sorted(
        os.path.join(CSRC, f) for f in os.listdir(os.path.join(ROOT, CSRC)) if f.endswith(suffix)
    )


def _psm_output_keys():
    with open(os.path.join(ROOT, CSRC, "pad_shift_mask.h")) as f:
        text = f.read()
    names = re.search(r"kOutputNames\[kNumOut\]\s*=\s*\{(.*?)\};", text, re.S)
    if names is None:
        raise RuntimeError("csrc/pad_shift_mask.h: psm::kOutputNames not found")
    return tuple(re.findall(r'"(\w+)"', names.group(1)))


CXX_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread", "-Wall", "-Wno-unused-function"]


class BuildExt(build_ext):
    """build_ext that compiles ``.cu`` sources with nvcc into a plain shared library."""

    def build_extensions(self):
        self.built_cuda = False
        self.cuda_info = {}
        super().build_extensions()
        self._write_build_info()

    def build_extension(self, ext):
        if ext.name == "pyseqpack._cuda":
            mode, nvcc = _cuda_mode(), _find_nvcc()
            if mode == "skip":
                print("pyseqpack: PYSEQPACK_CUDA=0, skipping the CUDA build")
                return
            if nvcc is None:
                if mode == "force":
                    raise RuntimeError("PYSEQPACK_CUDA=1 but nvcc was not found (set PYSEQPACK_NVCC or CUDA_HOME)")
                print("pyseqpack: nvcc not found, building without CUDA kernels")
                return
            try:
                self._build_cuda(ext, nvcc)
            except Exception as e:  # noqa: BLE001 - a failed optional build must not fail the install
                if mode == "force":
                    raise
                print(f"pyseqpack: WARNING: CUDA build failed, installing without CUDA kernels: {e}")
            return
        super().build_extension(ext)

    def copy_extensions_to_source(self):
        # Editable installs copy each built module into the source tree: a skipped CUDA build has none to copy.
        everything = self.extensions
        self.extensions = [e for e in everything if e.name != "pyseqpack._cuda" or self.built_cuda]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = everything

    def _build_cuda(self, ext, nvcc):
        archs = [a.strip().replace(".", "") for a in os.environ.get("PYSEQPACK_CUDA_ARCH", "80;90").replace(",", ";").split(";") if a.strip()]
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        out = self.get_ext_fullpath(ext.name)
        tmp = os.path.join(self.build_temp, "cuda")
        os.makedirs(tmp, exist_ok=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-I" + os.path.join(ROOT, CSRC),
                 "--expt-relaxed-constexpr", "-lineinfo"] + gencode

        def compile_one(src):
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)
            return obj

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        # Link with the static CUDA runtime: the library needs no libcudart on the loader path, and works
        # beside whatever runtime torch brings (both talk to the same driver and primary context).
        cmd = [nvcc, "-shared", "--cudart", "static", "-o", out] + objs + gencode
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        self.built_cuda = True
        self.cuda_info = {"nvcc": ver[-1] if ver else "?", "archs": archs}

    def _write_build_info(self):
        # Build metadata next to the modules; pyseqpack checks it at import to catch a stale build. It also carries
        # pad_shift_mask's output slot names, read from the one place they are written (csrc/pad_shift_mask.h),
        # so Python numbers the outputs as the kernels do without loading native code.
        info = {
            "version": VERSION,
            "psm_output_keys": _psm_output_keys(),
            "cuda_built": self.built_cuda,
            "cuda": self.cuda_info,
            "compiler": self.compiler.compiler_cxx[0] if getattr(self.compiler, "compiler_cxx", None) else "?",
            "python": sys.version.split()[0],
        }
        text = f"# Generated by setup.py at build time. Do not edit.\nBUILD_INFO = {info!r}\n"
        dirs = {os.path.join(self.build_lib, "pyseqpack"), os.path.dirname(self.get_ext_fullpath("pyseqpack._C"))}
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.add(os.path.join(ROOT, "pyseqpack"))
        for d in dirs:
            path = os.path.join(d, "_build_info.py")
            os.makedirs(d, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)


ext_modules = [
    Extension(
        "pyseqpack._C",
        sources=_sources(".cpp"),
        include_dirs=[CSRC],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-pthread"],
        language="c++",
    ),
    # A placeholder Extension: BuildExt compiles its .cu sources with nvcc (or skips it).
    Extension("pyseqpack._cuda", sources=_sources(".cu")),
]

setup(
    version=VERSION,
    # kernels/ installs as pyseqpack.kernels, a namespace subpackage: the checkout's kernels/ has no __init__.py,
    # so it never shadows the PyPI package `kernels` when Python runs in the checkout's root.
    packages=find_packages(include=["pyseqpack", "pyseqpack.*"]) + ["pyseqpack.kernels", "pyseqpack.data"],
    package_dir={"pyseqpack": "pyseqpack", "pyseqpack.kernels": "kernels"},
    package_data={"pyseqpack.data": ["*.txt"], "pyseqpack.kernels": ["README.md"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
