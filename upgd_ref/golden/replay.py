"""Running a golden case through the stateful API on a backend, recording its trace."""

from __future__ import annotations


import numpy as np

from ..arrays import as_kind, to_numpy
from ..backends import BACKENDS
from ..config import build
from ..precision import is_low_precision
from ..trace import TraceWriter
from .cases import STATE_FIELDS, GoldenCase


def replay_paths(case: GoldenCase) -> tuple[bool, ...]:
    """The ``fused`` values a case is verified with: both with a scaler, except for 16-bit
    cases, whose separate ``scaler.scale`` call rounds ``f g`` to the parameter dtype before
    the step sees it (``specs/precision.md`` §2), an input the case's truth does not have:
    16-bit cases are verified through the fused step only (``specs/golden.md`` §1)."""
    return (True, False) if case.vgs is not None and not is_low_precision(case.dtype) else (True,)


def replay(case: GoldenCase, backend: str = "auto", *, fused: bool = True) -> dict:
    """Run ``case`` through its optimizer class (+ scaler) on ``backend``; return its trace arrays.

    The class and profile are the case config's (``AdaptiveUPGD``, ``UPGD``, ``UPGDW``).

    ``fused``: with a scaler, one ``opt.step(..., vgs=scaler)`` call per step; otherwise the
    three calls ``scaler.scale``, ``opt.step``, ``scaler.update``.
    """
    layout = case.layout
    built = build(case.config, layout, backend=backend)
    opt, scaler = built.optimizer, built.scaler
    kind = "numpy" if backend == "auto" else BACKENDS[backend].array_kind  # CuPy backends: buffers on the GPU
    params = as_kind(layout.pack(case.segments(case.arrays["params0"])), kind)
    writer = TraceWriter(case=case.name)
    writer.set_initial(layout.unpack(to_numpy(params)))
    for k in range(1, case.steps + 1):
        host_grads = layout.pack(case.segments(case.arrays["grads"][k - 1]))
        grads = as_kind(host_grads, kind)
        present = [bool(b) for b in case.arrays["present"][k - 1]]
        fields = dict(grads=[g.copy() for g in layout.unpack(host_grads)], present=np.asarray(present),
                      normals=layout.unpack(to_numpy(opt.noise())))
        if scaler is None or fused:
            info = opt.step(params, grads, present, vgs=scaler)
            factor, variance = info.vgs_factor, info.vgs_normalized_variance
        else:
            variance = scaler.normalized_variance()  # the G behind this step's f
            factor = scaler.scale(grads, present)
            info = opt.step(params, grads, present)
            scaler.update(grads, present)
        fields.update(
            params=layout.unpack(to_numpy(params)), segment_step=opt.state.segment_step,
            grad_norm_ema=opt.state.grad_norm_ema, grad_norm=info.grad_norm, noise_std=info.noise_std,
            utility_min=info.utility_min, utility_max=info.utility_max,
            **{name: layout.unpack(to_numpy(getattr(opt.state, name))) for name in STATE_FIELDS[1:]},
        )
        if scaler is not None:
            fields.update(vgs_factor=factor, vgs_normalized_variance=variance,
                          vgs_grad_mean_avg=scaler.state.grad_mean_avg, vgs_grad_sq_avg=scaler.state.grad_sq_avg)
        writer.add_step(**fields)
    return writer.arrays()
