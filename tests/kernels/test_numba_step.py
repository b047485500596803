"""The Numba backend's steps against the reference, judged by the tolerance contract.

Every comparison is lockstep (``specs/tolerances.md`` §1): before each Numba step the float64
truth is computed from the candidate's own pre-step parameters, state and (scaled) gradients
with :func:`upgd_ref.tolerances.upgd_step_scales`, and every field must satisfy
``max_violation(candidate, truth, bound) <= 1`` with the bounds of
:func:`upgd_ref.tolerances.upgd_step_bounds`. Per-segment scalars derived from a reduction
(``noise_std``, the norm average ``n_i``, the VGS averages) get the contract's reduction bound
``(REDUCTION_ULPS * u + n * 2**-53)`` plus ``SCALAR_ULPS_F64 * 2**-53`` for their float64 formula.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings

from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.backends import backends_for
from upgd_ref.kernels.numba_step import CHUNK, traces_and_update

from tests.helpers.snapshots import snapshot

from tests.helpers.lockstep import cases, checked_step, numba_kernels


def run_case(case, backend="numba"):
    layout = case["layout"]
    data = np.random.default_rng(case["data_seed"])
    opt = AdaptiveUPGD(layout, param_groups=case["groups"], noise_norm=case["noise_norm"], seed=case["seed"],
                       backend=backend)
    vgs = None if case["vgs"] is None else VarianceGradientScaler(layout, backend=backend, **case["vgs"])
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    worst: dict[str, float] = {}
    for present in case["presents"]:
        grads = layout.pack([case["grad_scale"] * data.standard_normal(s) for s in layout.shapes])
        for name, value in checked_step(opt, params, grads, present, vgs).items():
            worst[name] = max(worst.get(name, 0.0), value)
    return worst


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_numba_steps_are_within_the_contract(case):
    with numba_kernels(case["parallel"]):
        worst = run_case(case)
    assert all(v <= 1.0 for v in worst.values()), worst


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("noise", [dict(adaptive_noise=False, sigma=0.05), dict(adaptive_noise=True, sigma=0.1),
                                   dict(adaptive_noise=True, instant_noise_scale=False, noise_ema_init=1.0),
                                   dict(sigma=0.0)])
def test_many_steps_with_vgs_stay_within_the_contract(dtype, noise):
    """Thirty lockstep steps on a multi-chunk layout, frozen segments now and then."""
    layout = FlatLayout([(3, CHUNK + 1), (0,), (7,), (2 * CHUNK - 3,)], dtype=dtype)
    data = np.random.default_rng(7)
    opt = AdaptiveUPGD(layout, lr=0.05, seed=3, backend="numba", **noise)
    vgs = VarianceGradientScaler(layout, warmup_steps=2, backend="numba")
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    with numba_kernels(parallel=True):
        for step in range(30):
            grads = layout.pack([data.standard_normal(s) * 10 ** data.uniform(-2, 1) for s in layout.shapes])
            present = [bool(b) for b in data.random(layout.num_segments) < 0.85]
            worst = checked_step(opt, params, grads, present, vgs)
            assert all(v <= 1.0 for v in worst.values()), (step, worst)
    assert vgs.scaling_factor() < 1.0  # the scaler did scale


# --- determinism ------------------------------------------------------------------------


def _trajectory(layout, parallel: bool, threads: int | None):
    data = np.random.default_rng(11)
    opt = AdaptiveUPGD(layout, lr=0.02, adaptive_noise=True, sigma=0.1, seed=5, backend="numba",
                       param_groups=[{"segments": [0, 2], "lr": 0.1}, {"segments": [1, 3], "sigma": 0.0}])
    vgs = VarianceGradientScaler(layout, warmup_steps=1, backend="numba")
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    infos = []
    with numba_kernels(parallel, threads):
        for step in range(4):
            grads = layout.pack([data.standard_normal(s) for s in layout.shapes])
            present = [True, step != 1, True, True]
            infos.append(opt.step(params, grads, present, vgs=vgs))
            vgs.scale(grads, present)  # the separate kernels too
            vgs.update(grads, present)
            infos.append(opt.step(params, grads, present))
    return snapshot(opt, vgs, params, infos)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bits_do_not_depend_on_threads_or_kernel_variant(dtype):
    layout = FlatLayout([(5 * CHUNK + 17,), (3,), (0,), (CHUNK, 2)], dtype=dtype)
    serial = _trajectory(layout, parallel=False, threads=None)
    assert _trajectory(layout, parallel=True, threads=1) == serial
    assert _trajectory(layout, parallel=True, threads=2) == serial


# --- the fused step -----------------------------------------------------------------------


def _fused_or_separate(layout, backend, gradients, presents, fused: bool):
    opt = AdaptiveUPGD(layout, lr=0.01, adaptive_noise=True, sigma=0.2, seed=9, backend=backend)
    vgs = VarianceGradientScaler(layout, warmup_steps=1, backend=backend)
    params = layout.pack([np.linspace(-1, 1, math.prod(s)).reshape(s) for s in layout.shapes])
    reported = []
    for given_grads, present in zip(gradients, presents):
        grads = given_grads.copy()
        if fused:
            info = opt.step(params, grads, present, vgs=vgs)
            reported.append((info.vgs_factor, info.vgs_normalized_variance))
        else:
            variance = vgs.normalized_variance()
            factor = vgs.scale(grads, present)
            opt.step(params, grads, present)
            vgs.update(grads, present)
            reported.append((factor, variance))
    return snapshot(opt, vgs, params, grads), reported


@pytest.mark.parametrize("backend", sorted(backends_for("numpy", emulators=True)))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_step_is_scale_step_update(backend, dtype):
    """Bit-identical to the three calls, scaled gradients included; StepInfo reports f, G."""
    layout = FlatLayout([(CHUNK + 3,), (4, 5), (0,)], dtype=dtype)
    data = np.random.default_rng(3)
    gradients = [layout.pack([data.standard_normal(s) * (k + 1) for s in layout.shapes]) for k in range(4)]
    presents = [[True, k != 2, True] for k in range(4)]
    fused = _fused_or_separate(layout, backend, gradients, presents, fused=True)
    separate = _fused_or_separate(layout, backend, gradients, presents, fused=False)
    assert fused == separate
    assert fused[1][-1][0] < 1.0  # the scaler really scaled


def test_step_without_scaler_reports_nan_vgs_fields():
    layout = FlatLayout([(4,)], dtype="float64")
    info = AdaptiveUPGD(layout, backend="numba").step(layout.zeros() + 1.0, layout.zeros() + 0.5)
    assert math.isnan(info.vgs_factor) and math.isnan(info.vgs_normalized_variance)
    assert math.isnan(info.to_dict()["vgs_factor"])


# --- sigma == 0 draws no noise, with identical results ------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_skipping_the_noise_of_a_zero_std_changes_nothing(dtype):
    data = np.random.default_rng(0)
    n = 1000
    u, m = data.standard_normal(n).astype(dtype), data.standard_normal(n).astype(dtype)
    v = np.abs(data.standard_normal(n)).astype(dtype)
    params = data.standard_normal(n).astype(dtype)
    params[:3] = [0.0, -0.0, 1.0]
    grads = data.standard_normal(n).astype(dtype)
    coefficients = np.array([0.999, 0.001, 0.9, 0.1, 0.999, 0.001, 1 - 1e-5, 1e-2, 1e-8, 1 / 0.3, 1 / 0.1, 1 / 0.01,
                             0.0], dtype=dtype)
    results = []
    for normals in (data.standard_normal(n).astype(dtype), np.zeros(n, dtype)):  # drawn, or nothing drawn
        p, state = params.copy(), [x.copy() for x in (u, m, v)]
        traces_and_update(p, grads, *state, normals, coefficients, dtype(1), dtype(-1.5), dtype(0.4))
        results.append((p, *state))
    assert all(np.array_equal(a, b) for a, b in zip(*results))


# --- state dicts move between backends mid-run --------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_dicts_are_interchangeable_between_backends(dtype, tmp_path):
    layout = FlatLayout([(CHUNK + 5,), (0,), (3, 3)], dtype=dtype)
    data = np.random.default_rng(1)
    groups = [{"segments": [0], "lr": 0.05}, {"segments": [1, 2], "adaptive_noise": True, "sigma": 0.3}]
    make = {name: AdaptiveUPGD(layout, lr=0.01, seed=4, param_groups=groups, backend=name)
            for name in ("numba", "reference")}
    scalers = {name: VarianceGradientScaler(layout, warmup_steps=1, backend=name) for name in make}
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    order = ["numba", "reference", "numba", "reference", "numba"]
    for step, name in enumerate(order):
        if step:  # continue from the other backend's state, in memory or through a file
            previous = order[step - 1]
            if step % 2:
                make[name].load_state_dict(make[previous].state_dict())
                scalers[name].load_state_dict(scalers[previous].state_dict())
            else:
                make[previous].save(tmp_path / "opt.npz")
                scalers[previous].save(tmp_path / "vgs.npz")
                make[name].load(tmp_path / "opt.npz")
                scalers[name].load(tmp_path / "vgs.npz")
            assert snapshot(make[name].state_dict()) == snapshot(make[previous].state_dict())
        grads = layout.pack([data.standard_normal(s) for s in layout.shapes])
        worst = checked_step(make[name], params, grads, [True, True, step != 3], scalers[name])
        assert all(v <= 1.0 for v in worst.values()), (step, name, worst)
