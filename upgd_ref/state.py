"""Mutable flat-buffer state records and their state-dict format (``specs/layout.md`` §4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .arrays import assign, describe_device, like_buffer, to_numpy
from .checkpoint import check_header, take_array, take_int
from .layout import FlatLayout
from .precision import state_dtype

__all__ = ["FlatUPGDState", "FlatVGSState", "UPGD_FORMAT", "VGS_FORMAT", "UPGD_VERSION", "VGS_VERSION"]

UPGD_FORMAT = "upgd_ref.AdaptiveUPGD"
VGS_FORMAT = "upgd_ref.VarianceGradientScaler"
UPGD_VERSION = 2  # 2 added "member" and "profile" (specs/layout.md §4.2); version 1 files still load
VGS_VERSION = 1


def _logical(layout, flat: np.ndarray) -> np.ndarray:
    """Padding removed: the concatenation of the segments, in order."""
    flat = to_numpy(flat)
    return np.concatenate([flat[layout.segment_slice(i)] for i in range(layout.num_segments)])


def _saved_state_dtype(state: dict, layout) -> np.dtype:
    """The dtype of a saved ``u``, ``m``, ``v``: the layout's, or float32 for 16-bit parameters
    (the default state dtype, ``specs/precision.md``)."""
    saved = getattr(state.get("utility"), "dtype", None)
    return np.dtype(saved) if saved is not None and saved == state_dtype(layout.dtype) else layout.dtype


def _padded(layout, logical: np.ndarray) -> np.ndarray:
    out = layout.zeros(logical.dtype)
    for i in range(layout.num_segments):
        start = layout.logical_offsets[i] - layout.logical_start
        out[layout.segment_slice(i)] = logical[start : start + layout.sizes[i]]
    return out


def _check_fields(state: dict, allowed) -> None:
    unknown = sorted(str(k) for k in state if k not in allowed)
    if unknown:
        raise ValueError(f"state dict has unknown field(s) {['state.' + k for k in unknown]}")


def _check_saved_layout(state_dict: dict, layout) -> None:
    """The state dict's ``layout`` entry, when it has one, must describe ``layout``."""
    if "layout" not in state_dict:
        return
    saved = state_dict["layout"]
    if not isinstance(saved, dict):
        raise ValueError(f"state dict field 'layout' must be a dict, got {type(saved).__name__}")
    shapes = saved.get("shapes")
    if not isinstance(shapes, (list, tuple)) or not all(isinstance(s, (list, tuple)) for s in shapes):
        raise ValueError("state dict field 'layout.shapes' must be a list of shapes")
    if [list(s) for s in shapes] != [list(s) for s in layout.shapes]:
        raise ValueError(
            f"state dict field 'layout.shapes' is {[list(s) for s in shapes]}; this layout has "
            f"segment shapes {[list(s) for s in layout.shapes]}"
        )
    dtype = saved.get("dtype")
    if dtype != layout.dtype.name:
        raise TypeError(f"state dict field 'layout.dtype' is {dtype!r}; this layout's dtype is {layout.dtype.name!r}")
    try:
        FlatLayout.from_dict(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"state dict field 'layout' is malformed: {exc}") from None


def _take_skipped(state: dict) -> int:
    """The optional ``skipped_steps`` counter (absent from state dicts written before it: 0)."""
    return take_int(state, "skipped_steps") if "skipped_steps" in state else 0


@dataclass
class FlatUPGDState:
    """AdaptiveUPGD state on flat buffers of a layout (padding elements stay zero)."""

    step: int  # completed calls to step(); the next step draws noise with counter step + 1
    segment_step: np.ndarray  # int64 (S,): t_i
    utility: np.ndarray  # flat, layout dtype: u
    first_moment: np.ndarray  # m
    second_moment: np.ndarray  # v
    grad_norm_ema: np.ndarray  # float64 (S,): n_i
    skipped_steps: int = 0  # steps refused and skipped under nonfinite="skip" (specs/algorithm.md §8)

    BUFFERS = ("utility", "first_moment", "second_moment")

    @classmethod
    def zeros(cls, layout, noise_ema_init, dtype=None) -> FlatUPGDState:
        """A fresh state; ``dtype`` of ``u``, ``m``, ``v``: the layout's, but float32 for
        16-bit parameters (``specs/precision.md``; ``dtype=layout.dtype`` keeps them 16-bit)."""
        dtype = state_dtype(layout.dtype) if dtype is None else np.dtype(dtype)
        return cls(
            step=0,
            segment_step=np.zeros(layout.num_segments, dtype=np.int64),
            utility=layout.zeros(dtype),
            first_moment=layout.zeros(dtype),
            second_moment=layout.zeros(dtype),
            grad_norm_ema=np.asarray(noise_ema_init, dtype=np.float64).copy(),
        )

    def to_state(self, layout) -> dict:
        out = {"step": self.step, "segment_step": self.segment_step.copy(), "grad_norm_ema": self.grad_norm_ema.copy(),
               "skipped_steps": self.skipped_steps}
        for name in self.BUFFERS:
            out[name] = _logical(layout, getattr(self, name))
        return out

    @classmethod
    def from_state_dict(cls, state_dict, layout) -> FlatUPGDState:
        """Checked state of a state dict; raises naming the first bad field."""
        state = check_header(state_dict, UPGD_FORMAT, UPGD_VERSION)
        _check_saved_layout(state_dict, layout)
        _check_fields(state, ("step", "segment_step", "grad_norm_ema", "skipped_steps", *cls.BUFFERS))
        s = layout.num_segments
        step = take_int(state, "step")
        skipped = _take_skipped(state)
        segment_step = take_array(state, "segment_step", (s,), np.int64)
        if (segment_step < 0).any() or (segment_step > step).any():
            raise ValueError("state dict field 'state.segment_step' must lie in [0, state.step]")
        grad_norm_ema = take_array(state, "grad_norm_ema", (s,), np.float64)
        if (grad_norm_ema < 0).any():
            raise ValueError("state dict field 'state.grad_norm_ema' must be >= 0")
        dtype = _saved_state_dtype(state, layout)
        buffers = {name: _padded(layout, take_array(state, name, (layout.num_logical,), dtype))
                   for name in cls.BUFFERS}
        if (buffers["second_moment"] < 0).any():
            raise ValueError("state dict field 'state.second_moment' must be >= 0")
        return cls(step=step, segment_step=segment_step, grad_norm_ema=grad_norm_ema, skipped_steps=skipped,
                   **buffers)

    def assign(self, other: FlatUPGDState) -> None:
        """Copy ``other`` into this record's buffers (their identity and device are kept)."""
        self.step, self.skipped_steps = other.step, other.skipped_steps
        for name in ("segment_step", "grad_norm_ema", *self.BUFFERS):
            assign(getattr(self, name), getattr(other, name))

    def follow(self, params) -> None:
        """Move the flat buffers to the device of ``params`` (host or a GPU) when they are
        elsewhere: state lives where the parameters live, as in torch.optim. An exact copy;
        the per-segment records stay on the host."""
        if describe_device(self.utility) != describe_device(params):  # "host" or "GPU n"
            for name in self.BUFFERS:
                setattr(self, name, like_buffer(to_numpy(getattr(self, name)), params))


@dataclass
class FlatVGSState:
    step: int  # k
    grad_mean_avg: np.ndarray  # float64 (S,): a_i
    grad_sq_avg: np.ndarray  # float64 (S,): b_i
    skipped_steps: int = 0  # statistics updates skipped under nonfinite="skip"

    ARRAYS = ("grad_mean_avg", "grad_sq_avg")

    @classmethod
    def zeros(cls, num_segments: int) -> FlatVGSState:
        return cls(0, np.zeros(num_segments), np.zeros(num_segments))

    def to_state(self) -> dict:
        return {"step": self.step, "grad_mean_avg": self.grad_mean_avg.copy(), "grad_sq_avg": self.grad_sq_avg.copy(),
                "skipped_steps": self.skipped_steps}

    @classmethod
    def from_state_dict(cls, state_dict, num_segments: int) -> FlatVGSState:
        state = check_header(state_dict, VGS_FORMAT, VGS_VERSION)
        saved = state_dict.get("num_segments", num_segments)
        if isinstance(saved, bool) or not isinstance(saved, (int, np.integer)) or saved != num_segments:
            raise ValueError(f"state dict field 'num_segments' is {saved!r}; this layout has {num_segments} segments")
        _check_fields(state, ("step", "grad_mean_avg", "grad_sq_avg", "skipped_steps"))
        step = take_int(state, "step")
        skipped = _take_skipped(state)
        mean = take_array(state, "grad_mean_avg", (num_segments,), np.float64)
        square = take_array(state, "grad_sq_avg", (num_segments,), np.float64)
        if (square < 0).any():
            raise ValueError("state dict field 'state.grad_sq_avg' must be >= 0")
        return cls(step, mean, square, skipped)
