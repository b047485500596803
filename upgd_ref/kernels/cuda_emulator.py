"""The CUDA kernels run on the CPU: ``upgd_step.cu`` compiled by the host C++ compiler.

Without ``__CUDACC__`` the source turns every kernel into a loop over its blocks and
threads, and its reductions combine in the GPU's fixed order (``specs/kernels-cuda.md`` §2).
So this emulator computes what the GPU computes, bit for bit, except where the C library
enters (``exp`` of the paper's "max" protection). It is how the GPU code is tested on
machines without a GPU (``backend="cuda-emulator"``), and a debugging aid for ports.

The shared library is built once per source text and compiler flags and cached under
``$UPGD_REF_CACHE_DIR`` (default ``~/.cache/upgd_ref``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .cuda_source import KERNEL_SIGNATURES, cache_dir, checked_arguments, cuda_source

__all__ = ["HOST_COMPILE_FLAGS", "host_compiler", "EmulatorLauncher"]

#: No contraction of ``a * b + c`` (as ``--fmad=false``), no fast math, the baseline x86-64 /
#: AArch64 instruction set chosen by the compiler (FMA instructions are not used unless
#: asked for, and contraction is off anyway).
HOST_COMPILE_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")

_CTYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double, "i32": ctypes.c_int32, "i64": ctypes.c_int64,
           "u32": ctypes.c_uint32}


def host_compiler() -> str | None:
    """The C++ compiler the emulator uses (``$CXX``, else ``c++`` or ``g++`` on ``PATH``)."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _build(compiler: str) -> Path:
    source = cuda_source()
    key = hashlib.sha256("\0".join([source, compiler, *HOST_COMPILE_FLAGS]).encode()).hexdigest()[:20]
    target = cache_dir() / f"upgd_step_emulator_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source_path = Path(tmp) / "upgd_step_emulator.cpp"
        source_path.write_text(source)
        built = Path(tmp) / target.name
        result = subprocess.run([compiler, *HOST_COMPILE_FLAGS, str(source_path), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to compile the CUDA source for the emulator:\n{result.stderr}")
        os.replace(built, target)  # atomic: concurrent builders never see a partial file
    return target


class EmulatorLauncher:
    """Runs the entry points of :data:`KERNEL_SIGNATURES` on NumPy buffers (one CPU thread).

    ``launch(name, items, *args)``: ``items`` (the GPU grid's work items) is ignored, every
    item runs; buffers must be contiguous NumPy arrays of the argument's dtype.
    """

    array_module = np
    array_kind = "numpy"

    def __init__(self):
        self._library = None

    @staticmethod
    def available() -> bool:
        return host_compiler() is not None

    def _functions(self):
        if self._library is None:
            compiler = host_compiler()
            if compiler is None:
                raise RuntimeError("the CUDA emulator needs a C++ compiler (set CXX or install g++)")
            library = ctypes.CDLL(str(_build(compiler)))
            for name, kinds in KERNEL_SIGNATURES.items():
                function = getattr(library, name)
                function.restype = None
                function.argtypes = [ctypes.c_void_p if kind.endswith("*") else _CTYPES[kind] for kind in kinds]
            self._library = library
        return self._library

    def compile(self) -> None:
        """Build (or load) the shared library now."""
        self._functions()

    def launch(self, name: str, items: int, *args) -> None:
        function = getattr(self._functions(), name)
        function(*checked_arguments(name, args, np.ndarray, lambda array: array.ctypes.data))

    @staticmethod
    def to_host(array) -> np.ndarray:
        return np.asarray(array)
