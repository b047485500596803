"""Lockstep checks of a step against the float64 truth under the tolerance contract.

Every comparison is lockstep (``specs/tolerances.md`` §1): before each candidate step the
float64 truth is computed from the candidate's own pre-step parameters, state and (scaled)
gradients with :func:`upgd_ref.tolerances.upgd_step_scales`, and every field must satisfy
``max_violation(candidate, truth, bound) <= 1``. Also: random cases (hypothesis strategies)
and a switch between the Numba backend's serial and parallel kernels.
"""

from __future__ import annotations

import contextlib
import math

import numba
import numpy as np
from hypothesis import strategies as st

from tests.helpers.members import member_info
from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler, rng, tolerances
from upgd_ref import reference as ref
from upgd_ref.backends import BACKENDS
from upgd_ref.kernels.numba_step import CHUNK

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


# --- family members on a backend ---------------------------------------------------------


def member_gradient(data, params, scale, paper: bool):
    """Standard normals times ``scale``; for the paper members the even elements (in every
    segment) get ``-|r| sign(p)``: a positive utility term, so that ``U_hi > 0``."""
    g = scale * data.standard_normal(params.shape)
    if paper:
        flat_g, flat_p = g.reshape(-1), params.reshape(-1)
        flat_g[::2] = -np.abs(flat_g[::2]) * np.sign(flat_p[::2])
    return g


def run_member_case(member, case, backend="numba"):
    """Largest ``error / bound`` per field over the case's lockstep steps on ``backend``."""
    layout = case["layout"]
    data = np.random.default_rng(case["data_seed"])
    opt = member_info(member).core(layout, param_groups=case["groups"], noise_norm=case["noise_norm"],
                                   seed=case["seed"], backend=backend)
    vgs = None if case["vgs"] is None else VarianceGradientScaler(layout, backend=backend, **case["vgs"])
    params = layout.pack([data.standard_normal(s) for s in layout.shapes])
    paper = member_info(member).paper
    worst: dict[str, float] = {}
    for present in case["presents"]:
        views = layout.unpack(params)
        grads = layout.pack([member_gradient(data, views[i], case["grad_scale"], paper) for i in range(len(views))])
        for name, value in checked_step(opt, params, grads, present, vgs).items():
            worst[name] = max(worst.get(name, 0.0), value)
    return worst
