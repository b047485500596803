r"""Numba code of noise format version 2 (``specs/noise-v2.md``): version 1's Philox words
(:mod:`.numba_noise`) and the binary32 transform of :mod:`upgd_ref.rng_v2`, term for term.

Every value of the transform is a float32 and every constant a ``np.float32`` global (a
Python float literal would make Numba compute in float64); no ``fastmath``, so no FMA
contraction. The exponent split reads the binary32 exponent field instead of the
reference's binary search (both give the unique ``(k, t)``). Integer work stays below
``2**31`` so that the conversions are ``int32 -> float32`` and LLVM vectorises the pair loop
16 lanes wide.

No cached kernel lives here: the cached kernels of :mod:`.numba_step` compile this code into
themselves (its digest is recorded there, like :mod:`.numba_noise`'s).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit
from numba.core import types

from .. import rng_v2 as v2
from . import numba_noise as v1
from .numba_noise import bitcast, fill_words, prefer_512_bit_vectors

__all__ = ["log_of_uniform", "cos_sin_of_turn", "fill_normals",
           "versioned_fill_tile", "versioned_chunk_normals"]

_F = np.float32
_LN2_HI, _LN2_LO = _F(v2.LN2_HI), _F(v2.LN2_LO)
_LG1, _LG2, _LG3, _LG4 = _F(v2.LG1), _F(v2.LG2), _F(v2.LG3), _F(v2.LG4)
_SQRT2, _ONE_MINUS_SQRT_HALF = _F(v2.SQRT2), _F(v2.ONE_MINUS_SQRT_HALF)
_S1, _S2, _S3 = _F(v2.S1), _F(v2.S2), _F(v2.S3)
_C1, _C2, _C3 = _F(v2.C1), _F(v2.C2), _F(v2.C3)
_ANGLE_SCALE = _F(v2.ANGLE_SCALE)
_ZERO, _HALF, _ONE, _TWO, _MINUS_ONE, _MINUS_TWO = _F(0.0), _F(0.5), _F(1.0), _F(2.0), _F(-1.0), _F(-2.0)
_TWO_M32 = _F(2.0**-32)
_TOP_BIT = np.uint32(v2.TOP_BIT)
_ALL_BITS = np.uint32(0xFFFFFFFF)
_OCTANT_SHIFT = np.uint32(v2.OCTANT_FRACTION_BITS)
_FRACTION_MASK = np.uint32((1 << v2.OCTANT_FRACTION_BITS) - 1)
_U0, _U1, _U2, _U4 = np.uint32(0), np.uint32(1), np.uint32(2), np.uint32(4)
# IEEE-754 binary32 fields.
_EXPONENT_SHIFT = np.uint32(23)
_MANTISSA_MASK = np.uint32((1 << 23) - 1)
_EXPONENT_OF_ONE = np.uint32(127 << 23)
_EXPONENT_BIAS_PLUS_WORD_BITS = _F(127 + 32)  # u = (word + 0.5) * 2**-32 = t 2**(exponent - 127 - 32)


float32_bits = bitcast(types.float32, types.uint32)
float32_from_bits = bitcast(types.uint32, types.float32)


@njit(inline="always")
def log_of_uniform(word):
    """``ln u`` in binary32, as :func:`upgd_ref.rng_v2.log_of_uniform` (``word``: uint32)."""
    high = word >= _TOP_BIT
    h = np.uint32(word ^ _ALL_BITS) if high else word  # below 2**31 (XOR = 2**32 - 1 - word)
    x = np.float32(np.int32(h)) + _HALF
    bits = float32_bits(x)
    biased_exponent = np.float32(np.int32(bits >> _EXPONENT_SHIFT))  # float: Numba's int math is 64-bit
    t = float32_from_bits(np.uint32((bits & _MANTISSA_MASK) | _EXPONENT_OF_ONE))
    upper = t >= _SQRT2
    t = t * _HALF if upper else t
    k_low = biased_exponent - _EXPONENT_BIAS_PLUS_WORD_BITS  # exact (small integers)
    k_low = k_low + _ONE if upper else k_low
    v = x * _TWO_M32
    near_one = v < _ONE_MINUS_SQRT_HALF
    f_high = -v if near_one else _ONE - _TWO * v
    k_high = _ZERO if near_one else _MINUS_ONE
    f = f_high if high else t - _ONE
    k = k_high if high else k_low
    s = f / (_TWO + f)
    z = s * s
    w = z * z
    t1 = w * (_LG2 + w * _LG4)
    t2 = z * (_LG1 + w * _LG3)
    r = t2 + t1
    hfsq = _HALF * f * f
    return k * _LN2_HI - ((hfsq - (s * (hfsq + r) + k * _LN2_LO)) - f)


@njit(inline="always")
def cos_sin_of_turn(word):
    """``cos, sin`` of ``2 pi u`` in binary32, as :func:`upgd_ref.rng_v2.cos_sin_of_turn`."""
    # Numba computes uint32 operations in 64 bits; each result is cut back to uint32 so that
    # LLVM narrows the vector loop's integer work to 32-bit lanes (16 per 512-bit register).
    octant = np.uint32(word >> _OCTANT_SHIFT)
    low = np.uint32(word & _FRACTION_MASK)
    odd = np.uint32(octant & _U1) != _U0
    reduced = np.uint32(low ^ _FRACTION_MASK) if odd else low  # XOR = mask - low
    a = np.float32(np.int32(np.uint32((reduced << _U1) | _U1))) * _ANGLE_SCALE
    z = a * a
    s = a + (((_S3 * z + _S2) * z + _S1) * z) * a
    c = ((((_C3 * z + _C2) * z + _C1) * z) * z - _HALF * z) + _ONE
    # the reference's swap and sign bits as XORs of octant bits (equal; no adds to narrow)
    swap = np.uint32((octant ^ np.uint32(octant >> _U1)) & _U1) != _U0  # octants 1, 2, 5, 6
    cos_negative = np.uint32((octant ^ np.uint32(octant >> _U1)) & _U2) != _U0  # octants 2..5
    sin_negative = octant >= _U4  # octants 4..7
    cos_magnitude = s if swap else c
    sin_magnitude = c if swap else s
    cos = -cos_magnitude if cos_negative else cos_magnitude
    sin = -sin_magnitude if sin_negative else sin_magnitude
    return cos, sin


@njit(error_model="numpy")
def fill_normals(tile, words):
    """Box-Muller in binary32 on word pairs: ``(tile[2i], tile[2i + 1]) = r (cos, sin)``,
    stored in the tile's dtype (a float64 tile holds the float32 normals exactly)."""
    prefer_512_bit_vectors()
    for i in range(tile.size // 2):
        radius = math.sqrt(_MINUS_TWO * log_of_uniform(words[2 * i]))
        cos, sin = cos_sin_of_turn(words[2 * i + 1])
        tile[2 * i] = radius * cos
        tile[2 * i + 1] = radius * sin


@njit(inline="always", error_model="numpy")
def versioned_fill_tile(noise_v2, tile, first_block, step_lo, step_hi, key0, key1):
    """``tile[4b + lane]`` = lane ``lane`` of block ``first_block + b`` in noise format 1
    (``noise_v2`` is ``None``) or 2 (``True``), ``tile.size`` a multiple of 4. Inlined into its
    callers: no compilation level of its own (``specs/kernels.md`` §7)."""
    words = np.empty(tile.size, dtype=np.uint32)
    fill_words(words, first_block, step_lo, step_hi, key0, key1)  # the same Philox words in both formats
    if noise_v2 is None:
        v1.fill_normals(tile, words)
    else:
        fill_normals(tile, words)


@njit(error_model="numpy")
def versioned_chunk_normals(noise_v2, logical_start, count, dtype_example, step_lo, step_hi, key0, key1):
    """``(tile, skip)``: ``tile[skip + j]`` is the normal of logical index ``logical_start + j``
    in noise format 1 (``noise_v2`` is ``None``, :mod:`.numba_noise`) or 2 (``True``).

    The tile covers whole blocks, ``4 * ceil((skip + count) / 4)`` values with
    ``skip = logical_start % 4``, in the dtype of the array ``dtype_example``: ``tile[4b + lane]``
    is lane ``lane`` of block ``logical_start // 4 + b``. Two loops, each from 0 over contiguous
    arrays so that LLVM vectorises it: the Philox words, then the transform (apart, the
    transform's registers stay free of the key schedule: about 10% faster). Numba prunes the
    ``is None`` branch at compile time for a ``None`` argument, so a format-1 kernel neither
    compiles nor contains the format-2 code. One function, no wrappers: every level of calls
    is a compilation of its own (``specs/kernels.md`` §7).
    """
    skip = logical_start % 4
    tile = np.empty(4 * ((skip + count + 3) // 4), dtype_example.dtype)
    versioned_fill_tile(noise_v2, tile, np.uint64(logical_start) // np.uint64(4), step_lo, step_hi, key0, key1)
    return tile, skip
