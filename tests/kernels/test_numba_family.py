"""Every member of the UPGD family (``specs/algorithm.md`` §7) on the Numba kernels, judged by
the tolerance contract in lockstep against the reference (``tests/kernels/test_numba_step.py``):
AdaptiveUPGD, UPGD, UPGDW, ``AdaptiveUPGD(profile="paper")``, ``UPGD(profile="paper")``;
float32 and float64, frozen segments, parameter groups, every noise mode, VGS on and off.

The paper members divide by ``U_hi``: the random cases keep the utilities of even elements
positive (``g = -|r| sign(p)``, so ``-g p > 0``), hence ``U_hi > 0``; the ``U_hi = 0`` case
(``0/0`` where ``u = 0``, so refused) is tested on its own with the reference.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings

from upgd_ref import FlatLayout, VarianceGradientScaler
from upgd_ref.backends import BACKENDS
from upgd_ref.checks import NonFiniteStepError
from upgd_ref.kernels.numba_step import CHUNK

from tests.helpers.lockstep import cases, checked_step, member_gradient, numba_kernels, run_member_case
from tests.helpers.members import MEMBER_DB, MEMBER_IDS, member_info

@pytest.mark.parametrize("member", MEMBER_IDS)
@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_every_member_is_within_the_contract(member, case):
    with numba_kernels(case["parallel"]):
        worst = run_member_case(member, case)
    assert all(v <= 1.0 for v in worst.values()), worst


@pytest.mark.parametrize("member", MEMBER_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("noise", [dict(adaptive_noise=False, sigma=0.05), dict(adaptive_noise=True, sigma=0.1),
                                   dict(adaptive_noise=True, instant_noise_scale=False, noise_ema_init=1.0),
                                   dict(sigma=0.0)])
def test_many_member_steps_with_vgs_stay_within_the_contract(member, dtype, noise):
    """Twenty lockstep steps on a multi-chunk layout with groups and frozen segments."""
    layout = FlatLayout([(3, CHUNK + 1), (0,), (7,), (2 * CHUNK - 3,)], dtype=dtype)
    data = np.random.default_rng(7)
    groups = [{"segments": [0, 1], "lr": 0.05}, {"segments": [2, 3], "lr": 0.01, "weight_decay": 0.01}]
    opt = member_info(member).core(layout, seed=3, backend="numba", param_groups=groups, **noise)
    vgs = VarianceGradientScaler(layout, warmup_steps=2, backend="numba")
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    with numba_kernels(parallel=True):
        for step in range(20):
            views = layout.unpack(params)
            grads = layout.pack([member_gradient(data, v, 10 ** data.uniform(-2, 1), member_info(member).paper)
                                 for v in views])
            present = [bool(b) for b in data.random(layout.num_segments) < 0.85]
            worst = checked_step(opt, params, grads, present, vgs if step % 3 else None)
            assert all(v <= 1.0 for v in worst.values()), (step, worst)


@pytest.mark.parametrize("member", MEMBER_IDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_serial_and_parallel_kernels_agree_for_every_member(member, dtype):
    layout = FlatLayout([(3 * CHUNK + 5,), (4,), (0,)], dtype=dtype)
    results = []
    for parallel in (False, True):
        data = np.random.default_rng(2)
        opt = member_info(member).core(layout, lr=0.01, sigma=0.1, adaptive_noise=True, seed=1, backend="numba")
        vgs = VarianceGradientScaler(layout, warmup_steps=1, backend="numba")
        params = layout.pack([data.standard_normal(s) for s in layout.shapes])
        with numba_kernels(parallel):
            for step in range(3):
                views = layout.unpack(params)
                grads = layout.pack([member_gradient(data, v, 1.0, True) for v in views])
                opt.step(params, grads, [True, step != 1, True], vgs=vgs)
        results.append((params.tobytes(), opt.state.utility.tobytes(), opt.state.first_moment.tobytes(),
                        opt.state.second_moment.tobytes()))
    assert results[0] == results[1]


@pytest.mark.parametrize("member", ["upgd", "upgd_paper"])
def test_members_without_moments_leave_m_and_v_untouched(member):
    layout = FlatLayout([(CHUNK + 3,), (5,)], dtype="float32")
    opt = member_info(member).core(layout, backend="numba")
    params = layout.zeros() + 0.5
    opt.step(params, layout.zeros() - 0.25)
    vgs = VarianceGradientScaler(layout, warmup_steps=0, backend="numba")
    opt.step(params, layout.zeros() - 0.25, vgs=vgs)
    assert not opt.state.first_moment.any() and not opt.state.second_moment.any()


@pytest.mark.parametrize("member", ["adaptive_paper", "upgd_paper"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("parallel", [False, True])
def test_paper_protection_with_zero_u_hi_is_refused_as_by_the_reference(member, dtype, parallel):
    """``U_hi = 0`` (every present utility <= 0): the paper's ``0/0`` would make parameters NaN
    where ``u = 0``; both backends refuse the step (``specs/algorithm.md`` §7.3, §8) and change
    nothing."""
    layout = FlatLayout([(CHUNK + 7,), (6,)], dtype=dtype)
    data = np.random.default_rng(5)
    start = layout.pack([data.standard_normal(s) for s in layout.shapes])
    for backend in ("numba", "reference"):
        opt = member_info(member).core(layout, lr=0.01, seed=2, backend=backend)
        params = start.copy()
        # g = |r| sign(p) on odd elements (u < 0), g = 0 on even ones (u = 0): U_hi = 0.
        sign = np.sign(params)
        grads = np.abs(np.random.default_rng(6).standard_normal(params.shape)).astype(dtype) * sign
        grads[::2] = 0.0
        with numba_kernels(parallel), pytest.raises(NonFiniteStepError, match="U_hi = 0"):
            opt.step(params, grads)
        assert np.array_equal(params, start) and opt.state.step == 0


def test_the_reference_backend_is_no_longer_used_for_members(monkeypatch):
    """The Numba backend computes every member itself (the reference backend is not called)."""
    reference = BACKENDS["reference"]

    def refuse(*args, **kwargs):
        raise AssertionError("reference backend called")

    for stage in ("first_pass", "second_pass", "gradient_sums", "scale"):
        monkeypatch.setattr(type(reference), stage, refuse)
    layout = FlatLayout([(10,)], dtype="float32")
    for info in MEMBER_DB:
        opt = info.core(layout, backend="numba")
        params = layout.zeros() + 1.0
        opt.step(params, layout.zeros() - 0.5, vgs=VarianceGradientScaler(layout, backend="numba"))
        opt.step(params, layout.zeros() - 0.5)
