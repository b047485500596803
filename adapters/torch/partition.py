r"""An optimizer's parameters partitioned into one flat buffer per dtype, and the layout the door takes.

Parameters of one dtype (the real dtype for complex ones, :mod:`.gather`) share one
:class:`~.buffers.Bucket`; the layout is a :class:`~upgd_ref.layout.FlatLayout` when there is
one bucket and a :class:`~upgd_ref.multi.MultiLayout` otherwise (buckets numbered in order of
their first parameter, segments in ``param_groups`` order). One step over all buckets is one
call of the door, whose result does not depend on the grouping (``specs/step.md`` §3), so a
mixed-dtype model steps as one model: one global utility range, one global norm.
The state record is a :class:`~upgd_ref.state.FlatUPGDState` or a
:class:`~upgd_ref.multi.MultiUPGDState` to match.
"""

from __future__ import annotations

import numpy as np
import torch

from upgd_ref.layout import FlatLayout
from upgd_ref.multi import MultiLayout, MultiUPGDState
from upgd_ref.precision import state_dtype
from upgd_ref.state import FlatUPGDState
from upgd_ref.step import noise as step_noise

from .buffers import Bucket, check_tensors, homed_in, segment_views, tensor_view
from .checkpoint import core_state_dict
from .conversions import DTYPE_NAMES
from .gather import as_param, rehome_plan, segment_shape


def flat_state_record(layout: FlatLayout, *, step: int, noise_ema_init: float, segments,
                      skipped_steps: int = 0) -> FlatUPGDState:
    """A :class:`~upgd_ref.state.FlatUPGDState` for ``layout`` from per-segment entries
    (:meth:`Partition.state_record`)."""
    saved = core_state_dict(layout, step=step, noise_ema_init=noise_ema_init, segments=segments)
    saved["state"]["skipped_steps"] = skipped_steps
    return FlatUPGDState.from_state_dict(saved, layout)


class Partition:
    """The buckets of ``params`` (``names`` label them in errors, ``groups`` are their param
    groups' indices), in global segment order: ``where[i] = (bucket, local segment)``.

    ``rehomed``: per parameter, whether it is re-homed (None: decided from the parameters'
    storage, :func:`~.gather.rehome_plan`; an unpickled optimizer passes what it was)."""

    def __init__(self, params, names, groups, *, what: str, rehomed=None):
        dtypes = check_tensors(params, names, what=what)
        plan = list(rehomed) if rehomed is not None else rehome_plan(params, [homed_in(p) is not None for p in params])
        keys = list(dict.fromkeys(dtypes))
        ids = [keys.index(d) for d in dtypes]
        shapes = [segment_shape(p) for p in params]
        if len(keys) == 1:
            self.layout = FlatLayout(shapes, DTYPE_NAMES[keys[0]], groups=groups)
            parts, members = [self.layout], [tuple(range(len(params)))]
        else:
            self.layout = MultiLayout(shapes, ids, [DTYPE_NAMES[k] for k in keys], groups=groups)
            parts, members = self.layout.parts, self.layout.segments
        self.params, self.names = list(params), list(names)
        self.shapes = [p.shape for p in params]
        self.segment_by_id = {id(p): i for i, p in enumerate(params)}
        self.buckets = [Bucket([params[i] for i in seg], part, [names[i] for i in seg], [plan[i] for i in seg])
                        for part, seg in zip(parts, members)]
        self.where = [None] * len(params)
        for k, seg in enumerate(members):
            for j, i in enumerate(seg):
                self.where[i] = (k, j)
        self.device = self.buckets[0].device

    @property
    def rehomed(self) -> list[bool]:
        """Per parameter (global order), whether it is re-homed (else gathered)."""
        return [self.buckets[k].rehomed[j] for k, j in self.where]

    @property
    def multi(self) -> bool:
        return isinstance(self.layout, MultiLayout)

    @property
    def param_flat(self):
        """The door's parameter buffer(s): one array, or a list of one per bucket."""
        return [b.param_flat for b in self.buckets] if self.multi else self.buckets[0].param_flat

    @property
    def grad_flat(self):
        return [b.grad_flat for b in self.buckets] if self.multi else self.buckets[0].grad_flat

    def _local(self, segments):
        """Global segment indices as per-bucket lists of local ones."""
        out = [[] for _ in self.buckets]
        for i in segments:
            k, j = self.where[i]
            out[k].append(j)
        return out

    def _global(self, per_bucket) -> list:
        """Per-bucket lists of per-segment values as one list in global order."""
        return [per_bucket[k][j] for k, j in self.where]

    # --- parameters and gradients -------------------------------------------------------

    def home(self) -> None:
        for bucket in self.buckets:
            bucket.home()

    def moved(self) -> bool:
        """Whether a parameter changed dtype or device since the buckets were built."""
        return any(b.moved() for b in self.buckets)

    def ensure_homed(self) -> None:
        for bucket in self.buckets:
            bucket.ensure_homed()

    def gather_grads(self):
        """``(present, copied)``: per segment (global order) whether it has a gradient, and
        per bucket the segments whose gradient was copied in (for :meth:`adopt_grads`)."""
        results = [b.gather_grads() for b in self.buckets]
        return self._global([r[0] for r in results]), [r[1] for r in results]

    def negate_grads(self, segments) -> None:
        for bucket, local in zip(self.buckets, self._local(segments)):
            bucket.negate_grads(local)

    def adopt_grads(self, copied) -> None:
        for bucket, local in zip(self.buckets, copied):
            bucket.adopt_grads(local)

    def scatter(self, present) -> None:
        """Write the gathered parameters of the present segments back (after a committed step)."""
        for bucket, local in zip(self.buckets, self._local(i for i, here in enumerate(present) if here)):
            chosen = set(local)
            bucket.scatter([j in chosen for j in range(len(bucket.params))])

    # --- state ----------------------------------------------------------------------------

    def segment_dtype(self, i: int) -> np.dtype:
        """The dtype of segment ``i``'s parameter buffer."""
        return self.buckets[self.where[i][0]].layout.dtype

    def state_array(self, state, name: str, i: int) -> np.ndarray:
        """Segment ``i`` of the state buffer ``name`` (``"utility"``, ...) of ``state`` (a view)."""
        k, j = self.where[i]
        record = state.parts[k] if self.multi else state
        return getattr(record, name)[self.buckets[k].layout.segment_slice(j)]

    def state_tensor(self, state, name: str, i: int) -> torch.Tensor:
        """:meth:`state_array` as a tensor in the parameter's shape (complex for a complex one)."""
        k, j = self.where[i]
        record = state.parts[k] if self.multi else state
        flat = tensor_view(getattr(record, name))[self.buckets[k].layout.segment_slice(j)]
        return as_param(flat.view(segment_shape(self.params[i])), self.params[i].is_complex())

    def state_record(self, *, step: int, noise_ema_init: float, segments, skipped_steps: int = 0):
        """A state record for this layout; ``segments[i]`` is None (fresh) or ``(t, arrays, n)``
        as :func:`~.checkpoint.core_state_dict` takes it (values converted to the state dtype)."""
        if not self.multi:
            return flat_state_record(self.layout, step=step, noise_ema_init=noise_ema_init, segments=segments,
                                     skipped_steps=skipped_steps)
        parts = [core_state_dict(part, step=step, noise_ema_init=noise_ema_init,
                                 segments=[segments[i] for i in members])["state"]
                 for part, members in zip(self.layout.parts, self.layout.segments)]
        return MultiUPGDState.from_state({"step": step, "skipped_steps": skipped_steps, "parts": parts}, self.layout)

    def snapshot(self, state, i: int):
        """``(t, arrays, n)`` copies of segment ``i`` of ``state`` (what :meth:`state_record` takes)."""
        arrays = {name: np.array(self.state_array(state, name, i)) for name in FlatUPGDState.BUFFERS}
        return int(state.segment_step[i]), arrays, float(state.grad_norm_ema[i])

    def state_dtype(self, i: int) -> np.dtype:
        return state_dtype(self.segment_dtype(i))

    def noise(self, seed: int, step: int, backend: str, noise_version: int = 1) -> list[torch.Tensor]:
        """Step ``step``'s standard normals in format ``noise_version``, one tensor per parameter
        (complex for complex ones)."""
        out = [None] * len(self.params)
        for bucket in self.buckets:
            flat = torch.from_numpy(step_noise(bucket.layout, seed, step, backend=backend,
                                               noise_version=noise_version)).to(self.device)
            for j, view in enumerate(segment_views(flat, bucket.layout)):
                i = self.segment_by_id[id(bucket.params[j])]
                out[i] = as_param(view, self.params[i].is_complex())
        return out
