"""Fast kernels for the flat-buffer operations of :mod:`upgd_ref.backends`.

:class:`NumbaBackend` runs AdaptiveUPGD, the VGS and the noise as Numba CPU kernels
(``specs/kernels.md``): two fused passes per step, noise generated in registers, results
bit-identical for any thread count. Importing this package needs Numba; compilation happens
on first use (or in :meth:`NumbaBackend.warmup`) and is cached on disk.
"""

from .numba_backend import NumbaBackend

__all__ = ["NumbaBackend"]
