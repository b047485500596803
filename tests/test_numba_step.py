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

import contextlib
import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler, reference as ref, rng, tolerances
from upgd_ref.backends import BACKENDS, backends_for
from upgd_ref.kernels.numba_step import CHUNK, traces_and_update

from .conftest import snapshot

F64_ROUNDOFF = tolerances.unit_roundoff(np.float64)


@contextlib.contextmanager
def numba_kernels(parallel: bool, threads: int | None = None):
    """Make the registered numba backend use its parallel (or serial) kernels, on ``threads``."""
    backend = BACKENDS["numba"]
    saved = backend.parallel_min_size
    backend.parallel_min_size = 0 if parallel else 2**62
    if threads is not None:
        numba.set_num_threads(threads)
    try:
        yield
    finally:
        backend.parallel_min_size = saved
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


# --- the lockstep check -----------------------------------------------------------------


def _copies(arrays):
    return [np.array(a, copy=True) for a in arrays]


def reduction_bound(dtype, count: int) -> float:
    """Relative bound of a float64 scalar derived from a sum of ``count`` non-negative terms."""
    return (tolerances.REDUCTION_ULPS * tolerances.unit_roundoff(dtype) + count * 2.0**-53
            + tolerances.SCALAR_ULPS_F64 * F64_ROUNDOFF)


class Lockstep:
    """Truth and bounds for the coming step of ``opt`` (and ``vgs``) from their own state."""

    def __init__(self, opt: AdaptiveUPGD, vgs, params, grads, present):
        layout = self.layout = opt.layout
        views = layout.unpack
        self.present = [True] * layout.num_segments if present is None else list(present)
        grads_in = views(grads)
        if vgs is not None:
            self.vgs_old = (vgs.state.step, vgs.state.grad_mean_avg.copy(), vgs.state.grad_sq_avg.copy())
            self.vgs_beta = vgs.hyperparams["beta"]
            self.factor, self.variance = vgs.scaling_factor(), vgs.normalized_variance()
            if self.factor != 1.0:
                grads_in = ref.vgs_scale(grads_in, self.factor, self.present)
        self.scaled_grads = _copies(grads_in)
        state = opt.state
        pre = ref.UPGDState(
            step=np.int64(state.step), segment_step=state.segment_step.copy(),
            utility=_copies(views(state.utility)), first_moment=_copies(views(state.first_moment)),
            second_moment=_copies(views(state.second_moment)), grad_norm_ema=state.grad_norm_ema.copy(),
        )
        self.ema_old = state.grad_norm_ema.copy()
        self.hyper = opt.step_hyperparams()  # UPGDW ties beta_utility to beta2 there
        normals = views(rng.noise(layout, opt.seed, state.step + 1, dtype="float64"))
        self.truth, scales = tolerances.upgd_step_scales(
            _copies(views(params)), self.scaled_grads, pre, normals, self.hyper, present=self.present,
            noise_norm=opt.noise_norm, variant=opt.variant,
        )
        self.bounds = tolerances.upgd_step_bounds(scales, layout.dtype, layout.sizes)

    def violations(self, opt: AdaptiveUPGD, vgs, params, grads, info) -> dict:
        """``max(error / bound)`` per field (<= 1 is within the contract)."""
        layout, (new_params, new_state, stats) = self.layout, self.truth
        views, dtype = layout.unpack, layout.dtype
        out = {"params": max(tolerances.max_violation(c, t, b)
                             for c, t, b in zip(views(params), new_params, self.bounds["params"]))}
        for name in ("utility", "first_moment", "second_moment"):
            out[name] = max(tolerances.max_violation(c, t, b) for c, t, b in
                            zip(views(getattr(opt.state, name)), getattr(new_state, name), self.bounds[name]))
        out["grad_norm"] = tolerances.max_violation(info.grad_norm, stats.grad_norm, self.bounds["grad_norm"])
        relative = reduction_bound(dtype, max(layout.num_logical, 1))
        out["noise_std"] = tolerances.max_violation(info.noise_std, stats.noise_std, relative * np.abs(stats.noise_std))
        out["grad_norm_ema"] = tolerances.max_violation(opt.state.grad_norm_ema, new_state.grad_norm_ema,
                                                        relative * np.abs(new_state.grad_norm_ema))
        assert opt.state.step == int(new_state.step)
        assert np.array_equal(opt.state.segment_step, new_state.segment_step)
        filled = [i for i in range(layout.num_segments) if self.present[i] and layout.sizes[i]]
        if filled:  # U_lo, U_hi are exactly the extrema of the candidate's own utility
            own = np.concatenate([views(opt.state.utility)[i].ravel() for i in filled])
            assert (info.utility_min, info.utility_max) == (float(own.min()), float(own.max()))
        else:
            assert math.isnan(info.utility_min) and math.isnan(info.utility_max)
        if vgs is not None:
            out.update(self._vgs_violations(vgs, grads, info))
        return out

    def _vgs_violations(self, vgs, grads, info) -> dict:
        layout = self.layout
        assert info.vgs_factor == self.factor and info.vgs_normalized_variance == self.variance
        assert all(np.array_equal(g, s) for g, s in zip(layout.unpack(grads), self.scaled_grads))  # left scaled
        step, mean_old, square_old = self.vgs_old
        wide = [np.asarray(g, dtype=np.float64) for g in self.scaled_grads]
        truth = ref.vgs_update(ref.VGSState(np.int64(step), mean_old, square_old), wide, beta=self.vgs_beta,
                               present=self.present)
        assert vgs.state.step == int(truth.step)
        beta = self.vgs_beta
        sizes = np.maximum(np.asarray(layout.sizes), 1)
        relative = np.array([reduction_bound(layout.dtype, n) for n in sizes])
        mean_abs = np.array([np.mean(np.abs(g)) if g.size else 0.0 for g in wide])
        mean_sq = np.array([np.mean(g * g) if g.size else 0.0 for g in wide])
        return {
            "vgs_mean": tolerances.max_violation(vgs.state.grad_mean_avg, truth.grad_mean_avg,
                                                 relative * (np.abs(beta * mean_old) + (1 - beta) * mean_abs)),
            "vgs_square": tolerances.max_violation(vgs.state.grad_sq_avg, truth.grad_sq_avg,
                                                   relative * (np.abs(beta * square_old) + (1 - beta) * mean_sq)),
        }


def checked_step(opt, params, grads, present=None, vgs=None) -> dict:
    """One step of ``opt`` (fused with ``vgs`` when given), checked against the contract."""
    lockstep = Lockstep(opt, vgs, params, grads, present)
    info = opt.step(params, grads, present, vgs=vgs)
    return lockstep.violations(opt, vgs, params, grads, info)


# --- random cases -----------------------------------------------------------------------

segment_sizes = st.sampled_from([0, 1, 2, 3, 5, 8, 63, 64, 65, 130, CHUNK - 1, CHUNK + 1, 2 * CHUNK + 5])


@st.composite
def shapes(draw):
    out = []
    for size in draw(st.lists(segment_sizes, min_size=1, max_size=5)):
        out.append((size // 5, 5) if size % 5 == 0 and size and draw(st.booleans()) else (size,))
    return out


hyper_strategy = st.fixed_dictionaries({
    "lr": st.sampled_from([1e-4, 1e-2, 0.3]),
    "weight_decay": st.sampled_from([0.0, 1e-3, 0.05]),
    "beta_utility": st.sampled_from([0.0, 0.9, 0.999]),
    "sigma": st.sampled_from([0.0, 1e-3, 0.1]),
    "beta1": st.sampled_from([0.0, 0.9]),
    "beta2": st.sampled_from([0.9, 0.999]),
    "eps": st.sampled_from([1e-8, 1e-3]),
    "adaptive_noise": st.booleans(),
    "instant_noise_scale": st.booleans(),
    "noise_beta": st.sampled_from([0.0, 0.9, 0.999]),
    "min_noise_std": st.sampled_from([0.0, 1e-6, 0.05]),
    "noise_ema_init": st.sampled_from([0.0, 1.0]),
})

vgs_strategy = st.one_of(st.none(), st.fixed_dictionaries({
    "warmup_steps": st.integers(0, 2),
    "alpha": st.sampled_from([0.1, 2.0]),
    "variance_cap": st.sampled_from([None, 50.0, 0.5]),
    "enabled": st.booleans(),
}))


@st.composite
def cases(draw):
    layout_shapes = draw(shapes())
    n = len(layout_shapes)
    num_groups = draw(st.integers(1, min(3, n)))
    group_of = draw(st.lists(st.integers(0, num_groups - 1), min_size=n, max_size=n))
    groups = [dict(draw(hyper_strategy), segments=[i for i in range(n) if group_of[i] == g]) for g in range(num_groups)]
    steps = draw(st.integers(1, 4))
    return dict(
        layout=FlatLayout(layout_shapes, dtype=draw(st.sampled_from(["float32", "float64"]))),
        groups=groups,
        noise_norm=draw(st.sampled_from(["segment", "global"])),
        seed=draw(st.integers(0, 2**64 - 1)),
        vgs=draw(vgs_strategy),
        presents=[draw(st.lists(st.booleans(), min_size=n, max_size=n)) for _ in range(steps)],
        grad_scale=draw(st.sampled_from([1e-3, 1.0, 100.0])),
        parallel=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**32 - 1)),
    )


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
        traces_and_update(p, grads, *state, normals, coefficients, dtype(-1.5), dtype(0.4))
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
