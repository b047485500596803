"""The one dispatch point: which implementation runs a step on which buffers.

A backend implements the flat-buffer operations below; the stateful classes validate
their inputs first and then hand over, so every backend sees only valid data and mutates
only after its own computation is complete.

``backend="auto"`` picks by array type: NumPy buffers -> the fastest backend registered for
NumPy, CuPy arrays -> the CUDA kernels. Backends register themselves in :data:`BACKENDS`:
the Numba kernels (:mod:`upgd_ref.kernels`) whenever Numba can be imported, in front of the
reference; ``"cupy"`` (the CUDA kernels on CuPy arrays) whenever CuPy is installed and the
CUDA driver library loads;
``"cuda-emulator"`` (the same CUDA source compiled for the CPU, on NumPy buffers) whenever a
C++ compiler is found. Each backend's ``array_kind`` says which buffers it takes.

Operations: ``noise``, ``check_finite`` (raises as :func:`upgd_ref.checks.check_finite`),
``upgd_step``, ``vgs_scale``, ``vgs_update`` and ``fused_step`` (VGS scale, step and VGS
update in one call; the kernels read the gradient once for all three).
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np

from . import checks
from . import reference as ref
from .arrays import array_kind
from .kernels.cuda_backend import CudaBackend, CupyLauncher  # imports neither CuPy nor Numba
from .kernels.cuda_emulator import EmulatorLauncher, host_compiler
from .rng import noise as reference_noise
from .state import FlatUPGDState, FlatVGSState

__all__ = [
    "ReferenceBackend", "BACKENDS", "AUTO_ORDER", "available_backends", "backends_for", "check_backend_name",
    "select_backend", "noise", "warmup",
]


class ReferenceBackend:
    """The Array-API reference run on NumPy views of the flat buffers."""

    name = "reference"
    array_kind = "numpy"

    def noise(self, layout, seed: int, step: int, dtype=None, out=None) -> np.ndarray:
        values = reference_noise(layout, seed, step, dtype)
        if out is None:
            return values
        out[...] = values
        return out

    def check_finite(self, name: str, buffer, layout, present) -> None:
        checks.check_finite(name, buffer, layout, present)

    def upgd_step(self, layout, params, grads, state: FlatUPGDState, present, hyper, seed, noise_norm,
                  variant=ref.PRODUCTION):
        views = layout.unpack
        normals = views(self.noise(layout, seed, state.step + 1))
        start = ref.UPGDState(
            step=np.int64(state.step),
            segment_step=state.segment_step,
            utility=views(state.utility),
            first_moment=views(state.first_moment),
            second_moment=views(state.second_moment),
            grad_norm_ema=state.grad_norm_ema,
        )
        with np.errstate(all="ignore"):
            new_params, new, stats = ref.adaptive_upgd_step(
                views(params), views(grads), start, normals, hyper, present=present, noise_norm=noise_norm,
                variant=variant,
            )
        for target, values in zip(views(params), new_params):
            target[...] = values
        for name in FlatUPGDState.BUFFERS:
            for target, values in zip(views(getattr(state, name)), getattr(new, name)):
                target[...] = values
        state.step = int(new.step)
        state.segment_step[...] = new.segment_step
        state.grad_norm_ema[...] = new.grad_norm_ema
        return stats

    def vgs_scale(self, layout, grads, factor: float, present) -> None:
        for target, values in zip(layout.unpack(grads), ref.vgs_scale(layout.unpack(grads), factor, present)):
            target[...] = values

    def vgs_update(self, layout, grads, state: FlatVGSState, beta: float, present) -> None:
        start = ref.VGSState(np.int64(state.step), state.grad_mean_avg, state.grad_sq_avg)
        new = ref.vgs_update(start, layout.unpack(grads), beta=beta, present=present)
        state.step = int(new.step)
        state.grad_mean_avg[...] = new.grad_mean_avg
        state.grad_sq_avg[...] = new.grad_sq_avg

    def fused_step(self, layout, params, grads, state: FlatUPGDState, present, hyper, seed, noise_norm,
                   vgs_state: FlatVGSState, vgs_factor: float, vgs_beta: float, variant=ref.PRODUCTION):
        """``vgs_scale`` (when ``vgs_factor != 1``), ``upgd_step``, ``vgs_update``: the
        definition that fused kernels must equal."""
        if vgs_factor != 1.0:
            self.vgs_scale(layout, grads, vgs_factor, present)
        stats = self.upgd_step(layout, params, grads, state, present, hyper, seed, noise_norm, variant)
        self.vgs_update(layout, grads, vgs_state, vgs_beta, present)
        return stats


BACKENDS: dict[str, object] = {"reference": ReferenceBackend()}
AUTO_ORDER = ["reference"]  # NumPy buffers, fastest first; kernels insert themselves in front

if importlib.util.find_spec("numba") is not None:  # without Numba the reference serves NumPy
    from .kernels import NumbaBackend

    BACKENDS["numba"] = NumbaBackend()
    AUTO_ORDER.insert(0, "numba")



def _cuda_driver_loads() -> bool:
    """Whether the CUDA driver library loads (a cheap stand-in for "this machine has a GPU")."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# CuPy itself is imported on first use; without a driver no CuPy array can exist.
if importlib.util.find_spec("cupy") is not None and _cuda_driver_loads():
    BACKENDS["cupy"] = CudaBackend("cupy", CupyLauncher())

if host_compiler() is not None:
    BACKENDS["cuda-emulator"] = CudaBackend("cuda-emulator", EmulatorLauncher())


def backends_for(kind: str = "numpy") -> list[str]:
    """Names of the registered backends that take buffers of ``kind`` (``"numpy"``, ``"cupy"``)."""
    return [name for name, backend in BACKENDS.items() if backend.array_kind == kind]


def available_backends() -> list[str]:
    """Names of the registered backends that can run here (``"cupy"`` needs a GPU)."""
    return [name for name, backend in BACKENDS.items() if getattr(backend, "available", lambda: True)()]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {['auto', *BACKENDS]}")
    return name


def select_backend(name: str, buffer):
    """The backend object for ``name`` ("auto" or a registered name) and this buffer.

    ``"auto"``: CuPy arrays go to the CUDA kernels (``"cupy"``); float32 NumPy buffers to the
    fastest NumPy backend (:data:`AUTO_ORDER`); float64 NumPy buffers to the reference,
    because float64 is the truth and the reference evaluates the spec's expressions
    literally with NumPy (its exp, its pairwise sums), so a float64 run equals a plain NumPy
    transcription of ``specs/algorithm.md`` bit for bit. The kernels' float64 results differ
    from that in the last bits (within the tolerance contract); ask for them with
    ``backend="numba"``. A named backend must take the buffer's kind of array.
    """
    check_backend_name(name)
    kind = array_kind(buffer) if buffer is not None else None
    if name != "auto":
        backend = BACKENDS[name]
        if kind is not None and backend.array_kind != kind:
            raise TypeError(f"backend {name!r} takes {backend.array_kind} arrays, got a {kind} array; "
                            f"backends for {kind} arrays: {backends_for(kind) or 'none installed'}")
        return backend
    if kind == "cupy":
        if "cupy" not in BACKENDS:
            raise TypeError("CuPy arrays need the 'cupy' backend, which needs CuPy")
        return BACKENDS["cupy"]
    if kind == "numpy":
        return BACKENDS["reference" if buffer.dtype == np.float64 else AUTO_ORDER[0]]
    raise TypeError(f"no backend for arrays of type {type(buffer).__name__}")


def noise(layout, seed: int, step: int, dtype=None, *, out=None, backend: str = "auto") -> np.ndarray:
    """The standard normals that optimizer step ``step`` with ``seed`` uses, as a flat buffer.

    Bit-identical for every backend: the definition is :func:`upgd_ref.rng.noise`
    (``specs/noise.md``); ``backend="auto"`` computes them with the fastest one (on the GPU
    when ``out`` is a CuPy array). ``out``: a writable, contiguous NumPy or CuPy buffer of the
    layout's length and of the noise dtype to fill (its padding is set to 0) instead of a new
    one. Without ``out``, ``backend="cupy"`` returns a CuPy array, the others NumPy.
    """
    if out is not None:
        _check_noise_out(out, layout, dtype)
    if backend == "auto":
        chosen = select_backend("auto", out) if array_kind(out) == "cupy" else BACKENDS[AUTO_ORDER[0]]
    else:
        chosen = select_backend(backend, out)  # bit-identical whichever computes them
    return chosen.noise(layout, seed, step, dtype, out)


def _check_noise_out(out, layout, dtype) -> None:
    expected = np.dtype(layout.dtype if dtype is None else dtype)
    if array_kind(out) not in ("numpy", "cupy"):
        raise TypeError(f"out must be a NumPy array (or a CuPy array on a GPU), got {type(out).__name__}")
    if out.shape != (layout.size,):
        raise ValueError(f"out must have shape ({layout.size},) for this layout, got {out.shape}")
    if out.dtype != expected:
        raise TypeError(f"out has dtype {out.dtype}; the noise dtype is {expected}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")
    if array_kind(out) == "numpy" and not out.flags.writeable:
        raise ValueError("out is read-only")


def warmup(dtypes=("float32", "float64")) -> dict[str, float]:
    """Compile every kernel backend's kernels for ``dtypes`` now rather than on first use.

    Returns seconds per backend that compiles and can run here (Numba; the CUDA kernels with
    a GPU; their emulator with a C++ compiler). Numba, CuPy and the emulator cache what they
    compile on disk, so a later process loads it in well under a second.
    """
    return {name: BACKENDS[name].warmup(dtypes) for name in available_backends() if hasattr(BACKENDS[name], "warmup")}
