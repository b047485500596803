r"""The stages of a step between the buffers and the per-segment formulas (``specs/step.md``).

Every backend runs a step as

1. **local** (per buffer, element-wise, read-only): pass 1 — ``f g`` when VGS scales, the new
   utility trace and moments, the update direction ``d`` — in registers only, reduced per
   segment to :class:`SegmentReductions` (``sum g``, ``sum g**2`` of the scaled gradient in
   float64, the extrema of the updated utility, ``max |p|``, ``max |d|`` and how many
   elements are not finite);
2. **combine** (:func:`combine_reductions`): the reductions of every buffer (today one; the
   several buffers of a mixed-precision model or the shards of several processes later)
   put in global segment order, then the global quantities taken in a fixed order: the
   utility extrema over the present, non-empty segments and, with ``noise_norm="global"``,
   the squares added in segment order;
3. **plan** (:func:`plan_step`, on the host in float64): ``t_i``, ``||g_i||``, the norm
   average ``n_i`` and ``std_i`` — the reference's own functions applied to the combined
   values — and the VGS statistics (:func:`vgs_next`); then the finiteness checks
   (:func:`refusal`, ``specs/algorithm.md`` §8), before anything is written;
4. **update** (per buffer, element-wise): pass 2 — pass 1's values again, written, and the
   parameter update with this step's normals; then :func:`commit` writes the per-segment
   records.

Because each global quantity is a function of per-segment values taken in segment order,
the result does not depend on how segments are grouped into buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from . import reference as ref
from .precision import finfo
from .rng import NORMAL_MAX

__all__ = ["SegmentReductions", "StepPlan", "Refusal", "BOUND_MARGIN", "combine_reductions", "plan_step", "refusal",
           "update_bound", "segment_dtypes", "part_plan", "commit", "vgs_next", "vgs_commit"]

#: A step is refused when the bound on a parameter's new magnitude exceeds this fraction of
#: the dtype's largest value (``specs/algorithm.md`` §8): room for the few roundings between
#: the bound's exact terms and the computed update.
BOUND_MARGIN = 1.0 - 2.0**-20


class SegmentReductions(NamedTuple):
    """Per-segment reductions of one buffer's local stage, float64 ``(S,)`` host arrays.

    ``grad_sum``, ``grad_sq_sum``: ``sum g_i``, ``sum g_i**2`` of the (scaled) gradient;
    ``utility_min``, ``utility_max``: extrema of the updated utility (exact: values of the
    buffer's dtype; ``+inf`` and ``-inf`` for an empty segment); ``param_max``: ``max |p|``;
    ``direction_max``: ``max |d|`` of the update direction (``specs/algorithm.md`` §8);
    ``nonfinite``: how many elements have a non-finite ``g``, ``p``, new ``u``, ``m``, ``v``
    or ``d``. Entries of absent segments are not read.
    """

    grad_sum: np.ndarray
    grad_sq_sum: np.ndarray
    utility_min: np.ndarray
    utility_max: np.ndarray
    param_max: np.ndarray
    direction_max: np.ndarray
    nonfinite: np.ndarray

    @classmethod
    def empty(cls, num_segments: int) -> SegmentReductions:
        return cls(np.zeros(num_segments), np.zeros(num_segments), np.full(num_segments, np.inf),
                   np.full(num_segments, -np.inf), np.zeros(num_segments), np.zeros(num_segments),
                   np.zeros(num_segments))

    @classmethod
    def from_columns(cls, totals: np.ndarray) -> SegmentReductions:
        """From an ``(S, 7)`` table whose columns are the fields in order (the kernels' partials)."""
        return cls(*(np.ascontiguousarray(totals[:, column], dtype=np.float64) for column in range(len(cls._fields))))


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


class Refusal(NamedTuple):
    """Why a step would leave something non-finite (``specs/algorithm.md`` §8): the ``field``
    (``"elements"``: a per-element check, worded by the door; ``"grads"``, ``"grad_norm_ema"``,
    ``"noise_std"``, ``"utility"``, ``"params"``, ``"vgs"``), the ``segment`` (or ``None``)
    and a message."""

    field: str
    segment: int | None
    message: str


def update_bound(dtype, hyper: dict, update_factor: float, param_max: float, direction_max: float,
                 std: float) -> float:
    """``B = max|p| |1 - lr wd| + max(1, update_factor lr) (max|d| + std NORMAL_MAX)``, float64,
    with the coefficients rounded to ``dtype`` as the update uses them: it bounds ``|p|`` after
    the update and every intermediate of it (``d + noise``, ``step (d + noise)``, ``p (1 - lr wd)``)."""
    with np.errstate(over="ignore"):
        decay = abs(float(np.asarray(1.0 - hyper["lr"] * hyper["weight_decay"], dtype=dtype)))
        step = abs(float(np.asarray(update_factor * hyper["lr"], dtype=dtype)))
        noise = abs(float(np.asarray(std, dtype=dtype))) * NORMAL_MAX
    return float(param_max) * decay + max(1.0, step) * (float(direction_max) + noise)  # Python floats: inf, no warning


def segment_dtypes(dtype, num_segments: int) -> list[np.dtype]:
    """One dtype per segment: ``dtype`` repeated, or ``dtype`` itself when it is a sequence
    (the segments of a :class:`~upgd_ref.multi.MultiLayout` live in buffers of several dtypes)."""
    if isinstance(dtype, (list, tuple)):
        return [np.dtype(d) for d in dtype]
    return [np.dtype(dtype)] * num_segments


def refusal(dtype, plan: StepPlan, reductions: SegmentReductions, hyper: Sequence[dict], present: Sequence[bool],
            variant: ref.UPGDVariant, vgs_new: ref.VGSState | None = None, storage=None) -> Refusal | None:
    """The first reason (in the order of ``specs/algorithm.md`` §8) why the planned step would
    leave a non-finite parameter, state entry or VGS statistic, or ``None``: nothing has been
    written yet, so a refused step changes nothing. ``dtype``: the buffers' dtype, or one
    per segment (:func:`segment_dtypes`), the dtype the step computes in; ``storage``: the
    parameters' dtypes when narrower (16-bit parameters stepped in float32,
    ``specs/precision.md``): the update's bound is checked against their largest value."""
    dtypes = segment_dtypes(dtype, len(present))
    stored = dtypes if storage is None else segment_dtypes(storage, len(present))
    segments = [i for i, p in enumerate(present) if p]
    for i in segments:
        if reductions.nonfinite[i] > 0:
            return Refusal("elements", i, f"segment {i}: {int(reductions.nonfinite[i])} element(s) with a non-finite "
                                          "gradient, parameter, utility, moment or update direction")
    for i in segments:
        if not (math.isfinite(reductions.grad_sum[i]) and math.isfinite(reductions.grad_sq_sum[i])):
            return Refusal("grads", i, f"grads: segment {i}: the sum of the gradient's squares overflows float64")
    for i in segments:
        if not math.isfinite(plan.grad_norm_ema[i]):
            return Refusal("grad_norm_ema", i, f"segment {i}: the gradient-norm average n_i overflows float64")
        with np.errstate(over="ignore"):
            std = float(np.asarray(plan.std[i], dtype=dtypes[i]))
        if not std * NORMAL_MAX <= BOUND_MARGIN * float(np.finfo(dtypes[i]).max):
            return Refusal("noise_std", i, f"segment {i}: the noise std {plan.std[i]:.6g} times the largest normal "
                                           f"({NORMAL_MAX}) overflows {dtypes[i].name}")
    if plan.run:
        for dtype in dict.fromkeys(dtypes[i] for i in segments):  # the range is formed in each buffer's dtype
            with np.errstate(over="ignore", invalid="ignore"):
                spread = (dtype.type(plan.utility_max) - dtype.type(plan.utility_min)
                          + dtype.type(ref.UTILITY_RANGE_EPS))
            if variant.protection == "min_max" and not np.isfinite(spread):
                return Refusal("utility", None, f"the utility range U_hi - U_lo = {float(plan.utility_max):.6g} - "
                                                f"({float(plan.utility_min):.6g}) overflows {dtype.name}")
        if variant.protection == "max" and plan.utility_max == 0:
            return Refusal("utility", None, "U_hi = 0: the paper's protection sigmoid((u/cu)/U_hi) divides 0 by 0 "
                                            "where u = 0 (specs/algorithm.md §7.3)")
    for i in segments:
        if reductions.utility_min[i] > reductions.utility_max[i]:
            continue  # no element
        bound = update_bound(dtypes[i], hyper[i], variant.update_factor, reductions.param_max[i],
                             reductions.direction_max[i], plan.std[i])
        if not bound <= BOUND_MARGIN * float(finfo(stored[i]).max):
            return Refusal("params", i, f"params: segment {i}: the update could overflow {stored[i].name} (bound "
                                        f"max|p| |1 - lr wd| + max(1, step) (max|d| + std {NORMAL_MAX}) = {bound:.6g})")
    if vgs_new is not None and not (np.isfinite(vgs_new.grad_mean_avg).all() and np.isfinite(vgs_new.grad_sq_avg).all()):
        bad = int(np.flatnonzero(~(np.isfinite(vgs_new.grad_mean_avg) & np.isfinite(vgs_new.grad_sq_avg)))[0])
        return Refusal("vgs", bad, f"segment {bad}: the VGS statistics a_i, b_i overflow float64")
    return None


def part_plan(plan: StepPlan, segments: Sequence[int], dtype) -> StepPlan:
    """The plan as the update stage of one buffer sees it: the per-segment arrays of its
    ``segments`` (global indices, in the buffer's order) and ``U_lo``, ``U_hi`` in its dtype
    (exact when every buffer has that dtype: the extrema are values of it)."""
    index = np.asarray(segments, dtype=np.int64)
    dtype = np.dtype(dtype)
    return plan._replace(segment_step=plan.segment_step[index], grad_norm_ema=plan.grad_norm_ema[index],
                         std=plan.std[index], utility_min=dtype.type(plan.utility_min),
                         utility_max=dtype.type(plan.utility_max))


def commit(state, plan: StepPlan) -> None:
    """The per-segment records of ``state`` after a step whose stages all ran."""
    state.step = plan.step
    state.segment_step[...] = plan.segment_step
    state.grad_norm_ema[...] = plan.grad_norm_ema


def vgs_next(state, reductions: SegmentReductions, sizes, present, beta: float) -> ref.VGSState:
    """The VGS statistics after this step (``state``: a :class:`~upgd_ref.state.FlatVGSState`,
    not modified): :func:`upgd_ref.reference.vgs_statistics_update` with ``mean(g_i) = sum g_i
    / n_i`` for the present, non-empty segments."""
    updated = [bool(p) and n != 0 for p, n in zip(present, sizes)]
    size = np.maximum(np.asarray(sizes, dtype=np.float64), 1.0)
    with np.errstate(over="ignore", invalid="ignore"):  # refused by the caller before any write
        return ref.vgs_statistics_update(
            ref.VGSState(state.step, state.grad_mean_avg, state.grad_sq_avg),
            reductions.grad_sum / size, reductions.grad_sq_sum / size, updated, beta=beta,
        )


def vgs_commit(state, new: ref.VGSState) -> None:
    """Write the statistics :func:`vgs_next` computed into ``state``."""
    state.step = int(new.step)
    state.grad_mean_avg[...] = new.grad_mean_avg
    state.grad_sq_avg[...] = new.grad_sq_avg
