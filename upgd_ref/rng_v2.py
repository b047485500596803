"""Noise format version 2: the Box-Muller transform in IEEE binary32 (``specs/noise-v2.md``).

The Philox words, counter, key and lanes are version 1's (:mod:`upgd_ref.rng`,
``specs/noise.md`` §2-§4); only the transform of a word pair differs: every value from the
words to the normal is a float32, every operation a correctly rounded binary32 ``+ - * /``,
``sqrt``, a comparison or a selection, in the order written here (no fused multiply-add).
The float64 normal of version 2 is the float32 normal, widened exactly.

The radius never forms ``u`` near 1 (a float32 cannot hold ``1 - 2**-33``): a word with its
top bit set gives ``v = 1 - u`` from its complement and ``ln u = ln(1 - v)`` (``log1p``
form), so the radius stays accurate to a few ulps down to ``r = 2**-16``; a word with its
top bit clear gives ``u`` itself, and word 0 the full ``u = 2**-33`` (largest ``|Z|`` as in
version 1). The exponent split is the exact binary search of version 1 (ports may read the
binary32 exponent field instead: the split is unique).

Array-API code (uint32 and float32 only), like :mod:`upgd_ref.rng`.
"""

from __future__ import annotations

from .rng import OCTANT_FRACTION_BITS, as_u32, box_muller_lanes, exponent_split, octant_cos_sin, octant_reduction

__all__ = ["log_of_uniform", "cos_sin_of_turn", "normals_from_words", "TOP_BIT", "OCTANT_FRACTION_BITS"]

_f = float.fromhex  # every constant is a binary32 value, given exactly in hex

# FreeBSD e_logf.c: ln 2 split so that k * LN2_HI is exact (17 significant bits, |k| <= 33),
# and its degree-4 polynomial for float.
LN2_HI = _f("0x1.62e300p-1")
LN2_LO = _f("0x1.2fefa2p-17")
LG1 = _f("0x1.555554p-1")
LG2 = _f("0x1.999c26p-2")
LG3 = _f("0x1.23d3dcp-2")
LG4 = _f("0x1.f13c4cp-3")
SQRT2 = _f("0x1.6a09e6p+0")  # binary32 below sqrt(2)
SQRT_HALF = _f("0x1.6a09e6p-1")  # SQRT2 / 2 exactly
ONE_MINUS_SQRT_HALF = _f("0x1.2bec34p-2")  # binary32 nearest 1 - sqrt(1/2)
# Cephes sinf.c / cosf.c polynomials on [-pi/4, pi/4], rounded to binary32.
S1 = _f("-0x1.555546p-3")
S2 = _f("0x1.11073cp-7")
S3 = _f("-0x1.9943f2p-13")
C1 = _f("0x1.55554ap-5")
C2 = _f("-0x1.6c0c34p-10")
C3 = _f("0x1.99eb9cp-16")
#: ``binary32(pi/4) * 2**-30``: the angle of ``2 * reduced + 1`` inside an octant.
ANGLE_SCALE = _f("0x1.921fb6p-31")
TOP_BIT = 0x80000000


def _log_kernel(k, f):
    """``k ln 2 + ln(1 + f)`` for ``f`` in ``[sqrt(1/2) - 1, sqrt(2) - 1)`` (e_logf.c's form)."""
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * LG4)
    t2 = z * (LG1 + w * LG3)
    r = t2 + t1
    hfsq = 0.5 * f * f
    return k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)


def log_of_uniform(xp, word):
    """``ln u``, ``u = (word + 0.5) 2**-32``, in binary32 (``specs/noise-v2.md`` §3)."""
    high = word >= as_u32(xp, TOP_BIT)
    h = xp.where(high, as_u32(xp, 0xFFFFFFFF) - word, word)  # < 2**31: word, or 2**32 - 1 - word
    x = xp.astype(h, xp.float32) + 0.5  # one rounding each; exact for h < 2**23
    # top bit clear: u = x 2**-32 = t 2**k exactly, t in [SQRT2 / 2, SQRT2)
    t, k = exponent_split(xp, x, SQRT2, SQRT_HALF)
    # top bit set: v = 1 - u = x 2**-32, ln u = ln(1 - v) = k ln 2 + ln(1 + f)
    v = x * 2.0**-32
    near_one = v < ONE_MINUS_SQRT_HALF
    f_high = xp.where(near_one, -v, 1.0 - 2.0 * v)  # 1 - 2v is exact (Sterbenz)
    k_high = xp.where(near_one, xp.zeros_like(v), xp.full_like(v, -1.0))
    f = xp.where(high, f_high, t - 1.0)
    k = xp.where(high, k_high, k - 32.0)
    return _log_kernel(k, f)


def _kernel_sin(a):
    z = a * a
    return a + ((((S3 * z + S2) * z + S1) * z) * a)


def _kernel_cos(a):
    z = a * a
    return ((((C3 * z + C2) * z + C1) * z) * z - 0.5 * z) + 1.0


def cos_sin_of_turn(xp, word):
    """``cos, sin`` of ``2 pi u`` in binary32: format 1's octant reduction on the integer."""
    octant, reduced = octant_reduction(xp, word)
    one = as_u32(xp, 1)
    a = xp.astype(reduced * as_u32(xp, 2) + one, xp.float32) * ANGLE_SCALE  # 0 < a < pi/4
    return octant_cos_sin(xp, octant, _kernel_sin(a), _kernel_cos(a))


def normals_from_words(xp, w0, w1, w2, w3):
    """Four float32 normals per Philox block, in lane order (``specs/noise.md`` §4)."""
    return box_muller_lanes(xp, log_of_uniform, cos_sin_of_turn, w0, w1, w2, w3)
