r"""Variance Gradient Scaler (VGS) on flat buffers (``specs/algorithm.md`` §2).

A training step is ``f = vgs.scale(grads)`` (multiplies every present gradient by ``f``),
``opt.step(params, grads)``, ``vgs.update(grads)`` (statistics from the *scaled* gradients):

.. math::

    \mu_i = a_i / (1-\beta^k),\quad s_i = b_i/(1-\beta^k),\quad
    nv_i = \frac{\max(s_i - \mu_i^2, 0)}{\max(\mu_i^2, 10^{-12}) + \epsilon} \\
    G = \min(\mathrm{clip}(q_{0.9}(nv), 0, 10^6), \mathrm{cap}),\quad
    f = \mathrm{clip}\!\left(\frac{1}{1 + \alpha G}, f_{min}, 1\right)

and ``f = 1`` when disabled, at ``k = 0`` and while ``k < warmup_steps``.

Example::

    >>> import numpy as np, upgd_ref
    >>> layout = upgd_ref.FlatLayout([(8,), (2, 2)], dtype="float64")
    >>> vgs = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0)
    >>> grads = layout.pack([np.linspace(-1, 1, 8), np.ones((2, 2))])
    >>> vgs.scale(grads), vgs.update(grads), round(vgs.scaling_factor(), 6)  # G capped at 50
    (1.0, None, 0.166667)
"""

from __future__ import annotations

import numpy as np

from . import reference as ref
from .backends import check_backend_name
from .checks import check_nonfinite_policy
from .checkpoint import FileCheckpoints
from .hyperparams import VGS_DEFAULTS, validate_vgs
from .layout import FlatLayout
from .serial import Serialised, serialised
from .state import VGS_FORMAT, VGS_VERSION, FlatVGSState
from .step import vgs_factor, vgs_scale_step, vgs_update_step

__all__ = ["VarianceGradientScaler"]


class VarianceGradientScaler(FileCheckpoints, Serialised):
    """Scales gradients down when their normalised variance is high (one factor per step).

    ``nonfinite``: ``"raise"`` (default) a :class:`~upgd_ref.checks.NonFiniteStepError` when
    the gradients or the new statistics are not finite, or ``"skip"``: :meth:`scale` leaves
    such gradients as they are and :meth:`update` leaves the statistics (and ``k``) unchanged
    and counts the skip in ``state.skipped_steps`` (``specs/algorithm.md`` §8).

    Thread-safe: each method call holds the scaler's lock (:mod:`upgd_ref.serial`).
    """

    def __init__(self, layout: FlatLayout, *, enabled=VGS_DEFAULTS["enabled"], beta=VGS_DEFAULTS["beta"],
                 alpha=VGS_DEFAULTS["alpha"], eps=VGS_DEFAULTS["eps"],
                 warmup_steps=VGS_DEFAULTS["warmup_steps"],
                 min_scaling_factor=VGS_DEFAULTS["min_scaling_factor"],
                 variance_cap=VGS_DEFAULTS["variance_cap"], backend="auto", nonfinite="raise"):
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        self.layout = layout
        self.hyperparams = validate_vgs(dict(
            enabled=enabled, beta=beta, alpha=alpha, eps=eps, warmup_steps=warmup_steps,
            min_scaling_factor=min_scaling_factor, variance_cap=variance_cap,
        ))
        self.backend = check_backend_name(backend)
        self.nonfinite = check_nonfinite_policy(nonfinite)
        self.state = FlatVGSState.zeros(layout.num_segments)

    def __repr__(self) -> str:
        return f"VarianceGradientScaler({self.layout!r}, step={self.state.step}, factor={self.scaling_factor():.6g})"

    @serialised
    def factor_and_variance(self) -> tuple[float, float]:
        """``(f, G)`` for the current statistics (:meth:`scaling_factor`, :meth:`normalized_variance`)."""
        return vgs_factor(self.state, self.hyperparams)

    def scaling_factor(self) -> float:
        """``f`` for the current statistics."""
        return self.factor_and_variance()[0]

    def normalized_variance(self) -> float:
        """``G``, the clipped and capped 0.9 quantile of the per-segment normalised variances."""
        return self.factor_and_variance()[1]

    @serialised
    def segment_normalized_variances(self) -> np.ndarray:
        """``nv_i`` per segment."""
        state = ref.VGSState(np.int64(self.state.step), self.state.grad_mean_avg, self.state.grad_sq_avg)
        with np.errstate(all="ignore"):
            return np.asarray(ref.vgs_normalized_variances(state, beta=self.hyperparams["beta"], eps=self.hyperparams["eps"]))

    @serialised
    def scale(self, grads, present=None) -> float:
        """Multiply every present segment of ``grads`` by ``f`` in place; return ``f``."""
        factor = self.scaling_factor()
        vgs_scale_step(self.layout, grads, factor, present, backend=self.backend, nonfinite=self.nonfinite)
        return factor

    @serialised
    def update(self, grads, present=None) -> None:
        """Advance ``k`` and the running averages from the (already scaled) gradients."""
        hp = validate_vgs(self.hyperparams)
        vgs_update_step(self.layout, grads, self.state, hp["beta"], present, backend=self.backend,
                        nonfinite=self.nonfinite)

    @serialised
    def reset_statistics(self) -> None:
        self.state = FlatVGSState.zeros(self.layout.num_segments)

    @serialised
    def state_dict(self) -> dict:
        return {
            "format": VGS_FORMAT,
            "version": VGS_VERSION,
            "num_segments": self.layout.num_segments,
            "hyperparams": dict(self.hyperparams),
            "state": self.state.to_state(),
        }

    @serialised
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore statistics and hyper-parameters; nothing changes if anything is invalid."""
        state = FlatVGSState.from_state_dict(state_dict, self.layout.num_segments)
        hyperparams = state_dict.get("hyperparams")
        if not isinstance(hyperparams, dict):
            raise ValueError("state dict field 'hyperparams' must be a dict")
        hyperparams = validate_vgs(hyperparams, where="state dict hyperparams: ")
        self.state, self.hyperparams = state, hyperparams
