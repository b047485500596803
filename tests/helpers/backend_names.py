"""The backends for NumPy buffers registered when the tests are collected (reference, numba,
cuda-emulator, ...), one definition for every test module that iterates them. The CuPy backend
has its own tests (``tests/kernels/test_cuda_gpu.py``)."""

from __future__ import annotations

from upgd_ref.backends import backends_for

BACKEND_NAMES = tuple(sorted(backends_for("numpy", emulators=True)))
