r"""16-bit leaves (``specs/precision.md``, ``specs/adapters-jax.md`` §5.2): the dtype policy at
the boundaries of a step.

A float16 or bfloat16 leaf is stepped in float32, its compute dtype: the step widens ``p``,
``g`` (and a 16-bit state) exactly to float32, runs the core's float32 step, and rounds the
new parameters **once** to the leaf's dtype,

    p' = round_P(p'_32)            (to nearest, or stochastically: ``rounding``)

and a 16-bit state to nearest. The state dtype of a leaf of dtype ``P`` is
``upgd_ref.precision.state_dtype(P)`` (float32 for 16-bit, ``P`` otherwise) or, with
``state_dtype="params"``, ``P`` itself. The rounding words are the core's
(:func:`upgd_ref.precision.rounding_words` on ``jax.numpy``), so a stochastically rounded
step has the bits the core's door gives for the same seed, step and element.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from upgd_ref import precision as _precision

from .words import join_uint

STATE_DTYPES = (None, "params")


def check_state_dtype(state_dtype):
    """``state_dtype``: ``None`` (float32 state for 16-bit leaves) or ``"params"`` (each leaf's dtype)."""
    if state_dtype is not None and (not isinstance(state_dtype, str) or state_dtype not in STATE_DTYPES):
        raise ValueError(f"state_dtype must be None (float32 state for 16-bit leaves) or 'params' (the leaf's "
                         f"dtype), got {state_dtype!r}")
    return state_dtype


def state_dtype_of(dtype, state_dtype) -> np.dtype:
    """The dtype of ``u``, ``m``, ``v`` for a leaf of ``dtype`` under the ``state_dtype`` option."""
    return np.dtype(dtype) if state_dtype == "params" else _precision.state_dtype(dtype)


def computed(leaves) -> list:
    """The leaves in their compute dtype: 16-bit ones widened (exactly) to float32, others as they are."""
    return [leaf.astype(_precision.compute_dtype(leaf.dtype)) for leaf in leaves]


def rounded(values, like) -> list:
    """``values`` rounded to nearest in the dtypes of ``like`` (the identity where they agree)."""
    return [v.astype(l.dtype) for v, l in zip(values, like)]


def rounded_params(values, like, rounding: str, seed_words, step) -> list:
    """New parameters ``values`` (compute dtype) rounded once to the dtypes of ``like``:
    to nearest, or (``rounding="stochastic"``, 16-bit leaves) by the core's rounding stream at
    each element's noise index under the key ``seed_words`` (uint32 ``[lo, hi]``) and step
    ``step`` (call inside ``x64_scope``)."""
    if rounding == "nearest":
        return rounded(values, like)
    seed = join_uint(seed_words)
    step = jnp.asarray(step).astype(jnp.uint64)
    out, start = [], 0
    for value, leaf in zip(values, like):
        size = math.prod(leaf.shape)
        if _precision.is_low_precision(leaf.dtype):
            words = _precision.rounding_words(seed, step, start, size, xp=jnp)
            flat = _precision.round_stochastic(value.reshape(-1), leaf.dtype, words, xp=jnp)
            out.append(flat.reshape(leaf.shape))
        else:
            out.append(value.astype(leaf.dtype))
        start += size
    return out
