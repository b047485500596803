"""Fast kernels for the flat-buffer operations of :mod:`upgd_ref.backends`.

* :class:`NumbaBackend` (``numba_backend.py``, ``numba_step.py``): AdaptiveUPGD, the VGS and
  the noise as Numba CPU kernels (``specs/kernels.md``): two fused passes per step, noise
  generated in registers, results bit-identical for any thread count. Needs Numba;
  compiled on first use (or by :func:`upgd_ref.warmup`) and cached on disk.
* :class:`~upgd_ref.kernels.cuda_backend.CudaBackend` (``cuda_backend.py``,
  ``upgd_step.cu``, ``cuda_source.py``): the same passes as CUDA kernels
  (``specs/kernels-cuda.md``), on a GPU through CuPy or on the CPU through the host-compiled
  emulator (``cuda_emulator.py``).
* ``chunk_abi.py``: the chunk table and the coefficient and partial-result tables both
  kernel families share (the CUDA source generates its constants from it).

Nothing here imports Numba or CuPy until the backend that needs it is used.
"""

__all__ = ["NumbaBackend"]


def __getattr__(name):
    if name == "NumbaBackend":
        from .numba_backend import NumbaBackend

        return NumbaBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
