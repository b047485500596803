r"""The stages of a step between the buffers and the per-segment formulas (``specs/step.md``).

Every backend runs a step as

1. **local** (per buffer, element-wise): the finiteness counts, then pass 1 — ``g <- f g``
   when VGS scales, the utility trace and the moments — which also reduces each segment to
   :class:`SegmentReductions` (``sum g``, ``sum g**2`` of the scaled gradient in float64,
   and the extrema of the updated utility);
2. **combine** (:func:`combine_reductions`): the reductions of every buffer (today one; the
   several buffers of a mixed-precision model or the shards of several processes later)
   put in global segment order, then the global quantities taken in a fixed order: the
   utility extrema over the present, non-empty segments and, with ``noise_norm="global"``,
   the squares added in segment order;
3. **plan** (:func:`plan_step`, on the host in float64): ``t_i``, ``||g_i||``, the norm
   average ``n_i`` and ``std_i`` — the reference's own functions applied to the combined
   values — and the VGS statistics (:func:`vgs_statistics`);
4. **update** (per buffer, element-wise): pass 2, the parameter update with this step's
   normals; then :func:`commit` writes the per-segment records.

Because each global quantity is a function of per-segment values taken in segment order,
the result does not depend on how segments are grouped into buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import reference as ref

__all__ = ["SegmentReductions", "StepPlan", "combine_reductions", "plan_step", "commit", "vgs_statistics"]


class SegmentReductions(NamedTuple):
    """Per-segment reductions of one buffer's local stage, float64 ``(S,)`` host arrays.

    ``grad_sum``, ``grad_sq_sum``: ``sum g_i``, ``sum g_i**2`` of the (scaled) gradient;
    ``utility_min``, ``utility_max``: extrema of the updated utility (exact: values of the
    buffer's dtype; ``+inf`` and ``-inf`` for an empty segment). Entries of absent segments
    are not read.
    """

    grad_sum: np.ndarray
    grad_sq_sum: np.ndarray
    utility_min: np.ndarray
    utility_max: np.ndarray

    @classmethod
    def empty(cls, num_segments: int) -> SegmentReductions:
        return cls(np.zeros(num_segments), np.zeros(num_segments), np.full(num_segments, np.inf),
                   np.full(num_segments, -np.inf))


def combine_reductions(parts: Sequence[tuple[Sequence[int], SegmentReductions]],
                       num_segments: int) -> SegmentReductions:
    """The reductions of several buffers in global segment order.

    ``parts``: ``(segments, reductions)`` per buffer, ``segments`` the global indices of the
    buffer's segments in its order (every segment in exactly one part). One buffer holding
    every segment in order is returned as it is.
    """
    if len(parts) == 1 and list(parts[0][0]) == list(range(num_segments)):
        return parts[0][1]
    out = SegmentReductions.empty(num_segments)
    seen = np.zeros(num_segments, dtype=np.bool_)
    for segments, reductions in parts:
        index = np.asarray(segments, dtype=np.int64)
        if seen[index].any():
            raise ValueError(f"segments {sorted(set(index[seen[index]].tolist()))} are in more than one buffer")
        seen[index] = True
        for combined, local in zip(out, reductions):
            combined[index] = local
    if not seen.all():
        raise ValueError(f"segments {np.flatnonzero(~seen).tolist()} are in no buffer")
    return out


class StepPlan(NamedTuple):
    """Everything the update stage needs and the step reports, computed on the host.

    ``run`` is False when no present segment has an element (the update is skipped);
    ``utility_min``, ``utility_max`` are in the parameters' dtype; ``std`` is NaN for absent
    segments.
    """

    run: bool
    step: int  # the noise counter T of this step (the global step count after it)
    segment_step: np.ndarray  # t_i after this step
    grad_norm_ema: np.ndarray  # n_i after this step
    std: np.ndarray  # std_i, float64
    utility_min: np.generic
    utility_max: np.generic
    stats: ref.StepStats


def plan_step(dtype, state, present: Sequence[bool], hyper: Sequence[dict], reductions: SegmentReductions,
              noise_norm: str) -> StepPlan:
    """The per-segment float64 work between the passes: the reference's formulas
    (:func:`upgd_ref.reference.noise_scales`) on the combined reductions."""
    dtype = np.dtype(dtype)
    flags = np.asarray(present, dtype=np.bool_)
    t = state.segment_step + flags
    with np.errstate(all="ignore"):  # NaN marks absent segments
        norms, ema, std = ref.noise_scales(np, reductions.grad_sq_sum, flags, hyper, state.grad_norm_ema, t,
                                           noise_norm)
    grad_norm, std = np.asarray(norms, dtype=np.float64), np.asarray(std, dtype=np.float64)
    u_lo = u_hi = dtype.type(np.nan)
    if flags.any():
        lo, hi = reductions.utility_min[flags].min(), reductions.utility_max[flags].max()
        if lo <= hi:  # some present segment has elements (empty ones hold +inf, -inf)
            u_lo, u_hi = dtype.type(lo), dtype.type(hi)
    stats = ref.StepStats(grad_norm=grad_norm, noise_std=std, utility_min=u_lo, utility_max=u_hi)
    return StepPlan(run=not np.isnan(u_lo), step=state.step + 1, segment_step=t,
                    grad_norm_ema=np.asarray(ema, dtype=np.float64), std=std, utility_min=u_lo,
                    utility_max=u_hi, stats=stats)


def commit(state, plan: StepPlan) -> None:
    """The per-segment records of ``state`` after a step whose stages all ran."""
    state.step = plan.step
    state.segment_step[...] = plan.segment_step
    state.grad_norm_ema[...] = plan.grad_norm_ema


def vgs_statistics(state, reductions: SegmentReductions, sizes, present, beta: float) -> None:
    """The VGS statistics of ``state`` (a :class:`~upgd_ref.state.FlatVGSState`) advanced in
    place from the combined reductions: :func:`upgd_ref.reference.vgs_statistics_update`
    with ``mean(g_i) = sum g_i / n_i`` for the present, non-empty segments."""
    updated = [bool(p) and n != 0 for p, n in zip(present, sizes)]
    size = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)
    new = ref.vgs_statistics_update(
        ref.VGSState(state.step, state.grad_mean_avg, state.grad_sq_avg),
        reductions.grad_sum / size, reductions.grad_sq_sum / size, updated, beta=beta,
    )
    state.step = int(new.step)
    state.grad_mean_avg[...] = new.grad_mean_avg
    state.grad_sq_avg[...] = new.grad_sq_avg
