"""Every row of PRODUCTION-API.md on the torch drop-in, each value against a written-out torch
computation of the page's formula; production-format state dicts round-trip; the adapter
steps through the functional door with its own state records (issue 13)."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref.adapters.torch import UPGDW, AdaptiveUPGD, VarianceGradientScaler
from upgd_ref.state import FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, upgd_step
from upgd_ref.tolerances import INDEPENDENT_RTOL, REDUCTION_ULPS, unit_roundoff

from tests.helpers import torch_tensors as helpers
from tests.helpers.torch_tensors import Recorder, run_scaler, seeded_grads, set_grads

SHAPES = ((6, 4), (4,), (3, 3), (2,), (5,))
BETA, EPS = 0.9, 1e-8


def make_params(dtype=torch.float32, seed=0):
    return helpers.make_params(SHAPES, dtype, seed)


def grads_for(step, params, absent=()):
    return seeded_grads(params, 900 + step, absent, spread=1.0, offset=0.1)


def close(a, b):
    return a == pytest.approx(b, rel=INDEPENDENT_RTOL, abs=1e-300)


# --- the page's formulas, written out in torch (float64) ----------------------------------

def written_gradient_statistics(grads):
    present = [g.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) for g in grads if g is not None]
    if not present:
        return {"grad_norm": 0.0, "grad_mean": 0.0, "grad_var": 0.0, "grad_max": 0.0, "num_params": 0}
    a = torch.cat([g.reshape(-1) for g in present]).abs()
    n = a.numel()
    mean = a.sum() / n
    return {"grad_norm": float(torch.sqrt((a * a).sum())), "grad_mean": float(mean),
            "grad_var": float(((a - mean) ** 2).sum() / (n - 1)), "grad_max": float(a.max()),
            "num_params": len(present)}


class WrittenScaler:
    """The production scaler's statistics as PRODUCTION-API.md states them (float64)."""

    def __init__(self, n):
        self.k, self.a, self.b = 0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        self.spatial = None

    def update_statistics(self, grads):
        if all(g is None for g in grads):
            return
        for i, g in enumerate(grads):
            if g is not None:
                g = g.double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
                self.a[i] = BETA * self.a[i] + (1 - BETA) * g.mean()
                self.b[i] = BETA * self.b[i] + (1 - BETA) * (g * g).mean()
        s = written_gradient_statistics(grads)
        new = {"grad_mean_ema": s["grad_mean"], "grad_var_ema": s["grad_var"], "grad_norm_ema": s["grad_norm"],
               "grad_max_ema": s["grad_max"]}
        self.spatial = new if self.spatial is None else {k: BETA * self.spatial[k] + (1 - BETA) * v
                                                          for k, v in new.items()}

    def step(self, grads):
        self.k += 1
        self.update_statistics(grads)

    def logs(self):
        c = 1 - BETA ** self.k
        mu, s = self.a / c, self.b / c
        nv = torch.clamp(s - mu * mu, min=0.0) / (torch.clamp(mu * mu, min=1e-12) + EPS)
        nv = torch.where(torch.isfinite(nv), nv, torch.zeros_like(nv))
        out = {"vgs/stochastic_var_p10": float(torch.quantile(nv, 0.1)),
               "vgs/stochastic_var_p50": float(torch.quantile(nv, 0.5)),
               "vgs/stochastic_var_p90": float(torch.quantile(nv, 0.9)), "vgs/stochastic_var_mean": float(nv.mean())}
        names = {"grad_norm_ema": "vgs/grad_norm_ema", "grad_mean_ema": "vgs/grad_mean_ema_spatial",
                 "grad_var_ema": "vgs/grad_var_ema_spatial", "grad_max_ema": "vgs/grad_max_ema"}
        out.update({name: self.spatial[key] / c for key, name in names.items()})
        return out


# --- VarianceGradientScaler ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compute_gradient_statistics_is_the_written_out_formula(dtype):
    params = make_params(dtype)
    vgs = VarianceGradientScaler(params)
    assert vgs.compute_gradient_statistics() == {"grad_norm": 0.0, "grad_mean": 0.0, "grad_var": 0.0,
                                                 "grad_max": 0.0, "num_params": 0}
    assert VarianceGradientScaler().compute_gradient_statistics()["num_params"] == 0
    grads = grads_for(0, params, absent={1})
    set_grads(params, grads)
    got, want = vgs.compute_gradient_statistics(), written_gradient_statistics(grads)
    assert got["num_params"] == want["num_params"] == 4 and type(got["num_params"]) is int
    # reductions in the gradients' dtype (as production): specs/tolerances.md's reduction row
    n = sum(g.numel() for g in grads if g is not None)
    squares = want["grad_norm"] ** 2
    scales = {"grad_norm": want["grad_norm"], "grad_mean": want["grad_mean"], "grad_max": 0.0,
              "grad_var": (squares + n * want["grad_mean"] ** 2) / (n - 1)}
    u = unit_roundoff(str(dtype).removeprefix("torch."))
    for key, scale in scales.items():
        assert type(got[key]) is float and abs(got[key] - want[key]) <= (REDUCTION_ULPS * u + n * 2**-53) * scale, key


def test_update_statistics_and_step_follow_the_page_and_log_its_metrics():
    params = make_params(torch.float64)
    logger = Recorder()
    vgs = VarianceGradientScaler(params, beta=BETA, eps=EPS, warmup_steps=2, logger=logger)
    written = WrittenScaler(len(params))
    assert vgs._grad_mean_ema is None and vgs._grad_norm_ema is None
    vgs.update_statistics()  # no gradient: skipped entirely
    assert vgs._step_count == 0 and vgs._grad_mean_ema is None and not vgs._param_grad_mean_ema.any()
    for k in range(6):
        grads = grads_for(k, params, absent={3} if k == 2 else ())
        set_grads(params, grads)
        vgs.scale_gradients()
        grads = [None if p.grad is None else p.grad.clone() for p in params]  # the scaled gradients
        logger.records.clear()
        vgs.step()
        written.step(grads)
        assert vgs._step_count == written.k
        assert all(close(x, y) for x, y in zip(vgs._param_grad_mean_ema.tolist(), written.a.tolist()))
        assert all(close(x, y) for x, y in zip(vgs._param_grad_sq_ema.tolist(), written.b.tolist()))
        for key, value in written.spatial.items():
            assert close(getattr(vgs, "_" + key), value), (k, key)
        recorded = dict(logger.records)
        for key, value in written.logs().items():
            assert close(recorded[key], value), (k, key)
        assert recorded["vgs/step_count"] == written.k
    # update_statistics alone: the averages move, k does not
    set_grads(params, grads_for(9, params))
    vgs.update_statistics()
    written.update_statistics([p.grad for p in params])
    assert vgs._step_count == written.k == 6
    assert all(close(x, y) for x, y in zip(vgs._param_grad_mean_ema.tolist(), written.a.tolist()))
    assert close(vgs._grad_var_ema, written.spatial["grad_var_ema"])
    assert vgs._param_numel.dtype == torch.float32 and vgs._param_numel.tolist() == [24.0, 4.0, 9.0, 2.0, 5.0]


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["own-buffer", "optimizer-buffer"])
def test_nan_gradients_count_as_zero_and_the_factor_stays_finite(with_optimizer):
    params = make_params()
    if with_optimizer:  # the scaler then works on the optimizer's flat gradient buffer
        AdaptiveUPGD(params, seed=0)
    vgs = VarianceGradientScaler(params, beta=BETA, eps=EPS, warmup_steps=0)
    zeros = VarianceGradientScaler([torch.nn.Parameter(p.detach().clone()) for p in params], beta=BETA, eps=EPS,
                                   warmup_steps=0)
    for k in range(4):
        grads = grads_for(k, params)
        clean = [g.clone() for g in grads]
        grads[0][1, 2], grads[2][0, 0], grads[4][3] = float("nan"), float("inf"), -float("inf")
        clean[0][1, 2] = clean[2][0, 0] = clean[4][3] = 0.0
        set_grads(params, grads)
        set_grads(zeros._parameters, clean)
        factor = vgs.scale_gradients()
        assert factor == zeros.scale_gradients()
        g = params[0].grad
        assert torch.isnan(g[1, 2]) and torch.equal(g.nan_to_num(nan=0.0), zeros._parameters[0].grad)
        assert torch.isinf(params[2].grad[0, 0])  # scaled as production does: inf stays inf
        assert vgs.compute_gradient_statistics() == zeros.compute_gradient_statistics()
        vgs.step()
        zeros.step()
        assert vgs.state_dict().keys() == zeros.state_dict().keys()
        assert torch.equal(vgs._param_grad_mean_ema, zeros._param_grad_mean_ema)
        assert np.isfinite(vgs.get_normalized_variance())
    assert vgs.get_scaling_factor() == zeros.get_scaling_factor() < 1.0


def test_nonfinite_policy_is_checked():
    with pytest.raises(ValueError, match="nonfinite"):
        VarianceGradientScaler(make_params(), nonfinite="ignore")


def test_production_state_dict_round_trips_with_the_spatial_averages():
    params = make_params()
    vgs = VarianceGradientScaler(params, beta=BETA, warmup_steps=0)
    run_scaler(vgs, params, grads_for, 3)
    sd = vgs.state_dict()
    assert all(type(sd[k]) is float for k in ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema"))
    assert sd["grad_norm_ema"] == vgs._grad_norm_ema
    # as production writes it: float32 per-parameter tensors, floats for the spatial averages
    production = dict(sd, param_grad_mean_ema=sd["param_grad_mean_ema"].float(),
                      param_grad_sq_ema=sd["param_grad_sq_ema"].float())
    other = VarianceGradientScaler(params, warmup_steps=7)
    other.load_state_dict(production)
    again = other.state_dict()
    assert {k: v for k, v in again.items() if not isinstance(v, torch.Tensor)} == \
        {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    assert torch.equal(again["param_grad_mean_ema"], sd["param_grad_mean_ema"].float().double())
    twin = VarianceGradientScaler(params, warmup_steps=7)
    twin.load_state_dict(sd)
    assert all(torch.equal(v, twin.state_dict()[k]) if isinstance(v, torch.Tensor) else v == twin.state_dict()[k]
               for k, v in sd.items())
    for bad, message in ((dict(sd, grad_var_ema=float("nan")), "finite"), (dict(sd, grad_max_ema="x"), "float")):
        with pytest.raises((ValueError, TypeError), match=message):
            twin.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k not in ("grad_mean_ema", "grad_var_ema")}
    twin.load_state_dict(missing)
    assert twin._grad_mean_ema is None and twin._grad_norm_ema == sd["grad_norm_ema"]
    # pickling keeps them; reset_statistics clears them; update_parameters keeps them (production)
    clone = pickle.loads(pickle.dumps(vgs))
    assert clone._grad_max_ema == vgs._grad_max_ema
    clone.update_parameters(params)
    assert clone._grad_max_ema == vgs._grad_max_ema and not clone._param_grad_mean_ema.any()
    clone.reset_statistics()
    assert clone._grad_max_ema is None and clone._step_count == 0


def test_checkpoint_migration_warning_has_the_production_phrases():
    params = make_params()
    vgs = VarianceGradientScaler(params)
    old = {k: v for k, v in vgs.state_dict().items() if k != "vgs_version"}  # "1.0"
    for sd, version in ((old, "1.0"), (dict(old, vgs_version="2.1"), "2.1")):
        with pytest.warns(UserWarning) as caught:
            vgs.load_state_dict(sd)
        text = str(caught[0].message)
        assert "VGS v3.1 CRITICAL FIX" in text and "VGS Checkpoint Migration" in text and version in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vgs.load_state_dict(dict(old, vgs_version="3.1"))


def test_a_scaler_pickled_before_it_kept_its_own_record_loads():
    params = make_params()
    vgs = VarianceGradientScaler(params, warmup_steps=0)
    run_scaler(vgs, params, grads_for, 3)
    layout = upgd_ref.FlatLayout([tuple(p.shape) for p in params], "float32")
    core = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0)
    core.load_state_dict(vgs.core.state_dict())
    state = {k: v for k, v in vgs.__getstate__().items() if k not in ("_stats", "_layout", "_spatial",
                                                                         "_nonfinite_policy")}
    old = VarianceGradientScaler.__new__(VarianceGradientScaler)
    old.__setstate__(dict(state, _core=core, _k=0))  # the attributes of the previous version
    assert old.get_scaling_factor() == vgs.get_scaling_factor() and old._step_count == 3
    assert old.state_dict()["param_numel"].tolist() == vgs.state_dict()["param_numel"].tolist()
    empty = VarianceGradientScaler.__new__(VarianceGradientScaler)
    empty.__setstate__(dict(state, _core=None, _k=5))
    assert empty._step_count == 5 and empty.get_scaling_factor() == 1.0


# --- optimizers ---------------------------------------------------------------------------

def test_upgdw_amsgrad_is_a_not_implemented_error_and_a_value_error():
    params = make_params()
    for error in (NotImplementedError, ValueError):
        with pytest.raises(error, match="AMSGrad"):
            UPGDW(params, amsgrad=True)
    opt = UPGDW(params, seed=0)
    opt.param_groups[0]["amsgrad"] = True
    set_grads(params, grads_for(0, params))
    with pytest.raises(NotImplementedError, match="AMSGrad"):
        opt.step()


def test_tensor_lr_must_have_one_element():
    params = make_params()
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        AdaptiveUPGD(params, lr=torch.tensor([1e-3, 1e-3]))
    opt = AdaptiveUPGD(params, lr=torch.tensor(1e-2), seed=1)
    plain = AdaptiveUPGD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, seed=1)
    for k in range(3):
        set_grads(params, grads_for(k, params))
        set_grads(plain.param_groups[0]["params"], grads_for(k, params))
        opt.step()
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(params, plain.param_groups[0]["params"]))


# --- the functional door (issue 13) ---------------------------------------------------------

def test_the_optimizer_steps_its_own_record_through_the_door_bit_identically():
    params = make_params(torch.float64)
    opt = AdaptiveUPGD(params, lr=1e-2, adaptive_noise=True, seed=4)
    state = FlatUPGDState.from_state_dict(opt.core_format(), opt.layout)
    flat = opt.layout.pack([p.detach().numpy() for p in params])
    hyper = opt.core.step_hyperparams()
    for k in range(4):
        grads = grads_for(k, params, absent={2} if k == 1 else ())
        set_grads(params, grads)
        present = [g is not None for g in grads]
        flat_g = opt.layout.pack([np.zeros(p.shape) if g is None else g.numpy() for p, g in zip(params, grads)])
        opt.step()
        upgd_step(opt.layout, flat, flat_g, state, StepRequest(hyper=hyper, present=present, seed=opt.seed))
        assert opt.layout.pack([p.detach().numpy() for p in params]).tobytes() == flat.tobytes()
        for name in ("utility", "first_moment", "second_moment", "segment_step", "grad_norm_ema"):
            assert getattr(opt.flat_state, name).tobytes() == getattr(state, name).tobytes()
    assert isinstance(opt.flat_state, FlatUPGDState) and opt.flat_state.step == state.step == 4


def test_core_is_a_snapshot_and_flat_state_is_live():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=1e-2, seed=4)
    set_grads(params, grads_for(0, params))
    opt.step()
    snapshot = opt.core
    snapshot.state.utility[...] = 7.0  # does not reach the optimizer
    assert not (opt.flat_state.utility == 7.0).any() and opt.core is not snapshot
    opt.state[params[0]]["avg_utility"].fill_(0.5)  # the views are the record's memory
    assert (opt.layout.unpack(opt.flat_state.utility)[0] == 0.5).all()
    vgs = VarianceGradientScaler(params, warmup_steps=0)
    vgs.step()
    assert isinstance(vgs.stats, FlatVGSState) and vgs.stats.step == 1 == vgs.core.state.step
    before = vgs.stats.grad_mean_avg.copy()
    vgs.core.state.grad_mean_avg[...] = 3.0
    assert vgs.stats.grad_mean_avg.tobytes() == before.tobytes()


def test_deepcopy_keeps_the_record_independent():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=1e-2, seed=4)
    set_grads(params, grads_for(0, params))
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.flat_state is not opt.flat_state
    assert twin.flat_state.utility.tobytes() == opt.flat_state.utility.tobytes()
