"""The PyTorch baselines of ``upgd-ref bench``: fused Adam, ``torch.randn`` of the same count,
and the production AdaptiveUPGD + VGS step as users run it today, a per-tensor PyTorch loop
(one loop per pass, ``.item()`` host reads, ``torch.randn_like`` noise).

This file is not part of the installed package: it is the yardstick, not the library.
``upgd-ref bench`` loads it from a checkout by default, or from ``--baseline FILE``
(``upgd_ref.bench.load_baseline``). A baseline file defines ``NAME``, ``setup(threads)``
(imports its framework, raising ``ImportError`` when it is missing, and returns the versions
to report) and ``cases(...)`` (the timed rows). ``tests/test_numba_bench.py`` checks
:func:`torch_production_step` against the reference under the tolerance contract.
"""

from __future__ import annotations

import math

import numpy as np

from upgd_ref.bench import Case
from upgd_ref.hyperparams import UPGD_DEFAULTS, VGS_DEFAULTS
from upgd_ref.traffic import fused_adam_bytes

NAME = "PyTorch (fused Adam, torch.randn, the production per-tensor loop)"


def setup(threads: int) -> dict:
    """Import torch (before Numba starts its threads: a torch imported after Numba's OpenMP
    layer binds to the system libgomp and runs several times slower, specs/kernels.md §6)."""
    import torch

    torch.set_num_threads(threads)
    return {"torch": torch.__version__}


def torch_production_step(torch, params, states: dict, vgs: dict, hyper: dict) -> None:
    """The production AdaptiveUPGD + VGS step on a list of tensors with ``.grad`` (one loop
    per pass over the tensors, ``.item()`` host reads, ``torch.randn_like`` noise).

    ``states``: per-tensor dicts (created on first use); ``vgs``: ``{"k", "a", "b"}`` with
    per-tensor lists and the VGS hyper-parameters. A tensor whose ``.grad`` is None sits the
    step out. Semantics: ``specs/algorithm.md``.
    """
    h = hyper
    present = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    with torch.no_grad():
        factor = torch_vgs_factor(torch, vgs)
        if factor != 1.0:
            for _, p in present:
                p.grad.mul_(factor)
        u_max, u_min = -math.inf, math.inf
        for _, p in present:
            state = states.setdefault(p, {
                "step": 0, "avg_utility": torch.zeros_like(p), "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p), "grad_norm_ema": h["noise_ema_init"],
            })
            state["step"] += 1
            g = p.grad
            state["avg_utility"].mul_(h["beta_utility"]).add_(-g * p, alpha=1 - h["beta_utility"])
            state["exp_avg"].mul_(h["beta1"]).add_(g, alpha=1 - h["beta1"])
            state["exp_avg_sq"].mul_(h["beta2"]).addcmul_(g, g, value=1 - h["beta2"])
            u_max = max(u_max, state["avg_utility"].max().item())
            u_min = min(u_min, state["avg_utility"].min().item())
        for _, p in present:
            state, t = states[p], states[p]["step"]
            exp_avg_hat = state["exp_avg"] / (1 - h["beta1"] ** t)
            exp_avg_sq_hat = state["exp_avg_sq"] / (1 - h["beta2"] ** t)
            norm = p.grad.norm().item()
            state["grad_norm_ema"] = h["noise_beta"] * state["grad_norm_ema"] + (1 - h["noise_beta"]) * norm
            if not h["instant_noise_scale"]:
                norm = state["grad_norm_ema"] / (1 - h["noise_beta"] ** t)
            noise = torch.randn_like(p.grad) * max(h["sigma"] * norm, h["min_noise_std"])
            x = ((state["avg_utility"] / (1 - h["beta_utility"] ** t) - u_min) / (u_max - u_min + 1e-8)).clamp_(0, 1)
            protection = torch.sigmoid(2 * (x - 0.5))
            update = (exp_avg_hat / (exp_avg_sq_hat.sqrt() + h["eps"]) + noise) * (1 - protection)
            p.mul_(1 - h["lr"] * h["weight_decay"]).add_(update, alpha=-h["lr"])
        vgs["k"] += 1
        for i, p in present:
            vgs["a"][i] = vgs["beta"] * vgs["a"][i] + (1 - vgs["beta"]) * p.grad.mean().item()
            vgs["b"][i] = vgs["beta"] * vgs["b"][i] + (1 - vgs["beta"]) * (p.grad * p.grad).mean().item()


def torch_vgs_factor(torch, vgs: dict) -> float:
    """``f`` of the production scaler from its per-tensor statistics."""
    if not vgs["enabled"] or vgs["k"] < vgs["warmup_steps"] or vgs["k"] == 0:
        return 1.0
    c = 1 - vgs["beta"] ** vgs["k"]
    mu = torch.tensor(vgs["a"], dtype=torch.float64) / c
    s = torch.tensor(vgs["b"], dtype=torch.float64) / c
    nv = torch.clamp(s - mu * mu, min=0) / (torch.clamp(mu * mu, min=1e-12) + vgs["eps"])
    nv = torch.where(torch.isfinite(nv), nv, torch.zeros_like(nv))
    g = torch.quantile(nv, 0.9).clamp(0, 1e6).item()
    if vgs["variance_cap"] is not None:
        g = min(g, vgs["variance_cap"])
    return min(max(1 / (1 + vgs["alpha"] * g), vgs["min_scaling_factor"]), 1.0)


def torch_vgs_state(num_tensors: int, **overrides) -> dict:
    """Fresh production VGS statistics (hyper-parameters: the scaler's defaults + overrides)."""
    return {**VGS_DEFAULTS, **overrides, "k": 0, "a": [0.0] * num_tensors, "b": [0.0] * num_tensors}


def cases(layout, rng: np.random.Generator, step_hyper: dict, vgs_hyper: dict) -> list[Case]:
    """The timed rows on ``layout``'s shapes (called after :func:`setup`)."""
    import torch

    dtype = getattr(torch, layout.dtype.name)
    n = layout.num_logical

    def tensors():
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s)).to(dtype)) for s in layout.shapes]
        grads0 = [torch.from_numpy(0.1 * rng.standard_normal(s)).to(dtype) for s in layout.shapes]
        for p, g in zip(params, grads0):
            p.grad = g.clone()
        return params, grads0

    adam_params, _ = tensors()
    adam = torch.optim.Adam(adam_params, lr=step_hyper["lr"], fused=True)
    prod_params, prod_grads0 = tensors()
    states, vgs = {}, torch_vgs_state(len(prod_params), **vgs_hyper)
    hyper = {**UPGD_DEFAULTS, **step_hyper}

    def restore():
        for p, g in zip(prod_params, prod_grads0):
            p.grad.copy_(g)

    normals = torch.empty(n, dtype=dtype)
    return [
        Case("torch fused Adam", adam.step, bytes_per_param=fused_adam_bytes(layout.dtype)),
        Case("torch.randn (same count)", lambda: torch.randn(n, dtype=dtype, out=normals),
             bytes_per_param=layout.dtype.itemsize),
        Case("torch per-tensor loop (production: VGS + adaptive noise)",
             lambda: torch_production_step(torch, prod_params, states, vgs, hyper), restore),
    ]
