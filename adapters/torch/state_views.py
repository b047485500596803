"""``optimizer.state``: the production per-parameter state, as live views of the optimizer's
flat state record.

The record is the optimizer's own :class:`upgd_ref.state.FlatUPGDState` (the one it passes
to :func:`upgd_ref.step.upgd_step`). The views hold no state of their own besides the
entries for keys that are not parameters of the optimizer: each access asks the optimizer
for a :class:`StateSource` (its current record, layout and bucket: a rebuild or
``load_state_dict`` replaces them) and reads or writes the segment of the parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from itertools import chain
from typing import Callable, NamedTuple

import torch

from .gather import real_value, segment_shape
from .partition import Partition
from .conversions import CORE_FIELD_OF_KEY, CORE_TENSOR_FIELDS, float_value, state_array, step_count


class StateSource(NamedTuple):
    """What the views read, current at the time of the access."""

    #: The optimizer's state record (a :class:`~upgd_ref.state.FlatUPGDState`, or a
    #: :class:`~upgd_ref.multi.MultiUPGDState` for several dtypes): ``step``,
    #: ``segment_step``, ``grad_norm_ema`` and the per-element buffers (``utility``, ...).
    flat_state: object
    #: The parameters (segment order), their names, shapes, ``segment_by_id`` and where
    #: each segment's state lives.
    bucket: Partition
    #: The optimizer's param groups (a segment's ``adaptive_noise`` flag).
    param_groups: list
    #: The member's per-parameter state keys, ``grad_norm_ema`` last.
    state_keys: tuple
    #: ``id(param) -> (param, {key: value})``: the keys users stored besides the state keys.
    extras: dict
    #: The ``grad_norm_ema`` a reset parameter starts from.
    noise_ema_init: float
    #: Makes the optimizer's global step counter at least the given ``t_i`` (the optimizer
    #: owns the record's counter; a view only writes the parameter's own entries).
    raise_counter: Callable[[int], None]

    def segment_of(self, param) -> int:
        try:
            return self.bucket.segment_by_id[id(param)]
        except KeyError:
            raise KeyError("this tensor is not a parameter of the optimizer") from None

    def group_of(self, segment: int) -> dict:
        start = 0
        for group in self.param_groups:
            start += len(group["params"])
            if segment < start:
                return group
        raise IndexError(segment)


def reset_segment(flat_state, partition: Partition, i: int, noise_ema_init: float) -> None:
    """Segment ``i`` of the optimizer's state record as before its first step."""
    flat_state.segment_step[i] = 0
    flat_state.grad_norm_ema[i] = noise_ema_init
    for name in CORE_TENSOR_FIELDS:
        partition.state_array(flat_state, name, i)[...] = 0


class ParamState(MutableMapping):
    """``optimizer.state[p]``: the production keys as live views of the optimizer's state record.

    ``step`` is a Python int and ``grad_norm_ema`` a Python float (as the production class
    keeps them); ``avg_utility``, ``first_moment`` and ``sec_moment`` are tensors sharing
    memory with the record, so in-place edits reach the optimizer. Other keys are kept
    as given. Empty until the parameter's first step, as in the production class.
    """

    __slots__ = ("_source", "_param")

    def __init__(self, source: Callable[[], StateSource], param):
        self._source = source
        self._param = param

    def _extras(self, source: StateSource, create=False) -> dict:
        entry = source.extras.get(id(self._param))
        if entry is None:
            if not create:
                return {}
            entry = source.extras[id(self._param)] = (self._param, {})
        return entry[1]

    @staticmethod
    def _live_keys(source: StateSource, i: int):
        if int(source.flat_state.segment_step[i]) == 0:
            return ()
        if source.group_of(i).get("adaptive_noise", False):
            return source.state_keys
        return source.state_keys[:-1]

    def __getitem__(self, key):
        source = self._source()
        i = source.segment_of(self._param)
        if key in self._live_keys(source, i):
            state = source.flat_state
            if key == "step":
                return int(state.segment_step[i])
            if key == "grad_norm_ema":
                return float(state.grad_norm_ema[i])
            return source.bucket.state_tensor(state, CORE_FIELD_OF_KEY[key], i)
        return self._extras(source)[key]

    def __setitem__(self, key, value):
        source = self._source()
        if key not in source.state_keys:
            self._extras(source, create=True)[key] = value
            return
        i = source.segment_of(self._param)
        state = source.flat_state
        where = f"state[{source.bucket.names[i]}][{key!r}]"
        if key == "step":
            step = step_count(where, value)
            state.segment_step[i] = step
            source.raise_counter(step)
        elif key == "grad_norm_ema":
            ema = float_value(where, value)
            if not (math.isfinite(ema) and ema >= 0):
                raise ValueError(f"{where} must be finite and >= 0, got {ema}")
            state.grad_norm_ema[i] = ema
        else:
            target = source.bucket.state_array(state, CORE_FIELD_OF_KEY[key], i)
            values = state_array(where, real_value(value), segment_shape(self._param), target.dtype)
            target[...] = values

    def __delitem__(self, key):
        source = self._source()
        if key in source.state_keys:
            raise KeyError(f"{key!r} is part of the optimizer's state and cannot be deleted "
                           "(delete optimizer.state[p] to reset the parameter's state)")
        del self._extras(source)[key]

    def __iter__(self):
        source = self._source()
        return chain(self._live_keys(source, source.segment_of(self._param)), iter(list(self._extras(source))))

    def __len__(self):
        source = self._source()
        return len(self._live_keys(source, source.segment_of(self._param))) + len(self._extras(source))

    def __repr__(self):
        return repr(dict(self.items()))


class StateView(MutableMapping):
    """``optimizer.state``: a ``defaultdict(dict)`` whose managed entries are :class:`ParamState`.

    ``unmanaged`` holds the entries of keys that are not parameters of the optimizer (plain
    values, as in ``torch.optim``); state dicts and pickles carry it.
    """

    def __init__(self, source: Callable[[], StateSource]):
        self._source = source
        self.unmanaged: dict = {}

    def _managed(self, key) -> bool:
        return isinstance(key, torch.Tensor) and id(key) in self._source().bucket.segment_by_id

    def __getitem__(self, key):
        if self._managed(key):
            return ParamState(self._source, key)
        if key not in self.unmanaged:
            self.unmanaged[key] = {}
        return self.unmanaged[key]

    def read(self, key) -> Mapping:
        """``self[key]`` without creating an entry (what a state dict reads)."""
        return ParamState(self._source, key) if self._managed(key) else self.unmanaged.get(key, {})

    def __setitem__(self, key, value):
        if not self._managed(key):
            self.unmanaged[key] = value
            return
        if not isinstance(value, Mapping):
            raise TypeError(f"optimizer.state[p] must be a mapping, got {type(value).__name__}")
        if key in self:
            del self[key]
        entry = ParamState(self._source, key)
        for k, v in dict(value).items():
            entry[k] = v

    def __delitem__(self, key):
        if not self._managed(key):
            del self.unmanaged[key]
            return
        source = self._source()
        reset_segment(source.flat_state, source.bucket, source.segment_of(key), source.noise_ema_init)
        source.extras.pop(id(key), None)

    def __contains__(self, key):
        if self._managed(key):
            return len(ParamState(self._source, key)) > 0
        return key in self.unmanaged

    def __iter__(self):
        managed = [p for p in self._source().bucket.params if len(ParamState(self._source, p))]
        return chain(managed, iter(list(self.unmanaged)))

    def __len__(self):
        return sum(1 for _ in self)

    def __repr__(self):
        return repr({k: v for k, v in self.items()})
