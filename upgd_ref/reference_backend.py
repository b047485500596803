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

    def noise(self, *, layout, seed, step, dtype=None, out=None, noise_version=1):
        values = reference_noise(layout, seed, step, dtype, noise_version)
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

    def _local(self, *, layout, params, grads, state, present, hyper, vgs_factor, variant):
        """Pass 1's values, nothing written: the scaled gradients and the new ``(u, m, v)`` lists."""
        views = layout.unpack
        scaled = views(grads) if vgs_factor == 1.0 else ref.vgs_scale(views(grads), vgs_factor, present)
        start = ref.UPGDState(np.int64(state.step), state.segment_step, views(state.utility),
                              views(state.first_moment), views(state.second_moment), state.grad_norm_ema)
        return scaled, ref.local_updates(views(params), scaled, start, hyper, present, variant)

    def first_pass(self, *, layout, params, grads, state, present, hyper, vgs_factor, variant) -> SegmentReductions:
        out = SegmentReductions.empty(layout.num_segments)
        t = state.segment_step + np.asarray(present, dtype=np.int64)
        with np.errstate(all="ignore"):
            scaled, (utility, first_moment, second_moment) = self._local(
                layout=layout, params=params, grads=grads, state=state, present=present, hyper=hyper,
                vgs_factor=vgs_factor, variant=variant)
            for i, p in enumerate(layout.unpack(params)):
                if not present[i]:
                    continue
                g, u = scaled[i], utility[i]
                out.grad_sum[i], out.grad_sq_sum[i] = _wide_sum(g), ref.sum_of_squares(g)
                if variant.moments == "adam":
                    d = _direction(first_moment[i], second_moment[i], hyper[i], int(t[i]))
                    values = (g, p, u, first_moment[i], second_moment[i], d)
                else:
                    d = g
                    values = (g, p, u)
                out.nonfinite[i] = np.count_nonzero(~np.logical_and.reduce([np.isfinite(x) for x in values]))
                if u.size:
                    out.utility_min[i], out.utility_max[i] = np.min(u), np.max(u)
                    out.param_max[i], out.direction_max[i] = np.max(np.abs(p)), np.max(np.abs(d))
        return out

    def second_pass(self, *, layout, params, grads, state, present, hyper, plan, seed, variant,
                    vgs_factor=1.0, noise_version=1) -> None:
        views = layout.unpack
        normals = views(self.noise(layout=layout, seed=seed, step=plan.step, noise_version=noise_version))
        with np.errstate(all="ignore"):
            scaled, new = self._local(layout=layout, params=params, grads=grads, state=state, present=present,
                                      hyper=hyper, vgs_factor=vgs_factor, variant=variant)
            new_params = ref.apply_updates(
                views(params), scaled, *new, normals, plan.std, plan.segment_step, hyper, present,
                plan.utility_min, plan.utility_max, variant,
            )
        targets = (views(grads) if vgs_factor != 1.0 else None, views(state.utility), views(state.first_moment),
                   views(state.second_moment), views(params))
        for values, target in zip((scaled, *new, new_params), targets):
            if target is None:
                continue
            for i in range(layout.num_segments):
                if present[i]:
                    target[i][...] = values[i]


def _direction(m, v, h, t):
    """``d = m_hat / (sqrt(v_hat) + eps)`` as :func:`upgd_ref.reference.apply_updates` forms it."""
    m_hat = m / np.asarray(ref.bias_correction(h["beta1"], t), dtype=m.dtype)
    v_hat = v / np.asarray(ref.bias_correction(h["beta2"], t), dtype=v.dtype)
    return m_hat / (np.sqrt(v_hat) + h["eps"])
