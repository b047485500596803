r"""Numba code of the counter-based standard normals (``specs/noise.md``), :mod:`upgd_ref.rng`
term for term (same expressions, same order, so the same bits; ``specs/kernels.md`` §4):

* Philox words live in uint64 lanes holding values below ``2**32``, so
  ``mulhilo32(a, M) = (a*M >> 32, a*M & 0xFFFFFFFF)`` is one exact 64-bit product (LLVM
  turns it into ``vpmuludq`` and vectorises the block loop);
* ``ln``, ``sin`` and ``cos`` are the fdlibm kernels of :mod:`upgd_ref.rng`; no ``fastmath``
  (so no FMA contraction); the exponent split of ``ln`` reads the IEEE-754 exponent field
  instead of the reference's binary search (both give the unique ``(k, t)`` with
  ``u = t 2**k``, ``t`` in ``[SQRT_HALF, SQRT2)``, exactly);
* float32 normals are the float64 normals rounded once (``fptrunc``, round to nearest).

No cached kernel lives here: the cached kernels of :mod:`.numba_step` compile this code
into themselves, through :func:`.numba_noise_v2.versioned_chunk_normals` (the tile of a chunk
in either format).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from ..rng import (
    C1, C2, C3, C4, C5, C6, LG1, LG2, LG3, LG4, LG5, LG6, LG7, LN2_HI, LN2_LO,
    OCTANT_FRACTION_BITS, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1,
    PI_OVER_4, S1, S2, S3, S4, S5, S6, SQRT2,
)

__all__ = [
    "philox4x32_10", "log_of_uniform", "kernel_sin", "kernel_cos", "cos_sin_of_turn",
    "fill_words", "fill_normals", "prefer_512_bit_vectors",
]

# uint64 constants: Numba types a Python int literal as int64, and uint64 op int64 is float64.
_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_M0 = np.uint64(PHILOX_M0)
_M1 = np.uint64(PHILOX_M1)
_W0 = np.uint64(PHILOX_W0)
_W1 = np.uint64(PHILOX_W1)
_ONE = np.uint64(1)
_TWO = np.uint64(2)
_FOUR = np.uint64(4)
_OCTANT_SHIFT = np.uint64(OCTANT_FRACTION_BITS)
_FRACTION_MASK = np.uint64((1 << OCTANT_FRACTION_BITS) - 1)
_FRACTION_SCALE = 2.0**-OCTANT_FRACTION_BITS
# IEEE-754 binary64 fields.
_EXPONENT_SHIFT = np.uint64(52)
_MANTISSA_MASK = np.uint64((1 << 52) - 1)
_EXPONENT_OF_ONE = np.uint64(1023 << 52)
_EXPONENT_BIAS = 1023
_WORD_BITS = 32  # u = (word + 0.5) * 2**-32


def bitcast(source, target):
    """A Numba intrinsic reinterpreting a ``source`` value's IEEE-754 bits as ``target`` (a free
    bitcast, e.g. float64 <-> uint64)."""

    @intrinsic
    def cast(typingctx, x):
        if x != source:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return cast


@intrinsic
def prefer_512_bit_vectors(typingctx):
    """Marks the calling function ``"prefer-vector-width"="512"`` and ``noinline`` (LLVM
    function attributes).

    LLVM tunes Intel server CPUs (Skylake-X .. Emerald Rapids) to prefer 256-bit vectors, so
    it vectorises 8 lanes wide; 16 lanes run noise format 2's float32 transform about 2x
    faster (``specs/noise-v2.md`` §7). Inlined into a caller, a loop would take the caller's
    preference, hence ``noinline`` (one call per tile). Instruction selection only, never a
    result. llvmlite's attribute set lists only enumerated attributes, hence ``set.add``.
    """

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        builder.function.attributes.add("noinline")
        return context.get_dummy_value()

    return types.none(), codegen


float64_bits = bitcast(types.float64, types.uint64)
float64_from_bits = bitcast(types.uint64, types.float64)


@njit(inline="always")
def mulhilo32(a, multiplier):
    """``(a * multiplier) >> 32`` and ``(a * multiplier) mod 2**32`` for uint64 values < 2**32."""
    product = a * multiplier
    return product >> _SHIFT32, product & _MASK32


@njit(inline="always")
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on one counter; words and key as uint64 values below ``2**32``."""
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = mulhilo32(c0, _M0)
        hi1, lo1 = mulhilo32(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@njit(inline="always")
def log_of_uniform(word):
    """``ln u`` for ``u = (word + 0.5) 2**-32``: fdlibm's log kernel, as in :mod:`upgd_ref.rng`.

    ``word + 0.5 = t 2**(k + 32)`` with ``t`` in ``[SQRT_HALF, SQRT2)``: ``t`` is the
    mantissa with the exponent of 1, halved (and ``k`` raised) when it is ``>= SQRT2``.
    """
    bits = float64_bits(np.float64(word) + 0.5)
    exponent = np.int64(bits >> _EXPONENT_SHIFT) - _EXPONENT_BIAS
    t = float64_from_bits((bits & _MANTISSA_MASK) | _EXPONENT_OF_ONE)
    upper = t >= SQRT2
    t = t * 0.5 if upper else t
    k = np.float64(exponent + (1 if upper else 0) - _WORD_BITS)
    f = t - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    return k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)


@njit(inline="always")
def kernel_sin(x):
    """fdlibm ``__kernel_sin`` on ``[-pi/4, pi/4]`` (tail term omitted, as in the reference)."""
    z = x * x
    v = z * x
    r = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))
    return x + v * (S1 + z * r)


@njit(inline="always")
def kernel_cos(x):
    """fdlibm ``__kernel_cos`` on ``[-pi/4, pi/4]`` (tail term omitted, as in the reference)."""
    z = x * x
    r = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))))
    return 1.0 - (0.5 * z - z * r)


@njit(inline="always")
def cos_sin_of_turn(word):
    """``cos, sin`` of ``2 pi u``: octant from the top 3 bits, odd octants reflected."""
    octant = word >> _OCTANT_SHIFT
    low = word & _FRACTION_MASK
    odd = (octant & _ONE) == _ONE
    reduced = _FRACTION_MASK - low if odd else low
    a = ((np.float64(reduced) + 0.5) * _FRACTION_SCALE) * PI_OVER_4
    s = kernel_sin(a)
    c = kernel_cos(a)
    swap = (((octant + _ONE) >> _ONE) & _ONE) == _ONE  # octants 1, 2, 5, 6
    cos_negative = (((octant + _TWO) >> _TWO) & _ONE) == _ONE  # octants 2..5
    sin_negative = (octant >> _TWO) == _ONE  # octants 4..7
    cos_magnitude = s if swap else c
    sin_magnitude = c if swap else s
    cos = -cos_magnitude if cos_negative else cos_magnitude
    sin = -sin_magnitude if sin_negative else sin_magnitude
    return cos, sin


@njit(error_model="numpy")
def fill_words(words, first_block, step_lo, step_hi, key0, key1):
    """``words[4b + k]`` = word ``k`` of Philox block ``first_block + b`` (``first_block``:
    uint64; ``words``: uint32, ``size % 4 == 0``), for noise formats 1 and 2, 512 bits wide."""
    prefer_512_bit_vectors()
    for b in range(words.size // 4):
        block = first_block + np.uint64(b)
        w0, w1, w2, w3 = philox4x32_10(block & _MASK32, block >> _SHIFT32, step_lo, step_hi, key0, key1)
        words[4 * b] = w0
        words[4 * b + 1] = w1
        words[4 * b + 2] = w2
        words[4 * b + 3] = w3


@njit(error_model="numpy")
def fill_normals(tile, words):
    """Box-Muller on word pairs: ``(tile[2i], tile[2i + 1]) = r (cos, sin)`` with
    ``r = sqrt(-2 ln u(words[2i]))`` and the angle from ``words[2i + 1]``.

    Pairs ``(w0, w1)`` and ``(w2, w3)`` of a block give its lanes 0, 1 and 2, 3.
    """
    for i in range(tile.size // 2):
        radius = math.sqrt(-2.0 * log_of_uniform(np.uint64(words[2 * i])))
        cos, sin = cos_sin_of_turn(np.uint64(words[2 * i + 1]))
        tile[2 * i] = radius * cos
        tile[2 * i + 1] = radius * sin
