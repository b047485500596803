r"""The production scaler's deprecated statistics, for logging only (not part of ``algorithm.md``).

The production ``VarianceGradientScaler`` (``vgs_version`` 3.2) still computes, logs and
stores "spatial" statistics of the gradients that no longer take part in its factor; code
written against it reads them, so the drop-in keeps them (``specs/adapters-torch.md`` §3.6).
Over the parameters that have a gradient, all elements concatenated:

.. math::

    \mathrm{norm} = \lVert g \rVert_2,\quad \mathrm{mean} = \overline{|g|},\quad
    \mathrm{var} = \frac{1}{n-1}\sum (|g| - \overline{|g|})^2,\quad \mathrm{max} = \max |g|

and each has an average ``x <- beta x + (1 - beta) value`` that starts at its first value
(no bias); production logs it divided by ``1 - beta**k`` all the same (a flaw it keeps,
and so does the drop-in). Non-finite gradient values count as 0 here, as in every
statistic of the drop-in (production's NaN handling). Each gradient is reduced by torch in
its own dtype (as production does), the per-gradient sums are combined in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

#: ``compute_gradient_statistics()`` when nothing is tracked or no gradient exists.
NO_GRADIENT_STATISTICS = {"grad_norm": 0.0, "grad_mean": 0.0, "grad_var": 0.0, "grad_max": 0.0, "num_params": 0}


def finite_values(g: torch.Tensor) -> torch.Tensor:
    """``g`` with NaN and infinite values as 0 (the drop-in's statistics, as production's)."""
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def _sums(g: torch.Tensor) -> tuple[float, float, float]:
    """``(sum |g|, sum g**2, max |g|)`` of one gradient: torch's norms in the gradient's dtype
    (as production computes them), no copy of the gradient (these run on every scaler step)."""
    g = g.detach()
    low, high = g.aminmax()  # max |g| = max(-min g, max g): one pass, faster than the inf-norm
    return (float(torch.linalg.vector_norm(g, 1)), float(torch.linalg.vector_norm(g, 2)) ** 2,
            max(-float(low), float(high)))


def gradient_statistics(grads) -> dict:
    """``compute_gradient_statistics()`` of the present gradients ``grads``: per-gradient sums
    (:func:`_sums`) combined in float64.

    ``grad_var`` is the unbiased variance of ``|g|``, ``(sum g**2 - n mean**2) / (n - 1)``
    (clipped at 0; with fewer than two elements it is 0 where ``torch.var`` gives NaN, which
    the averages would keep forever). A gradient holding NaN or infinities is summed with
    those values as 0.
    """
    if not grads:
        return dict(NO_GRADIENT_STATISTICS)
    total = absolute = square = 0.0
    largest = 0.0
    for g in grads:
        if g.numel() == 0:
            continue
        sums = _sums(g)
        if not all(math.isfinite(x) for x in sums):
            sums = _sums(finite_values(g))
        total += g.numel()
        absolute, square, largest = absolute + sums[0], square + sums[1], max(largest, sums[2])
    if total == 0:
        return dict(NO_GRADIENT_STATISTICS, num_params=len(grads))
    mean = absolute / total
    variance = max(square - total * mean * mean, 0.0) / (total - 1) if total > 1 else 0.0
    return {"grad_norm": math.sqrt(square), "grad_mean": mean, "grad_var": variance, "grad_max": largest,
            "num_params": len(grads)}


@dataclass
class SpatialAverages:
    """The four averages (None: not initialised), under their state-dict keys."""

    grad_mean_ema: float | None = None
    grad_var_ema: float | None = None
    grad_norm_ema: float | None = None
    grad_max_ema: float | None = None

    KEYS = ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema")
    #: The statistic of :func:`gradient_statistics` each average follows.
    SOURCES = {"grad_mean_ema": "grad_mean", "grad_var_ema": "grad_var", "grad_norm_ema": "grad_norm",
               "grad_max_ema": "grad_max"}
    #: The name each is logged under (production's), in its order.
    METRICS = {"grad_norm_ema": "vgs/grad_norm_ema", "grad_mean_ema": "vgs/grad_mean_ema_spatial",
               "grad_var_ema": "vgs/grad_var_ema_spatial", "grad_max_ema": "vgs/grad_max_ema"}

    def advanced(self, statistics: dict, beta: float) -> SpatialAverages:
        """The averages after one update: the first value as it is, then ``beta x + (1 - beta) v``."""
        out = {}
        for key, source in self.SOURCES.items():
            old, value = getattr(self, key), statistics[source]
            out[key] = value if old is None else beta * old + (1.0 - beta) * value
        return SpatialAverages(**out)

    def initialised(self) -> bool:
        return all(getattr(self, key) is not None for key in self.KEYS)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state_dict) -> SpatialAverages:
        """The averages stored in a production VGS state dict (missing or None: not initialised)."""
        values = {}
        for key in cls.KEYS:
            value = state_dict.get(key)
            if value is not None:
                if isinstance(value, torch.Tensor):
                    value = value.item() if value.numel() == 1 else value
                if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                    raise TypeError(f"VGS state dict: {key!r} must be a float or None, got {type(value).__name__}")
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError(f"VGS state dict: {key!r} must be finite, got {value}")
            values[key] = value
        return cls(**values)

    def metrics(self, correction: float) -> dict:
        """The logged values: each average divided by ``correction`` (``1 - beta**k``; production)."""
        if not self.initialised():
            return {}
        scale = correction if correction > 0.0 else 1.0
        return {name: getattr(self, key) / scale for key, name in self.METRICS.items()}


def stochastic_variance_metrics(normalized_variances: np.ndarray) -> dict:
    """``vgs/stochastic_var_p10/p50/p90/mean`` of the per-parameter normalised variances
    (non-finite values as 0; quantiles with linear interpolation, as ``torch.quantile``)."""
    nv = np.where(np.isfinite(normalized_variances), normalized_variances, 0.0)
    if nv.size == 0:
        return {}
    p10, p50, p90 = np.quantile(nv, [0.1, 0.5, 0.9])
    return {"vgs/stochastic_var_p10": float(p10), "vgs/stochastic_var_p50": float(p50),
            "vgs/stochastic_var_p90": float(p90), "vgs/stochastic_var_mean": float(nv.mean())}
