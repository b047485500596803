r"""16-bit parameters: the precision policy (``specs/precision.md``).

A buffer of float16 or bfloat16 parameters (``ml_dtypes.bfloat16``, the type JAX uses) is
stepped in float32, its *compute dtype*: the door widens ``p`` and ``g`` exactly to float32,
runs the float32 step (any backend, the float32 noise: the float64 normals rounded once),
and rounds the new parameters once back to the parameter dtype:

    p' = round_P(p'_32)

``round_P`` is round-to-nearest-even (``rounding="nearest"``), or stochastic rounding
(``rounding="stochastic"``): with ``lo``, ``hi`` the neighbours of ``x = p'_32`` in ``P``
(``lo`` towards zero) and ``w`` a 32-bit word of the counter-based generator,

    round_P(x) = hi  if  (w + 1/2) 2**-32 < (|x| - |lo|) / (|hi| - |lo|)  else  lo

(the quotient in float64, exact operands), so ``E[round_P(x)] = x`` up to ``2**-33`` and the
result is a pure function of ``(seed, T, index)``: bit-identical on every backend. ``w`` is
word ``i mod 4`` of the Philox4x32-10 block ``i // 4`` under the noise key with counter
``(block_lo, block_hi, T_lo, T_hi | 2**31)``: ``T < 2**63`` keeps bit 31 of ``T_hi`` clear
in every noise counter, so the rounding stream never meets the noise stream.

The state ``u``, ``m``, ``v`` is float32 by default (:func:`state_dtype`), like optax's
``mu_dtype=jnp.float32`` and the master-weight practice: a 16-bit EMA with ``beta2 = 0.999``
stalls (``1 - beta2`` is below half an ulp of bfloat16's 1). ``FlatUPGDState.zeros(layout,
..., dtype=layout.dtype)`` keeps it in the parameter dtype (torch's convention), rounded to
nearest after each step.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .arrays import is_cupy_array
from .rng import philox4x32_10

__all__ = ["LOW_PRECISION", "ROUNDINGS", "bfloat16", "is_low_precision", "compute_dtype", "state_dtype",
           "finfo", "check_rounding", "array_module", "round_nearest", "rounding_words", "round_stochastic", "spacing"]

bfloat16 = np.dtype(ml_dtypes.bfloat16)
#: Parameter dtypes stepped in float32 and rounded back.
LOW_PRECISION = ("float16", "bfloat16")
ROUNDINGS = ("nearest", "stochastic")
_STREAM_BIT = 1 << 31  # set in counter word 3: the rounding stream (T_hi < 2**31 for every step)


def is_low_precision(dtype) -> bool:
    return np.dtype(dtype).name in LOW_PRECISION


def compute_dtype(dtype) -> np.dtype:
    """The dtype a buffer of ``dtype`` is stepped in: float32 for 16-bit, else itself."""
    return np.dtype(np.float32) if is_low_precision(dtype) else np.dtype(dtype)


def state_dtype(dtype) -> np.dtype:
    """The default dtype of ``u``, ``m``, ``v`` for parameters of ``dtype`` (float32 for 16-bit)."""
    return compute_dtype(dtype)


def check_rounding(rounding, where: str = "") -> str:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"{where}rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def round_nearest(values, dtype):
    """``values`` (float32) rounded to nearest-even in ``dtype`` (beyond its range: inf,
    which the door's checks refuse before anything is written)."""
    with np.errstate(over="ignore"):
        return values.astype(np.dtype(dtype))


def array_module(x):
    """NumPy, or CuPy for a CuPy array."""
    if is_cupy_array(x):
        import cupy

        return cupy
    return np


def rounding_words(seed: int, step: int, start: int, count: int, xp=np):
    """The 32-bit words of the rounding stream at noise indices ``start .. start + count - 1``,
    step ``T``: uint32 ``(count,)``. One Philox block gives the words of four indices.
    ``seed`` and ``step`` may also be uint64 scalar arrays of ``xp`` (a traced JAX step)."""
    if count == 0:
        return xp.zeros(0, dtype=xp.uint32)
    first = start // 4
    blocks = xp.arange((start + count - 1) // 4 + 1 - first, dtype=xp.uint64) + xp.uint64(first)
    counter = ((blocks & xp.uint64(0xFFFFFFFF)).astype(xp.uint32), (blocks >> xp.uint64(32)).astype(xp.uint32),
               xp.full(blocks.shape, step & 0xFFFFFFFF, dtype=xp.uint32),
               xp.full(blocks.shape, (step >> 32) | _STREAM_BIT, dtype=xp.uint32))
    words = xp.stack(philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32)), axis=1).reshape(-1)
    skip = start - 4 * first
    return words[skip : skip + count]


def round_stochastic(values, dtype, words, xp=None):
    """``values`` (float32, finite) stochastically rounded to ``dtype`` by ``words``
    (uint32, one per element): the module's definition. ``xp``: the array namespace (default
    NumPy, or CuPy for a CuPy array; the JAX adapter passes ``jax.numpy``)."""
    xp = array_module(values) if xp is None else xp
    dtype = np.dtype(dtype)
    near = values.astype(dtype)
    x = values.astype(np.float64)
    n64 = near.astype(np.float64)
    toward_zero = xp.abs(n64) > xp.abs(x)  # nearest rounded away: it is hi, lo is the next one down
    inward = xp.nextafter(near, xp.zeros_like(near))
    outward = xp.nextafter(near, xp.where(x < 0, -xp.inf, xp.inf).astype(dtype))
    lo = xp.where(toward_zero, inward, near)
    hi = xp.where(toward_zero, near, outward)
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    exact = n64 == x
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = (xp.abs(x) - xp.abs(lo64)) / (xp.abs(hi64) - xp.abs(lo64))
    up = (words.astype(np.float64) + 0.5) * 2.0**-32 < fraction
    return xp.where(exact, near, xp.where(up, hi, lo))


def finfo(dtype):
    """``np.finfo`` for every float dtype, bfloat16 included (``ml_dtypes.finfo``)."""
    return ml_dtypes.finfo(dtype) if np.dtype(dtype) == bfloat16 else np.finfo(dtype)


def spacing(values, dtype) -> np.ndarray:
    """float64 ulp of ``dtype`` at ``|values|`` (float64): the gap to the next larger
    magnitude, the smallest subnormal gap below the normal range."""
    info = finfo(dtype)
    mantissa = int(info.nmant)
    tiny = float(info.smallest_normal)
    magnitude = np.maximum(np.abs(np.asarray(values, dtype=np.float64)), tiny)
    return np.exp2(np.floor(np.log2(magnitude)) - mantissa)
