"""Helpers of the torch adapter's tests: seeded parameters and gradients, a metrics recorder."""

from __future__ import annotations

import torch


class Recorder:
    """A logger with production's ``record(key, value)``."""

    def __init__(self):
        self.records = []

    def record(self, key, value):
        self.records.append((key, value))


def make_params(shapes, dtype=torch.float32, seed=0):
    """Seeded ``Parameter``\\ s of these shapes."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def seeded_grads(params, seed, absent=(), spread=0.0, offset=0.0):
    """Gradients like the parameters (``None`` for indices in ``absent``); parameter ``i``'s are
    ``randn * (1 + spread * i) + offset * (i - 2)``, so parameters differ in scale and mean."""
    gen = torch.Generator().manual_seed(seed)
    return [None if i in absent else torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1 + spread * i)
            + offset * (i - 2) for i, p in enumerate(params)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def run_scaler(vgs, params, grads_for, steps):
    """``steps`` production training steps of the scaler alone (scale, then statistics)."""
    for k in range(steps):
        set_grads(params, grads_for(k, params))
        vgs.scale_gradients()
        vgs.step()
    return vgs
