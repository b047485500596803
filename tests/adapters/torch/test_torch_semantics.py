"""The PyTorch adapter against a plain per-tensor PyTorch implementation of SEMANTICS.

``PerTensorAdaptiveUPGD`` and ``PerTensorVGS`` below are written in this file from the
algorithm text (``specs/algorithm.md``), the way the production classes are written: one
tensor at a time, lazily initialised per-parameter state with an ``int`` step, the
production state-dict formats. They share no code with ``upgd_ref``; their only inputs from
it are the standard normals (injected instead of ``torch.randn_like``).

They serve twice: as the independent implementation that the adapter must agree with (to
the tolerance contract of ``upgd_ref.tolerances``, step by step from the same inputs), and
as a "production-format consumer" for checkpoints going both ways.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref import reference as ref
from upgd_ref import tolerances
from upgd_ref.adapters.torch import HYPERPARAMETER_KEYS, AdaptiveUPGD, VarianceGradientScaler
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.tolerances import INDEPENDENT_RTOL

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- the per-tensor implementation (production style) ------------------------------------


class PerTensorAdaptiveUPGD(torch.optim.Optimizer):
    """AdaptiveUPGD one tensor at a time; ``normals(i)`` gives parameter i's standard normals."""

    def __init__(self, params, lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001, beta1=0.9,
                 beta2=0.999, eps=1e-8, adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6,
                 instant_noise_scale=True, noise_ema_init=1.0, normals=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
                        beta2=beta2, eps=eps, adaptive_noise=adaptive_noise, noise_beta=noise_beta,
                        min_noise_std=min_noise_std, instant_noise_scale=instant_noise_scale)
        super().__init__(params, defaults)
        self.noise_ema_init = noise_ema_init
        self.normals = normals

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("adaptive_noise", False)
            group.setdefault("noise_beta", 0.999)
            group.setdefault("min_noise_std", 1e-6)
            group.setdefault("instant_noise_scale", True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live, lo, hi, index = [], math.inf, -math.inf, 0
        for group in self.param_groups:
            for p in group["params"]:
                i, index = index, index + 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["avg_utility"] = torch.zeros_like(p)
                    state["first_moment"] = torch.zeros_like(p)
                    state["sec_moment"] = torch.zeros_like(p)
                    if group["adaptive_noise"]:
                        state["grad_norm_ema"] = self.noise_ema_init
                state["step"] += 1
                g = p.grad
                bu, b1, b2 = group["beta_utility"], group["beta1"], group["beta2"]
                state["avg_utility"].mul_(bu).add_(-g * p, alpha=1 - bu)
                state["first_moment"].mul_(b1).add_(g, alpha=1 - b1)
                state["sec_moment"].mul_(b2).add_(g * g, alpha=1 - b2)
                if p.numel():
                    lo = min(lo, float(state["avg_utility"].min()))
                    hi = max(hi, float(state["avg_utility"].max()))
                live.append((group, p, i))
        for group, p, i in live:
            state, g, t = self.state[p], p.grad, self.state[p]["step"]
            if group["adaptive_noise"]:
                r = float(torch.linalg.vector_norm(g.double()))
                nb = group["noise_beta"]
                state["grad_norm_ema"] = nb * state["grad_norm_ema"] + (1 - nb) * r
                norm = r if group["instant_noise_scale"] else state["grad_norm_ema"] / (1 - nb**t)
                std = max(group["sigma"] * norm, group["min_noise_std"])
            else:
                std = group["sigma"]
            noise = std * self.normals(i)
            m_hat = state["first_moment"] / (1 - group["beta1"] ** t)
            v_hat = state["sec_moment"] / (1 - group["beta2"] ** t)
            x = ((state["avg_utility"] / (1 - group["beta_utility"] ** t) - lo) / (hi - lo + 1e-8)).clamp(0.0, 1.0)
            su = torch.sigmoid(2.0 * (x - 0.5))
            p.mul_(1 - group["lr"] * group["weight_decay"]).add_(
                (m_hat / (v_hat.sqrt() + group["eps"]) + noise) * (1 - su), alpha=-group["lr"])
        return loss


class PerTensorVGS:
    """The scaler per tensor, production state-dict format; statistics in ``stat_dtype``."""

    def __init__(self, parameters, enabled=True, beta=0.99, alpha=0.1, eps=1e-8, warmup_steps=100,
                 min_scaling_factor=0.1, variance_cap=50.0, stat_dtype=torch.float64):
        self.params = list(parameters)
        self.enabled, self.beta, self.alpha, self.eps = enabled, beta, alpha, eps
        self.warmup_steps, self.min_scaling_factor, self.variance_cap = warmup_steps, min_scaling_factor, variance_cap
        self.k = 0
        self.a = torch.zeros(len(self.params), dtype=stat_dtype)
        self.b = torch.zeros(len(self.params), dtype=stat_dtype)

    def normalized_variance(self):
        if self.k == 0:
            return 0.0
        c = 1 - self.beta**self.k
        mu, s = self.a.double() / c, self.b.double() / c
        nv = (s - mu**2).clamp(min=0) / ((mu**2).clamp(min=1e-12) + self.eps)
        nv = torch.where(torch.isfinite(nv), nv, torch.zeros_like(nv))
        return min(max(float(np.quantile(nv.numpy(), 0.9)), 0.0), 1e6)

    def factor(self):
        if not self.enabled or self.k < self.warmup_steps:
            return 1.0
        g = self.normalized_variance()
        if self.variance_cap is not None:
            g = min(g, self.variance_cap)
        return min(max(1.0 / (1.0 + self.alpha * g), self.min_scaling_factor), 1.0)

    def scale_gradients(self):
        f = self.factor()
        if f < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(f)
        return f

    def step(self):
        self.k += 1
        for i, p in enumerate(self.params):
            if p.grad is not None and p.numel():
                g = p.grad.double()
                self.a[i] = self.beta * self.a[i] + (1 - self.beta) * float(g.mean())
                self.b[i] = self.beta * self.b[i] + (1 - self.beta) * float((g * g).mean())

    def state_dict(self):
        return {"enabled": self.enabled, "beta": self.beta, "alpha": self.alpha, "eps": self.eps,
                "warmup_steps": self.warmup_steps, "step_count": self.k,
                "min_scaling_factor": self.min_scaling_factor, "variance_cap": self.variance_cap,
                "param_grad_mean_ema": self.a.clone(), "param_grad_sq_ema": self.b.clone(),
                "param_numel": torch.tensor([float(p.numel()) for p in self.params]),
                "grad_mean_ema": None, "grad_var_ema": None, "grad_norm_ema": None, "grad_max_ema": None,
                "vgs_version": "3.2"}

    def load_state_dict(self, sd):
        self.k = int(sd["step_count"])
        self.a = sd["param_grad_mean_ema"].clone().to(self.a.dtype)
        self.b = sd["param_grad_sq_ema"].clone().to(self.b.dtype)


# --- helpers ------------------------------------------------------------------------------


def make_params(dtype, seed=0, shapes=((6, 5), (5,), (0, 3), (3, 6), (1,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_for(step, params, dtype, absent=()):
    """Deterministic gradients of step ``step``; indices in ``absent`` get None."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=dtype) * (0.1 + 0.05 * i) + 0.02 * (i - 2)
        out.append(None if i in absent else g)
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def hyper_of(opt):
    """Per-segment validated hyper-parameters of an adapter optimizer, from its param_groups."""
    out = []
    for group in opt.param_groups:
        h = validate_upgd({k: group[k] for k in HYPERPARAMETER_KEYS} | {"noise_ema_init": opt._noise_ema_init})
        out.extend([h] * len(group["params"]))
    return out


def pre_step_inputs(opt):
    """The adapter's pre-step parameters and state as per-segment NumPy arrays (copies)."""
    layout, state = opt.layout, opt.core.state
    views = layout.unpack
    params = [np.array(v) for v in views(opt._partition.buckets[0].param_flat)]
    start = ref.UPGDState(
        step=np.int64(state.step), segment_step=state.segment_step.copy(),
        utility=[np.array(v) for v in views(state.utility)],
        first_moment=[np.array(v) for v in views(state.first_moment)],
        second_moment=[np.array(v) for v in views(state.second_moment)],
        grad_norm_ema=state.grad_norm_ema.copy(),
    )
    return params, start


def per_tensor_from(opt, params_copy, normals_fn):
    """A PerTensorAdaptiveUPGD over ``params_copy`` holding the adapter's current state."""
    groups, start = [], 0
    for group in opt.param_groups:
        count = len(group["params"])
        groups.append({k: v for k, v in group.items() if k != "params"} | {"params": params_copy[start:start + count]})
        start += count
    plain = PerTensorAdaptiveUPGD(groups, noise_ema_init=opt._noise_ema_init, normals=normals_fn)
    plain.load_state_dict(opt.state_dict())
    return plain


def assert_within_contract(candidate_params, candidate_state, truth, bounds, present, what):
    new_params, new_state, _ = truth
    for i, is_present in enumerate(present):
        if not is_present:
            continue
        v = tolerances.max_violation(candidate_params[i], new_params[i], bounds["params"][i])
        assert v <= 1.0, f"{what}: parameter {i} off by {v:.3g} x the contract"
        for name in ("utility", "first_moment", "second_moment"):
            v = tolerances.max_violation(candidate_state[name][i], getattr(new_state, name)[i], bounds[name][i])
            assert v <= 1.0, f"{what}: {name}[{i}] off by {v:.3g} x the contract"


# --- tests --------------------------------------------------------------------------------

NOISE_MODES = [
    pytest.param(dict(sigma=0.0), id="sigma0"),
    pytest.param(dict(sigma=0.5), id="fixed-noise"),
    pytest.param(dict(sigma=0.3, adaptive_noise=True), id="adaptive-instant"),
    pytest.param(dict(sigma=0.3, adaptive_noise=True, instant_noise_scale=False), id="adaptive-ema"),
]


@pytest.mark.parametrize("mode", NOISE_MODES)
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_adapter_matches_the_per_tensor_implementation_step_by_step(dtype_name, mode):
    """Lockstep over 12 steps (two groups, a zero-size parameter, gradients missing at some
    steps, VGS active): from the adapter's own pre-step state, the float64 reference, the
    adapter and the per-tensor PyTorch implementation agree to the tolerance contract."""
    dtype = DTYPES[dtype_name]
    params = make_params(dtype)
    opt = AdaptiveUPGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.02, "beta1": 0.8}],
                       lr=0.05, weight_decay=0.01, beta_utility=0.9, seed=1234, **mode)
    vgs = VarianceGradientScaler(params, warmup_steps=3)
    for k in range(12):
        absent = {1} if k in (4, 5) else ({3} if k == 8 else set())
        set_grads(params, grads_for(k, params, dtype, absent))
        vgs.scale_gradients()
        present = [p.grad is not None for p in params]
        grads = [p.grad.numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), dtype_name) for p in params]
        before_params, before_state = pre_step_inputs(opt)
        step_k = opt.core.step_count + 1
        normals64 = opt.layout.unpack(upgd_ref.noise(opt.layout, opt.seed, step_k, dtype="float64"))
        normals = opt.layout.unpack(upgd_ref.noise(opt.layout, opt.seed, step_k))
        truth, scales = tolerances.upgd_step_scales(before_params, grads, before_state, normals64, hyper_of(opt),
                                                     present=present)
        bounds = tolerances.upgd_step_bounds(scales, dtype_name, opt.layout.sizes)

        copies = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in before_params]
        for c, p in zip(copies, params):
            c.grad = None if p.grad is None else p.grad.detach().clone()
        plain = per_tensor_from(opt, copies, lambda i: torch.from_numpy(np.array(normals[i])))
        plain.step()
        opt.step()
        vgs.step()

        adapter_state = {name: [np.array(v) for v in opt.layout.unpack(getattr(opt.core.state, name))]
                         for name in ("utility", "first_moment", "second_moment")}
        assert_within_contract([p.detach().numpy() for p in params], adapter_state, truth, bounds, present, "adapter")
        plain_state = {name: [plain.state[c][key].numpy() if c in plain.state else None for c in copies]
                       for name, key in (("utility", "avg_utility"), ("first_moment", "first_moment"),
                                         ("second_moment", "sec_moment"))}
        assert_within_contract([c.detach().numpy() for c in copies], plain_state, truth, bounds, present, "per-tensor")
        assert [opt.state[p].get("step", 0) for p in params] == [int(t) for t in truth[1].segment_step]
        if mode.get("adaptive_noise"):
            for i, p in enumerate(params):
                if present[i]:
                    assert opt.state[p]["grad_norm_ema"] == pytest.approx(float(truth[1].grad_norm_ema[i]), rel=INDEPENDENT_RTOL)


def test_injected_noise_is_upgd_ref_noise_element_for_element():
    """With lr=1, no decay, sigma=1, fresh zero gradients and U_hi == U_lo, the update of
    each element is ``-(1 - sigmoid(-1)) * xi``, so the normals can be read back."""
    params = make_params(torch.float64, shapes=((7, 3), (5,)))
    opt = AdaptiveUPGD(params, lr=1.0, weight_decay=0.0, sigma=1.0, seed=2**63 + 5)
    for k in (1, 2):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        protection = 1.0 - 1.0 / (1.0 + math.exp(1.0))  # 1 - sigmoid(2 * (0 - 0.5))
        recovered = [((b - p.detach()) / protection) for b, p in zip(before, params)]
        expected = opt.layout.unpack(upgd_ref.noise(opt.layout, opt.seed, k))
        for r, e in zip(recovered, expected):
            np.testing.assert_allclose(r.numpy(), e, rtol=INDEPENDENT_RTOL, atol=1e-12)
        assert [n.numpy().tobytes() for n in opt.noise(k)] == [np.ascontiguousarray(e).tobytes() for e in expected]


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_vgs_matches_the_per_tensor_scaler(dtype_name):
    """Factors within the scalar contract from identical statistics; statistics within the
    reduction contract; the scaled gradients are ``g * float(f)`` rounded to the dtype."""
    dtype = DTYPES[dtype_name]
    params = make_params(dtype)
    vgs = VarianceGradientScaler(params, warmup_steps=2, alpha=0.5, variance_cap=None)
    plain = PerTensorVGS(params, warmup_steps=2, alpha=0.5, variance_cap=None)
    u = tolerances.unit_roundoff(dtype_name)
    for k in range(8):
        grads = grads_for(k, params, dtype, absent={4} if k == 3 else ())
        plain.load_state_dict(vgs.state_dict())
        f_plain = plain.factor()
        set_grads(params, grads)
        f = vgs.scale_gradients()
        assert abs(f - f_plain) <= tolerances.SCALAR_ULPS_F64 * 2.0**-53 * abs(f_plain)
        assert vgs.get_normalized_variance() == pytest.approx(plain.normalized_variance(), rel=INDEPENDENT_RTOL, abs=0)
        for p, g in zip(params, grads):
            if g is not None:
                assert torch.equal(p.grad, g * torch.tensor(f, dtype=dtype)) if f != 1.0 else torch.equal(p.grad, g)
        a_before, b_before = plain.a.clone(), plain.b.clone()
        plain_grads = [None if p.grad is None else p.grad.clone() for p in params]
        vgs.step()
        set_grads(plain.params, plain_grads)
        plain.step()
        sd = vgs.state_dict()
        for i, p in enumerate(params):
            n = max(p.numel(), 1)
            g = plain_grads[i]
            if g is None or p.numel() == 0:
                continue
            g64 = g.double()
            scale_a = abs(0.99 * float(a_before[i])) + 0.01 * float(g64.abs().mean())
            scale_b = abs(0.99 * float(b_before[i])) + 0.01 * float((g64 * g64).mean())
            bound = tolerances.REDUCTION_ULPS * u + n * 2.0**-53
            assert abs(float(sd["param_grad_mean_ema"][i]) - float(plain.a[i])) <= bound * scale_a
            assert abs(float(sd["param_grad_sq_ema"][i]) - float(plain.b[i])) <= bound * scale_b
        assert sd["step_count"] == plain.k


# --- checkpoints both ways ----------------------------------------------------------------


def _train(opt, params, dtype, steps, start=0):
    for k in range(start, start + steps):
        set_grads(params, grads_for(k, params, dtype, absent={0} if k == 2 else ()))
        opt.step()


@pytest.mark.parametrize("adaptive", [False, True])
def test_production_checkpoint_loads_and_training_continues_with_identical_math(adaptive):
    dtype = torch.float64
    params = make_params(dtype)
    mode = dict(lr=0.05, sigma=0.2, adaptive_noise=adaptive, beta_utility=0.9)
    normals_step = {"k": 1}
    layout = upgd_ref.FlatLayout([tuple(p.shape) for p in params], "float64")
    seed = 77

    def normals(i):
        return torch.from_numpy(np.array(layout.unpack(upgd_ref.noise(layout, seed, normals_step["k"]))[i]))

    prod = PerTensorAdaptiveUPGD(params, normals=normals, **mode)
    for k in range(5):
        normals_step["k"] = k + 1
        _train(prod, params, dtype, 1, start=k)
    saved = copy.deepcopy(prod.state_dict())
    assert isinstance(saved["state"][1]["step"], int)

    mine_params = clone_params(params)
    mine = AdaptiveUPGD(mine_params, seed=seed, **mode)
    mine.load_state_dict(saved)
    assert mine.core.step_count == 5  # the noise counter continues after the largest step
    for p, q in zip(params, mine_params):
        assert set(prod.state[p]) == set(mine.state[q])
        for key, value in prod.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, mine.state[q][key])
            else:
                assert value == mine.state[q][key] and type(value) is type(mine.state[q][key])
    for k in range(5, 9):  # continue both; identical math to the float64 contract
        normals_step["k"] = k + 1
        _train(prod, params, dtype, 1, start=k)
        _train(mine, mine_params, dtype, 1, start=k)
        for p, q in zip(params, mine_params):
            np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=INDEPENDENT_RTOL, atol=1e-15)


@pytest.mark.parametrize("adaptive", [False, True])
def test_our_checkpoint_loads_into_a_production_format_consumer(adaptive):
    dtype = torch.float32
    params = make_params(dtype)
    mode = dict(lr=0.05, sigma=0.2, adaptive_noise=adaptive)
    mine = AdaptiveUPGD(params, seed=5, **mode)
    _train(mine, params, dtype, 4)
    ours = mine.state_dict()

    reference_params = clone_params(params)
    prod = PerTensorAdaptiveUPGD(reference_params, normals=lambda i: torch.zeros(()), **mode)
    _train(prod, reference_params, dtype, 4)
    theirs = prod.state_dict()
    assert set(ours) - {"upgd_ref"} == set(theirs)
    assert ours["param_groups"] == theirs["param_groups"]
    assert set(ours["state"]) == set(theirs["state"])
    for index, entry in theirs["state"].items():
        assert set(ours["state"][index]) == set(entry)
        for key, value in entry.items():
            mine_value = ours["state"][index][key]
            assert type(mine_value) is type(value), key
            if isinstance(value, torch.Tensor):
                assert (mine_value.shape, mine_value.dtype) == (value.shape, value.dtype)

    consumer_params = clone_params(params)
    layout = mine.layout
    step = {"k": mine.core.step_count + 1}
    consumer = PerTensorAdaptiveUPGD(consumer_params, normals=lambda i: torch.from_numpy(
        np.array(layout.unpack(upgd_ref.noise(layout, mine.seed, step["k"]))[i])), **mode)
    consumer.load_state_dict(copy.deepcopy(ours))
    for p, q in zip(params, consumer_params):
        for key in ("avg_utility", "first_moment", "sec_moment"):
            assert torch.equal(mine.state[p][key], consumer.state[q][key])
        assert consumer.state[q]["step"] == mine.state[p]["step"]
    for k in range(4, 7):
        step["k"] = mine.core.step_count + 1
        _train(mine, params, dtype, 1, start=k)
        _train(consumer, consumer_params, dtype, 1, start=k)
        for p, q in zip(params, consumer_params):  # two float32 implementations: the parameter contract
            bound = tolerances.PARAM_ULPS * tolerances.unit_roundoff("float32")
            scale = float(np.max(np.abs(p.detach().numpy()), initial=1.0))
            np.testing.assert_allclose(q.detach().numpy(), p.detach().numpy(), rtol=bound, atol=bound * scale)


def test_old_state_dict_without_adaptive_noise_keys_loads_with_defaults():
    params = make_params(torch.float64)
    old = PerTensorAdaptiveUPGD(params, lr=0.01, normals=lambda i: torch.zeros(()))
    _train(old, params, torch.float64, 2)
    sd = copy.deepcopy(old.state_dict())
    for group in sd["param_groups"]:
        for key in ("adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale"):
            del group[key]
    mine = AdaptiveUPGD(clone_params(params), adaptive_noise=True, noise_beta=0.5, seed=1)
    mine.load_state_dict(sd)
    group = mine.param_groups[0]
    assert (group["adaptive_noise"], group["noise_beta"], group["min_noise_std"], group["instant_noise_scale"]) == (
        False, 0.999, 1e-6, True)
    assert group["lr"] == 0.01
    _train(mine, mine.param_groups[0]["params"], torch.float64, 1, start=2)  # and it steps
