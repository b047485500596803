"""Hypothesis properties of the math (``specs/algorithm.md``), run on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import reference as ref
from upgd_ref import tolerances
from upgd_ref.backends import backends_for
from upgd_ref.hyperparams import validate_upgd

BACKEND_NAMES = sorted(backends_for("numpy", emulators=True))
F64_ULP = tolerances.unit_roundoff(np.float64)
SIGMOID_MINUS_1 = 1 / (1 + math.e)
SIGMOID_PLUS_1 = 1 / (1 + math.exp(-1))

shapes_strategy = st.lists(
    st.one_of(st.just((0,)), st.tuples(st.integers(1, 9)), st.tuples(st.integers(1, 4), st.integers(1, 5))),
    min_size=1, max_size=5,
)


def _gradients(seed, shapes, scale=1.0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) * scale * 10 ** rng.uniform(-2, 1) for s in shapes]


def _one_step(layout, grads, present=None, backend="auto", warm_steps=0, **hyper):
    """Params after ``warm_steps`` identical steps then one step with ``grads``; and its StepInfo."""
    opt = upgd_ref.AdaptiveUPGD(layout, seed=5, backend=backend, **hyper)
    params = layout.pack([np.linspace(-1, 1, max(1, math.prod(s)))[: math.prod(s)].reshape(s) for s in layout.shapes])
    warm = layout.pack([np.full(s, 0.3) for s in layout.shapes])
    for _ in range(warm_steps):
        opt.step(params, warm.copy(), present)
    info = opt.step(params, layout.pack(grads), present)
    return params, info, opt


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**32 - 1), c=st.floats(1e-3, 1.0),
       sigma=st.floats(1e-4, 0.5), noise_norm=st.sampled_from(["segment", "global"]))
def test_adaptive_instant_noise_keeps_noise_to_signal_at_sigma(backend, shapes, seed, c, sigma, noise_norm):
    layout = upgd_ref.FlatLayout(shapes, dtype="float64")
    grads = _gradients(seed, shapes)
    hyper = dict(adaptive_noise=True, instant_noise_scale=True, sigma=sigma, min_noise_std=0.0, noise_norm=noise_norm)
    _, base, opt = _one_step(layout, grads, backend=backend, **hyper)
    _, scaled, opt_scaled = _one_step(layout, [g * c for g in grads], backend=backend, **hyper)
    nonzero = base.grad_norm > 0
    if noise_norm == "segment":
        np.testing.assert_allclose(base.noise_to_signal[nonzero], sigma, rtol=8 * F64_ULP)
        np.testing.assert_allclose(scaled.noise_to_signal[nonzero], sigma, rtol=8 * F64_ULP)
    else:  # one global norm: every segment's NSR is sigma * |g| / |g_i|, unchanged by c
        np.testing.assert_allclose(scaled.noise_to_signal[nonzero], base.noise_to_signal[nonzero], rtol=8 * F64_ULP)
    np.testing.assert_allclose(scaled.noise_std, c * base.noise_std, rtol=8 * F64_ULP)
    np.testing.assert_array_equal(opt.noise(1), opt_scaled.noise(1))  # the draws themselves do not change


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**32 - 1), c=st.floats(1e-3, 1.0), sigma=st.floats(1e-4, 0.5))
def test_fixed_noise_to_signal_grows_as_one_over_c(backend, shapes, seed, c, sigma):
    layout = upgd_ref.FlatLayout(shapes, dtype="float64")
    grads = _gradients(seed, shapes)
    _, base, _ = _one_step(layout, grads, backend=backend, sigma=sigma)
    _, scaled, _ = _one_step(layout, [g * c for g in grads], backend=backend, sigma=sigma)
    nonzero = base.grad_norm > 0
    assert np.all(scaled.noise_std == sigma)
    np.testing.assert_allclose(scaled.noise_to_signal[nonzero], base.noise_to_signal[nonzero] / c, rtol=8 * F64_ULP)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=25, deadline=None)
@given(norm=st.floats(1e-3, 1e3), noise_beta=st.floats(0.5, 0.9999), init=st.sampled_from([0.0, 1.0, 2.5]),
       steps=st.integers(1, 30))
def test_ema_noise_scale_overestimates_by_the_derived_factor(backend, norm, noise_beta, init, steps):
    """Constant |g| = r: the EMA scale is ``r + noise_beta**t * n0 / (1 - noise_beta**t)``.

    ``n0 = 0`` gives exactly r (unbiased); the production ``n0 = 1`` overestimates by
    ``1 + noise_beta**t / ((1 - noise_beta**t) r)`` (specs/algorithm.md, flaw 1).
    """
    layout = upgd_ref.FlatLayout([(4,)], dtype="float64")
    sigma = 0.01
    opt = upgd_ref.AdaptiveUPGD(layout, adaptive_noise=True, instant_noise_scale=False, sigma=sigma,
                                noise_beta=noise_beta, noise_ema_init=init, min_noise_std=0.0, backend=backend)
    params = layout.pack([np.ones(4)])
    grad = layout.pack([np.full(4, norm / 2)])  # ||g|| = norm
    for _ in range(steps):
        info = opt.step(params, grad.copy())
    decay = noise_beta**steps
    expected_scale = norm + decay * init / (1 - decay)
    # the recursion rounds a few times per step, and dividing by 1 - noise_beta**t (itself
    # rounded at magnitude 1) amplifies relative errors by 1 / (1 - noise_beta**t)
    rtol = (8 + 4 * steps) * F64_ULP / (1 - decay)
    np.testing.assert_allclose(info.noise_std[0] / sigma, expected_scale, rtol=rtol)
    if init == 0.0:
        np.testing.assert_allclose(info.noise_std[0] / sigma, norm, rtol=rtol)


vgs_hyper = st.fixed_dictionaries(dict(
    beta=st.floats(0.5, 0.999), alpha=st.floats(0.0, 10.0), eps=st.floats(1e-10, 1e-2),
    warmup_steps=st.integers(0, 6), min_scaling_factor=st.floats(0.01, 1.0),
    variance_cap=st.one_of(st.none(), st.floats(0.01, 100.0)),
))


def _vgs_after(layout, hyper, grads_per_step, backend="auto"):
    vgs = upgd_ref.VarianceGradientScaler(layout, backend=backend, **hyper)
    factors = []
    for grads in grads_per_step:
        flat = layout.pack(grads)
        factors.append(vgs.scale(flat))
        vgs.update(flat)
    return vgs, factors


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, hyper=vgs_hyper, seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 10))
def test_vgs_factor_bounds_warmup_and_alpha_zero(backend, shapes, hyper, seed, steps):
    layout = upgd_ref.FlatLayout(shapes, dtype="float64")
    stream = [_gradients(seed + k, shapes) for k in range(steps)]
    vgs, factors = _vgs_after(layout, hyper, stream, backend)
    for k, f in enumerate(factors):  # factor of the step taken with statistics count k
        assert hyper["min_scaling_factor"] <= f <= 1.0
        if k < hyper["warmup_steps"] or k == 0:
            assert f == 1.0
    assert upgd_ref.VarianceGradientScaler(layout, **{**hyper, "alpha": 0.0}).scaling_factor() == 1.0
    vgs.hyperparams["alpha"] = 0.0
    assert vgs.scaling_factor() == 1.0
    vgs.hyperparams["enabled"] = False
    vgs.hyperparams["alpha"] = hyper["alpha"]
    assert vgs.scaling_factor() == 1.0


@settings(max_examples=40, deadline=None)
@given(shapes=shapes_strategy, hyper=vgs_hyper, seed=st.integers(0, 2**32 - 1),
       alphas=st.lists(st.floats(0.0, 50.0), min_size=2, max_size=6))
def test_vgs_factor_is_non_increasing_in_alpha(shapes, hyper, seed, alphas):
    layout = upgd_ref.FlatLayout(shapes, dtype="float64")
    vgs, _ = _vgs_after(layout, {**hyper, "warmup_steps": 0}, [_gradients(seed + k, shapes) for k in range(4)])
    factors = []
    for alpha in sorted(alphas):
        vgs.hyperparams["alpha"] = alpha
        factors.append(vgs.scaling_factor())
    assert all(a >= b for a, b in zip(factors, factors[1:]))


finite = st.floats(-1e30, 1e30, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(u=st.lists(finite, min_size=1, max_size=20), lo=finite, hi=finite, cu=st.floats(1e-12, 1.0),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_scaled_utility_and_protection_stay_in_range(u, lo, hi, cu, dtype):
    lo, hi = min(lo, hi), max(lo, hi)
    with np.errstate(all="ignore"):
        x = ref.scaled_utility(np.asarray(u, dtype=dtype), dtype(cu), dtype(lo), dtype(hi))
        su = ref.protection(x)
    assume(not np.isnan(x).any())  # inf / inf: a non-finite input range
    assert np.all((x >= 0) & (x <= 1))
    assert np.all(su >= np.asarray(SIGMOID_MINUS_1, dtype) - np.finfo(dtype).eps)
    assert np.all(su <= np.asarray(SIGMOID_PLUS_1, dtype) + np.finfo(dtype).eps)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=25, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**32 - 1), lr=st.floats(1e-4, 0.3),
       mode=st.sampled_from([dict(), dict(adaptive_noise=True), dict(adaptive_noise=True, instant_noise_scale=False)]),
       steps=st.integers(1, 12))
def test_float32_steps_are_within_the_contract_of_float64(backend, shapes, seed, lr, mode, steps):
    """Each float32 step, from the float32 state, within the contract of the float64 step."""
    layout = upgd_ref.FlatLayout(shapes, dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, lr=lr, sigma=0.01, seed=3, backend=backend, **mode)
    hyper = [validate_upgd({k: v for k, v in opt.param_groups[0].items() if k != "segments"})] * len(shapes)
    rng = np.random.default_rng(seed)
    params = layout.pack([rng.standard_normal(s) for s in shapes])
    for step in range(1, steps + 1):
        grads = layout.pack([rng.standard_normal(s) * 10 ** rng.uniform(-3, 1) for s in shapes])
        present = [bool(b) for b in rng.random(len(shapes)) < 0.85]
        before = ref.UPGDState(
            step=opt.state.step, segment_step=opt.state.segment_step.copy(),
            utility=[a.copy() for a in layout.unpack(opt.state.utility)],
            first_moment=[a.copy() for a in layout.unpack(opt.state.first_moment)],
            second_moment=[a.copy() for a in layout.unpack(opt.state.second_moment)],
            grad_norm_ema=opt.state.grad_norm_ema.copy(),
        )
        p_before = [a.copy() for a in layout.unpack(params)]
        (p64, s64, _), scales = tolerances.upgd_step_scales(
            p_before, layout.unpack(grads), before, layout.unpack(upgd_ref.noise(layout, 3, step, "float64")),
            hyper, present)
        bounds = tolerances.upgd_step_bounds(scales, np.float32, layout.sizes)
        opt.step(params, grads, present)
        for name, got, want in (("params", layout.unpack(params), p64),
                                ("utility", layout.unpack(opt.state.utility), s64.utility),
                                ("first_moment", layout.unpack(opt.state.first_moment), s64.first_moment),
                                ("second_moment", layout.unpack(opt.state.second_moment), s64.second_moment)):
            for i in range(len(shapes)):
                assert tolerances.max_violation(got[i], want[i], bounds[name][i]) <= 1.0, (name, step, i)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=30, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_frozen_segments_stay_bit_identical(backend, shapes, seed, data):
    present = data.draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    layout = upgd_ref.FlatLayout(shapes, dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, lr=0.1, adaptive_noise=True, backend=backend, sigma=0.1)
    vgs = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0, backend=backend)
    params = layout.pack(_gradients(seed, shapes))
    for k in range(3):  # some history in every segment
        grads = layout.pack(_gradients(seed + k + 1, shapes))
        vgs.scale(grads)
        opt.step(params, grads)
        vgs.update(grads)
    snapshot = {name: getattr(opt.state, name).copy() for name in ("segment_step", "utility", "first_moment",
                                                                   "second_moment", "grad_norm_ema")}
    p_before, stats_before = params.copy(), (vgs.state.grad_mean_avg.copy(), vgs.state.grad_sq_avg.copy())
    grads = layout.pack(_gradients(seed + 9, shapes))
    g_before = grads.copy()
    vgs.scale(grads, present)
    info = opt.step(params, grads, present)
    vgs.update(grads, present)
    for i, is_present in enumerate(present):
        if is_present:
            continue
        sl = layout.segment_slice(i)
        assert params[sl].tobytes() == p_before[sl].tobytes()
        assert grads[sl].tobytes() == g_before[sl].tobytes()
        for name in ("utility", "first_moment", "second_moment"):
            assert getattr(opt.state, name)[sl].tobytes() == snapshot[name][sl].tobytes()
        assert opt.state.segment_step[i] == snapshot["segment_step"][i]
        assert opt.state.grad_norm_ema[i] == snapshot["grad_norm_ema"][i]
        assert vgs.state.grad_mean_avg[i] == stats_before[0][i] and vgs.state.grad_sq_avg[i] == stats_before[1][i]
        assert np.isnan(info.grad_norm[i]) and np.isnan(info.noise_std[i])


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@settings(max_examples=30, deadline=None)
@given(shapes=shapes_strategy, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_segment_order_does_not_matter_without_noise(backend, shapes, seed, data):
    """min/max are global: permuting segments permutes the results (sigma = 0: no noise)."""
    order = data.draw(st.permutations(range(len(shapes))))
    rng = np.random.default_rng(seed)
    values = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    results = []
    for perm in (list(range(len(shapes))), list(order)):
        layout = upgd_ref.FlatLayout([shapes[i] for i in perm], dtype="float64")
        opt = upgd_ref.AdaptiveUPGD(layout, lr=0.05, sigma=0.0, backend=backend)
        params = layout.pack([values[i] for i in perm])
        for g in grads:
            opt.step(params, layout.pack([g[i] for i in perm]))
        unpacked = layout.unpack(params)
        results.append({perm[j]: unpacked[j] for j in range(len(perm))})
    for i in range(len(shapes)):
        np.testing.assert_array_equal(results[0][i], results[1][i])
