r"""The reference math: pure Array-API functions shaped like the equations.

Normative text: ``specs/algorithm.md``; the section numbers below refer to it. Every
function takes and returns arrays of one namespace (``xp = array_namespace(...)``), never
mutates its inputs, and branches in Python only on static things (segment count, which
segments are present, mode flags), so the same code runs under NumPy, CuPy, PyTorch and
``jax.numpy`` (also inside ``jax.jit``).

Precision (``specs/tolerances.md``): element-wise formulas run in the segment's dtype with
scalar coefficients rounded to that dtype first; per-segment scalars (bias corrections,
norms, noise std, VGS statistics) are float64 (where the namespace has float64).

Example (one step on two segments, float64, fixed noise)::

    >>> import numpy as np
    >>> from upgd_ref import reference as ref
    >>> params = [np.ones(3), np.full((2, 2), -0.5)]
    >>> grads = [np.array([0.1, -0.2, 0.3]), np.full((2, 2), 0.05)]
    >>> state = ref.upgd_init(params, noise_ema_init=[1.0, 1.0])
    >>> hyper = [ref.UPGD_DEFAULTS] * 2
    >>> normals = [np.zeros(3), np.zeros((2, 2))]
    >>> new_params, state, stats = ref.adaptive_upgd_step(params, grads, state, normals, hyper)
    >>> int(state.step), [int(t) for t in state.segment_step]
    (1, [1, 1])
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .hyperparams import UPGD_DEFAULTS, VGS_DEFAULTS

__all__ = [
    "UPGD_DEFAULTS", "VGS_DEFAULTS", "UTILITY_RANGE_EPS", "VGS_MEAN_SQUARE_FLOOR", "VGS_QUANTILE",
    "VGS_MAX_NORMALIZED_VARIANCE", "UPGDState", "UPGDVariant", "PRODUCTION", "check_variant", "VGSState",
    "StepStats", "bias_correction", "utility_trace_update", "first_moment_update", "second_moment_update",
    "coefficient", "sum_of_squares", "grad_norm_ema_update", "noise_std", "scaled_utility", "protection",
    "max_protection", "parameter_update", "family_parameter_update", "upgd_init", "local_updates", "utility_extrema",
    "noise_scales", "apply_updates", "adaptive_upgd_step", "vgs_init", "vgs_normalized_variances",
    "vgs_global_variance", "vgs_scaling_factor", "vgs_scale", "vgs_statistics_update", "vgs_update",
]

UTILITY_RANGE_EPS = 1e-8
VGS_MEAN_SQUARE_FLOOR = 1e-12
VGS_QUANTILE = 0.9
VGS_MAX_NORMALIZED_VARIANCE = 1e6


class UPGDState(NamedTuple):
    """Optimizer state. Arrays per segment in lists; per-segment scalars as (S,) arrays."""

    step: Any  # int64 scalar: completed calls to step (global, drives the noise counter)
    segment_step: Any  # int64 (S,): t_i, steps in which segment i had a gradient
    utility: list  # u_i
    first_moment: list  # m_i
    second_moment: list  # v_i
    grad_norm_ema: Any  # float64 (S,): n_i (used only with adaptive noise)


class UPGDVariant(NamedTuple):
    """Which member of the UPGD family a step computes (section 7 of specs/algorithm.md).

    ``moments``: ``"adam"`` (direction ``m_hat / (sqrt(v_hat) + eps)``) or ``"none"`` (the
    gradient itself; ``m`` and ``v`` stay 0). ``protection``: ``"min_max"``
    (``sigmoid(2 (x - 1/2))``, ``x`` min-max normalised) or ``"max"`` (the paper's
    ``sigmoid((u / cu) / U_hi)``). ``update_factor``: 1 (production) or 2 (paper).
    ``noise_placement``: ``"sum"`` (``(d + noise) (1 - su)``) or ``"terms"`` (the paper's
    Adam form ``m_hat (1 - su) / (sqrt(v_hat) + eps) + noise (1 - su)``).
    """

    moments: str = "adam"
    protection: str = "min_max"
    update_factor: float = 1.0
    noise_placement: str = "sum"


PRODUCTION = UPGDVariant()
VARIANT_CHOICES = {
    "moments": ("adam", "none"),
    "protection": ("min_max", "max"),
    "update_factor": (1.0, 2.0),
    "noise_placement": ("sum", "terms"),
}


def check_variant(variant) -> UPGDVariant:
    """A valid :class:`UPGDVariant` (from a variant or a dict), or a ``ValueError`` naming the field."""
    if isinstance(variant, dict):
        unknown = set(variant) - set(UPGDVariant._fields)
        if unknown:
            raise ValueError(f"unknown variant field(s): {sorted(unknown)}")
        variant = UPGDVariant(**variant)
    if not isinstance(variant, UPGDVariant):
        raise TypeError(f"variant must be an UPGDVariant or a dict, got {type(variant).__name__}")
    for name, choices in VARIANT_CHOICES.items():
        if getattr(variant, name) not in choices:
            raise ValueError(f"variant.{name} must be one of {choices}, got {getattr(variant, name)!r}")
    return variant._replace(update_factor=float(variant.update_factor))


class VGSState(NamedTuple):
    step: Any  # int64 scalar: k, completed statistics updates
    grad_mean_avg: Any  # float64 (S,): a_i
    grad_sq_avg: Any  # float64 (S,): b_i


class StepStats(NamedTuple):
    """Diagnostics of one step (NaN for segments without a gradient)."""

    grad_norm: Any  # float64 (S,): ||g_i||_2
    noise_std: Any  # float64 (S,): std_i
    utility_min: Any  # U_lo (NaN when no present segment has elements)
    utility_max: Any  # U_hi
    skipped: Any = False  # the step was refused and skipped (specs/algorithm.md §8)


def _numel(x) -> int:
    return math.prod(x.shape)


def _float64(xp):
    return getattr(xp, "float64", xp.float32)


def coefficient(value, like):
    """A scalar coefficient of an element-wise formula on ``like``, rounded once to its dtype.

    A Python number is returned as is: it rounds to ``like``'s dtype where it meets the array
    (weak typing), after any scalar arithmetic done in float64 (``1 - lr * wd``). An array
    scalar (a traced hyper-parameter, float64) is rounded explicitly, so the two give the
    same bits and the element-wise math stays in ``like``'s dtype.
    """
    if isinstance(value, numbers.Number):  # Python and NumPy scalars: unchanged behaviour
        return value
    xp = array_namespace(like)
    return xp.astype(value, like.dtype)


# --- AdaptiveUPGD, pass 1 (section 3.2) ------------------------------------------------


def bias_correction(beta, t):
    """``1 - beta**t``, with ``beta**t`` the C library's double ``pow`` (Python's ``**``).

    NumPy's array ``power`` can differ from ``pow`` by an ulp, so a concrete step count
    is evaluated in Python floats; a traced one (``jax.jit``) falls back to ``xp`` power.
    """
    try:
        steps = operator.index(t)
    except TypeError:
        return 1.0 - beta**t
    return 1.0 - float(beta) ** steps


def utility_trace_update(utility, grad, param, beta_utility):
    """``u <- beta_utility * u + (1 - beta_utility) * (-g * p)``."""
    keep, take = coefficient(beta_utility, utility), coefficient(1.0 - beta_utility, utility)
    return keep * utility + take * (-grad * param)


def first_moment_update(first_moment, grad, beta1):
    """``m <- beta1 * m + (1 - beta1) * g``."""
    return coefficient(beta1, first_moment) * first_moment + coefficient(1.0 - beta1, first_moment) * grad


def second_moment_update(second_moment, grad, beta2):
    """``v <- beta2 * v + (1 - beta2) * g**2``."""
    keep, take = coefficient(beta2, second_moment), coefficient(1.0 - beta2, second_moment)
    return keep * second_moment + take * (grad * grad)


def sum_of_squares(x, total=None):
    """``sum(x**2)`` accumulated in float64, added by ``total`` (default ``xp.sum``)."""
    xp = array_namespace(x)
    wide = xp.astype(x, _float64(xp))
    return (xp.sum if total is None else total)(wide * wide)


# --- AdaptiveUPGD, noise (section 3.3) --------------------------------------------------


def grad_norm_ema_update(grad_norm_ema, norm, noise_beta):
    """``n <- noise_beta * n + (1 - noise_beta) * r``."""
    return noise_beta * grad_norm_ema + (1.0 - noise_beta) * norm


def noise_std(xp, *, sigma, adaptive_noise, instant_noise_scale, min_noise_std, noise_beta,
              norm, grad_norm_ema, t):
    """Noise standard deviation of one segment (float64 scalar).

    Fixed: ``sigma``. Adaptive: ``max(sigma * N, min_noise_std)`` with ``N = r`` (instant)
    or ``N = n / (1 - noise_beta**t)`` (EMA), ``n`` the already-updated average.
    """
    if not adaptive_noise:
        return xp.asarray(sigma, dtype=_float64(xp))
    scale = norm if instant_noise_scale else grad_norm_ema / bias_correction(noise_beta, t)
    return xp.maximum(sigma * scale, xp.asarray(min_noise_std, dtype=_float64(xp)))


# --- AdaptiveUPGD, pass 2 (section 3.4) -------------------------------------------------


def scaled_utility(utility, utility_correction, utility_min, utility_max):
    """``x = clip((u / cu - U_lo) / (U_hi - U_lo + 1e-8), 0, 1)``."""
    xp = array_namespace(utility)
    x = (utility / utility_correction - utility_min) / (utility_max - utility_min + UTILITY_RANGE_EPS)
    return xp.clip(x, 0.0, 1.0)


def protection(x):
    """``su = sigmoid(2 * (x - 0.5))``: how much of the update an element is spared."""
    xp = array_namespace(x)
    return 1.0 / (1.0 + xp.exp(-2.0 * (x - 0.5)))


def max_protection(utility, utility_correction, utility_max):
    """The paper's ``su = sigmoid((u / cu) / U_hi)`` (no minimum, no clip).

    Divides whatever ``U_hi`` is: ``U_hi < 0`` inverts the protection, ``U_hi = 0`` gives
    ``su = 0`` for ``u < 0``, 1 for ``u > 0`` and NaN for ``u = 0`` (section 7.3).
    """
    xp = array_namespace(utility)
    return 1.0 / (1.0 + xp.exp(-((utility / utility_correction) / utility_max)))


def parameter_update(param, m_hat, v_hat, noise, su, *, lr, weight_decay, eps):
    """``p <- p * (1 - lr * wd) - lr * (m_hat / (sqrt(v_hat) + eps) + noise) * (1 - su)``."""
    xp = array_namespace(param)
    decay, lr, eps = (coefficient(c, param) for c in (1.0 - lr * weight_decay, lr, eps))
    return param * decay - lr * (m_hat / (xp.sqrt(v_hat) + eps) + noise) * (1.0 - su)


def family_parameter_update(param, grad, m_hat, v_hat, noise, su, *, lr, weight_decay, eps,
                            variant: UPGDVariant):
    """The update of any family member (section 7.2); ``PRODUCTION`` is :func:`parameter_update`.

    ``step = update_factor * lr``; with ``d`` the direction (``m_hat / (sqrt(v_hat) + eps)``
    or ``g``)::

        sum:    p * (1 - lr * wd) - step * (d + noise) * (1 - su)
        terms:  p * (1 - lr * wd) - step * (m_hat * (1 - su) / (sqrt(v_hat) + eps) + noise * (1 - su))
                p * (1 - lr * wd) - step * (g * (1 - su) + noise * (1 - su))      (no moments)
    """
    if variant == PRODUCTION:
        return parameter_update(param, m_hat, v_hat, noise, su, lr=lr, weight_decay=weight_decay, eps=eps)
    xp = array_namespace(param)
    decay, step, eps = (coefficient(c, param) for c in (1.0 - lr * weight_decay, variant.update_factor * lr, eps))
    keep = 1.0 - su
    if variant.noise_placement == "sum":
        direction = m_hat / (xp.sqrt(v_hat) + eps) if variant.moments == "adam" else grad
        return param * decay - step * (direction + noise) * keep
    protected = m_hat * keep / (xp.sqrt(v_hat) + eps) if variant.moments == "adam" else grad * keep
    return param * decay - step * (protected + noise * keep)


# --- the whole step ---------------------------------------------------------------------


def upgd_init(params, noise_ema_init) -> UPGDState:
    """Zero state for ``params``; ``noise_ema_init``: start value of n_i per segment."""
    xp = array_namespace(*params)
    return UPGDState(
        step=xp.asarray(0, dtype=xp.int64),
        segment_step=xp.zeros((len(params),), dtype=xp.int64),
        utility=[xp.zeros_like(p) for p in params],
        first_moment=[xp.zeros_like(p) for p in params],
        second_moment=[xp.zeros_like(p) for p in params],
        grad_norm_ema=xp.asarray([float(v) for v in noise_ema_init], dtype=_float64(xp)),
    )


def local_updates(params, grads, state: UPGDState, hyper, present, variant: UPGDVariant = PRODUCTION):
    """Pass 1, element-wise (section 3.2): ``(utility, first_moment, second_moment)`` lists with
    every present segment's traces and moments advanced; absent segments' arrays unchanged."""
    utility, first_moment, second_moment = list(state.utility), list(state.first_moment), list(state.second_moment)
    for i in range(len(params)):
        if present[i]:
            h, g = hyper[i], grads[i]
            utility[i] = utility_trace_update(utility[i], g, params[i], h["beta_utility"])
            if variant.moments == "adam":
                first_moment[i] = first_moment_update(first_moment[i], g, h["beta1"])
                second_moment[i] = second_moment_update(second_moment[i], g, h["beta2"])
    return utility, first_moment, second_moment


def utility_extrema(utility, present, dtype, extrema=None):
    """``(U_lo, U_hi)`` over every element of the present, non-empty segments (NaN in
    ``dtype`` when there is none): per-segment extrema (``extrema[i]``, else xp's) combined in segment order."""
    xp = array_namespace(*utility)
    filled = [i for i in range(len(utility)) if present[i] and _numel(utility[i]) != 0]
    if not filled:
        nan = xp.astype(xp.asarray(float("nan"), dtype=_float64(xp)), dtype)
        return nan, nan
    pairs = [(xp.min(utility[i]), xp.max(utility[i])) if extrema is None else extrema[i](utility[i]) for i in filled]
    return xp.min(xp.stack([lo for lo, _ in pairs])), xp.max(xp.stack([hi for _, hi in pairs]))


def noise_scales(xp, squares, present, hyper, grad_norm_ema, segment_step, noise_norm="segment"):
    """Section 3.3 from the per-segment ``sum g_i**2`` (float64): ``(norms, emas, stds)``, lists.

    ``norms[i] = sqrt(squares[i])``; with ``noise_norm="global"`` every segment's ``r`` is
    ``sqrt`` of the present squares added in segment order. Absent segments: NaN norm and
    std, ``n_i`` unchanged (``squares[i]`` is not read).
    """
    f64 = _float64(xp)
    nan = xp.asarray(float("nan"), dtype=f64)
    squares = [squares[i] if present[i] else nan for i in range(len(present))]
    segment_norm = [xp.sqrt(s) for s in squares]
    global_norm = xp.sqrt(sum(squares[i] for i in range(len(present)) if present[i])) if any(present) else nan
    ema, std = [], []
    for i in range(len(present)):
        if not present[i]:
            ema.append(grad_norm_ema[i])
            std.append(nan)
            continue
        h = hyper[i]
        r = segment_norm[i] if noise_norm == "segment" else global_norm
        n_i = grad_norm_ema_update(grad_norm_ema[i], r, h["noise_beta"]) if h["adaptive_noise"] else grad_norm_ema[i]
        ema.append(n_i)
        std.append(noise_std(
            xp, sigma=h["sigma"], adaptive_noise=h["adaptive_noise"],
            instant_noise_scale=h["instant_noise_scale"], min_noise_std=h["min_noise_std"],
            noise_beta=h["noise_beta"], norm=r, grad_norm_ema=n_i, t=segment_step[i],
        ))
    return segment_norm, ema, std


def apply_updates(params, grads, utility, first_moment, second_moment, normals, std, segment_step, hyper,
                  present, utility_min, utility_max, variant: UPGDVariant = PRODUCTION):
    """Pass 2 (section 3.4): the new parameter list (absent segments unchanged); ``std[i]``
    and ``segment_step[i]`` are this step's, ``U_lo``, ``U_hi`` in the parameters' dtype."""
    xp = array_namespace(*params)
    new_params = list(params)
    for i in range(len(params)):
        if not present[i]:
            continue
        h, t, dtype = hyper[i], segment_step[i], params[i].dtype
        cu = xp.asarray(bias_correction(h["beta_utility"], t), dtype=dtype)
        m_hat = first_moment[i] / xp.asarray(bias_correction(h["beta1"], t), dtype=dtype)
        v_hat = second_moment[i] / xp.asarray(bias_correction(h["beta2"], t), dtype=dtype)
        noise = xp.asarray(std[i], dtype=dtype) * normals[i]
        if variant.protection == "min_max":
            su = protection(scaled_utility(utility[i], cu, utility_min, utility_max))
        else:
            su = max_protection(utility[i], cu, utility_max)
        new_params[i] = family_parameter_update(
            params[i], grads[i], m_hat, v_hat, noise, su, lr=h["lr"], weight_decay=h["weight_decay"],
            eps=h["eps"], variant=variant,
        )
    return new_params


def adaptive_upgd_step(params, grads, state: UPGDState, normals, hyper, *, present=None,
                       noise_norm="segment", variant: UPGDVariant = PRODUCTION, total=None, extrema=None):
    """One AdaptiveUPGD step (section 3): returns ``(new_params, new_state, stats)``.

    ``params``, ``grads``, ``normals`` (this step's standard normals, see ``upgd_ref.noise``)
    are per-segment arrays; ``hyper`` is one hyper-parameter dict per segment; ``present[i]``
    False means segment i has no gradient this step and is left entirely unchanged.
    ``variant`` selects a member of the UPGD family (section 7); the default is AdaptiveUPGD.

    The stages are those of every backend (``specs/step.md``): :func:`local_updates` and the
    per-segment reductions (``sum g_i**2``, the utility extrema), their combination
    (:func:`utility_extrema`, :func:`noise_scales`), then :func:`apply_updates`. ``total[i]``,
    ``extrema[i]``: segment ``i``'s summation and extrema (default: ``xp``'s; JAX: ``folded_sum``).
    """
    variant = check_variant(variant)
    xp = array_namespace(*params)
    f64 = _float64(xp)
    present = [True] * len(params) if present is None else [bool(b) for b in present]
    nan = xp.asarray(float("nan"), dtype=f64)

    segment_step = state.segment_step + xp.asarray(present, dtype=xp.int64)
    utility, first_moment, second_moment = local_updates(params, grads, state, hyper, present, variant)
    utility_min, utility_max = utility_extrema(utility, present, params[0].dtype, extrema)
    squares = [sum_of_squares(grads[i], total[i] if total else None) if present[i] else nan for i in range(len(params))]
    segment_norm, ema, std = noise_scales(xp, squares, present, hyper, state.grad_norm_ema, segment_step,
                                          noise_norm)
    new_params = apply_updates(params, grads, utility, first_moment, second_moment, normals, std, segment_step,
                               hyper, present, utility_min, utility_max, variant)

    new_state = UPGDState(
        step=state.step + 1,
        segment_step=segment_step,
        utility=utility,
        first_moment=first_moment,
        second_moment=second_moment,
        grad_norm_ema=xp.stack([xp.asarray(v, dtype=f64) for v in ema]),
    )
    stats = StepStats(
        grad_norm=xp.stack([xp.asarray(v, dtype=f64) for v in segment_norm]),
        noise_std=xp.stack([xp.asarray(v, dtype=f64) for v in std]),
        utility_min=utility_min,
        utility_max=utility_max,
    )
    return new_params, new_state, stats


# --- VarianceGradientScaler (section 2) -------------------------------------------------


def vgs_init(xp, num_segments: int) -> VGSState:
    f64 = _float64(xp)
    return VGSState(
        step=xp.asarray(0, dtype=xp.int64),
        grad_mean_avg=xp.zeros((num_segments,), dtype=f64),
        grad_sq_avg=xp.zeros((num_segments,), dtype=f64),
    )


def vgs_normalized_variances(state: VGSState, *, beta, eps):
    """``nv_i = max(s_i - mu_i**2, 0) / (max(mu_i**2, 1e-12) + eps)``, non-finite -> 0.

    ``mu_i = a_i / (1 - beta**k)``, ``s_i = b_i / (1 - beta**k)``; all zero while k = 0.
    """
    xp = array_namespace(state.grad_mean_avg)
    correction = xp.asarray(bias_correction(beta, state.step), dtype=state.grad_mean_avg.dtype)
    safe = xp.where(correction > 0.0, correction, 1.0)
    mu = state.grad_mean_avg / safe
    s = state.grad_sq_avg / safe
    variance = xp.maximum(s - mu * mu, 0.0)
    nv = variance / (xp.maximum(mu * mu, VGS_MEAN_SQUARE_FLOOR) + eps)
    return xp.where(xp.isfinite(nv) & (correction > 0.0), nv, 0.0)


def vgs_global_variance(normalized_variances, *, variance_cap):
    """``G``: 0.9 quantile (NumPy's linear method, bit for bit), clipped, then capped."""
    xp = array_namespace(normalized_variances)
    ordered = xp.sort(normalized_variances)
    n = ordered.shape[0]
    virtual = (n - 1) * VGS_QUANTILE  # NumPy's virtual index for method="linear"
    below = n - 1 if virtual >= n - 1 else int(virtual // 1)
    above = n - 1 if virtual >= n - 1 else below + 1
    frac = virtual - (virtual // 1)
    a, b = ordered[below], ordered[above]
    diff = b - a
    g = b - diff * (1.0 - frac) if frac >= 0.5 else a + diff * frac
    g = xp.clip(g, 0.0, VGS_MAX_NORMALIZED_VARIANCE)
    if variance_cap is not None:
        g = xp.minimum(g, variance_cap)
    return g


def vgs_scaling_factor(state: VGSState, *, enabled, beta, alpha, eps, warmup_steps,
                       min_scaling_factor, variance_cap):
    """``(f, G)``: ``f = clip(1 / (1 + alpha * G), min_scaling_factor, 1)``.

    ``f = 1`` when disabled, while ``k < warmup_steps`` and at ``k = 0``.
    """
    xp = array_namespace(state.grad_mean_avg)
    g = vgs_global_variance(vgs_normalized_variances(state, beta=beta, eps=eps), variance_cap=variance_cap)
    factor = xp.clip(1.0 / (1.0 + alpha * g), min_scaling_factor, 1.0)
    active = (state.step >= warmup_steps) & (state.step > 0) & bool(enabled)
    return xp.where(active, factor, 1.0), g


def vgs_scale(grads, factor, present=None):
    """Gradients multiplied by ``f`` (rounded to their dtype); absent ones unchanged."""
    present = [True] * len(grads) if present is None else present
    out = []
    for g, p in zip(grads, present):
        xp = array_namespace(g)
        out.append(g * xp.astype(xp.asarray(factor), g.dtype) if p else g)
    return out


def vgs_statistics_update(state: VGSState, grad_mean, grad_sq_mean, updated, *, beta) -> VGSState:
    """``k += 1``; ``a_i <- beta a_i + (1 - beta) mean(g_i)``, ``b_i <- beta b_i + (1 - beta)
    mean(g_i**2)`` for each segment with ``updated[i]`` (float64 per-segment means); the
    others keep their statistics and their ``grad_mean[i]`` is not read."""
    xp = array_namespace(state.grad_mean_avg)
    a, b = [], []
    for i in range(len(updated)):
        if updated[i]:
            a.append(beta * state.grad_mean_avg[i] + (1.0 - beta) * grad_mean[i])
            b.append(beta * state.grad_sq_avg[i] + (1.0 - beta) * grad_sq_mean[i])
        else:
            a.append(state.grad_mean_avg[i])
            b.append(state.grad_sq_avg[i])
    return VGSState(step=state.step + 1, grad_mean_avg=xp.stack(a), grad_sq_avg=xp.stack(b))


def vgs_update(state: VGSState, grads, *, beta, present=None) -> VGSState:
    """``k += 1``; ``a_i, b_i`` <- EMA of ``mean(g_i)``, ``mean(g_i**2)`` (scaled gradients).

    Absent and zero-size segments keep their statistics.
    """
    xp = array_namespace(state.grad_mean_avg)
    f64 = _float64(xp)
    present = [True] * len(grads) if present is None else present
    updated = [bool(present[i]) and _numel(g) != 0 for i, g in enumerate(grads)]
    wide = [xp.astype(g, f64) if u else None for g, u in zip(grads, updated)]
    means = [xp.mean(w) if u else None for w, u in zip(wide, updated)]
    sq_means = [xp.mean(w * w) if u else None for w, u in zip(wide, updated)]
    return vgs_statistics_update(state, means, sq_means, updated, beta=beta)
