"""The one dispatch point: which implementation runs a step on which buffers.

A backend implements the flat-buffer operations below; the stateful classes validate
their inputs first and then hand over, so every backend sees only valid data and mutates
only after its own computation is complete.

``backend="auto"`` picks by array type: NumPy buffers -> the fastest backend registered for
NumPy. Backends register themselves in :data:`BACKENDS` (later: Numba, CuPy).
"""

from __future__ import annotations

import numpy as np

from . import reference as ref
from .rng import noise as reference_noise
from .state import FlatUPGDState, FlatVGSState

__all__ = ["ReferenceBackend", "BACKENDS", "AUTO_ORDER", "check_backend_name", "select_backend"]


class ReferenceBackend:
    """The Array-API reference run on NumPy views of the flat buffers."""

    name = "reference"

    def noise(self, layout, seed: int, step: int, dtype=None) -> np.ndarray:
        return reference_noise(layout, seed, step, dtype)

    def upgd_step(self, layout, params, grads, state: FlatUPGDState, present, hyper, seed, noise_norm):
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
                views(params), views(grads), start, normals, hyper, present=present, noise_norm=noise_norm
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


BACKENDS: dict[str, object] = {"reference": ReferenceBackend()}
AUTO_ORDER = ["reference"]  # fastest first; kernels insert themselves in front


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {['auto', *BACKENDS]}")
    return name


def select_backend(name: str, buffer):
    """The backend object for ``name`` ("auto" or a registered name) and this buffer type."""
    check_backend_name(name)
    if name != "auto":
        return BACKENDS[name]
    if isinstance(buffer, np.ndarray):
        return BACKENDS[AUTO_ORDER[0]]
    raise TypeError(f"no backend for arrays of type {type(buffer).__name__}")
