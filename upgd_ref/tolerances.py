r"""The tolerance contract (``specs/tolerances.md``), as code every test cites.

float64 is the truth. A *candidate* (float32 or float64 results of any backend or port) is
compared with the float64 reference run **from the same inputs**: the candidate's own
pre-step state and parameters, converted exactly to float64. Errors are measured in units of
the candidate dtype's unit roundoff ``u`` (``2**-24`` float32, ``2**-53`` float64) times the
*scale* of each quantity, the sum of the magnitudes of the terms it is computed from, so a
bound never depends on how cancellation happens to come out:

==========================  ================================================================
quantity                    allowed ``|candidate - truth|``
==========================  ================================================================
normals (``noise``)         0 (bit-identical)
``u``, ``m``, ``v``         ``STATE_ULPS * u * (|beta * old| + |(1 - beta) * new_term|)``
parameters                  ``PARAM_ULPS * u * scale_p`` (below)
reductions (norms, stats)   ``(REDUCTION_ULPS * u + n * 2**-53) * scale`` (n terms summed)
VGS ``f``, ``G``            ``SCALAR_ULPS_F64 * 2**-53 * |truth|`` (evaluated in float64)
==========================  ================================================================

``scale_p = |p| + lr * (scale_d + |noise|) * (1 + kappa)`` where
``scale_d = (scale_m / (1 - beta1**t)) / (sqrt(v_hat) + eps) + |d|`` bounds the Adam
direction's rounding and ``kappa = (|u|/cu + scale_u/cu + 3 max|U| + max scale_u) /
(2 (U_hi - U_lo + 1e-8))`` is the sensitivity of the protection ``1 - su`` to rounding in
the utility normalisation (``d su / d x <= 1/2``). Other members of the family
(:func:`upgd_step_scales`, ``variant=``): ``lr`` becomes ``update_factor * lr``,
``scale_d = |g|`` without moments, and the ``"max"`` protection has its own ``kappa``.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref
from .precision import spacing

__all__ = [
    "UNIT_ROUNDOFF",
    "STATE_ULPS",
    "PARAM_ULPS",
    "REDUCTION_ULPS",
    "SCALAR_ULPS_F64",
    "INDEPENDENT_RTOL",
    "unit_roundoff",
    "upgd_step_scales",
    "upgd_step_bounds",
    "max_violation",
    "ROUNDING_ULPS_16",
    "low_precision_bound",
    "update_convention_bound",
    "ulps",
]

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float64": 2.0**-53}
STATE_ULPS = 8
PARAM_ULPS = 16
REDUCTION_ULPS = 8
SCALAR_ULPS_F64 = 64
#: 16-bit parameters (and a 16-bit state), ``specs/tolerances.md`` §2a: the float32 bound
#: plus this many ulps of the 16-bit dtype (the one rounding to it, nearest or stochastic).
ROUNDING_ULPS_16 = 1
#: Relative agreement of the float64 stateful API with an independent float64 implementation
#: of the same formulas, free-running (specs/tolerances.md §3): two transcriptions of one
#: expression order differ only where a libm call or a summation order does.
INDEPENDENT_RTOL = 1e-12


def unit_roundoff(dtype) -> float:
    return UNIT_ROUNDOFF[np.dtype(dtype).name]


def _ema_scale(beta, old, term):
    return np.abs(beta * old) + np.abs((1.0 - beta) * term)


def upgd_step_scales(params, grads, state: ref.UPGDState, normals, hyper, present=None,
                     noise_norm="segment", variant=ref.PRODUCTION):
    """Per-segment scales of one step, computed in float64 from the step's inputs.

    Inputs as for :func:`upgd_ref.reference.adaptive_upgd_step` (NumPy arrays of any float
    dtype; they are converted exactly to float64). Returns ``(truth, scales)``: the float64
    step's ``(new_params, new_state, stats)`` and a dict of per-segment scale arrays for
    ``params``, ``utility``, ``first_moment``, ``second_moment`` plus per-segment scalars
    ``grad_norm`` (its own value: a sum of non-negative terms).

    ``variant`` (``specs/algorithm.md`` §7): the truth is that member's step and the
    parameter scale is ``|p| + step * (scale_d + |noise|) * (1 + kappa)`` with
    ``step = update_factor * lr``; without moments ``scale_d = |g|`` (``g`` is exact: only
    the products round) and ``m``, ``v`` must stay exactly as they were (scale 0). With the
    ``"max"`` protection ``su = sigmoid(z)``, ``z = (u/cu) / U_hi``, ``d su / d z <= 1/4``;
    ``z`` carries the rounding of ``u`` (``scale_u``), of ``u/cu`` and of the division
    (``|u|/cu``), and the error of ``U_hi`` (the maximum of the candidate's utilities, off by
    at most ``max scale_u`` units) times ``|z| / |U_hi|``::

        kappa = (|u|/cu + scale_u/cu + (|u|/cu) * max(scale_u) / |U_hi|) / (4 |U_hi|)

    (infinite when ``U_hi = 0``: there the member's ``su`` is NaN or 0/1, compared exactly).
    """
    variant = ref.check_variant(variant)
    wide = lambda xs: [np.asarray(x, dtype=np.float64) for x in xs]  # noqa: E731
    params64, grads64, normals64 = wide(params), wide(grads), wide(normals)
    state64 = ref.UPGDState(
        step=np.int64(state.step), segment_step=np.asarray(state.segment_step, dtype=np.int64),
        utility=wide(state.utility), first_moment=wide(state.first_moment),
        second_moment=wide(state.second_moment),
        grad_norm_ema=np.asarray(state.grad_norm_ema, dtype=np.float64),
    )
    with np.errstate(all="ignore"):
        truth = ref.adaptive_upgd_step(params64, grads64, state64, normals64, hyper, present=present,
                                       noise_norm=noise_norm, variant=variant)
    new_params, new_state, stats = truth
    n = len(params)
    present = [True] * n if present is None else list(present)
    scales = {k: [np.zeros_like(p) for p in params64] for k in ("params", "utility", "first_moment", "second_moment")}
    scale_u = [None] * n
    for i in range(n):
        if present[i]:
            h, g, p = hyper[i], grads64[i], params64[i]
            scale_u[i] = _ema_scale(h["beta_utility"], state64.utility[i], g * p)
            scales["utility"][i] = scale_u[i]
            if variant.moments == "adam":  # else m, v must be left exactly as they were
                scales["first_moment"][i] = _ema_scale(h["beta1"], state64.first_moment[i], g)
                scales["second_moment"][i] = _ema_scale(h["beta2"], state64.second_moment[i], g * g)
    filled = [i for i in range(n) if present[i] and params64[i].size]
    if filled:
        u_lo, u_hi = float(stats.utility_min), float(stats.utility_max)
        u_max = max(abs(u_lo), abs(u_hi))
        max_scale_u = max(float(np.max(scale_u[i])) for i in filled)
        width = 2.0 * (u_hi - u_lo + ref.UTILITY_RANGE_EPS)
    with np.errstate(all="ignore"):
        for i in filled:
            h, t = hyper[i], int(new_state.segment_step[i])
            cu = ref.bias_correction(h["beta_utility"], t)
            bc1 = ref.bias_correction(h["beta1"], t)
            v_hat = new_state.second_moment[i] / ref.bias_correction(h["beta2"], t)
            m_hat = new_state.first_moment[i] / bc1
            if variant.moments == "adam":
                denom = np.sqrt(v_hat) + h["eps"]
                direction = m_hat / denom
                scale_d = (_ema_scale(h["beta1"], state64.first_moment[i], grads64[i]) / bc1) / denom \
                    + np.abs(direction)
            else:
                scale_d = np.abs(grads64[i])
            noise = float(stats.noise_std[i]) * normals64[i]
            scaled_u = np.abs(new_state.utility[i]) / cu
            if variant.protection == "min_max":
                kappa = (scaled_u + scale_u[i] / cu + 3.0 * u_max + max_scale_u) / width
            else:
                kappa = (scaled_u + scale_u[i] / cu + scaled_u * max_scale_u / abs(u_hi)) / (4.0 * abs(u_hi))
            step = variant.update_factor * h["lr"]
            scales["params"][i] = np.abs(params64[i]) + step * (scale_d + np.abs(noise)) * (1.0 + kappa)
    scales["grad_norm"] = np.asarray(stats.grad_norm, dtype=np.float64)
    return truth, scales


def upgd_step_bounds(scales: dict, dtype, sizes) -> dict:
    """Allowed absolute errors from :func:`upgd_step_scales` for a candidate of ``dtype``."""
    u = unit_roundoff(dtype)
    return {
        "params": [PARAM_ULPS * u * s for s in scales["params"]],
        "utility": [STATE_ULPS * u * s for s in scales["utility"]],
        "first_moment": [STATE_ULPS * u * s for s in scales["first_moment"]],
        "second_moment": [STATE_ULPS * u * s for s in scales["second_moment"]],
        "grad_norm": np.array([(REDUCTION_ULPS * u + n * 2.0**-53) for n in sizes]) * scales["grad_norm"],
    }


def max_violation(candidate, truth, bound) -> float:
    """``max(|candidate - truth| / bound)``: <= 1 means within the contract.

    An exact match counts 0 (also for a zero bound), NaN on both sides 0, NaN on one side inf.
    """
    candidate = np.asarray(candidate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    error = np.abs(candidate - truth)
    bound = np.asarray(bound, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error == 0.0, 0.0, error / bound)
    both_nan = np.isnan(candidate) & np.isnan(truth)
    one_nan = np.isnan(candidate) ^ np.isnan(truth)
    ratio = np.where(both_nan, 0.0, np.where(one_nan, np.inf, ratio))
    return float(np.max(ratio)) if ratio.size else 0.0


def low_precision_bound(candidate, truth, float32_bound, dtype) -> np.ndarray:
    """Allowed ``|candidate - truth|`` of 16-bit values (``specs/tolerances.md`` §2a):
    ``ROUNDING_ULPS_16 * ulp_P(max(|candidate|, |truth|) + b) + b``, ``b`` the float32 bound
    of the value before its rounding to ``dtype`` (:func:`upgd_step_bounds` for float32)."""
    b = np.asarray(float32_bound, dtype=np.float64)
    magnitude = np.maximum(np.abs(np.asarray(candidate, dtype=np.float64)), np.abs(np.asarray(truth, dtype=np.float64)))
    return ROUNDING_ULPS_16 * spacing(magnitude + b, dtype) + b


def update_convention_bound(params, updates, new_params, dtype) -> np.ndarray:
    """The extra error of 16-bit parameters stepped through an update ``d = fl_P(P - p)``
    applied as ``q = fl_P(p + d)`` (optax's convention, ``specs/tolerances.md`` §2a):
    0 where ``|d| < |p| / 2`` (then ``|P - p| < |p| / 2``, as ``|p| / 2`` is a value of ``P``
    and rounding is monotone, so ``P - p`` is exact by Sterbenz and ``q = P``), else
    ``(ulp_P(d) + ulp_P(q)) / 2``, the two roundings."""
    p, d, q = (np.abs(np.asarray(x, dtype=np.float64)) for x in (params, updates, new_params))
    extra = (spacing(d, dtype) + spacing(q, dtype)) / 2
    return np.where(d < p / 2, 0.0, extra)


def ulps(candidate, truth, dtype) -> float:
    """``max |candidate - truth| / ulp_P(truth)``: the error of 16-bit values in ulps of ``dtype``."""
    truth = np.asarray(truth, dtype=np.float64)
    error = np.abs(np.asarray(candidate, dtype=np.float64) - truth)
    return float(np.max(error / spacing(truth, dtype))) if error.size else 0.0
