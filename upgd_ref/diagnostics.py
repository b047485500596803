r"""Per-step diagnostics: one record per training step, for logs, plots and tests.

A :class:`StepRecord` is what the optimizer reports for a step (:class:`upgd_ref.StepInfo`)
plus any metrics of your own (``loss=...``), with summaries derived for logs and plots:

- ``vgs_factor``: the factor ``f`` multiplied into this step's gradients (1.0 while VGS is
  disabled or warming up, NaN when the step had no scaler); ``vgs_normalized_variance``:
  the ``G`` it came from.
- ``grad_norm[i] = ||g_i||_2`` of the gradient the optimizer saw (after scaling), so
  ``grad_norm[i] / vgs_factor`` is the norm before scaling.
- ``noise_std[i]``; ``noise_to_signal[i] = noise_std[i] / grad_norm[i]`` (the design's NSR).
- Per-segment arrays hold NaN where a segment had no gradient.

Two per-step summaries are derived from those:

- ``global_grad_norm = sqrt(sum_i grad_norm[i]**2)`` over present segments;
- ``nsr``: the median over segments of ``noise_to_signal`` (only finite values count, so
  absent, zero-size and zero-gradient segments are left out). With adaptive noise, instant
  scaling and no floor hit, every segment's NSR is ``sigma`` and so is the median.

Example::

    >>> import numpy as np, upgd_ref
    >>> from upgd_ref.diagnostics import record_step
    >>> layout = upgd_ref.FlatLayout([(3,), (2,)], dtype="float64")
    >>> opt = upgd_ref.AdaptiveUPGD(layout, adaptive_noise=True, sigma=0.02)
    >>> vgs = upgd_ref.VarianceGradientScaler(layout, warmup_steps=0)
    >>> params, grads = layout.zeros(), layout.pack([np.ones(3), -np.ones(2)])
    >>> record = record_step(opt, params, grads, vgs, loss=0.5)
    >>> record.step, record.vgs_factor, round(record.nsr, 6), record.metrics["loss"]
    (1, 1.0, 0.02, 0.5)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

import numpy as np

from .optimizer import StepInfo

__all__ = ["StepRecord", "StepLog", "record_step"]


@dataclass(frozen=True)
class StepRecord(StepInfo):
    """A :class:`StepInfo` plus metrics of your own and derived summaries (module docstring)."""

    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_step(cls, info: StepInfo, **metrics) -> StepRecord:
        """A record from a :class:`StepInfo` and any metrics (numbers) of your own."""
        return cls(**{f.name: getattr(info, f.name) for f in fields(StepInfo)}, metrics=dict(metrics))

    @property
    def pre_vgs_grad_norm(self) -> np.ndarray:
        """``grad_norm / vgs_factor``: the norms before scaling (``grad_norm`` without a scaler)."""
        return self.grad_norm / self.vgs_factor if math.isfinite(self.vgs_factor) else self.grad_norm

    @property
    def global_grad_norm(self) -> float:
        """``sqrt(sum of grad_norm[i]**2)`` over present segments (after scaling)."""
        norms = self.grad_norm[np.asarray(self.present, dtype=bool)]
        return float(np.sqrt(np.sum(norms * norms)))

    @property
    def nsr(self) -> float:
        """Median over segments of the finite ``noise_to_signal`` values (NaN if none)."""
        finite = self.noise_to_signal[np.isfinite(self.noise_to_signal)]
        return float(np.median(finite)) if finite.size else math.nan

    @property
    def mean_noise_std(self) -> float:
        """Mean of ``noise_std`` over present segments."""
        stds = self.noise_std[np.asarray(self.present, dtype=bool)]
        return float(np.mean(stds)) if stds.size else math.nan

    def to_dict(self) -> dict:
        """Plain JSON-ready values, the derived summaries included (NaN/inf become None)."""
        out = {f.name: _plain(getattr(self, f.name)) for f in fields(StepInfo)}
        out["present"] = [bool(p) for p in self.present]
        out["global_grad_norm"] = _plain(self.global_grad_norm)
        out["nsr"] = _plain(self.nsr)
        out.update({k: _plain(v) for k, v in self.metrics.items()})
        return out


def _plain(value):
    """JSON has no NaN or infinity: those become None."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def record_step(optimizer, params, grads, scaler=None, present=None, **metrics) -> StepRecord:
    """``optimizer.step(params, grads, present, vgs=scaler)`` as a :class:`StepRecord`.

    With a scaler that is the production order in one call: ``f = scaler.scale(grads)`` (in
    place), the optimizer step, ``scaler.update(grads)``. ``metrics`` (e.g. ``loss=...``)
    are stored as given.
    """
    return StepRecord.from_step(optimizer.step(params, grads, present, vgs=scaler), **metrics)


class StepLog:
    """A list of :class:`StepRecord` with column access for plots and summaries."""

    def __init__(self):
        self.records: list[StepRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: StepRecord) -> None:
        self.records.append(record)

    def column(self, name: str) -> np.ndarray:
        """``(steps,)`` or ``(steps, segments)`` array of a field, summary or metric."""
        if not self.records:
            return np.empty(0)
        first = self.records[0]
        if name in first.metrics:
            return np.asarray([r.metrics[name] for r in self.records], dtype=np.float64)
        if not hasattr(first, name):
            raise KeyError(f"no field, summary or metric named {name!r}")
        return np.asarray([getattr(r, name) for r in self.records])

    def write_jsonl(self, path) -> None:
        """One JSON object per line and step (:meth:`StepRecord.to_dict`)."""
        with open(path, "w", encoding="utf-8") as fh:
            for record in self.records:
                fh.write(json.dumps(record.to_dict()) + "\n")
