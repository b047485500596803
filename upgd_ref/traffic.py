r"""Bytes per parameter that one step moves to and from main memory (``specs/kernels.md`` §5).

Counted per logical element, each buffer line read once and, when written, written back
once (the chunk's second touches and the noise tile stay in L1/L2). With ``c`` the bytes of
the compute dtype (float32 for 16-bit parameters), ``s`` of the parameters' storage dtype,
``t`` of the state's, ``k`` the state streams (3 with moments: ``u``, ``m``, ``v``; 1 without)
and ``vgs`` whether the gradient is scaled (``f != 1``, written back)::

    pass 1 (read-only):    reads  g, p, u (, m, v)          (2 + k) c
    pass 2:                reads  g, p, u (, m, v)          (2 + k) c
                           writes p, u (, m, v) (, g)       (1 + k + vgs) c
    16-bit, before:        p, g (and a 16-bit u, m, v) copied to float32:     2 (s + c) (+ 3 (t + c))
    16-bit, after:         p (and g) rounded into new arrays, then written:   (1 + vgs) (c + 3 s)
                           a 16-bit u, m, v rounded, checked finite, written: 3 (c + 4 t + 2)

The 16-bit copies cover all three state buffers whatever the member (``upgd_ref.parts``).
:func:`kernel_floor` is what the same two passes would move if they read and wrote the
storage dtypes directly (no copies): ``(2 + k)(s or t)`` per pass and the writes in the
storage dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .family import member
from .precision import compute_dtype, is_low_precision

__all__ = ["Traffic", "step_traffic", "kernel_floor", "fused_adam_bytes", "copy_bytes"]

_STATE_BUFFERS = 3  # u, m, v: what the 16-bit copies move, whatever the member


class Traffic(NamedTuple):
    """Bytes per parameter of one step, by phase."""

    widen: int  # 16-bit: float32 copies of p, g (and a 16-bit state) before pass 1
    pass1_read: int
    pass2_read: int
    pass2_write: int
    narrow: int  # 16-bit: the new values rounded to the caller's dtypes, checked and written

    @property
    def total(self) -> int:
        return sum(self)


def _streams(member_name: str) -> int:
    """State streams the passes read and write: ``u`` (and ``m``, ``v`` with moments)."""
    return 3 if member(member_name).moments == "adam" else 1


def _passes(params: int, state: int, streams: int, vgs: bool) -> tuple[int, int, int]:
    """``(pass 1 reads, pass 2 reads, pass 2 writes)`` with ``params`` bytes for p and g and
    ``state`` bytes for each state stream."""
    reads = 2 * params + streams * state
    return reads, reads, (1 + int(vgs)) * params + streams * state


def _sizes(dtype, state_dtype) -> tuple[int, int, int]:
    """``(c, s, t)``: bytes of the compute, parameter and state dtypes."""
    dtype = np.dtype(dtype)
    state = dtype if state_dtype is None else np.dtype(state_dtype)
    allowed = dict.fromkeys((dtype, compute_dtype(dtype)))
    if state not in allowed:
        raise ValueError(f"a {dtype.name} step keeps its state in {' or '.join(d.name for d in allowed)}, "
                         f"got {state.name}")
    return compute_dtype(dtype).itemsize, dtype.itemsize, state.itemsize


def step_traffic(member_name: str, dtype, state_dtype=None, vgs: bool = False) -> Traffic:
    """The bytes per parameter one step of ``member_name`` moves as implemented, by phase.

    ``dtype``: the parameters' dtype; ``state_dtype``: the state's (``None``: the parameters';
    float32 for 16-bit parameters with a float32 state); ``vgs``: the gradient scaled.
    """
    c, s, t = _sizes(dtype, state_dtype)
    streams = _streams(member_name)
    widen = narrow = 0
    if is_low_precision(dtype):
        state_copied = t != c
        widen = 2 * (s + c) + (_STATE_BUFFERS * (t + c) if state_copied else 0)
        narrow = (1 + int(vgs)) * (c + 3 * s) + (_STATE_BUFFERS * (c + 4 * t + 2) if state_copied else 0)
    return Traffic(widen, *_passes(c, c, streams, vgs), narrow)  # the passes run on compute-dtype buffers


def kernel_floor(member_name: str, dtype, state_dtype=None, vgs: bool = False) -> int:
    """Bytes per parameter of the two passes reading and writing the storage dtypes directly."""
    _, s, t = _sizes(dtype, state_dtype)
    return sum(_passes(s, t, _streams(member_name), vgs))


def fused_adam_bytes(dtype) -> int:
    """A fused Adam step: reads ``p``, ``g``, ``m``, ``v``, writes ``p``, ``m``, ``v``."""
    return 7 * np.dtype(dtype).itemsize


def copy_bytes(nbytes: int) -> int:
    """Bytes a copy of an ``nbytes`` buffer moves: read once, written once."""
    return 2 * nbytes
