"""The UPGD family in the PyTorch adapter: ``UPGD``, ``UPGDW`` and ``AdaptiveUPGD(profile=...)``.

``PerTensorFamily`` below is written in this file from ``specs/algorithm.md`` §7 (the
two-pass step with its four options), one float64 tensor at a time; it shares no code
with ``upgd_ref``. Its only input from the library is the standard normals
(``upgd_ref.noise(opt.layout, opt.seed, k)``), injected instead of ``torch.randn_like``.
Each member must agree with it to 1e-12 relative over 25 steps, with a parameter frozen at
some steps, two param groups and a hyper-parameter edit mid-run; and must be bit-identical
to the core class on the same flat buffers.
"""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

import upgd_ref
from upgd_ref.adapters.torch import UPGD, UPGDW, AdaptiveUPGD
from upgd_ref.tolerances import INDEPENDENT_RTOL

SHAPES = ((4, 3), (5,), (0,), (2, 3, 2), (1,))
GROUP_SPLIT = 2  # parameters [0, 2) in group 0, the rest in group 1
STEPS = 25
FROZEN = {3: {1}, 10: {3}, 11: {3}, 12: {3, 0}, 17: {4}}  # step -> parameters without a gradient
NEVER_BEFORE = {4: 2}  # parameter 4 has no gradient before step 2 (lazy state)

# --- the independent per-tensor implementation ---------------------------------------------

#: (moments, protection, update_factor, noise_placement) of each member (§7.2)
VARIANTS = {
    "AdaptiveUPGD": ("adam", "min_max", 1.0, "sum"),
    "AdaptiveUPGD-paper": ("adam", "max", 2.0, "terms"),
    "UPGD": ("none", "min_max", 1.0, "sum"),
    "UPGD-paper": ("none", "max", 2.0, "sum"),
    "UPGDW": ("adam", "min_max", 1.0, "sum"),
}


class PerTensorFamily:
    """§7's two-pass step on float64 tensors, per tensor, lazily initialised state.

    ``groups``: list of ``(parameter indices, hyper)`` with ``hyper`` holding ``lr,
    weight_decay, beta_utility, sigma, beta1, beta2, eps, adaptive_noise, noise_beta,
    min_noise_std, instant_noise_scale``.
    """

    def __init__(self, params, groups, variant, noise_ema_init=1.0):
        self.params = [p.detach().clone().double() for p in params]
        self.groups = groups
        self.moments, self.protection, self.update_factor, self.placement = variant
        self.noise_ema_init = noise_ema_init
        self.state = [None] * len(params)

    def hyper(self, i):
        return next(h for members, h in self.groups if i in members)

    def step(self, grads, normals):
        live, lo, hi = [], math.inf, -math.inf
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            g = g.double()
            h = self.hyper(i)
            if self.state[i] is None:
                self.state[i] = {"t": 0, "u": torch.zeros_like(p), "m": torch.zeros_like(p),
                                 "v": torch.zeros_like(p), "n": self.noise_ema_init}
            s = self.state[i]
            s["t"] += 1
            bu = h["beta_utility"]
            s["u"] = bu * s["u"] + (1 - bu) * (-g * p)
            if self.moments == "adam":
                s["m"] = h["beta1"] * s["m"] + (1 - h["beta1"]) * g
                s["v"] = h["beta2"] * s["v"] + (1 - h["beta2"]) * (g * g)
            if p.numel():
                lo, hi = min(lo, float(s["u"].min())), max(hi, float(s["u"].max()))
            live.append((i, g))
        for i, g in live:
            p, s, h, t = self.params[i], self.state[i], self.hyper(i), self.state[i]["t"]
            if h["adaptive_noise"]:
                r = float(torch.linalg.vector_norm(g))
                nb = h["noise_beta"]
                s["n"] = nb * s["n"] + (1 - nb) * r
                norm = r if h["instant_noise_scale"] else s["n"] / (1 - nb**t)
                std = max(h["sigma"] * norm, h["min_noise_std"])
            else:
                std = h["sigma"]
            noise = std * normals[i]
            cu = 1 - h["beta_utility"] ** t
            if self.protection == "min_max":
                x = ((s["u"] / cu - lo) / (hi - lo + 1e-8)).clamp(0.0, 1.0)
                su = 1 / (1 + torch.exp(-2 * (x - 0.5)))
            else:
                su = 1 / (1 + torch.exp(-((s["u"] / cu) / hi)))
            if self.moments == "adam":
                m_hat = s["m"] / (1 - h["beta1"] ** t)
                v_hat = s["v"] / (1 - h["beta2"] ** t)
                if self.placement == "sum":
                    bracket = (m_hat / (v_hat.sqrt() + h["eps"]) + noise) * (1 - su)
                else:
                    bracket = m_hat * (1 - su) / (v_hat.sqrt() + h["eps"]) + noise * (1 - su)
            elif self.placement == "sum":
                bracket = (g + noise) * (1 - su)
            else:
                bracket = g * (1 - su) + noise * (1 - su)
            self.params[i] = p * (1 - h["lr"] * h["weight_decay"]) - self.update_factor * h["lr"] * bracket


# --- members under test -----------------------------------------------------------------

COMMON = dict(adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6, instant_noise_scale=True)


def member(name, noise):
    """``(adapter class, constructor kwargs, group-1 override, reference hypers of the two
    groups, core class, core kwargs, core groups)`` of member ``name`` with noise mode ``noise``."""
    adaptive = dict(adaptive_noise=noise != "fixed", instant_noise_scale=noise != "ema", noise_beta=0.9,
                    min_noise_std=1e-7)
    sigma = 0.05 if noise != "fixed" else 0.01
    if name.startswith("UPGDW"):
        kwargs = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.01, sigma=sigma)
        override = dict(lr=3e-2, betas=(0.7, 0.9))
        ref = [dict(lr=1e-2, weight_decay=0.01, beta_utility=0.95, sigma=sigma, beta1=0.8, beta2=0.95, eps=1e-8),
               dict(lr=3e-2, weight_decay=0.01, beta_utility=0.9, sigma=sigma, beta1=0.7, beta2=0.9, eps=1e-8)]
        core_groups = [dict(lr=1e-2, weight_decay=0.01, sigma=sigma, beta1=0.8, beta2=0.95, eps=1e-8),
                       dict(lr=3e-2, weight_decay=0.01, sigma=sigma, beta1=0.7, beta2=0.9, eps=1e-8)]
        return UPGDW, kwargs, override, ref, upgd_ref.UPGDW, {}, core_groups, adaptive
    profile = "paper" if name.endswith("paper") else "production"
    kwargs = dict(lr=1e-2, weight_decay=0.001, beta_utility=0.9, sigma=sigma)
    override = dict(lr=3e-2, beta_utility=0.8)
    eps = 1e-5 if profile == "paper" else 1e-8
    ref = [dict(kwargs, beta1=0.85, beta2=0.99, eps=eps), dict(kwargs, **override, beta1=0.85, beta2=0.99, eps=eps)]
    core_groups = [dict(kwargs), dict(kwargs, **override)]
    if name.startswith("AdaptiveUPGD"):
        kwargs = dict(kwargs, beta1=0.85, beta2=0.99)
        core_groups = [dict(g, beta1=0.85, beta2=0.99) for g in core_groups]
        return AdaptiveUPGD, dict(kwargs, profile=profile), override, ref, upgd_ref.AdaptiveUPGD, \
            dict(profile=profile), core_groups, adaptive
    return UPGD, dict(kwargs, profile=profile), override, ref, upgd_ref.UPGD, dict(profile=profile), \
        core_groups, adaptive


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def grads_for(step, params):
    """Gradients with ``-g * p > 0`` everywhere, so every utility stays positive (``U_hi > 0``)."""
    gen = torch.Generator().manual_seed(1000 + step)
    absent = FROZEN.get(step, set()) | {i for i, first in NEVER_BEFORE.items() if step < first}
    out = []
    for i, p in enumerate(params):
        scale = 0.2 + torch.rand(p.shape, generator=gen, dtype=torch.float64)
        out.append(None if i in absent else -scale * p.detach())
    return out


def build(name, noise, params, seed=11):
    cls, kwargs, override, *_ = member(name, noise)
    adaptive = member(name, noise)[-1]
    groups = [{"params": params[:GROUP_SPLIT]}, {"params": params[GROUP_SPLIT:], **override}]
    return cls(groups, **kwargs, **adaptive, seed=seed)


def normals(opt, k):
    flat = upgd_ref.noise(opt.layout, opt.seed, k)
    return [torch.from_numpy(flat[opt.layout.segment_slice(i)].copy()).view(s) for i, s in enumerate(SHAPES)]


def edit_groups(name, opt, ref):
    """A mid-run hyper-parameter edit, applied to the adapter and the reference alike."""
    if name == "UPGDW":
        opt.param_groups[1]["betas"] = (0.75, 0.97)  # beta_utility follows beta2
        ref.groups[1][1].update(beta1=0.75, beta2=0.97, beta_utility=0.97)
    else:
        opt.param_groups[0]["lr"] = 2e-2
        ref.groups[0][1].update(lr=2e-2)


MEMBERS = list(VARIANTS)
NOISES = ["fixed", "adaptive", "ema"]


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("name", MEMBERS)
def test_member_agrees_with_independent_per_tensor_implementation(name, noise):
    params = make_params()
    opt = build(name, noise, params)
    _, _, _, ref_hyper, _, _, _, adaptive = member(name, noise)
    n = len(SHAPES)
    ref = PerTensorFamily(params, [(set(range(GROUP_SPLIT)), dict(ref_hyper[0], **adaptive)),
                                   (set(range(GROUP_SPLIT, n)), dict(ref_hyper[1], **adaptive))], VARIANTS[name])
    for k in range(1, STEPS + 1):
        if k == 13:
            edit_groups(name, opt, ref)
        grads = grads_for(k, params)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        xi = normals(opt, k)
        opt.step()
        ref.step(grads, xi)
        for i, (p, q) in enumerate(zip(params, ref.params)):
            torch.testing.assert_close(p.detach(), q, rtol=INDEPENDENT_RTOL, atol=1e-15,
                                       msg=lambda m, i=i, k=k: f"{name}/{noise} parameter {i} step {k}: {m}")
        assert opt.core.step_count == k
    # the per-parameter state agrees too
    for i, p in enumerate(params):
        s = ref.state[i]
        torch.testing.assert_close(opt.state[p]["avg_utility"], s["u"], rtol=INDEPENDENT_RTOL, atol=1e-15)
        assert opt.state[p]["step"] == s["t"]
        if "first_moment" in opt.state[p]:
            torch.testing.assert_close(opt.state[p]["first_moment"], s["m"], rtol=INDEPENDENT_RTOL, atol=1e-15)
            torch.testing.assert_close(opt.state[p]["sec_moment"], s["v"], rtol=INDEPENDENT_RTOL, atol=1e-15)
        if adaptive["adaptive_noise"]:
            assert opt.state[p]["grad_norm_ema"] == pytest.approx(s["n"], rel=INDEPENDENT_RTOL)
    assert ref.state[1]["t"] == STEPS - 1 and ref.state[3]["t"] == STEPS - 3 and ref.state[4]["t"] == STEPS - 2


@pytest.mark.parametrize("noise", ["fixed", "adaptive"])
@pytest.mark.parametrize("name", MEMBERS)
def test_member_is_bit_identical_to_the_core_class(name, noise):
    params = make_params(seed=3)
    opt = build(name, noise, params, seed=5)
    _, _, _, _, core_cls, core_kwargs, core_groups, adaptive = member(name, noise)
    n = len(SHAPES)
    groups = [dict(core_groups[0], **adaptive, segments=list(range(GROUP_SPLIT))),
              dict(core_groups[1], **adaptive, segments=list(range(GROUP_SPLIT, n)))]
    core = core_cls(opt.layout, seed=opt.seed, param_groups=groups, **core_kwargs)
    assert type(opt.core) is core_cls and opt.core.variant == core.variant
    flat_p = opt.layout.pack([p.detach().numpy() for p in params])
    for k in range(1, 16):
        grads = grads_for(k, params)
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        present = [g is not None for g in grads]
        flat_g = opt.layout.pack([np.zeros(s) if g is None else g.numpy() for s, g in zip(SHAPES, grads)])
        opt.step()
        core.step(flat_p, flat_g, present)
        assert opt._partition.buckets[0].param_flat.tobytes() == flat_p.tobytes(), (name, k)
        for field in ("utility", "first_moment", "second_moment", "segment_step", "grad_norm_ema"):
            assert getattr(opt.core.state, field).tobytes() == getattr(core.state, field).tobytes(), (name, k, field)


# --- state keys, state dicts, pickling -----------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_state_keys_and_param_group_keys(adaptive):
    params = make_params()
    upgd = UPGD(params[:2], adaptive_noise=adaptive, seed=0)
    upgdw = UPGDW(make_params()[:2], adaptive_noise=adaptive, seed=0)
    assert list(upgd.param_groups[0])[:5] == ["params", "lr", "weight_decay", "beta_utility", "sigma"]
    assert upgd.defaults["lr"] == 1e-5 and upgd.defaults["weight_decay"] == 0.001
    assert upgd.defaults["beta_utility"] == 0.999 and upgd.defaults["sigma"] == 0.001
    assert list(upgdw.param_groups[0])[:7] == ["params", "lr", "betas", "eps", "weight_decay", "sigma", "amsgrad"]
    assert upgdw.defaults["betas"] == (0.9, 0.999) and upgdw.defaults["lr"] == 1e-4
    assert upgdw.defaults["weight_decay"] == 0.01 and upgdw.defaults["eps"] == 1e-8
    assert upgdw.defaults["amsgrad"] is False
    for opt, keys in ((upgd, ["step", "avg_utility"]), (upgdw, ["step", "avg_utility", "first_moment", "sec_moment"])):
        assert len(opt.state) == 0
        for p in opt._partition.buckets[0].params:
            p.grad = torch.full_like(p, 0.1)
        opt.step()
        expected = keys + (["grad_norm_ema"] if adaptive else [])
        for p in opt._partition.buckets[0].params:
            assert list(opt.state[p]) == expected
            assert opt.state[p]["step"] == 1
        sd = opt.state_dict()
        assert list(sd["state"][0]) == expected


def test_positional_order_of_the_production_signatures():
    a = UPGD(make_params()[:1], 1e-3, 0.002, 0.99, 0.01, seed=0)
    assert {k: a.defaults[k] for k in ("lr", "weight_decay", "beta_utility", "sigma")} == \
        dict(lr=1e-3, weight_decay=0.002, beta_utility=0.99, sigma=0.01)
    b = UPGDW(make_params()[:1], 1e-3, (0.8, 0.9), 1e-6, 0.02, 0.01, False, seed=0)
    assert {k: b.defaults[k] for k in ("lr", "betas", "eps", "weight_decay", "sigma", "amsgrad")} == \
        dict(lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.02, sigma=0.01, amsgrad=False)


@pytest.mark.parametrize("name", MEMBERS)
def test_state_dict_round_trip_in_lockstep(name):
    noise = "adaptive"
    params_a = make_params(seed=1)
    a = build(name, noise, params_a, seed=9)
    for k in range(1, 7):
        for p, g in zip(params_a, grads_for(k, params_a)):
            p.grad = g
        a.step()
    sd = copy.deepcopy(a.state_dict())
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    b = build(name, noise, params_b, seed=123)  # the state dict carries the seed
    b.load_state_dict(sd)
    assert b.seed == a.seed and b.core.step_count == a.core.step_count
    for k in range(7, 16):
        for params in (params_a, params_b):
            for p, g in zip(params, grads_for(k, params)):
                p.grad = g
        a.step()
        b.step()
        assert a._partition.buckets[0].param_flat.tobytes() == b._partition.buckets[0].param_flat.tobytes(), (name, k)
        for field in ("utility", "first_moment", "second_moment", "segment_step", "grad_norm_ema"):
            assert getattr(a.core.state, field).tobytes() == getattr(b.core.state, field).tobytes(), (name, k, field)
    c = pickle.loads(pickle.dumps(a))
    assert c.core.variant == a.core.variant and c.profile == a.profile
    assert c._partition.buckets[0].param_flat.tobytes() == a._partition.buckets[0].param_flat.tobytes()
    d = copy.deepcopy(a)
    assert d.core.state.utility.tobytes() == a.core.state.utility.tobytes() and type(d) is type(a)


def test_a_state_dict_of_another_profile_is_rejected_unchanged():
    params = make_params()
    paper = UPGD(params[:2], lr=1e-2, profile="paper", seed=1)
    for p in params[:2]:
        p.grad = -p.detach().clone()
    paper.step()
    production = UPGD(make_params()[:2], lr=1e-2, seed=2)
    before = production.state_dict()
    with pytest.raises(ValueError, match="variant"):
        production.load_state_dict(paper.state_dict())
    assert production.seed == 2 and production.core.step_count == 0 and before["state"] == {}


def test_profiles():
    assert AdaptiveUPGD(make_params()[:1], seed=0).defaults["eps"] == 1e-8
    paper = AdaptiveUPGD(make_params()[:1], profile="paper", seed=0)
    assert paper.defaults["eps"] == 1e-5 and paper.profile == "paper"
    assert paper.core.variant == upgd_ref.AdaptiveUPGD(paper.layout, profile="paper").variant
    assert AdaptiveUPGD(make_params()[:1], eps=1e-7, profile="paper", seed=0).defaults["eps"] == 1e-7
    assert UPGD(make_params()[:1], seed=0).core.variant.moments == "none"
    assert UPGD(make_params()[:1], profile="paper", seed=0).core.variant.protection == "max"
    for cls in (AdaptiveUPGD, UPGD):
        with pytest.raises(ValueError, match="profile"):
            cls(make_params()[:1], profile="Paper")
    with pytest.raises(TypeError):
        UPGDW(make_params()[:1], profile="paper")


# --- UPGDW: betas and amsgrad ------------------------------------------------------------


def test_upgdw_rejects_amsgrad_everywhere_and_changes_nothing():
    params = make_params()
    with pytest.raises(ValueError, match="amsgrad"):
        UPGDW(params, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        UPGDW([{"params": params[:2]}, {"params": params[2:], "amsgrad": True}])
    opt = UPGDW(params[:2], lr=1e-2, seed=0)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.add_param_group({"params": params[2:], "amsgrad": True})
    assert len(opt.param_groups) == 1 and opt.layout.num_segments == 2
    for p in params[:2]:
        p.grad = torch.full_like(p, 0.1)
    opt.step()
    before = [p.detach().clone() for p in params[:2]]
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params[:2], before)) and opt.core.step_count == 1
    opt.param_groups[0]["amsgrad"] = False
    opt.step()
    assert opt.core.step_count == 2


def test_upgdw_betas_validation_and_utility_tie():
    params = make_params()[:1]
    with pytest.raises(ValueError, match="index 1"):
        UPGDW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="index 0"):
        UPGDW(params, betas=(-0.1, 0.9))
    with pytest.raises(ValueError, match="pair"):
        UPGDW(params, betas=(0.9,))
    with pytest.raises(ValueError, match="epsilon"):
        UPGDW(params, eps=-1.0)
    opt = UPGDW(params, betas=(0.5, 0.6), seed=0)
    hyper = opt.core.step_hyperparams()[0]
    assert (hyper["beta1"], hyper["beta2"], hyper["beta_utility"]) == (0.5, 0.6, 0.6)
    opt.param_groups[0]["betas"] = (0.5, 1.5)
    params[0].grad = torch.ones_like(params[0])
    with pytest.raises(ValueError, match="beta2"):
        opt.step()
    assert opt.core.step_count == 0
