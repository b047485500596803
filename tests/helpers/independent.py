"""An independent float64 implementation of AdaptiveUPGD + VGS, written from the spec.

It shares no code with ``upgd_ref`` (only the standard normals are taken as input), so
agreement with it checks the library against the text of ``specs/algorithm.md``.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class PlainVGS:
    def __init__(self, n, enabled=True, beta=0.99, alpha=0.1, eps=1e-8, warmup_steps=100,
                 min_scaling_factor=0.1, variance_cap=50.0):
        self.enabled, self.beta, self.alpha, self.eps = enabled, beta, alpha, eps
        self.warmup_steps, self.min_scaling_factor, self.variance_cap = warmup_steps, min_scaling_factor, variance_cap
        self.k = 0
        self.a = [0.0] * n
        self.b = [0.0] * n

    def factor(self):
        if not self.enabled or self.k < self.warmup_steps or self.k == 0:
            return 1.0
        c = 1.0 - self.beta**self.k
        nv = []
        for a, b in zip(self.a, self.b):
            mu, s = a / c, b / c
            value = max(s - mu * mu, 0.0) / (max(mu * mu, 1e-12) + self.eps)
            nv.append(value if math.isfinite(value) else 0.0)
        g = float(np.quantile(np.array(nv), 0.9))
        g = min(max(g, 0.0), 1e6)
        if self.variance_cap is not None:
            g = min(g, self.variance_cap)
        return min(max(1.0 / (1.0 + self.alpha * g), self.min_scaling_factor), 1.0)

    def update(self, grads):
        self.k += 1
        for i, g in enumerate(grads):
            if g is not None and g.size:
                self.a[i] = self.beta * self.a[i] + (1 - self.beta) * float(np.mean(g))
                self.b[i] = self.beta * self.b[i] + (1 - self.beta) * float(np.mean(g * g))


class PlainAdaptiveUPGD:
    """Per-segment hyper-parameters ``hp[i]`` (dicts with the spec's names)."""

    def __init__(self, params, hp, noise_norm="segment"):
        self.hp, self.noise_norm = hp, noise_norm
        self.t = [0] * len(params)
        self.u = [np.zeros_like(p) for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.n = [h["noise_ema_init"] for h in hp]

    def step(self, params, grads, normals):
        live = [i for i, g in enumerate(grads) if g is not None]
        for i in live:
            h, g, p = self.hp[i], grads[i], params[i]
            self.t[i] += 1
            self.u[i] = h["beta_utility"] * self.u[i] + (1 - h["beta_utility"]) * (-g * p)
            self.m[i] = h["beta1"] * self.m[i] + (1 - h["beta1"]) * g
            self.v[i] = h["beta2"] * self.v[i] + (1 - h["beta2"]) * g**2
        nonempty = [i for i in live if self.u[i].size]
        lo = min(float(self.u[i].min()) for i in nonempty) if nonempty else float("nan")
        hi = max(float(self.u[i].max()) for i in nonempty) if nonempty else float("nan")
        global_norm = math.sqrt(sum(float(np.sum(grads[i] ** 2)) for i in live))
        out = list(params)
        for i in live:
            h, t = self.hp[i], self.t[i]
            cu = 1 - h["beta_utility"] ** t
            m_hat = self.m[i] / (1 - h["beta1"] ** t)
            v_hat = self.v[i] / (1 - h["beta2"] ** t)
            if h["adaptive_noise"]:
                r = float(np.sqrt(np.sum(grads[i] ** 2))) if self.noise_norm == "segment" else global_norm
                self.n[i] = h["noise_beta"] * self.n[i] + (1 - h["noise_beta"]) * r
                norm = r if h["instant_noise_scale"] else self.n[i] / (1 - h["noise_beta"] ** t)
                std = max(h["sigma"] * norm, h["min_noise_std"])
            else:
                std = h["sigma"]
            noise = std * normals[i]
            x = np.clip((self.u[i] / cu - lo) / (hi - lo + 1e-8), 0, 1)
            su = sigmoid(2 * (x - 0.5))
            out[i] = params[i] * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * (
                m_hat / (np.sqrt(v_hat) + h["eps"]) + noise
            ) * (1 - su)
        return out


# --- the UPGD family (specs/algorithm.md §7), written from the text --------------------------

# §3.1 defaults, and the members' own (§7.2), as the spec's tables state them.
SPEC_DEFAULTS = dict(lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001, beta1=0.9, beta2=0.999,
                     eps=1e-8, adaptive_noise=False, noise_beta=0.999, min_noise_std=1e-6,
                     instant_noise_scale=True, noise_ema_init=1.0)
# (class, profile) -> (options of §7.1, defaults that differ from §3.1)
SPEC_MEMBERS = {
    ("AdaptiveUPGD", "production"): (dict(moments="adam", protection="min_max", update_factor=1,
                                          noise_placement="sum"), {}),
    ("UPGD", "production"): (dict(moments="none", protection="min_max", update_factor=1, noise_placement="sum"),
                             dict(lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001)),
    ("UPGDW", "production"): (dict(moments="adam", protection="min_max", update_factor=1, noise_placement="sum"),
                              dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, sigma=0.001)),
    ("AdaptiveUPGD", "paper"): (dict(moments="adam", protection="max", update_factor=2, noise_placement="terms"),
                                dict(eps=1e-5)),
    ("UPGD", "paper"): (dict(moments="none", protection="max", update_factor=2, noise_placement="sum"),
                        dict(lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001)),
}


class PlainFamilyUPGD:
    """Any member of §7: ``options`` has ``moments``, ``protection``, ``update_factor``,
    ``noise_placement``; per-segment hyper-parameters ``hp[i]`` with the spec's names (for
    UPGDW the caller sets ``beta_utility = beta2``). Plain float64 NumPy, element by formula."""

    def __init__(self, params, hp, options, noise_norm="segment"):
        self.hp, self.options, self.noise_norm = hp, dict(options), noise_norm
        self.t = [0] * len(params)
        self.u = [np.zeros_like(p) for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.n = [h["noise_ema_init"] for h in hp]
        self.last_range = (float("nan"), float("nan"))
        self.last_std = [float("nan")] * len(params)

    def step(self, params, grads, normals):
        adam = self.options["moments"] == "adam"
        live = [i for i, g in enumerate(grads) if g is not None]
        # pass 1 (§3.2; §7.1: without moments m and v are not updated)
        for i in live:
            h, g, p = self.hp[i], grads[i], params[i]
            self.t[i] += 1
            self.u[i] = h["beta_utility"] * self.u[i] + (1 - h["beta_utility"]) * (-g * p)
            if adam:
                self.m[i] = h["beta1"] * self.m[i] + (1 - h["beta1"]) * g
                self.v[i] = h["beta2"] * self.v[i] + (1 - h["beta2"]) * g**2
        nonempty = [i for i in live if self.u[i].size]
        lo = min(float(self.u[i].min()) for i in nonempty) if nonempty else float("nan")
        hi = max(float(self.u[i].max()) for i in nonempty) if nonempty else float("nan")
        self.last_range = (lo, hi)
        global_norm = math.sqrt(sum(float(np.sum(grads[i] ** 2)) for i in live))
        out = list(params)
        self.last_std = [float("nan")] * len(params)
        for i in live:
            h, t, g = self.hp[i], self.t[i], grads[i]
            # noise std (§3.3)
            if h["adaptive_noise"]:
                r = float(np.sqrt(np.sum(g**2))) if self.noise_norm == "segment" else global_norm
                self.n[i] = h["noise_beta"] * self.n[i] + (1 - h["noise_beta"]) * r
                norm = r if h["instant_noise_scale"] else self.n[i] / (1 - h["noise_beta"] ** t)
                std = max(h["sigma"] * norm, h["min_noise_std"])
            else:
                std = h["sigma"]
            self.last_std[i] = std
            noise = std * normals[i]
            # protection (§7.1)
            cu = 1 - h["beta_utility"] ** t
            if self.options["protection"] == "min_max":
                x = np.clip((self.u[i] / cu - lo) / (hi - lo + 1e-8), 0, 1)
                su = sigmoid(2 * (x - 0.5))
            else:
                su = sigmoid((self.u[i] / cu) / hi)
            # bracket and update (§7.1)
            if adam:
                m_hat = self.m[i] / (1 - h["beta1"] ** t)
                v_hat = self.v[i] / (1 - h["beta2"] ** t)
            # evaluated left to right as SEMANTICS writes it: step * (d + noise) * (1 - su)
            step = self.options["update_factor"] * h["lr"]
            decayed = params[i] * (1 - h["lr"] * h["weight_decay"])
            if self.options["noise_placement"] == "sum":
                d = m_hat / (np.sqrt(v_hat) + h["eps"]) if adam else g
                out[i] = decayed - step * (d + noise) * (1 - su)
            elif adam:
                out[i] = decayed - step * (m_hat * (1 - su) / (np.sqrt(v_hat) + h["eps"]) + noise * (1 - su))
            else:
                out[i] = decayed - step * (g * (1 - su) + noise * (1 - su))
        return out


# --- random scenarios shared by the independent comparisons ------------------------------

NOISE_MODES = [
    dict(adaptive_noise=False),
    dict(adaptive_noise=True, instant_noise_scale=True),
    dict(adaptive_noise=True, instant_noise_scale=False, noise_ema_init=1.0),
    dict(adaptive_noise=True, instant_noise_scale=False, noise_ema_init=0.0),
    dict(adaptive_noise=True, instant_noise_scale=True, min_noise_std=0.05),  # floor hit
]

#: One random scenario of the independent comparisons: data seed, noise mode, VGS on or off, norm.
SCENARIOS = dict(
    seed=st.integers(0, 2**32 - 1),
    mode_index=st.integers(0, len(NOISE_MODES) - 1),
    vgs_on=st.booleans(),
    noise_norm=st.sampled_from(["segment", "global"]),
)


def random_hyper(rng, mode):
    return dict(
        lr=float(10 ** rng.uniform(-3, -1)), weight_decay=float(rng.choice([0.0, 1e-3, 0.05])),
        beta_utility=float(rng.choice([0.0, 0.9, 0.999])), sigma=float(rng.choice([0.0, 1e-3, 0.1])),
        beta1=float(rng.choice([0.0, 0.9])), beta2=float(rng.choice([0.9, 0.999])),
        eps=float(rng.choice([1e-8, 1e-3])), noise_beta=float(rng.choice([0.9, 0.999])), **mode,
    )
