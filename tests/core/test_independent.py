"""Acceptance: the stateful API agrees with an independent float64 implementation.

Random layouts (zero-size and frozen segments), every noise mode, VGS on and off, param
groups, 60 steps; parameters and state compared element-wise with the float64 contract of
``upgd_ref.tolerances`` and, for the parameters, at 1e-12 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import upgd_ref
from upgd_ref import tolerances
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.tolerances import INDEPENDENT_RTOL

from tests.helpers.independent import NOISE_MODES, SCENARIOS, PlainAdaptiveUPGD, PlainVGS, random_hyper

STEPS = 60
def _random_case(rng):
    num_segments = int(rng.integers(1, 6))
    shapes = []
    for _ in range(num_segments):
        kind = rng.integers(0, 5)
        shapes.append((0,) if kind == 0 else tuple(int(d) for d in rng.integers(1, 7, size=rng.integers(1, 3))))
    return shapes


def _state_scales(plain, params, grads):
    """The contract's scale ``|beta * old| + |(1 - beta) * term|`` of u, m and v."""
    scales = {"utility": [], "first_moment": [], "second_moment": []}
    for i, (p, g) in enumerate(zip(params, grads)):
        h = plain.hp[i]
        if g is None:
            g = np.zeros_like(p)  # absent: the state must not move at all
        for name, old, beta, term in (("utility", plain.u[i], h["beta_utility"], g * p),
                                      ("first_moment", plain.m[i], h["beta1"], g),
                                      ("second_moment", plain.v[i], h["beta2"], g * g)):
            scales[name].append(np.abs(beta * old) + np.abs((1 - beta) * term))
    return scales


def _run(seed, mode_index, vgs_on, noise_norm, backend):
    rng = np.random.default_rng(seed)
    shapes = _random_case(rng)
    layout = upgd_ref.FlatLayout(shapes, dtype="float64")
    mode = NOISE_MODES[mode_index]
    defaults = random_hyper(rng, mode)
    groups = []
    if len(shapes) > 1 and rng.random() < 0.6:  # a second group with its own settings
        groups = [dict(segments=[0], **random_hyper(rng, NOISE_MODES[int(rng.integers(len(NOISE_MODES)))]))]
    opt = upgd_ref.AdaptiveUPGD(layout, **defaults, noise_norm=noise_norm, seed=int(rng.integers(2**63)),
                                param_groups=groups, backend=backend)
    vgs_kwargs = dict(enabled=vgs_on, warmup_steps=int(rng.integers(0, 6)), alpha=float(rng.choice([0.1, 2.0])),
                      variance_cap=[None, 50.0, 0.5][int(rng.integers(3))])
    vgs = upgd_ref.VarianceGradientScaler(layout, **vgs_kwargs, backend=backend)

    segment_hp = [None] * len(shapes)
    for group in opt.param_groups:
        for i in group["segments"]:
            segment_hp[i] = validate_upgd({k: v for k, v in group.items() if k != "segments"})
    plain = PlainAdaptiveUPGD([np.zeros(s) for s in shapes], segment_hp, noise_norm)
    plain_vgs = PlainVGS(len(shapes), **vgs_kwargs)

    values = [rng.standard_normal(s) for s in shapes]
    params = layout.pack(values)
    worst = 0.0
    for step in range(1, STEPS + 1):
        present = [bool(b) for b in rng.random(len(shapes)) < 0.8]
        grad_values = [rng.standard_normal(s) * 10 ** rng.uniform(-2, 1) for s in shapes]
        grads = layout.pack(grad_values)

        factor = vgs.scale(grads, present)
        opt.step(params, grads, present)
        vgs.update(grads, present)

        expected_factor = plain_vgs.factor()
        scaled = [g * expected_factor if p else None for g, p in zip(grad_values, present)]
        normals = layout.unpack(upgd_ref.noise(layout, opt.seed, step))
        scales = _state_scales(plain, values, scaled)
        values = plain.step(values, scaled, normals)
        plain_vgs.update(scaled)

        assert factor == pytest.approx(expected_factor, rel=INDEPENDENT_RTOL, abs=0)
        for i, (got, want) in enumerate(zip(layout.unpack(params), values)):
            np.testing.assert_allclose(got, want, rtol=INDEPENDENT_RTOL, atol=0, err_msg=f"step {step} segment {i}")
        state = opt.state
        assert list(state.segment_step) == plain.t
        for name, expected in (("utility", plain.u), ("first_moment", plain.m), ("second_moment", plain.v)):
            for got, want, scale in zip(layout.unpack(getattr(state, name)), expected, scales[name]):
                bound = tolerances.STATE_ULPS * tolerances.unit_roundoff(np.float64) * scale
                worst = max(worst, tolerances.max_violation(got, want, bound))
        np.testing.assert_allclose(state.grad_norm_ema, plain.n, rtol=INDEPENDENT_RTOL, atol=0)
    assert worst <= 1.0


# The default for float64 buffers ("auto" -> the reference). Kernels differ from a literal
# NumPy transcription in the last bits, which drift apart over free-running steps; they are
# held to the contract in lockstep instead (tests/kernels/test_numba_step.py, specs/tolerances.md §3).
@pytest.mark.parametrize("backend", ["auto", "reference"])
@settings(max_examples=12, deadline=None)
@given(**SCENARIOS)
def test_agrees_with_independent_float64_implementation(backend, seed, mode_index, vgs_on, noise_norm):
    _run(seed, mode_index, vgs_on, noise_norm, backend)


@pytest.mark.parametrize("mode_index", range(len(NOISE_MODES)))
@pytest.mark.parametrize("noise_norm", ["segment", "global"])
def test_every_mode_with_vgs(mode_index, noise_norm):
    _run(1234 + mode_index, mode_index, True, noise_norm, "auto")
