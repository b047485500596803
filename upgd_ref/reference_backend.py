"""The reference backend: the stages of a step run by :mod:`upgd_ref.reference` on NumPy views.

Each stage is the reference's own function (``local_updates``, ``sum_of_squares``,
``apply_updates``, ``vgs_scale``), so a float64 step equals a literal NumPy transcription of
``specs/algorithm.md`` bit for bit; the combination and the per-segment plan between the
passes are the core's (:mod:`upgd_ref.stages`), which every backend shares.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref
from .rng import noise as reference_noise
from .stages import SegmentReductions

__all__ = ["ReferenceBackend"]


def _wide_sum(x) -> np.float64:
    return np.sum(x.astype(np.float64))


class ReferenceBackend:
    """The Array-API reference on NumPy flat buffers (any float dtype the reference takes)."""

    name = "reference"
    array_kind = "numpy"

    def available(self) -> bool:
        return True

    def warmup(self, dtypes=()) -> float:
        return 0.0  # nothing to compile

    def noise(self, *, layout, seed, step, dtype=None, out=None):
        values = reference_noise(layout, seed, step, dtype)
        if out is None:
            return values
        out[...] = values
        return out

    def nonfinite_counts(self, *, layout, buffer, present) -> np.ndarray:
        return np.array([int((~np.isfinite(segment)).sum()) if p else 0
                         for segment, p in zip(layout.unpack(buffer), present)], dtype=np.int64)

    def scale(self, *, layout, grads, factor, present) -> None:
        views = layout.unpack(grads)
        for target, values in zip(views, ref.vgs_scale(views, factor, present)):
            target[...] = values

    def gradient_sums(self, *, layout, grads, present) -> SegmentReductions:
        out = SegmentReductions.empty(layout.num_segments)
        with np.errstate(all="ignore"):
            for i, g in enumerate(layout.unpack(grads)):
                if present[i]:
                    out.grad_sum[i], out.grad_sq_sum[i] = _wide_sum(g), ref.sum_of_squares(g)
        return out

    def first_pass(self, *, layout, params, grads, state, present, hyper, vgs_factor, variant) -> SegmentReductions:
        if vgs_factor != 1.0:
            self.scale(layout=layout, grads=grads, factor=vgs_factor, present=present)
        views = layout.unpack
        start = ref.UPGDState(np.int64(state.step), state.segment_step, views(state.utility),
                              views(state.first_moment), views(state.second_moment), state.grad_norm_ema)
        with np.errstate(all="ignore"):
            new = ref.local_updates(views(params), views(grads), start, hyper, present, variant)
            out = self.gradient_sums(layout=layout, grads=grads, present=present)
            for name, targets, values in zip(("utility", "first_moment", "second_moment"),
                                             (start.utility, start.first_moment, start.second_moment), new):
                for i, (target, value) in enumerate(zip(targets, values)):
                    if present[i]:
                        target[...] = value
            for i, u in enumerate(start.utility):
                if present[i] and u.size:
                    out.utility_min[i], out.utility_max[i] = np.min(u), np.max(u)
        return out

    def second_pass(self, *, layout, params, grads, state, present, hyper, plan, seed, variant) -> None:
        views = layout.unpack
        normals = views(self.noise(layout=layout, seed=seed, step=plan.step))
        with np.errstate(all="ignore"):
            new_params = ref.apply_updates(
                views(params), views(grads), views(state.utility), views(state.first_moment),
                views(state.second_moment), normals, plan.std, plan.segment_step, hyper, present,
                plan.utility_min, plan.utility_max, variant,
            )
        for i, (target, values) in enumerate(zip(views(params), new_params)):
            if present[i]:
                target[...] = values
