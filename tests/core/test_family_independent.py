"""Acceptance: every member of the UPGD family (specs/algorithm.md §7) agrees with an
independent float64 implementation written from the spec (``tests/helpers/independent.py``).

Through the core classes (``AdaptiveUPGD``, ``UPGD``, ``UPGDW``, with ``profile``), on random
layouts with zero-size and frozen segments, fixed and adaptive noise, VGS on and off,
parameter groups, fused and separate VGS calls, 45 steps:

- the default backend (``"auto"``, the reference for float64) and ``"reference"``
  free-running at 1e-12 relative on the parameters;
- ``"numba"`` in lockstep with the tolerance contract (float64 and float32): each step is
  judged from the backend's own state before it, since compiled kernels differ from a
  literal NumPy transcription in the last bits and those drift apart over free-running
  steps (``tests/core/test_independent.py``, ``specs/tolerances.md`` §3).

The expected hyper-parameters per segment and each member's options come from the spec's
tables as written out in ``tests/helpers/independent.py``, not from the library.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref import tolerances
from upgd_ref import reference as ref
from upgd_ref.tolerances import INDEPENDENT_RTOL

from tests.helpers.independent import (
    NOISE_MODES, SCENARIOS, SPEC_DEFAULTS, SPEC_MEMBERS, PlainFamilyUPGD, PlainVGS, random_hyper,
)

STEPS = 45
LOCKSTEP_STEPS = 40
MEMBERS = list(SPEC_MEMBERS)
MEMBER_IDS = [f"{c}-{p}" for c, p in MEMBERS]
_NO_MOMENTS = ("beta1", "beta2", "eps")


def _random_shapes(rng):
    shapes = [tuple(int(d) for d in rng.integers(1, 6, size=rng.integers(1, 3)))]  # one non-empty segment
    for _ in range(int(rng.integers(0, 5))):
        kind = rng.integers(0, 5)
        shapes.append((0,) if kind == 0 else tuple(int(d) for d in rng.integers(1, 7, size=rng.integers(1, 3))))
    order = rng.permutation(len(shapes))
    return [shapes[i] for i in order], int(np.argmin(order))  # the index of the non-empty one


def _member_kwargs(member, h, rng):
    """Constructor keywords for ``member`` from spec-named values ``h`` (some left to defaults)."""
    cls, profile = member
    h = dict(h)
    if rng.random() < 0.3:  # exercise the member's own defaults
        for name in ("lr", "weight_decay", "sigma", "eps"):
            if rng.random() < 0.5:
                h.pop(name, None)
    if cls == "UPGD":
        return {k: v for k, v in h.items() if k not in _NO_MOMENTS}, profile
    if cls == "UPGDW":
        out = {k: v for k, v in h.items() if k not in ("beta_utility", "beta1", "beta2")}
        out["betas"] = (h["beta1"], h["beta2"])
        return out, None
    return h, profile


def _group_override(member, h):
    if member[0] == "UPGD":
        return {k: v for k, v in h.items() if k not in _NO_MOMENTS}
    if member[0] == "UPGDW":
        return {k: v for k, v in h.items() if k != "beta_utility"}
    return h


def _expected_hyper(member, kwargs, groups, num_segments):
    """Per-segment hyper-parameters as §3.1 and §7.2 define them."""
    _, member_defaults = SPEC_MEMBERS[member]
    base = {**SPEC_DEFAULTS, **member_defaults}
    for name, value in kwargs.items():
        if name == "betas":
            base["beta1"], base["beta2"] = value
        elif name in base:
            base[name] = value
    out = [dict(base) for _ in range(num_segments)]
    for group in groups:
        for i in group["segments"]:
            out[i].update({k: v for k, v in group.items() if k != "segments"})
    if member[0] == "UPGDW":  # beta_utility is beta2, in every group
        for h in out:
            h["beta_utility"] = h["beta2"]
    return out


def _setup(member, seed, mode_index, vgs_on, noise_norm, backend, dtype="float64"):
    rng = np.random.default_rng(seed)
    shapes, anchor = _random_shapes(rng)
    layout = upgd_ref.FlatLayout(shapes, dtype=dtype)
    kwargs, profile = _member_kwargs(member, random_hyper(rng, NOISE_MODES[mode_index]), rng)
    groups = []
    if len(shapes) > 1 and rng.random() < 0.6:  # a second group with its own settings
        other = random_hyper(rng, NOISE_MODES[int(rng.integers(len(NOISE_MODES)))])
        groups = [dict(segments=[int(rng.integers(len(shapes)))], **_group_override(member, other))]
    extra = {} if profile is None else {"profile": profile}
    opt = getattr(upgd_ref, member[0])(layout, **kwargs, **extra, noise_norm=noise_norm,
                                       seed=int(rng.integers(2**63)), param_groups=groups, backend=backend)
    vgs_kwargs = dict(enabled=vgs_on, warmup_steps=int(rng.integers(0, 6)), alpha=float(rng.choice([0.1, 2.0])),
                      variance_cap=[None, 50.0, 0.5][int(rng.integers(3))])
    scaler = upgd_ref.VarianceGradientScaler(layout, **vgs_kwargs, backend=backend)
    hyper = _expected_hyper(member, kwargs, groups, len(shapes))
    options = SPEC_MEMBERS[member][0]
    return rng, layout, anchor, opt, scaler, hyper, options, vgs_kwargs


def _inputs(rng, layout, anchor, values):
    """One step's presence mask and gradients. The anchor segment is always present and its
    first element's gradient is ``-p``, so its utility element is positive and ``U_hi > 0``
    (the paper's protection divides by ``U_hi``; §7.3)."""
    shapes = layout.shapes
    present = [bool(b) for b in rng.random(len(shapes)) < 0.8]
    present[anchor] = True
    grads = [rng.standard_normal(s) * 10 ** rng.uniform(-2, 1) for s in shapes]
    grads[anchor].reshape(-1)[0] = -float(np.asarray(values[anchor]).reshape(-1)[0])
    return present, grads


def _run_free(member, seed, mode_index, vgs_on, noise_norm, backend, fused):
    rng, layout, anchor, opt, scaler, hyper, options, vgs_kwargs = _setup(
        member, seed, mode_index, vgs_on, noise_norm, backend)
    # the options are the spec's, and the optimizer computes them
    assert dict(opt.variant._asdict()) == {**options, "update_factor": float(options["update_factor"])}
    plain = PlainFamilyUPGD([np.zeros(s) for s in layout.shapes], hyper, options, noise_norm)
    plain_vgs = PlainVGS(len(layout.shapes), **vgs_kwargs)
    values = [rng.standard_normal(s) for s in layout.shapes]
    params = layout.pack(values)
    worst = 0.0
    for step in range(1, STEPS + 1):
        present, grad_values = _inputs(rng, layout, anchor, values)
        grads = layout.pack(grad_values)
        if fused:
            info = opt.step(params, grads, present, vgs=scaler)
            factor = info.vgs_factor
        else:
            factor = scaler.scale(grads, present)
            info = opt.step(params, grads, present)
            scaler.update(grads, present)

        expected_factor = plain_vgs.factor()
        scaled = [g * expected_factor if p else None for g, p in zip(grad_values, present)]
        normals = layout.unpack(upgd_ref.noise(layout, opt.seed, step))
        old_u = [u.copy() for u in plain.u]
        pre = values
        with np.errstate(all="ignore"):
            values = plain.step(values, scaled, normals)
        plain_vgs.update(scaled)

        assert factor == pytest.approx(expected_factor, rel=INDEPENDENT_RTOL, abs=0)
        for i, (got, want) in enumerate(zip(layout.unpack(params), values)):
            # 1e-12 relative to the larger of |p| before and after the step: where the update
            # cancels p almost exactly, relative to the (tiny) result would measure the cancellation
            rel = np.abs(got - want) / np.maximum(np.abs(want), np.abs(pre[i]))
            assert not np.any(rel > INDEPENDENT_RTOL), (step, i, float(np.nanmax(rel)))
            assert np.isfinite(got).all()
        state = opt.state
        assert list(state.segment_step) == plain.t
        np.testing.assert_allclose(state.grad_norm_ema, plain.n, rtol=INDEPENDENT_RTOL, atol=0)
        np.testing.assert_allclose(info.noise_std, plain.last_std, rtol=INDEPENDENT_RTOL, atol=0)
        assert info.utility_max > 0
        for i, (got, want) in enumerate(zip(layout.unpack(state.utility), plain.u)):
            h, g = hyper[i], scaled[i] if scaled[i] is not None else np.zeros_like(pre[i])
            scale = np.abs(h["beta_utility"] * old_u[i]) + np.abs((1 - h["beta_utility"]) * g * pre[i])
            # 1e-12 of the terms' scale (or of u, for state carried over): the parameters and
            # with them the utility terms may drift by 1e-12 relative while free-running
            bound = INDEPENDENT_RTOL * np.maximum(scale, np.abs(want))
            worst = max(worst, tolerances.max_violation(got, want, bound))
        for name, expected in (("first_moment", plain.m), ("second_moment", plain.v)):
            for got, want in zip(layout.unpack(getattr(state, name)), expected):
                if options["moments"] == "none":  # §7.1: they stay exactly 0
                    assert not np.any(got)
                else:
                    np.testing.assert_allclose(got, want, rtol=INDEPENDENT_RTOL, atol=1e-300)
    assert worst <= 1.0


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("member", MEMBERS, ids=MEMBER_IDS)
@settings(max_examples=6, deadline=None)
@given(**SCENARIOS, fused=st.booleans())
def test_member_agrees_with_independent_float64_implementation(member, backend, seed, mode_index, vgs_on,
                                                               noise_norm, fused):
    _run_free(member, seed, mode_index, vgs_on, noise_norm, backend, fused)


@pytest.mark.parametrize("mode_index", range(len(NOISE_MODES)))
@pytest.mark.parametrize("member", MEMBERS, ids=MEMBER_IDS)
def test_every_member_every_noise_mode_with_vgs(member, mode_index):
    _run_free(member, 4321 + mode_index, mode_index, True, ["segment", "global"][mode_index % 2], "auto",
              fused=bool(mode_index % 2))


# --- numba: lockstep with the tolerance contract -----------------------------------------------


def _run_lockstep(member, seed, mode_index, vgs_on, noise_norm, dtype, fused):
    rng, layout, anchor, opt, scaler, hyper, options, vgs_kwargs = _setup(
        member, seed, mode_index, vgs_on, noise_norm, "numba", dtype)
    plain_vgs = PlainVGS(len(layout.shapes), **vgs_kwargs)
    params = layout.pack([rng.standard_normal(s) for s in layout.shapes])
    u = tolerances.unit_roundoff(dtype)
    worst = {}
    for step in range(1, LOCKSTEP_STEPS + 1):
        # the candidate's own state before this step, in float64
        state = opt.state
        pre_params = [np.array(x, dtype=np.float64) for x in layout.unpack(params)]  # copies, not views
        plain = PlainFamilyUPGD(pre_params, hyper, options, noise_norm)
        plain.t = [int(t) for t in state.segment_step]
        for name, attr in (("utility", "u"), ("first_moment", "m"), ("second_moment", "v")):
            setattr(plain, attr, [np.array(x, dtype=np.float64) for x in layout.unpack(getattr(state, name))])
        plain.n = [float(x) for x in state.grad_norm_ema]
        pre_state = ref.UPGDState(np.int64(state.step), np.array(state.segment_step, dtype=np.int64),
                                  [x.copy() for x in plain.u], [x.copy() for x in plain.m],
                                  [x.copy() for x in plain.v], np.array(plain.n))
        plain_vgs.k = int(scaler.state.step)
        plain_vgs.a = [float(x) for x in scaler.state.grad_mean_avg]
        plain_vgs.b = [float(x) for x in scaler.state.grad_sq_avg]
        expected_factor = plain_vgs.factor()

        present, grad_values = _inputs(rng, layout, anchor, pre_params)
        grads = layout.pack(grad_values)
        if fused:
            factor = opt.step(params, grads, present, vgs=scaler).vgs_factor
        else:
            factor = scaler.scale(grads, present)
            opt.step(params, grads, present)
            scaler.update(grads, present)
        assert abs(factor - expected_factor) <= tolerances.SCALAR_ULPS_F64 * 2.0**-53 * expected_factor
        # the gradients the optimizer saw: scaled in place by the backend
        seen = [np.asarray(g, dtype=np.float64) if p else None for g, p in zip(layout.unpack(grads), present)]
        normals = [np.asarray(x, dtype=np.float64) for x in layout.unpack(upgd_ref.noise(layout, opt.seed, step))]
        with np.errstate(all="ignore"):
            truth = plain.step(pre_params, seen, normals)
        # the contract's bounds (specs/golden.md §3, for every member)
        (lib_params, _, _), scales = tolerances.upgd_step_scales(
            pre_params, [g if g is not None else np.zeros_like(p) for g, p in zip(seen, pre_params)],
            pre_state, normals, hyper, present=present, noise_norm=noise_norm, variant=opt.variant)
        bounds = tolerances.upgd_step_bounds(scales, dtype, layout.sizes)
        for i in range(len(truth)):  # the independent truth is the library's float64 truth
            np.testing.assert_allclose(truth[i], lib_params[i], rtol=INDEPENDENT_RTOL, atol=0)
        got = {"params": layout.unpack(params), "utility": layout.unpack(opt.state.utility),
               "first_moment": layout.unpack(opt.state.first_moment),
               "second_moment": layout.unpack(opt.state.second_moment)}
        want = {"params": truth, "utility": plain.u, "first_moment": plain.m, "second_moment": plain.v}
        for name in got:
            for i in range(len(truth)):
                ratio = tolerances.max_violation(got[name][i], want[name][i], bounds[name][i])
                worst[name] = max(worst.get(name, 0.0), ratio)
                assert ratio <= 1.0, (step, name, i, ratio)
        assert list(opt.state.segment_step) == plain.t
        n_bound = [(tolerances.REDUCTION_ULPS * u + layout.num_logical * 2.0**-53) * (abs(x) + 1e-300)
                   for x in plain.n]
        assert tolerances.max_violation(opt.state.grad_norm_ema, plain.n, n_bound) <= 1.0
    return worst


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("member", MEMBERS, ids=MEMBER_IDS)
@settings(max_examples=4, deadline=None)
@given(**SCENARIOS, fused=st.booleans())
def test_numba_member_within_the_contract_in_lockstep(member, dtype, seed, mode_index, vgs_on, noise_norm, fused):
    _run_lockstep(member, seed, mode_index, vgs_on, noise_norm, dtype, fused)


def test_spec_tables_match_the_classes():
    """The options and defaults written out from §7.2 are what the classes construct."""
    layout = upgd_ref.FlatLayout([(3,)], dtype="float64")
    for (cls, profile), (options, defaults) in SPEC_MEMBERS.items():
        opt = getattr(upgd_ref, cls)(layout, **({} if cls == "UPGDW" else {"profile": profile}))
        assert opt.variant == ref.UPGDVariant(**{**options, "update_factor": float(options["update_factor"])})
        hyper = opt.step_hyperparams()[0]
        expected = _expected_hyper((cls, profile), {}, [], 1)[0]
        for name in ("lr", "weight_decay", "beta_utility", "sigma", "noise_beta", "min_noise_std"):
            assert hyper[name] == expected[name], (cls, profile, name)
        if options["moments"] == "adam":
            assert (hyper["beta1"], hyper["beta2"], hyper["eps"]) == (expected["beta1"], expected["beta2"],
                                                                      expected["eps"])
    with pytest.raises(ValueError, match="amsgrad"):
        upgd_ref.UPGDW(layout, amsgrad=True)
