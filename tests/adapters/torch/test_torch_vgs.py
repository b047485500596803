"""The PyTorch adapter's VarianceGradientScaler: production API, state dicts, pickling,
logging, and bit-identity with the core scaler on the same buffers."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref.adapters.torch import VGS_VERSION, AdaptiveUPGD, VarianceGradientScaler

PRODUCTION_KEYS = {"enabled", "beta", "alpha", "eps", "warmup_steps", "step_count", "min_scaling_factor",
                   "variance_cap", "param_grad_mean_ema", "param_grad_sq_ema", "param_numel", "grad_mean_ema",
                   "grad_var_ema", "grad_norm_ema", "grad_max_ema", "vgs_version"}
#: What the production scaler logs after a step with gradients, in its order (PRODUCTION-API.md).
METRICS = ["vgs/stochastic_var_p10", "vgs/stochastic_var_p50", "vgs/stochastic_var_p90", "vgs/stochastic_var_mean",
           "vgs/grad_norm_ema", "vgs/grad_mean_ema_spatial", "vgs/grad_var_ema_spatial", "vgs/grad_max_ema",
           "vgs/normalized_variance", "vgs/scaling_factor", "vgs/step_count", "vgs/warmup_active"]


def make_params(dtype=torch.float32, seed=0, shapes=((6, 4), (4,), (0,), (3, 3), (2,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def grads_for(step, params, absent=()):
    gen = torch.Generator().manual_seed(700 + step)
    return [None if i in absent else torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + i) + 0.05 * (i - 1)
            for i, p in enumerate(params)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


class Recorder:
    def __init__(self):
        self.records = []

    def record(self, key, value):
        self.records.append((key, value))


def stats(vgs):
    core = vgs.core
    return vgs._step_count, core.state.grad_mean_avg.tobytes(), core.state.grad_sq_avg.tobytes()


# --- API ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=1.0), "beta must be in (0, 1), got 1.0"),
    (dict(beta=0.0), "beta must be in (0, 1), got 0.0"),
    (dict(alpha=-0.1), "alpha must be non-negative, got -0.1"),
    (dict(eps=0.0), "eps must be positive, got 0.0"),
    (dict(warmup_steps=-1), "warmup_steps must be non-negative, got -1"),
    (dict(min_scaling_factor=0.0), "min_scaling_factor must be in (0, 1], got 0.0"),
    (dict(min_scaling_factor=1.5), "min_scaling_factor must be in (0, 1], got 1.5"),
    (dict(variance_cap=0.0), "variance_cap must be positive when set, got 0.0"),
    (dict(beta=float("nan")), "beta must be finite"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        VarianceGradientScaler(make_params(), **kwargs)


def test_attributes_and_defaults_as_production():
    vgs = VarianceGradientScaler(make_params())
    assert (vgs.enabled, vgs.beta, vgs.alpha, vgs.eps, vgs.warmup_steps, vgs.min_scaling_factor,
            vgs.variance_cap, vgs.track_per_param, vgs._step_count) == (True, 0.99, 0.1, 1e-8, 100, 0.1, 50.0, True, 0)
    assert "VarianceGradientScaler(enabled=True" in repr(vgs) and "version=3.2" in repr(vgs)
    assert VarianceGradientScaler(make_params(), warmup_steps=5.0).warmup_steps == 5  # int(), as production


def test_without_parameters_the_factor_is_one_and_steps_are_counted():
    vgs = VarianceGradientScaler(warmup_steps=0)
    assert vgs.scale_gradients() == 1.0 and vgs.get_normalized_variance() == 0.0
    vgs.step()
    vgs.step()
    assert vgs._step_count == 2 and vgs.get_scaling_factor() == 1.0
    assert vgs.state_dict()["param_grad_mean_ema"] is None


# --- against the core -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_optimizer", [False, True], ids=["own-buffer", "optimizer-buffer"])
def test_bit_identical_to_the_core_scaler(dtype, with_optimizer):
    params = make_params(dtype)
    if with_optimizer:
        opt = AdaptiveUPGD(params, lr=1e-3, seed=1)
    vgs = VarianceGradientScaler(params, warmup_steps=2, variance_cap=None)
    layout = upgd_ref.FlatLayout([tuple(p.shape) for p in params], {torch.float32: "float32", torch.float64: "float64"}[dtype])
    core = upgd_ref.VarianceGradientScaler(layout, warmup_steps=2, variance_cap=None)
    for k in range(7):
        grads = grads_for(k, params, absent={1} if k == 3 else ())
        set_grads(params, grads)
        identities = [p.grad for p in params]
        present = [g is not None for g in grads]
        flat = layout.pack([g.numpy() if g is not None else np.zeros(tuple(p.shape), layout.dtype)
                            for g, p in zip(grads, params)])
        f = vgs.scale_gradients()
        assert f == core.scale(flat, present)
        for i, p in enumerate(params):
            if present[i]:
                assert p.grad.numpy().tobytes() == layout.unpack(flat)[i].tobytes()
                if not with_optimizer:
                    assert p.grad is identities[i]  # scaled in place, as production
        if with_optimizer:
            opt.step()
        vgs.step()
        core.update(flat, present)
        assert (core.state.step, core.state.grad_mean_avg.tobytes(), core.state.grad_sq_avg.tobytes()) == stats(vgs)
        assert vgs.get_scaling_factor() == core.scaling_factor()
    assert vgs.get_scaling_factor() < 1.0  # the test exercised real scaling


def test_uses_the_optimizer_flat_gradient_buffer_without_copies():
    params = make_params()
    opt = AdaptiveUPGD(params, lr=1e-3, seed=1)
    vgs = VarianceGradientScaler(params[1:4], warmup_steps=0)  # consecutive: a slice of the buffer
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params[1:4]]
    plain = VarianceGradientScaler(clones, warmup_steps=0)  # private buffer
    bucket = opt._partition.buckets[0]
    for k in range(4):
        grads = grads_for(k, params)
        set_grads(params, grads)
        set_grads(clones, grads[1:4])
        assert vgs.scale_gradients() == plain.scale_gradients()  # copies fresh .grads in once
        assert [p.grad.data_ptr() for p in params[1:4]] == bucket.grad_ptrs[1:4]
        assert bucket.gather_grads(1, 4)[1] == []
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(params[1:4], clones))
        opt.step()
        vgs.step()
        plain.step()
        assert [p.grad.data_ptr() for p in params] == bucket.grad_ptrs
        assert stats(vgs) == stats(plain)
    assert plain.get_scaling_factor() < 1.0


def test_non_consecutive_parameters_use_a_private_buffer_with_the_same_numbers():
    params = make_params()
    AdaptiveUPGD(params, seed=1)
    subset = [params[3], params[0]]
    vgs = VarianceGradientScaler(subset, warmup_steps=0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in subset]
    plain = VarianceGradientScaler(clones, warmup_steps=0)
    for k in range(4):
        grads = grads_for(k, subset)
        set_grads(subset, grads)
        set_grads(clones, grads)
        assert vgs.scale_gradients() == plain.scale_gradients()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(subset, clones))
        vgs.step()
        plain.step()
    assert stats(vgs) == stats(plain)


def test_normalized_variance_is_reported_before_the_cap():
    params = make_params(torch.float64)
    vgs = VarianceGradientScaler(params, warmup_steps=0, variance_cap=1e-3, alpha=1.0)
    for k in range(3):
        set_grads(params, grads_for(k, params))
        vgs.scale_gradients()
        vgs.step()
    g = vgs.get_normalized_variance()
    assert g > 1e-3
    assert vgs.get_scaling_factor() == pytest.approx(1.0 / (1.0 + 1e-3), rel=1e-15)


def test_hyperparameter_attributes_are_live():
    params = make_params()
    vgs = VarianceGradientScaler(params, warmup_steps=0)
    for k in range(3):
        set_grads(params, grads_for(k, params))
        vgs.scale_gradients()
        vgs.step()
    assert vgs.get_scaling_factor() < 1.0
    vgs.enabled = False
    assert vgs.get_scaling_factor() == 1.0
    vgs.enabled = True
    vgs.warmup_steps = 10
    assert vgs.get_scaling_factor() == 1.0
    vgs.beta = 2.0
    with pytest.raises(ValueError, match="beta"):
        vgs.get_scaling_factor()


def test_step_logs_the_production_metric_names():
    params = make_params()
    logger = Recorder()
    vgs = VarianceGradientScaler(params, warmup_steps=2, logger=logger)
    set_grads(params, grads_for(0, params))
    vgs.scale_gradients()
    vgs.step()
    recorded = dict(logger.records)
    assert [key for key, _ in logger.records] == METRICS
    assert recorded["vgs/step_count"] == 1.0 and recorded["vgs/warmup_active"] == 1.0
    assert recorded["vgs/scaling_factor"] == 1.0
    assert all(isinstance(v, float) for v in recorded.values())

    class Broken:
        def record(self, key, value):
            raise RuntimeError("logging backend down")

    VarianceGradientScaler(params, logger=Broken()).step()  # never breaks training
    VarianceGradientScaler(params, logger=object()).step()


# --- state ----------------------------------------------------------------------------------


def _trained(params, steps=4, **kwargs):
    vgs = VarianceGradientScaler(params, warmup_steps=1, **kwargs)
    for k in range(steps):
        set_grads(params, grads_for(k, params))
        vgs.scale_gradients()
        vgs.step()
    return vgs


def test_state_dict_has_the_production_format():
    params = make_params()
    sd = _trained(params).state_dict()
    assert set(sd) == PRODUCTION_KEYS
    assert sd["vgs_version"] == VGS_VERSION == "3.2"
    assert sd["step_count"] == 4 and isinstance(sd["step_count"], int)
    assert sd["param_grad_mean_ema"].shape == sd["param_grad_sq_ema"].shape == sd["param_numel"].shape == (5,)
    assert sd["param_grad_mean_ema"].dtype == torch.float64
    assert sd["param_numel"].tolist() == [24.0, 4.0, 0.0, 9.0, 2.0]
    assert all(type(sd[k]) is float for k in ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema"))


def test_state_dict_round_trip_in_lockstep_bit_identical(tmp_path):
    params = make_params()
    vgs = _trained(params)
    torch.save(vgs.state_dict(), tmp_path / "vgs.pt")
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = VarianceGradientScaler(twin_params)
    twin.load_state_dict(torch.load(tmp_path / "vgs.pt"))
    assert stats(twin) == stats(vgs) and twin.warmup_steps == 1
    for k in range(4, 8):
        for v, ps in ((vgs, params), (twin, twin_params)):
            set_grads(ps, grads_for(k, params))
            v.scale_gradients()
            v.step()
        assert stats(twin) == stats(vgs)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(params, twin_params))


def test_loads_production_variants():
    params = make_params()
    source = _trained(params).state_dict()
    variant = dict(source)  # production keeps float32 statistics and may lack the 3.2 keys
    variant["param_grad_mean_ema"] = source["param_grad_mean_ema"].float()
    variant["param_grad_sq_ema"] = source["param_grad_sq_ema"].float()
    variant["vgs_version"] = "3.1"
    del variant["min_scaling_factor"], variant["variance_cap"]
    variant["step_count"] = torch.tensor(4)
    vgs = VarianceGradientScaler(params, min_scaling_factor=0.5, variance_cap=3.0)
    vgs.load_state_dict(variant)
    assert (vgs.min_scaling_factor, vgs.variance_cap, vgs._step_count) == (0.1, 50.0, 4)
    assert np.array_equal(vgs.core.state.grad_mean_avg, source["param_grad_mean_ema"].float().double().numpy())

    fresh = dict(source, param_grad_mean_ema=None, param_grad_sq_ema=None, param_numel=None)
    vgs.load_state_dict(fresh)  # production before its first statistics update
    assert vgs._step_count == 4 and not vgs.core.state.grad_sq_avg.any()

    old = dict(source, vgs_version="2.0")
    with pytest.warns(UserWarning, match="version 2.0"):
        vgs.load_state_dict(old)
    assert vgs._step_count == 4 and not vgs.core.state.grad_mean_avg.any()

    core = upgd_ref.VarianceGradientScaler(vgs.core.layout, warmup_steps=3)
    core.state.step = 9
    vgs.load_state_dict(core.state_dict())
    assert vgs._step_count == 9 and vgs.warmup_steps == 3


def test_bad_state_dicts_change_nothing():
    params = make_params()
    vgs = _trained(params)
    before = (stats(vgs), dict(vgs._hyper))
    good = vgs.state_dict()
    bad = [
        (dict(good, beta=1.5), "beta"),
        (dict(good, step_count=-2), "non-negative"),
        (dict(good, param_grad_mean_ema=torch.zeros(3), param_grad_sq_ema=torch.zeros(3)), "statistics for 3"),
        (dict(good, param_grad_sq_ema=-torch.ones(5)), ">= 0"),
        (dict(good, param_grad_mean_ema=torch.full((5,), float("nan"))), "non-finite"),
        (dict(good, param_grad_sq_ema=None), "both"),
    ]
    for sd, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            vgs.load_state_dict(sd)
        assert (stats(vgs), dict(vgs._hyper)) == before


def test_pickling_drops_parameters_and_logger_as_production():
    params = make_params()
    vgs = _trained(params, logger=Recorder())
    clone = pickle.loads(pickle.dumps(vgs))
    assert clone._parameters is None and clone._logger is None
    assert clone.get_scaling_factor() == vgs.get_scaling_factor()
    assert clone.state_dict()["step_count"] == 4
    assert clone.scale_gradients() == 1.0  # no parameters to scale
    clone.update_parameters(params)  # as production: statistics restart, the step count stays
    assert clone._step_count == 4 and not clone.core.state.grad_mean_avg.any()
    deep = copy.deepcopy(vgs)
    assert deep._parameters is None and stats(deep) == stats(vgs)


def test_reset_statistics_and_update_parameters():
    params = make_params()
    vgs = _trained(params)
    vgs.update_parameters(params[:2])
    assert vgs._step_count == 4 and vgs.core.layout.num_segments == 2
    vgs.reset_statistics()
    assert vgs._step_count == 0 and vgs.get_scaling_factor() == 1.0
    assert vgs.get_normalized_variance() == 0.0


def test_no_warning_in_normal_use():
    params = make_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trained(params)


def test_state_dict_round_trip_after_a_step():
    """``load_state_dict(state_dict())`` after a step: the core record is written with the VGS
    format's version (it was written with the optimizer format's version 2, which the VGS
    reader refuses)."""
    import torch

    from upgd_ref.adapters.torch import VarianceGradientScaler

    params = [torch.nn.Parameter(torch.randn(5))]
    scaler = VarianceGradientScaler(params, warmup_steps=2, beta=0.9)
    params[0].grad = torch.randn(5)
    scaler.scale_gradients()
    scaler.step()
    other = VarianceGradientScaler(params, warmup_steps=2, beta=0.9)
    other.load_state_dict(scaler.state_dict())
    mine, theirs = (s.core.state_dict()["state"]["grad_mean_avg"] for s in (other, scaler))
    assert mine.tobytes() == theirs.tobytes()
    assert scaler.core.state_dict()["state"]["step"] == 1  # the core snapshot loads the core-format record
