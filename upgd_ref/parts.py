r"""The flat buffers one step runs over (``specs/step.md`` §3a, ``specs/precision.md``).

A step on a :class:`~upgd_ref.layout.FlatLayout` has one part; on a
:class:`~upgd_ref.multi.MultiLayout`, one per buffer. A part of 16-bit parameters is
*widened* before the passes (:func:`widened`: ``p``, ``g`` and a 16-bit state copied exactly
to float32 buffers at the same offsets) and *narrowed* after them (:func:`narrowed`: the new
values rounded once to the caller's dtypes, checked finite, then written), so every backend
runs its float32 kernels and nothing the caller owns changes before the checks pass.
"""

from __future__ import annotations

from typing import NamedTuple


from .arrays import describe_device
from .checks import check_distinct, check_flat_buffer
from .layout import FlatLayout
from .multi import MultiLayout, MultiUPGDState
from .precision import array_module, compute_dtype, is_low_precision, round_nearest, round_stochastic, rounding_words
from .state import FlatUPGDState

__all__ = ["StepPart", "step_parts", "backend_record", "widened", "narrowed", "Narrowed"]


class StepPart(NamedTuple):
    """One flat buffer of a step: its layout, its segments' global indices, its buffers, the
    state record the backend reads (``record``) and the one whose buffers follow ``params``
    (``owner``). ``caller``: for a widened part, the part as the caller gave it."""

    layout: FlatLayout
    segments: tuple
    params: object
    grads: object
    record: FlatUPGDState
    owner: FlatUPGDState
    name: str  # "" for a single buffer, "[k]" for part k
    caller: StepPart | None = None
    state_copied: bool = False  # a 16-bit state stepped in a float32 copy (narrowed back)


def _check_state_buffers(part: StepPart) -> None:
    """``u``, ``m``, ``v`` of the layout's length, in its dtype or (16-bit) in float32."""
    allowed = {part.layout.dtype, compute_dtype(part.layout.dtype)}
    for name in FlatUPGDState.BUFFERS:
        buffer = getattr(part.owner, name)
        if getattr(buffer, "shape", None) != (part.layout.size,) or buffer.dtype not in allowed:
            raise ValueError(f"state{part.name}.{name} must be a flat buffer of shape ({part.layout.size},) and dtype "
                             f"{' or '.join(sorted(d.name for d in allowed))}, got {getattr(buffer, 'shape', None)} "
                             f"{getattr(buffer, 'dtype', type(buffer).__name__)}")


def step_parts(layout, params, grads, state, writable_grads: bool) -> list[StepPart]:
    """The step's buffers, checked: one part for a :class:`FlatLayout`, one per buffer of a
    :class:`~upgd_ref.multi.MultiLayout` (then ``params``, ``grads`` are sequences and
    ``state`` a :class:`~upgd_ref.multi.MultiUPGDState`)."""
    if isinstance(layout, MultiLayout):
        if not isinstance(state, MultiUPGDState) or len(state.parts) != len(layout.parts):
            raise TypeError(f"state must be a MultiUPGDState of {len(layout.parts)} parts for a MultiLayout, "
                            f"got {type(state).__name__}")
        params, grads = layout.buffers_of(params), layout.buffers_of(grads)
        parts = [StepPart(part, segments, params[k], grads[k], state.part(layout, k), state.parts[k], f"[{k}]")
                 for k, (part, segments) in enumerate(zip(layout.parts, layout.segments))]
    elif isinstance(layout, FlatLayout):
        if not isinstance(state, FlatUPGDState):
            raise TypeError(f"state must be a FlatUPGDState, got {type(state).__name__}")
        parts = [StepPart(layout, tuple(range(layout.num_segments)), params, grads, state, state, "")]
    else:
        raise TypeError(f"layout must be a FlatLayout or a MultiLayout, got {type(layout).__name__}")
    by_device: dict[str, dict] = {}
    for part in parts:
        check_flat_buffer("params" + part.name, part.params, part.layout, writable=True)
        check_flat_buffer("grads" + part.name, part.grads, part.layout, writable=writable_grads)
        _check_state_buffers(part)
        check_distinct(**{"params" + part.name: part.params, "grads" + part.name: part.grads})
        by_device.setdefault(describe_device(part.params), {}).update(
            {"params" + part.name: part.params, "grads" + part.name: part.grads})
    for buffers in by_device.values():  # buffers on one device share no memory
        if len(buffers) > 2:
            check_distinct(**buffers)
    return parts


def backend_record(part: StepPart) -> FlatUPGDState:
    """The record the backend reads, with the buffers where :meth:`FlatUPGDState.follow` put them."""
    record, owner = part.record, part.owner
    if record is not owner:
        record.utility, record.first_moment, record.second_moment = (
            owner.utility, owner.first_moment, owner.second_moment)
    return record


def widened(part: StepPart) -> StepPart:
    """A 16-bit part as the backends run it: float32 copies of ``p`` and ``g`` (exact) at the
    same offsets, and of ``u``, ``m``, ``v`` when the state is 16-bit too (float32 state is
    used in place). Other parts as they are."""
    if not is_low_precision(part.layout.dtype):
        return part
    wide = compute_dtype(part.layout.dtype)
    record = backend_record(part)
    copied = record.utility.dtype != wide
    if copied:
        record = FlatUPGDState(record.step, record.segment_step, *(getattr(record, name).astype(wide)
                                                                 for name in FlatUPGDState.BUFFERS),
                               record.grad_norm_ema, record.skipped_steps)
    return StepPart(part.layout.widened(wide), part.segments, part.params.astype(wide), part.grads.astype(wide),
                    record, record, part.name, part, copied)


class Narrowed(NamedTuple):
    """What narrowing a widened part would write (``writes``: (target, values) pairs), or the
    first non-finite value it would leave (``field``, global ``segment``, ``element``)."""

    writes: list
    field: str | None = None
    segment: int | None = None
    element: int | None = None


def _rounding_words(layout: FlatLayout, seed: int, step: int, xp):
    """Per flat element: its word of the rounding stream (padding: 0), uint32."""
    words = xp.zeros(layout.size, dtype=xp.uint32)
    for offset, start, size in zip(layout.offsets, layout.noise_offsets, layout.sizes):
        words[offset : offset + size] = rounding_words(seed, step, start, size, xp=xp)
    return words


def narrowed(part: StepPart, *, present, rounding: str, seed: int, step: int, scaled: bool) -> Narrowed:
    """The caller's values after the step of a widened ``part``: ``p`` rounded once to its
    dtype (nearest or stochastic), ``g`` (when VGS scaled it) and a 16-bit state to nearest.
    Nothing is written here."""
    caller = part.caller
    dtype = caller.layout.dtype
    xp = array_module(part.params)
    if rounding == "stochastic":
        words = _rounding_words(caller.layout, seed, step, xp)
        new_params = round_stochastic(part.params, dtype, words)
    else:
        new_params = round_nearest(part.params, dtype)
    writes = [(caller.params, new_params)]
    if scaled:
        writes.append((caller.grads, round_nearest(part.grads, dtype)))
    if part.state_copied:  # a 16-bit state, stepped in a float32 copy
        for name in FlatUPGDState.BUFFERS:
            values = round_nearest(getattr(part.record, name), dtype)
            for local, i in enumerate(part.segments):
                segment = values[caller.layout.segment_slice(local)]
                if present[i] and not bool(xp.isfinite(segment).all()):
                    bad = int(xp.flatnonzero(~xp.isfinite(segment))[0])
                    return Narrowed([], name, i, bad)
            writes.append((getattr(caller.owner, name), values))
    return Narrowed(writes)
