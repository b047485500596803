"""One float64 reference step of a golden case on logical vectors: the truth both the
generator and the comparator measure against (``specs/golden.md`` §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import reference as ref
from ..tolerances import upgd_step_scales
from .cases import GoldenCase, join_segments, split_vector


# --- one reference step on logical vectors ------------------------------------------------


@dataclass
class ReferenceStep:
    """The float64 reference step ``k`` from a given state: values and contract scales."""

    values: dict
    scales: dict
    vgs_scales: dict | None


def reference_step(case: GoldenCase, k: int, prev: dict, factor=None) -> ReferenceStep:
    """Step ``k`` of ``case`` by the float64 reference from ``prev`` (state after step k - 1).

    ``prev`` holds logical arrays for :data:`STATE_FIELDS`, ``segment_step``,
    ``grad_norm_ema`` and, with VGS, the VGS statistics. ``factor`` replaces the VGS factor
    computed from ``prev`` (the candidate's own ``f``, once that has been checked).
    """
    layout, inputs = case.layout, case.arrays
    present = [bool(b) for b in inputs["present"][k - 1]]
    grads = split_vector(layout, inputs["grads"][k - 1])
    normals = split_vector(layout, inputs["normals"][k - 1])
    values, vgs_scales = {}, None
    if case.vgs is not None:
        vgs_state = ref.VGSState(np.int64(k - 1), np.asarray(prev["vgs_grad_mean_avg"], dtype=np.float64),
                                 np.asarray(prev["vgs_grad_sq_avg"], dtype=np.float64))
        with np.errstate(all="ignore"):
            f, g = ref.vgs_scaling_factor(vgs_state, **case.vgs)
        values["vgs_factor"], values["vgs_normalized_variance"] = float(f), float(g)
        grads = ref.vgs_scale(grads, np.float64(values["vgs_factor"] if factor is None else factor), present)
        updated = ref.vgs_update(vgs_state, grads, beta=case.vgs["beta"], present=present)
        values["vgs_grad_mean_avg"] = np.asarray(updated.grad_mean_avg)
        values["vgs_grad_sq_avg"] = np.asarray(updated.grad_sq_avg)
        vgs_scales = _vgs_scales(vgs_state, grads, case.vgs["beta"], present)
    state = ref.UPGDState(
        step=np.int64(k - 1),
        segment_step=np.asarray(prev["segment_step"], dtype=np.int64),
        utility=split_vector(layout, prev["utility"]),
        first_moment=split_vector(layout, prev["first_moment"]),
        second_moment=split_vector(layout, prev["second_moment"]),
        grad_norm_ema=np.asarray(prev["grad_norm_ema"], dtype=np.float64),
    )
    (new_params, new_state, stats), scales = upgd_step_scales(
        split_vector(layout, prev["params"]), grads, state, normals, case.hyper, present=present,
        noise_norm=case.config.noise_norm, variant=case.variant,
    )
    values.update(
        params=join_segments(new_params), utility=join_segments(new_state.utility),
        first_moment=join_segments(new_state.first_moment), second_moment=join_segments(new_state.second_moment),
        segment_step=np.asarray(new_state.segment_step, dtype=np.int64),
        grad_norm_ema=np.asarray(new_state.grad_norm_ema, dtype=np.float64),
        grad_norm=np.asarray(stats.grad_norm, dtype=np.float64),
        noise_std=np.asarray(stats.noise_std, dtype=np.float64),
        utility_min=float(stats.utility_min), utility_max=float(stats.utility_max),
    )
    scales["grad_norm_ema"] = _ema_norm_scales(case, prev, values["grad_norm"], present)
    return ReferenceStep(values, scales, vgs_scales)


def _vgs_scales(vgs_state, grads, beta, present) -> dict:
    """Scales of ``a_i``, ``b_i``: ``|beta * old| + (1 - beta) * mean(|g|)`` (resp. ``g**2``)."""
    a, b = np.zeros(len(grads)), np.zeros(len(grads))
    for i, g in enumerate(grads):
        if present[i] and g.size:
            a[i] = abs(beta * vgs_state.grad_mean_avg[i]) + (1.0 - beta) * float(np.mean(np.abs(g)))
            b[i] = abs(beta * vgs_state.grad_sq_avg[i]) + (1.0 - beta) * float(np.mean(g * g))
    return {"vgs_grad_mean_avg": a, "vgs_grad_sq_avg": b}


def _ema_norm_scales(case, prev, grad_norm, present) -> np.ndarray:
    """Scale of ``n_i = nb * n_old + (1 - nb) * r``; 0 where ``n_i`` must stay unchanged."""
    out = np.zeros(len(present))
    global_norm = math.sqrt(sum(float(grad_norm[i]) ** 2 for i in range(len(present)) if present[i]))
    for i, h in enumerate(case.hyper):
        if present[i] and h["adaptive_noise"]:
            r = float(grad_norm[i]) if case.config.noise_norm == "segment" else global_norm
            out[i] = abs(h["noise_beta"] * float(prev["grad_norm_ema"][i])) + abs((1.0 - h["noise_beta"]) * r)
    return out
