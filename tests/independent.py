"""An independent float64 implementation of AdaptiveUPGD + VGS, written from the spec.

It shares no code with ``upgd_ref`` (only the standard normals are taken as input), so
agreement with it checks the library against the text of ``specs/algorithm.md``.
"""

from __future__ import annotations

import math

import numpy as np


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
