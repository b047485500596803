"""Input validation shared by the stateful API. Every check runs before anything is written."""

from __future__ import annotations

import numpy as np

from .arrays import array_kind, describe_device, is_cupy_array, may_share_memory

__all__ = ["NONFINITE_POLICIES", "NonFiniteStepError", "check_nonfinite_policy", "check_flat_buffer", "check_present",
           "check_finite", "check_distinct",
           "check_not_aliased"]

#: What a step does when it would leave a non-finite parameter, state entry or statistic
#: (``specs/algorithm.md`` §8): raise, or skip the step (nothing changes, a counter advances).
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteStepError(ValueError):
    """A step refused by the finiteness contract (``specs/algorithm.md`` §8); nothing changed.

    ``field``: what is or would become non-finite (``"grads"``, ``"params"``, ``"utility"``,
    ``"first_moment"``, ``"second_moment"``, ``"direction"``, ``"noise_std"``,
    ``"grad_norm_ema"``, ``"vgs"``, ...); ``segment`` and ``element`` where known, else ``None``.
    """

    def __init__(self, message: str, *, field: str = "", segment: int | None = None, element: int | None = None):
        super().__init__(message)
        self.field, self.segment, self.element = field, segment, element


def check_nonfinite_policy(policy, where: str = "") -> str:
    """``policy`` when it is one of :data:`NONFINITE_POLICIES`, else ``ValueError``."""
    if not isinstance(policy, str) or policy not in NONFINITE_POLICIES:
        raise ValueError(f"{where}nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
    return policy


def check_flat_buffer(name: str, buffer, layout, *, writable: bool) -> None:
    """A 1-D, contiguous, naturally aligned NumPy (or CuPy) buffer of the layout's length and dtype."""
    cupy_array = is_cupy_array(buffer)
    if isinstance(buffer, np.ma.MaskedArray):  # NumPy would honour the mask, the kernels its data
        raise TypeError(f"{name} is a NumPy masked array; pass a plain array ({name}.filled(0.0) or "
                        f"np.ma.getdata({name})): masks are not supported on any backend")
    if not isinstance(buffer, np.ndarray) and not cupy_array:
        raise TypeError(
            f"{name} must be a NumPy array (or a CuPy array on a GPU; flat buffer of the layout), got "
            f"{type(buffer).__name__}; "
            "other array types go through upgd_ref.adapters"
        )
    if buffer.ndim != 1 or buffer.shape[0] != layout.size:
        raise ValueError(f"{name} must have shape ({layout.size},) for this layout, got {buffer.shape}")
    if buffer.dtype != layout.dtype:
        kind = "an integer" if np.issubdtype(buffer.dtype, np.integer) else "a"
        raise TypeError(f"{name} has {kind} dtype {buffer.dtype}; the layout's dtype is {layout.dtype}")
    if not buffer.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")
    address = buffer.data.ptr if cupy_array else buffer.ctypes.data
    if address % buffer.dtype.itemsize:
        raise ValueError(f"{name} is misaligned: its address is not a multiple of {buffer.dtype.itemsize} bytes")
    if writable and not cupy_array and not buffer.flags.writeable:  # CuPy arrays are always writable
        raise ValueError(f"{name} is read-only; it is updated in place")


def check_present(present, num_segments: int) -> list[bool]:
    if present is None:
        return [True] * num_segments
    if isinstance(present, np.ndarray):
        if present.ndim != 1:
            raise ValueError(f"present must be 1-D (one flag per segment), got shape {present.shape}")
        flags = list(present)
    elif isinstance(present, (list, tuple)):
        flags = list(present)
    else:
        raise TypeError(f"present must be a list, tuple or 1-D array of bools, got {type(present).__name__}")
    if len(flags) != num_segments:
        raise ValueError(f"present has {len(flags)} entries for {num_segments} segments")
    for i, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"present[{i}] must be a bool, got {type(flag).__name__}")
    return [bool(f) for f in flags]


def check_finite(name: str, buffer: np.ndarray, layout, present: list[bool], segment_ids=None) -> None:
    """NaN or Inf in a present segment is an error naming the segment (``segment_ids[i]``:
    how segment ``i`` of ``layout`` is named, its index in the whole model; default ``i``)."""
    for i, is_present in enumerate(present):
        if is_present:
            segment = buffer[layout.segment_slice(i)]
            if not np.isfinite(segment).all():
                bad = int(np.flatnonzero(~np.isfinite(segment))[0])
                named = i if segment_ids is None else segment_ids[i]
                raise NonFiniteStepError(f"{name}: segment {named} holds a non-finite value (element {bad}: "
                                         f"{segment[bad]})", field=name, segment=named, element=bad)


def check_distinct(**buffers) -> None:
    """The buffers live on one device (all host or all the same GPU) and share no memory."""
    names = list(buffers)
    first = names[0]
    for name in names[1:]:
        if describe_device(buffers[name]) != describe_device(buffers[first]):
            raise ValueError(f"{name} is on the {describe_device(buffers[name])}, {first} on the "
                             f"{describe_device(buffers[first])}; both must be on one device")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if may_share_memory(buffers[a], buffers[b]):
                raise ValueError(f"{a} and {b} share memory")


def check_not_aliased(inputs: dict, owned: dict) -> None:
    """No input buffer (``params``, ``grads``) overlaps a buffer the step keeps as its own
    state (``owned``: name -> array, e.g. ``state.utility``): the step would read values it
    has just written. Buffers on different devices cannot overlap."""
    for name, buffer in inputs.items():
        for owner, other in owned.items():
            if (array_kind(other) == array_kind(buffer) and describe_device(other) == describe_device(buffer)
                    and may_share_memory(buffer, other)):
                raise ValueError(f"{name} shares memory with {owner}, a state buffer the step updates; "
                                 f"pass a buffer of your own")
