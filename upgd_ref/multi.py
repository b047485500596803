r"""One model in several flat buffers: one buffer per (device, dtype), one step over all.

A :class:`MultiLayout` partitions a model's segments (in their global order ``0 .. S-1``)
into buffers; part ``k`` is an ordinary :class:`~upgd_ref.layout.FlatLayout` of its
segments whose ``noise_offsets`` are the segments' logical offsets in the whole model, so
element ``j`` of segment ``i`` draws the normal of index ``L_i + j`` whichever buffer holds it.
A :class:`MultiUPGDState` holds the per-segment records (``t_i``, ``n_i``) in global order
and one set of state buffers (``u``, ``m``, ``v``) per part.

:func:`upgd_ref.step.upgd_step` takes a ``MultiLayout`` with a sequence of parameter and
gradient buffers and a ``MultiUPGDState``: the local pass runs per buffer, the reductions are
combined in global segment order (:func:`upgd_ref.stages.combine_reductions`), so the step
does not depend on how the segments are grouped into buffers (``specs/step.md`` §3).

Example::

    >>> import numpy as np, upgd_ref
    >>> from upgd_ref.multi import MultiLayout, MultiUPGDState
    >>> from upgd_ref.step import StepRequest, upgd_step
    >>> layout = MultiLayout([(3,), (2, 2)], buffers=[1, 0], dtypes=["float64", "float32"])
    >>> params = layout.pack([np.ones(3), np.ones((2, 2))])
    >>> grads = layout.pack([np.full(3, 0.1), np.full((2, 2), 0.2)])
    >>> state = MultiUPGDState.zeros(layout, [1.0, 1.0])
    >>> _ = upgd_step(layout, params, grads, state, StepRequest(hyper=[upgd_ref.hyperparams.UPGD_DEFAULTS] * 2))
    >>> state.step, [b.dtype.name for b in params]
    (1, ['float32', 'float64'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .layout import FlatLayout
from .state import UPGD_FORMAT, UPGD_VERSION, FlatUPGDState

__all__ = ["MultiLayout", "MultiUPGDState"]


def _buffer_ids(buffers, num_segments: int) -> tuple[int, ...]:
    """Per-segment buffer ids ``0 .. B-1`` (every id used) from per-segment ids."""
    ids = list(buffers)
    if len(ids) != num_segments:
        raise ValueError(f"buffers has {len(ids)} entries but there are {num_segments} segments")
    for i, b in enumerate(ids):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0:
            raise TypeError(f"buffers[{i}] must be a non-negative int (the segment's buffer), got {b!r}")
    missing = sorted(set(range(max(ids) + 1)) - set(int(b) for b in ids))
    if missing:
        raise ValueError(f"buffers {missing} hold no segment; number the buffers 0 .. B-1")
    return tuple(int(b) for b in ids)


class MultiLayout:
    """Segments ``shapes`` (global order) held in several flat buffers.

    ``buffers[i]``: the buffer of segment ``i`` (ints ``0 .. B-1``); within a buffer the
    segments keep their global order. ``dtypes``: one dtype per buffer (or one for all).
    ``groups``: per-segment group ids of the whole model. ``parts[k]`` is buffer ``k``'s
    :class:`~upgd_ref.layout.FlatLayout` and ``segments[k]`` its segments' global indices.
    """

    def __init__(self, shapes: Sequence, buffers: Sequence[int], dtypes="float32", groups=None):
        whole = FlatLayout(shapes, "float64", groups)  # checks the shapes and groups once
        self.shapes, self.sizes, self.groups = whole.shapes, whole.sizes, whole.groups
        self.logical_offsets, self.num_logical = whole.logical_offsets, whole.num_logical
        ids = _buffer_ids(buffers, whole.num_segments)
        count = max(ids) + 1
        dtypes = [dtypes] * count if isinstance(dtypes, (str, np.dtype, type)) else list(dtypes)
        if len(dtypes) != count:
            raise ValueError(f"dtypes has {len(dtypes)} entries for {count} buffers")
        self.segments = tuple(tuple(i for i, b in enumerate(ids) if b == k) for k in range(count))
        self.parts = tuple(
            FlatLayout([self.shapes[i] for i in segments], dtypes[k], [self.groups[i] for i in segments],
                       noise_offsets=[self.logical_offsets[i] for i in segments])
            for k, segments in enumerate(self.segments))
        self.buffers = ids

    @property
    def num_segments(self) -> int:
        return len(self.shapes)

    @property
    def dtypes(self) -> tuple[np.dtype, ...]:
        """Each segment's dtype (that of its buffer)."""
        return tuple(self.parts[b].dtype for b in self.buffers)

    def __repr__(self) -> str:
        return (f"MultiLayout(shapes={list(self.shapes)}, buffers={list(self.buffers)}, "
                f"dtypes={[p.dtype.name for p in self.parts]})")

    def pack(self, arrays: Sequence) -> list:
        """One new flat buffer per part holding ``arrays`` (one per segment, global order)."""
        arrays = list(arrays)
        if len(arrays) != self.num_segments:
            raise ValueError(f"pack got {len(arrays)} arrays for {self.num_segments} segments")
        return [part.pack([arrays[i] for i in segments]) for part, segments in zip(self.parts, self.segments)]

    def unpack(self, buffers: Sequence) -> list:
        """Per-segment arrays in global order (views) of one buffer per part."""
        out = [None] * self.num_segments
        for part, segments, buffer in zip(self.parts, self.segments, self.buffers_of(buffers)):
            for i, view in zip(segments, part.unpack(buffer)):
                out[i] = view
        return out

    def zeros(self) -> list:
        return [part.zeros() for part in self.parts]

    def buffers_of(self, buffers) -> list:
        """``buffers`` checked to be a list or tuple of one flat buffer per part."""
        if not isinstance(buffers, (list, tuple)) or len(buffers) != len(self.parts):
            raise ValueError(f"expected a list of {len(self.parts)} flat buffers (one per part), "
                             f"got {type(buffers).__name__}")
        return list(buffers)


@dataclass
class MultiUPGDState:
    """AdaptiveUPGD state of a :class:`MultiLayout`: the per-segment records in global
    order and ``parts[k]``, the ``(utility, first_moment, second_moment)`` buffers of part ``k``."""

    step: int
    segment_step: np.ndarray  # int64 (S,)
    grad_norm_ema: np.ndarray  # float64 (S,)
    parts: list  # per part: FlatUPGDState whose per-segment records are not read (see part())
    skipped_steps: int = 0

    @classmethod
    def zeros(cls, layout: MultiLayout, noise_ema_init) -> MultiUPGDState:
        init = np.asarray(noise_ema_init, dtype=np.float64)
        parts = [FlatUPGDState.zeros(part, init[list(segments)]) for part, segments in zip(layout.parts, layout.segments)]
        return cls(0, np.zeros(layout.num_segments, dtype=np.int64), init.copy(), parts)

    def part(self, layout: MultiLayout, k: int) -> FlatUPGDState:
        """Part ``k``'s buffers with this record's step and its segments' ``t_i``, ``n_i``
        (copies: the door commits the records here, never through a part)."""
        buffers = self.parts[k]
        index = list(layout.segments[k])
        return FlatUPGDState(self.step, self.segment_step[index], buffers.utility, buffers.first_moment,
                             buffers.second_moment, self.grad_norm_ema[index], self.skipped_steps)

    def to_state(self, layout: MultiLayout) -> dict:
        """A state dict: the step counts and, per part, :meth:`FlatUPGDState.to_state` of the
        part (its segments' records and buffers, in its layout's format)."""
        return {"step": self.step, "skipped_steps": self.skipped_steps,
                "parts": [self.part(layout, k).to_state(part) for k, part in enumerate(layout.parts)]}

    @classmethod
    def from_state(cls, state: dict, layout: MultiLayout) -> MultiUPGDState:
        """The state of :meth:`to_state` for ``layout`` (each part checked as
        :meth:`FlatUPGDState.from_state_dict` checks it); raises naming the part."""
        parts = state.get("parts") if isinstance(state, dict) else None
        if not isinstance(parts, list) or len(parts) != len(layout.parts):
            raise ValueError(f"state must hold 'parts', one state per buffer ({len(layout.parts)})")
        segment_step = np.zeros(layout.num_segments, dtype=np.int64)
        grad_norm_ema = np.zeros(layout.num_segments)
        records = []
        for k, (part, segments) in enumerate(zip(layout.parts, layout.segments)):
            saved = {"format": UPGD_FORMAT, "version": UPGD_VERSION, "state": parts[k]}
            try:
                record = FlatUPGDState.from_state_dict(saved, part)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"part {k}: {exc}") from None
            if record.step != state.get("step"):
                raise ValueError(f"part {k}: step {record.step} differs from the state's step {state.get('step')!r}")
            segment_step[list(segments)] = record.segment_step
            grad_norm_ema[list(segments)] = record.grad_norm_ema
            records.append(record)
        return cls(int(state["step"]), segment_step, grad_norm_ema, records, int(state.get("skipped_steps", 0)))
