"""The one dispatch point: the :class:`Backend` protocol, the registry, and which backend runs
a step on which buffers.

A backend implements the stages of a step on flat buffers (``specs/step.md``): local
reductions (:meth:`Backend.nonfinite_counts`, :meth:`Backend.gradient_sums`, and the ones
:meth:`Backend.first_pass` returns) and element-wise passes (:meth:`Backend.scale`,
:meth:`Backend.first_pass`, :meth:`Backend.second_pass`). The combination of the reductions
and the per-segment float64 plan between the passes are the core's
(:mod:`upgd_ref.stages`), and :func:`upgd_ref.step.upgd_step` validates every input before
it calls a backend, so a backend sees only valid data.

Backends register lazily: importing :mod:`upgd_ref` imports neither Numba nor CuPy and
probes no driver or compiler. The first use of a backend (``BACKENDS[name]``, a step with
``backend="auto"``, :func:`backends_for`) loads it; one that cannot run here (its package is
not installed, no CUDA driver, no C++ compiler) is then absent from the registry.

``backend="auto"`` picks by array type: CuPy arrays -> ``"cupy"`` (the CUDA kernels);
float32 NumPy buffers -> ``"numba"`` when Numba is installed, else the reference; float64
NumPy buffers -> the reference (see :func:`select_backend`).

``"cuda-emulator"`` (the CUDA source compiled for the CPU) is registered for testing the
CUDA code's arithmetic on machines without a GPU: it can be named, but :func:`backends_for`
and :func:`available_backends` list it only when asked for emulators.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable, Iterator, MutableMapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from .arrays import array_kind
from .reference_backend import ReferenceBackend
from .stages import SegmentReductions, StepPlan

__all__ = [
    "Backend", "Registration", "BackendRegistry", "BACKENDS", "auto_order", "available_backends", "backends_for",
    "check_backend_name", "select_backend", "absence_reason",
]


@runtime_checkable
class Backend(Protocol):
    """What a backend implements; every method takes keyword arguments only.

    ``layout`` is the :class:`~upgd_ref.FlatLayout` of the buffers; ``present`` one bool per
    segment; ``state`` a :class:`~upgd_ref.state.FlatUPGDState` whose buffers live where
    ``params`` live; ``hyper`` one validated hyper-parameter dict per segment; ``variant``
    a checked :class:`~upgd_ref.reference.UPGDVariant`.
    """

    name: str
    array_kind: str  # "numpy" or "cupy": the buffers it takes

    def available(self) -> bool:
        """Whether it can run here (e.g. a GPU for CuPy)."""

    def warmup(self, dtypes) -> float:
        """Compile (or load) its kernels for ``dtypes``; returns the seconds it took."""

    def noise(self, *, layout, seed: int, step: int, dtype=None, out=None, noise_version: int = 1):
        """The flat buffer of :func:`upgd_ref.rng.noise` (bit for bit) in noise format
        ``noise_version`` (checked by the caller), into ``out`` when given."""

    def nonfinite_counts(self, *, layout, buffer, present) -> np.ndarray:
        """int64 ``(S,)``: NaN and Inf elements per present segment (0 for absent ones)."""

    def gradient_sums(self, *, layout, grads, present) -> SegmentReductions:
        """``sum g_i``, ``sum g_i**2`` per present segment (utility entries ``+inf``, ``-inf``)."""

    def scale(self, *, layout, grads, factor: float, present) -> None:
        """``g_i <- f g_i`` (``f`` rounded to the dtype) for present segments, in place."""

    def first_pass(self, *, layout, params, grads, state, present, hyper, vgs_factor: float,
                   variant) -> SegmentReductions:
        """Pass 1, read-only: the :class:`~upgd_ref.stages.SegmentReductions` of ``f g`` and
        the new utility trace, moments and direction of the present segments (computed, not
        written: a refused step must leave everything as it was)."""

    def second_pass(self, *, layout, params, grads, state, present, hyper, plan: StepPlan, seed: int,
                    variant, vgs_factor: float = 1.0, noise_version: int = 1) -> None:
        """Pass 2: pass 1's values again (the same bits) written — ``g <- f g`` when
        ``vgs_factor != 1``, ``u``, ``m``, ``v`` — and the parameter update of the present
        segments, in place, with the normals of ``(seed, plan.step)`` in format ``noise_version``."""


class Registration(NamedTuple):
    """A backend the registry can load: ``load()`` returns it, or ``None`` where it cannot
    run. ``auto`` ranks it for NumPy buffers under ``backend="auto"`` (lower first);
    ``emulator`` marks a test backend."""

    name: str
    array_kind: str
    load: Callable[[], object]
    auto: int | None = None
    emulator: bool = False


def _load_numba():
    if importlib.util.find_spec("numba") is None:
        return None
    from .kernels.numba_backend import NumbaBackend

    return NumbaBackend()


def _cuda_driver_loads() -> bool:
    """Whether the CUDA driver library loads (a cheap stand-in for "this machine has a GPU")."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _load_cupy():
    # CuPy itself is imported on first use; without a driver no CuPy array can exist.
    if importlib.util.find_spec("cupy") is None or not _cuda_driver_loads():
        return None
    from .kernels.cuda_backend import CudaBackend, CupyLauncher

    return CudaBackend("cupy", CupyLauncher())


def _load_emulator():
    from .kernels.cuda_emulator import EmulatorLauncher, host_compiler

    if host_compiler() is None:
        return None
    from .kernels.cuda_backend import CudaBackend

    return CudaBackend("cuda-emulator", EmulatorLauncher())


REGISTRATIONS = (
    Registration("reference", "numpy", ReferenceBackend, auto=1),
    Registration("numba", "numpy", _load_numba, auto=0),
    Registration("cupy", "cupy", _load_cupy),
    Registration("cuda-emulator", "numpy", _load_emulator, emulator=True),
)


class BackendRegistry(MutableMapping):
    """Backends by name, each loaded on first access; one that cannot run here is absent.

    Assigning a name (``registry[name] = backend``) installs or replaces a backend (tests use
    it to swap in differently configured instances).
    """

    def __init__(self, registrations):
        self.registrations = {r.name: r for r in registrations}
        self._loaded: dict[str, object] = {}
        self._absent: set[str] = set()

    def _load(self, name: str):
        if name in self._loaded:
            return self._loaded[name]
        if name in self._absent or name not in self.registrations:
            return None
        backend = self.registrations[name].load()
        if backend is None:
            self._absent.add(name)
        else:
            self._loaded[name] = backend
        return backend

    def __getitem__(self, name: str):
        backend = self._load(name)
        if backend is None:
            raise KeyError(name)
        return backend

    def __setitem__(self, name: str, backend) -> None:
        self._absent.discard(name)
        self._loaded[name] = backend

    def __delitem__(self, name: str) -> None:
        if name not in self._loaded:
            raise KeyError(name)
        del self._loaded[name]
        if name not in self.registrations:
            return
        self._absent.add(name)  # deleted: not reloaded behind the caller's back

    def __iter__(self) -> Iterator[str]:
        names = [*self.registrations, *(n for n in self._loaded if n not in self.registrations)]
        return iter([name for name in names if self._load(name) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def is_emulator(self, name: str) -> bool:
        registration = self.registrations.get(name)
        return registration is not None and registration.emulator


BACKENDS = BackendRegistry(REGISTRATIONS)


def auto_order() -> list[str]:
    """Names of the backends ``backend="auto"`` may pick for float32 NumPy buffers, fastest first."""
    ranked = sorted((r.auto, r.name) for r in BACKENDS.registrations.values() if r.auto is not None)
    return [name for _, name in ranked if name in BACKENDS]


def backends_for(kind: str = "numpy", *, emulators: bool = False) -> list[str]:
    """Names of the registered backends that take buffers of ``kind`` (``"numpy"``, ``"cupy"``);
    with ``emulators=True`` also the test emulators."""
    return [name for name, backend in BACKENDS.items()
            if backend.array_kind == kind and (emulators or not BACKENDS.is_emulator(name))]


def available_backends(*, emulators: bool = False) -> list[str]:
    """Names of the registered backends that can run here (``"cupy"`` needs a GPU)."""
    return [name for name, backend in BACKENDS.items()
            if backend.available() and (emulators or not BACKENDS.is_emulator(name))]


def absence_reason(name: str) -> str | None:
    """Why a registered backend cannot run here, or ``None`` when it can (``upgd-ref info``)."""
    if name not in BACKENDS.registrations:
        raise ValueError(f"unknown backend {name!r}; registered: {list(BACKENDS.registrations)}")
    if name in BACKENDS:
        return None if BACKENDS[name].available() else "registered, but no CUDA device is visible"
    if name == "numba":
        return "Numba is not installed (pip install numba)"
    if name == "cupy":
        if importlib.util.find_spec("cupy") is None:
            return "CuPy is not installed (pip install 'upgd-ref[cuda]')"
        return "no CUDA driver: libcuda.so.1 does not load"
    if name == "cuda-emulator":
        return "no C++ compiler ($CXX, c++, g++ or clang++) to build the CPU emulator of the CUDA source"
    return "its loader found nothing to run"


def check_backend_name(name) -> str:
    """``name`` when it is ``"auto"``, a registered name or a :class:`Backend`; ``ValueError`` otherwise."""
    if isinstance(name, Backend) and not isinstance(name, str):
        return name
    if name != "auto" and name not in BACKENDS.registrations and name not in BACKENDS:
        choices = ["auto", *(n for n in BACKENDS.registrations if not BACKENDS.is_emulator(n))]
        raise ValueError(f"unknown backend {name!r}; choose one of {choices}")
    return name


def select_backend(name, buffer):
    """The backend object for ``name`` ("auto", a registered name or a :class:`Backend`) and this buffer.

    ``"auto"``: CuPy arrays go to the CUDA kernels (``"cupy"``); float32 NumPy buffers to the
    fastest NumPy backend (:func:`auto_order`); float64 NumPy buffers to the reference,
    because float64 is the truth and the reference evaluates the spec's expressions
    literally with NumPy (its exp, its pairwise sums), so a float64 run equals a plain NumPy
    transcription of ``specs/algorithm.md`` bit for bit. The kernels' float64 results differ
    from that in the last bits (within the tolerance contract); ask for them with
    ``backend="numba"``. A named backend must take the buffer's kind of array.
    """
    check_backend_name(name)
    kind = array_kind(buffer) if buffer is not None else None
    if name != "auto":
        backend = name if not isinstance(name, str) else BACKENDS.get(name)
        if backend is None:
            raise ValueError(f"backend {name!r} cannot run here (its package, driver or compiler is missing); "
                             f"available: {available_backends()}")
        if kind is not None and backend.array_kind != kind:
            raise TypeError(f"backend {backend.name!r} takes {backend.array_kind} arrays, got a {kind} array; "
                            f"backends for {kind} arrays: {backends_for(kind) or 'none installed'}")
        return backend
    if kind == "cupy":
        if "cupy" not in BACKENDS:
            raise TypeError("CuPy arrays need the 'cupy' backend, which needs CuPy")
        return BACKENDS["cupy"]
    if kind == "numpy":
        return BACKENDS["reference" if buffer.dtype == np.float64 else auto_order()[0]]
    raise TypeError(f"no backend for arrays of type {type(buffer).__name__}")
