r"""The scaler over parameters of several dtypes: one door call per dtype.

The scaler's quantities are per parameter (``a_i``, ``b_i`` from parameter ``i``'s gradient
alone) or computed once from them (the factor ``f``), so the parameters of each dtype form
one :class:`~upgd_ref.layout.FlatLayout` (a *part*) and the door runs on each part in turn
with that part's rows of the statistics. The gradients are copied into private buffers and
the results published only when every part succeeded, so a refusal in any part leaves the
gradients and the statistics as they were (``specs/adapters-torch.md`` §3.1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from upgd_ref.layout import FlatLayout
from upgd_ref.state import FlatVGSState
from upgd_ref.step import vgs_scale_step, vgs_update_step

from .buffers import check_grad, flat_buffer
from .conversions import DTYPE_NAMES, named_errors
from .gather import as_real, segment_shape
from .spatial import finite_values


class Part(NamedTuple):
    layout: FlatLayout
    indices: list  # the part's parameters' indices among the scaler's


def dtype_parts(params, dtypes) -> list[Part] | None:
    """One part per dtype (in order of first appearance); None for a single dtype."""
    keys = list(dict.fromkeys(dtypes))
    if len(keys) == 1:
        return None
    parts = []
    for key in keys:
        indices = [i for i, d in enumerate(dtypes) if d == key]
        parts.append(Part(FlatLayout([segment_shape(params[i]) for i in indices], DTYPE_NAMES[key]), indices))
    return parts


def _copies(parts, params, names, finite: bool):
    """Per part ``(buffer, views, present)``: the present gradients copied into a new flat
    buffer (``finite``: non-finite values as 0)."""
    out = []
    with torch.no_grad():
        for part in parts:
            buffer, views = flat_buffer(part.layout, params[0].device)
            present = []
            for i, view in zip(part.indices, views):
                g = params[i].grad
                present.append(g is not None)
                if g is not None:
                    check_grad(f"VarianceGradientScaler: {names[i]}", g, params[i])
                    view.copy_(finite_values(as_real(g)) if finite else as_real(g))
            out.append((buffer, views, present))
    return out


def scale(parts, params, names, factor: float, *, backend, nonfinite: str, what: str) -> bool:
    """``g <- f g`` for every present gradient, part by part; False (nothing changed) when a
    part refuses under ``nonfinite="skip"``; a refusal under ``"raise"`` raises (nothing changed)."""
    copies = _copies(parts, params, names, finite=False)
    for part, (buffer, _, present) in zip(parts, copies):
        with named_errors(what, [names[i] for i in part.indices]):
            if not vgs_scale_step(part.layout, buffer, factor, present, backend=backend, nonfinite=nonfinite):
                return False
    if factor != 1.0:
        with torch.no_grad():
            for part, (_, views, present) in zip(parts, copies):
                for i, view, here in zip(part.indices, views, present):
                    if here:
                        as_real(params[i].grad).copy_(view)
    return True


def update(parts, params, names, stats: FlatVGSState, beta: float, *, backend, policy: str, what: str):
    """The next statistics (``k + 1``, ``a_i``, ``b_i`` of the present parameters), part by part
    on copies of the rows of ``stats`` (not modified): ``[(indices, part record)]``, or None
    when a part refuses under ``policy="skip"``. ``policy``: ``"zero"`` (non-finite values
    count as 0), ``"raise"`` (a refusal raises) or ``"skip"``."""
    copies = _copies(parts, params, names, finite=policy == "zero")
    rows = []
    for part, (buffer, _, present) in zip(parts, copies):
        index = part.indices
        record = FlatVGSState(stats.step, stats.grad_mean_avg[index], stats.grad_sq_avg[index])  # copies
        with named_errors(what, [names[i] for i in index]):
            if not vgs_update_step(part.layout, buffer, record, beta, present, backend=backend,
                                   nonfinite="skip" if policy == "skip" else "raise"):
                return None
        rows.append((index, record))
    return rows
