"""The one dispatch point: which implementation runs a step on which buffers.

A backend implements the flat-buffer operations below; the stateful classes validate
their inputs first and then hand over, so every backend sees only valid data and mutates
only after its own computation is complete.

``backend="auto"`` picks by array type: NumPy buffers -> the fastest backend registered for
NumPy. Backends register themselves in :data:`BACKENDS`: the Numba kernels
(:mod:`upgd_ref.kernels`) whenever Numba can be imported, in front of the reference.

Operations: ``noise``, ``check_finite`` (raises as :func:`upgd_ref.checks.check_finite`),
``upgd_step``, ``vgs_scale``, ``vgs_update`` and ``fused_step`` (VGS scale, step and VGS
update in one call; the kernels read the gradient once for all three).
"""

from __future__ import annotations

import importlib.util

import numpy as np

from . import checks
from . import reference as ref
from .rng import noise as reference_noise
from .state import FlatUPGDState, FlatVGSState

__all__ = [
    "ReferenceBackend", "BACKENDS", "AUTO_ORDER", "check_backend_name", "select_backend", "noise", "warmup",
]


class ReferenceBackend:
    """The Array-API reference run on NumPy views of the flat buffers."""

    name = "reference"

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
AUTO_ORDER = ["reference"]  # fastest first; kernels insert themselves in front

if importlib.util.find_spec("numba") is not None:  # without Numba the reference serves NumPy
    from .kernels import NumbaBackend

    BACKENDS["numba"] = NumbaBackend()
    AUTO_ORDER.insert(0, "numba")


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {['auto', *BACKENDS]}")
    return name


def select_backend(name: str, buffer):
    """The backend object for ``name`` ("auto" or a registered name) and this buffer.

    ``"auto"``: float32 NumPy buffers go to the fastest backend (:data:`AUTO_ORDER`);
    float64 buffers to the reference, because float64 is the truth and the reference
    evaluates the spec's expressions literally with NumPy (its exp, its pairwise sums), so a
    float64 run equals a plain NumPy transcription of ``specs/algorithm.md`` bit for bit.
    The kernels' float64 results differ from that in the last bits (within the tolerance
    contract); ask for them with ``backend="numba"``.
    """
    check_backend_name(name)
    if name != "auto":
        return BACKENDS[name]
    if isinstance(buffer, np.ndarray):
        return BACKENDS["reference" if buffer.dtype == np.float64 else AUTO_ORDER[0]]
    raise TypeError(f"no backend for arrays of type {type(buffer).__name__}")


def noise(layout, seed: int, step: int, dtype=None, *, out=None, backend: str = "auto") -> np.ndarray:
    """The standard normals that optimizer step ``step`` with ``seed`` uses, as a flat buffer.

    Bit-identical for every backend: the definition is :func:`upgd_ref.rng.noise`
    (``specs/noise.md``); ``backend="auto"`` computes them with the fastest one. ``out``: a
    writable, contiguous NumPy buffer of the layout's length and of the noise dtype to fill
    (its padding is set to 0) instead of a new one.
    """
    if out is not None:
        _check_noise_out(out, layout, dtype)
    chosen = BACKENDS[AUTO_ORDER[0]] if backend == "auto" else select_backend(backend, None)  # bit-identical: fastest
    return chosen.noise(layout, seed, step, dtype, out)


def _check_noise_out(out, layout, dtype) -> None:
    expected = np.dtype(layout.dtype if dtype is None else dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != (layout.size,):
        raise ValueError(f"out must have shape ({layout.size},) for this layout, got {out.shape}")
    if out.dtype != expected:
        raise TypeError(f"out has dtype {out.dtype}; the noise dtype is {expected}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be contiguous")
    if not out.flags.writeable:
        raise ValueError("out is read-only")


def warmup(dtypes=("float32", "float64")) -> dict[str, float]:
    """Compile every kernel backend's kernels for ``dtypes`` now rather than on first use.

    Returns seconds per backend that compiles (empty without Numba). Numba caches the
    machine code on disk, so a later process loads it in well under a second.
    """
    return {name: backend.warmup(dtypes) for name, backend in BACKENDS.items() if hasattr(backend, "warmup")}
