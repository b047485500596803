"""The torch sharded tests' shared pieces: the model's parameters, optimizer and scaler, the
gradients of step ``k``, and results as comparable bits."""

from __future__ import annotations

import torch

SHAPES = [(3000,), (50,), (70, 90), (5,)]  # 8 chunks; 2 and 4 ranks cut tensors 0 and 2
FROZEN = 1  # parameter 1 has no gradient on the steps k with k % 3 == 2
CONFIGS = [(dtype, member, vgs) for dtype in ("float32", "float64") for member in ("AdaptiveUPGD", "UPGD", "UPGDW")
           for vgs in (False, True)]


def make_params(dtype):
    """The model's parameters (:data:`SHAPES`), the same on every rank."""
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=getattr(torch, dtype))) for s in SHAPES]


def make_optimizer(member, params, **options):
    """``member``'s torch optimizer over ``params`` with the tests' hyper-parameters."""
    from upgd_ref.adapters import torch as upgd_torch

    return getattr(upgd_torch, member)(params, lr=1e-2, sigma=1e-2, adaptive_noise=True, seed=2024,
                                       backend="numba", **options)


def make_scaler(params):
    """The tests' ``VarianceGradientScaler`` over ``params``, on the optimizer's backend: the
    fused step's sums are the optimizer backend's, so the separate calls match them bit for
    bit on the same backend (``specs/distributed.md`` §3)."""
    from upgd_ref.adapters import torch as upgd_torch

    return upgd_torch.VarianceGradientScaler(params, warmup_steps=2, beta=0.9, backend="numba")


def build(config, group, **options):
    """``(params, optimizer, scaler or None)`` of ``config = (dtype, member, vgs)``, the same
    on every rank (``group``: the optimizer's process group, None for one process)."""
    dtype, member, use_vgs = config
    params = make_params(dtype)
    extra = {"process_group": group} if group is not None else {}
    optimizer = make_optimizer(member, params, **extra, **options)
    vgs = make_scaler(params) if use_vgs else None
    return params, optimizer, vgs


def step_grads(params, k):
    """Step ``k``'s gradients (None for the frozen parameter on some steps): dyadic values of
    at most 11 significant bits, so sums of a few of them are exact in float32."""
    gen = torch.Generator().manual_seed(k)
    return [None if (i == FROZEN and k % 3 == 2) else
            (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 256).round().div(256).to(p.dtype)
            for i, p in enumerate(params)]


def run_steps(params, optimizer, vgs, first, last):
    """Steps ``first..last`` with the same (averaged) gradients on every rank; the scaler's
    separate calls around each step."""
    for k in range(first, last + 1):
        for p, g in zip(params, step_grads(params, k)):
            p.grad = g
        if vgs is not None:
            vgs.scale_gradients()
        optimizer.step()
        if vgs is not None:
            vgs.step()


def vgs_bits(vgs):
    """The scaler's ``k``, ``a_i``, ``b_i`` as comparable bits (None without a scaler)."""
    return None if vgs is None else (vgs.stats.step, vgs.stats.grad_mean_avg.tobytes(), vgs.stats.grad_sq_avg.tobytes())


def flat(tensors):
    """The tensors' values in logical order, as one NumPy copy."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy().copy()


def bits(state_dict):
    """A state dict's tensors as bytes, everything else as is (comparable with ==)."""
    def convert(value):
        if isinstance(value, torch.Tensor):
            return (str(value.dtype), tuple(value.shape), value.numpy().tobytes())
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value
    return convert(state_dict)


def single_process(config, resume, first, last):
    """One process's optimizer and scaler (the scaler's separate calls), steps ``first..last``,
    after loading ``resume`` (``(params, optimizer state dict, scaler state dict)``, a
    consolidated checkpoint) when given; returns ``(params, optimizer, vgs)``."""
    params, optimizer, vgs = build(config, None)
    if resume is not None:
        with torch.no_grad():
            for p, values in zip(params, resume[0]):
                p.copy_(values)
        optimizer.load_state_dict(resume[1])
        if vgs is not None:
            vgs.load_state_dict(resume[2])
    run_steps(params, optimizer, vgs, first, last)
    return params, optimizer, vgs
