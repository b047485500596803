"""64-bit state values as pairs of uint32 words (``specs/adapters-jax.md`` §5.1).

JAX narrows int64/float64 arrays to 32 bits when ``jax_enable_x64`` is off (the default), so
a state leaf of those types does not survive pickle, ``np.savez``, orbax or a wrapper that
rebuilds leaves. The states therefore keep every 64-bit value ``x`` as its two 32-bit words
``[lo, hi]`` in a trailing axis of length 2: an integer as ``x mod 2**32``, ``x >> 32``; a
float64 as the two halves of its IEEE-754 bit pattern, which is exact for every value
(NaN payloads and signed zeros included). The step joins the words into int64/float64
inside :func:`.leaves.x64_scope` and splits its results again, so the arithmetic is the
core's float64/int64 arithmetic in both x64 modes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MASK32 = 0xFFFFFFFF


def _join64(words):
    wide = words.astype(jnp.uint64)
    return wide[..., 0] | (wide[..., 1] << jnp.uint64(32))


def _split64(bits):
    return jnp.stack([(bits & jnp.uint64(_MASK32)).astype(jnp.uint32), (bits >> jnp.uint64(32)).astype(jnp.uint32)],
                     axis=-1)


def join_uint(words):
    """uint64 values of ``[lo, hi]`` words (e.g. the seed; inside ``x64_scope``)."""
    return _join64(words)


def join_int(words):
    """int64 values of ``[lo, hi]`` words (traced or concrete; inside ``x64_scope``)."""
    return _join64(words).astype(jnp.int64)


def split_int(values):
    """``[lo, hi]`` uint32 words of int64 ``values`` (two's complement; inside ``x64_scope``)."""
    return _split64(jnp.asarray(values, dtype=jnp.int64).astype(jnp.uint64))


def join_float(words):
    """float64 values whose bit patterns are the ``[lo, hi]`` words (inside ``x64_scope``)."""
    return jax.lax.bitcast_convert_type(_join64(words), jnp.float64)


def split_float(values):
    """``[lo, hi]`` uint32 words of the bit patterns of float64 ``values`` (inside ``x64_scope``)."""
    return _split64(jax.lax.bitcast_convert_type(jnp.asarray(values, dtype=jnp.float64), jnp.uint64))


def host_words(values) -> np.ndarray:
    """NumPy ``[lo, hi]`` uint32 words of int64 or float64 NumPy ``values`` (no JAX, any byte order)."""
    values = np.asarray(values)
    values = values if values.dtype == np.float64 else values.astype(np.int64)
    bits = values.reshape(values.shape).view(np.uint64)
    return np.stack([(bits & _MASK32).astype(np.uint32), (bits >> np.uint64(32)).astype(np.uint32)], axis=-1)


def host_int(words) -> np.ndarray:
    """NumPy int64 values of ``[lo, hi]`` words."""
    words = np.asarray(words, dtype=np.uint64)
    return np.asarray(words[..., 0] | (words[..., 1] << np.uint64(32))).view(np.int64)


def host_float(words) -> np.ndarray:
    """NumPy float64 values whose bit patterns are the ``[lo, hi]`` words."""
    words = np.asarray(words, dtype=np.uint64)
    return np.asarray(words[..., 0] | (words[..., 1] << np.uint64(32))).view(np.float64)
