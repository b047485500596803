"""The finiteness contract (``specs/algorithm.md`` §8) on every NumPy backend.

After a step everything is finite, or the step did not happen: ``nonfinite="raise"`` raises
:class:`~upgd_ref.checks.NonFiniteStepError` naming the field and segment with parameters,
gradients, state and VGS statistics bit-identical; ``"skip"`` leaves them bit-identical too
and counts the skip. Spikes sit just above (refused) and just below (stepped, finite) the
overflow thresholds of ``g*g`` in float32 (~1.8e19) and float64 (~1.3e154), in one element
of one segment, in each pass's inputs: gradients, parameters and the utility/moment state.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.helpers.snapshots import assert_unchanged, snapshot
from upgd_ref import UPGD, AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.checks import NonFiniteStepError
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.stages import BOUND_MARGIN, update_bound

SHAPES = [(5,), (3, 4), (6,)]
SEGMENT = 1  # the spiked segment
ELEMENT = 7  # its spiked element (logical index within the segment)
#: Largest |g| whose square is finite, and a value just above: per dtype.
SQUARE_EDGE = {"float32": (1.8e19, 1.9e19), "float64": (1.3e154, 1.4e154)}


def _problem(dtype, seed=0):
    layout = FlatLayout(SHAPES, dtype=dtype)
    data = np.random.default_rng(seed)
    params = layout.pack([data.standard_normal(s) for s in SHAPES])
    grads = layout.pack([data.standard_normal(s) * 0.1 for s in SHAPES])
    return layout, params, grads


def _at(layout, buffer, value):
    """Put ``value`` at (SEGMENT, ELEMENT) of a flat buffer."""
    buffer[layout.offsets[SEGMENT] + ELEMENT] = value


def _state_without_counter(opt):
    state = opt.state.to_state(opt.layout)
    state.pop("skipped_steps")
    return state


def _assert_all_finite(opt, params, vgs=None):
    assert np.isfinite(params).all()
    for name in ("utility", "first_moment", "second_moment", "grad_norm_ema"):
        assert np.isfinite(getattr(opt.state, name)).all(), name
    if vgs is not None:
        assert np.isfinite(vgs.state.grad_mean_avg).all() and np.isfinite(vgs.state.grad_sq_avg).all()


def _spike(layout, params, grads, opt, site, dtype, above):
    """Set up one spike; returns the field a refusal names."""
    low, high = SQUARE_EDGE[dtype]
    big = np.finfo(dtype).max
    if site == "grad_square":  # v' = beta2 v + (1 - beta2) g*g: g*g overflows above the edge
        _at(layout, grads, high if above else low)
        return "second_moment"
    if site == "grad_nan":
        _at(layout, grads, np.nan if above else 1.0)
        return "grads"
    if site == "param_product":  # u' = ... (1 - beta_u)(-g p): g p overflows
        _at(layout, params, big / 2)
        _at(layout, grads, 4.0 if above else 1e-3)
        return "utility"
    if site == "param_inf":
        _at(layout, params, np.inf if above else big / 4)
        return "params"
    if site == "utility_state":
        opt.state.utility[layout.offsets[SEGMENT] + ELEMENT] = np.inf if above else big / 2
        return "utility"
    if site == "moment_state":  # m' = 0.9 m + 0.1 g, then m_hat = m' / (1 - 0.9) overflows
        opt.state.first_moment[layout.offsets[SEGMENT] + ELEMENT] = big / 2 if above else big / 1e6
        opt.state.second_moment[layout.offsets[SEGMENT] + ELEMENT] = 0.0
        return "direction"
    raise AssertionError(site)


SITES = ["grad_square", "grad_nan", "param_product", "param_inf", "utility_state", "moment_state"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("site", SITES)
def test_a_spike_above_the_threshold_raises_naming_field_and_segment_with_nothing_changed(backend, dtype, site):
    layout, params, grads = _problem(dtype)
    opt = AdaptiveUPGD(layout, lr=1e-3, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    field = _spike(layout, params, grads, opt, site, dtype, above=True)
    before = snapshot(opt, vgs, params, grads)
    with pytest.raises(NonFiniteStepError) as caught:
        opt.step(params, grads, vgs=vgs)
    assert_unchanged(before, snapshot(opt, vgs, params, grads))
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.field, error.segment) == (field, SEGMENT)
    assert field in str(error) and f"segment {SEGMENT}" in str(error)
    if site not in ("param_inf",):
        assert error.element == ELEMENT and f"element {ELEMENT}" in str(error)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("site", SITES)
def test_a_spike_above_the_threshold_is_skipped_under_skip(backend, dtype, site):
    layout, params, grads = _problem(dtype)
    opt = AdaptiveUPGD(layout, lr=1e-3, backend=backend, nonfinite="skip")
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    _spike(layout, params, grads, opt, site, dtype, above=True)
    before = snapshot(_state_without_counter(opt), vgs, params, grads)
    info = opt.step(params, grads, vgs=vgs)
    assert_unchanged(before, snapshot(_state_without_counter(opt), vgs, params, grads))
    assert info.skipped and info.skipped_steps == 1 and info.step == 0
    assert opt.state.skipped_steps == 1 and opt.state_dict()["state"]["skipped_steps"] == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("site", SITES)
def test_a_spike_below_the_threshold_steps_and_stays_finite(backend, dtype, site):
    layout, params, grads = _problem(dtype)
    opt = AdaptiveUPGD(layout, lr=1e-3, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    _spike(layout, params, grads, opt, site, dtype, above=False)
    info = opt.step(params, grads, vgs=vgs)
    assert not info.skipped and info.step == 1
    _assert_all_finite(opt, params, vgs)


def test_a_skipped_step_draws_the_same_noise_counter_next_time(backend):
    """Skip leaves T: the next valid step equals the step on a fresh optimizer, bit for bit."""
    layout, params, grads = _problem("float32")
    skipping = AdaptiveUPGD(layout, lr=1e-2, sigma=0.1, seed=3, backend=backend, nonfinite="skip")
    fresh = AdaptiveUPGD(layout, lr=1e-2, sigma=0.1, seed=3, backend=backend)
    bad = grads.copy()
    _at(layout, bad, np.inf)
    assert skipping.step(params.copy(), bad).skipped
    mine, theirs = params.copy(), params.copy()
    skipping.step(mine, grads.copy())
    fresh.step(theirs, grads.copy())
    assert np.array_equal(mine, theirs)
    assert skipping.state.step == fresh.state.step == 1 and skipping.state.skipped_steps == 1


def test_the_sum_of_squares_overflowing_float64_is_refused(backend):
    """Two elements of 1.3e154: each square is finite, their sum (and the VGS b_i) is not."""
    layout, params, grads = _problem("float64")
    grads[layout.offsets[SEGMENT] : layout.offsets[SEGMENT] + 2] = SQUARE_EDGE["float64"][0]
    opt = AdaptiveUPGD(layout, backend=backend)
    before = snapshot(opt, params, grads)
    with pytest.raises(NonFiniteStepError, match="sum of the gradient's squares") as caught:
        opt.step(params, grads)
    assert caught.value.field == "grads" and caught.value.segment == SEGMENT
    assert_unchanged(before, snapshot(opt, params, grads))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_update_bound_refuses_an_overflowing_update(backend, dtype):
    """Plain UPGD (d = g) with a huge lr: the update would overflow; refused as ``params``."""
    layout, params, grads = _problem(dtype)
    big = float(np.finfo(dtype).max)
    grads[...] = np.where(grads != 0, 10.0, 0.0)
    opt = UPGD(layout, lr=big / 2, weight_decay=0.0, backend=backend)  # lr g (1 - su) >= 0.27 big / 2 * 10
    before = snapshot(opt, params, grads)
    with pytest.raises(NonFiniteStepError, match="could overflow") as caught:
        opt.step(params, grads)
    assert caught.value.field == "params" and caught.value.segment == 0
    assert_unchanged(before, snapshot(opt, params, grads))


def test_the_update_bound_is_exactly_the_spec_formula():
    """``B = max|p| |1 - lr wd| + max(1, step) (max|d| + std 6.7637...)`` in float64."""
    h = validate_upgd(dict(lr=3.0, weight_decay=0.5))
    assert update_bound("float64", h, 2.0, 4.0, 5.0, 0.25) == 4.0 * 0.5 + 6.0 * (5.0 + 0.25 * 6.763705635001895)
    assert BOUND_MARGIN == 1.0 - 2.0**-20


@pytest.mark.parametrize("member", ["adaptive_paper", "upgd_paper"])
def test_the_paper_protection_with_zero_u_hi_is_refused(backend, member):
    """``U_hi = 0``: the paper's ``0/0`` would make parameters NaN; refused (``utility``)."""
    layout, params, grads = _problem("float64")
    grads[...] = 0.0  # every utility 0 at the first step
    opt = (AdaptiveUPGD if member == "adaptive_paper" else UPGD)(layout, profile="paper", backend=backend)
    before = snapshot(opt, params, grads)
    with pytest.raises(NonFiniteStepError, match="U_hi = 0") as caught:
        opt.step(params, grads)
    assert caught.value.field == "utility"
    assert_unchanged(before, snapshot(opt, params, grads))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_huge_noise_ema_init_is_refused_or_finite(backend, dtype):
    """EMA noise from ``n_0 = 1e300``: ``std = 1e303 * sigma`` overflows float32 (refused as
    ``noise_std``); in float64 the step runs and everything stays finite."""
    layout, params, grads = _problem(dtype)
    opt = AdaptiveUPGD(layout, adaptive_noise=True, instant_noise_scale=False, noise_ema_init=1e300, backend=backend)
    if dtype == "float32":
        before = snapshot(opt, params, grads)
        with pytest.raises(NonFiniteStepError) as caught:
            opt.step(params, grads)
        assert caught.value.field == "noise_std"
        assert_unchanged(before, snapshot(opt, params, grads))
    else:
        opt.step(params, grads)
        _assert_all_finite(opt, params)


def test_the_utility_range_overflowing_is_refused(backend):
    """``U_hi - U_lo`` overflows float32 (utilities of both signs near the maximum)."""
    layout, params, grads = _problem("float32")
    opt = AdaptiveUPGD(layout, beta_utility=0.0, backend=backend)
    params[layout.offsets[0]], grads[layout.offsets[0]] = 2e19, 1e19  # u = -2e38
    params[layout.offsets[2]], grads[layout.offsets[2]] = 2e19, -1e19  # u = +2e38
    before = snapshot(opt, params, grads)
    with pytest.raises(NonFiniteStepError, match="utility range") as caught:
        opt.step(params, grads)
    assert caught.value.field == "utility"
    assert_unchanged(before, snapshot(opt, params, grads))


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_the_scaler_alone_follows_its_policy(backend, policy):
    layout, _, grads = _problem("float64")
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend=backend, nonfinite=policy)
    vgs.update(grads)
    grads[layout.offsets[SEGMENT] : layout.offsets[SEGMENT] + 2] = SQUARE_EDGE["float64"][0]
    before = snapshot(vgs.state.step, vgs.state.grad_mean_avg, vgs.state.grad_sq_avg, grads)
    if policy == "raise":
        with pytest.raises(NonFiniteStepError) as caught:
            vgs.update(grads)
        assert caught.value.field == "vgs" and caught.value.segment == SEGMENT
        nan = grads.copy()
        _at(layout, nan, np.nan)
        with pytest.raises(NonFiniteStepError, match=f"segment {SEGMENT}"):
            vgs.scale(nan)
    else:
        vgs.update(grads)
        assert vgs.state.skipped_steps == 1 and vgs.state_dict()["state"]["skipped_steps"] == 1
    assert_unchanged(before, snapshot(vgs.state.step, vgs.state.grad_mean_avg, vgs.state.grad_sq_avg, grads))


def test_the_skipped_counter_is_saved_and_old_state_dicts_load(tmp_path):
    layout, params, grads = _problem("float64")
    opt = AdaptiveUPGD(layout, nonfinite="skip")
    bad = grads.copy()
    _at(layout, bad, np.nan)
    opt.step(params, bad)
    opt.step(params, grads)
    opt.save(tmp_path / "opt.npz")
    again = AdaptiveUPGD(layout)
    again.load(tmp_path / "opt.npz")
    assert again.state.skipped_steps == 1 and snapshot(again.state) == snapshot(opt.state)
    old = opt.state_dict()
    del old["state"]["skipped_steps"]  # written before the counter existed
    again.load_state_dict(old)
    assert again.state.skipped_steps == 0 and again.state.step == 1


@pytest.mark.parametrize("value", [10**400, -(10**400)])
@pytest.mark.parametrize("name", ["lr", "sigma", "noise_ema_init", "weight_decay"])
def test_numbers_too_large_for_float64_are_a_value_error_naming_the_parameter(name, value):
    layout = FlatLayout([(2,)], dtype="float64")
    with pytest.raises(ValueError, match=name):
        AdaptiveUPGD(layout, **{name: value})


def test_eps_zero_is_refused():
    with pytest.raises(ValueError, match="eps must be > 0"):
        AdaptiveUPGD(FlatLayout([(2,)]), eps=0.0)


@pytest.mark.parametrize("kwargs, name", [(dict(lr=1e39), "lr"), (dict(lr=1e30, weight_decay=1e10), "weight_decay"),
                                          (dict(eps=1e-50), "eps")])
def test_coefficients_beyond_the_dtype_are_a_value_error_at_the_step(backend, kwargs, name):
    layout, params, grads = _problem("float32")
    opt = AdaptiveUPGD(layout, backend=backend, nonfinite="skip", **kwargs)  # settings: never skipped
    before = snapshot(opt, params, grads)
    with pytest.raises(ValueError, match=name):
        opt.step(params, grads)
    assert_unchanged(before, snapshot(opt, params, grads))
    assert not math.isnan(float(params[0]))


@pytest.mark.parametrize("bad", ["ignore", None, 1])
def test_an_unknown_policy_is_refused(bad):
    with pytest.raises(ValueError, match="nonfinite"):
        AdaptiveUPGD(FlatLayout([(2,)]), nonfinite=bad)
    with pytest.raises(ValueError, match="nonfinite"):
        VarianceGradientScaler(FlatLayout([(2,)]), nonfinite=bad)
