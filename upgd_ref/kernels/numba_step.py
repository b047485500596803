r"""Numba kernels of one fused VGS + AdaptiveUPGD step on flat buffers (``specs/kernels.md``).

Work is split into *chunks*: runs of at most :data:`CHUNK` consecutive elements of one
segment (a fixed size, so the split never depends on the thread count). A chunk table is an
int64 array ``(C, 4)`` whose columns are :data:`SEGMENT`, :data:`START` (index into the flat
buffer), :data:`LENGTH` and :data:`LOGICAL` (logical index of the first element: the noise
counter). Each kernel exists twice, ``*_serial`` and ``*_parallel``: distinct top-level
functions (distinct cache entries) over the same per-chunk helper, so their results are
identical.

Pass 1, per chunk of a present segment, one read-only sweep: the new traces of ``f g`` in
registers (nothing is written, so a step refused by the finiteness checks of
``specs/algorithm.md`` §8 leaves every buffer as it was)::

    u' = beta_u u + (1 - beta_u)(-f g p),   m' = beta1 m + (1 - beta1) f g,   v' = beta2 v + (1 - beta2) (f g)^2
    d  = m'/bc1 / (sqrt(v'/bc2) + eps)   (f g without moments)
    partial[c] = (sum f g, sum (f g)^2 [float64], min u', max u', max |p|, max |d|, #non-finite)

Pass 2, per chunk of a present segment, with the segment's coefficients and the global
``U_lo`` and ``1 / (U_hi - U_lo + 1e-8)``: pass 1's ``f g``, ``u'``, ``m'``, ``v'`` again (the
same operations, so the same bits), written once, and the update; the normals ``xi`` are
generated per chunk into an L1-resident tile, and not at all when ``std == 0``::

    x = clip((u'/cu - U_lo) / (U_hi - U_lo + 1e-8), 0, 1),   su = 1 / (1 + exp(-2 (x - 1/2)))
    p <- p (1 - lr wd) - lr (d + std xi) (1 - su)

Other members of the UPGD family (``specs/algorithm.md`` §7, ``specs/kernels.md`` §1.1): a
run-time ``moments_none`` in pass 1 (``u`` only; ``m`` and ``v`` not read), and pass 2 is
``family_pass2_*`` with a run-time ``mode`` (OR of :data:`MOMENTS_NONE`,
:data:`PROTECTION_MAX`, :data:`NOISE_TERMS`), ``step = update_factor lr`` in the ``LR``
column and :func:`family_param` per element. The production member keeps ``pass2_*``.

The normals are those of :mod:`upgd_ref.rng`, evaluated term for term (same expressions, same
order, so the same bits; ``specs/kernels.md`` §4):

* Philox words live in uint64 lanes holding values below ``2**32``, so
  ``mulhilo32(a, M) = (a*M >> 32, a*M & 0xFFFFFFFF)`` is one exact 64-bit product (LLVM
  turns it into ``vpmuludq`` and vectorises the block loop);
* ``ln``, ``sin`` and ``cos`` are the fdlibm kernels of :mod:`upgd_ref.rng`; no ``fastmath``
  (so no FMA contraction); the exponent split of ``ln`` reads the IEEE-754 exponent field
  instead of the reference's binary search (both give the unique ``(k, t)`` with
  ``u = t 2**k``, ``t`` in ``[SQRT_HALF, SQRT2)``, exactly);
* float32 normals are the float64 normals rounded once (``fptrunc``, round to nearest).

Every cached kernel and everything it inlines lives in this one file: Numba's on-disk cache
is keyed by the content of the kernel's own source file, so code inlined from another file
could go stale unnoticed.

Also: the VGS scaling and statistics on their own (``scale_*``, ``moments_*``), the noise on
its own (``noise_*``), a finiteness scan (``nonfinite_*``) and the serial combination of the
chunk partials (``segment_reductions``). Element-wise arithmetic runs in the
buffers' dtype with coefficients already rounded to it; float64 appears in float32 kernels
only in the sums and inside the normal generator (whose float64 result is rounded once).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic, overload

from ..rng import (
    C1, C2, C3, C4, C5, C6, LG1, LG2, LG3, LG4, LG5, LG6, LG7, LN2_HI, LN2_LO,
    OCTANT_FRACTION_BITS, PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1,
    PI_OVER_4, S1, S2, S3, S4, S5, S6, SQRT2,
)
from .chunk_abi import (  # the tables' layout, shared with the CUDA kernels
    BAD, BETA1, BETA2, BETA_U, CHUNK, DECAY, EPS, INV_BC1, INV_BC2, INV_CU, LENGTH, LOGICAL, LR, MAX_D, MAX_P,
    MAX_U, MIN_U, MOMENTS_NONE, NOISE_TERMS, NUM_COEFFICIENTS, NUM_PARTIALS, ONE_MINUS_BETA1, ONE_MINUS_BETA2,
    ONE_MINUS_BETA_U, PROTECTION_MAX, SEGMENT, START, STD, SUM, SUM_SQ, TANH_FLOAT32, TANH_FLOAT64,
)

__all__ = [
    "philox4x32_10", "fill_words", "fill_normals", "fill_tile", "chunk_normals",
    "CHUNK",
    "LANES",
    "SEGMENT", "START", "LENGTH", "LOGICAL",
    "BETA_U", "ONE_MINUS_BETA_U", "BETA1", "ONE_MINUS_BETA1", "BETA2", "ONE_MINUS_BETA2",
    "DECAY", "LR", "EPS", "INV_CU", "INV_BC1", "INV_BC2", "STD", "NUM_COEFFICIENTS",
    "SUM", "SUM_SQ", "MIN_U", "MAX_U", "MAX_P", "MAX_D", "BAD", "NUM_PARTIALS",
    "tanh_half_unit",
    "protection",
    "pass1_serial", "pass1_parallel",
    "pass2_serial", "pass2_parallel",
    "MOMENTS_NONE", "PROTECTION_MAX", "NOISE_TERMS",
    "max_protection", "family_param",
    "family_pass2_serial", "family_pass2_parallel",
    "scale_serial", "scale_parallel",
    "moments_serial", "moments_parallel",
    "noise_serial", "noise_parallel",
    "nonfinite_serial", "nonfinite_parallel",
    "segment_reductions",
    "KERNELS",
]

LANES = 64  # independent accumulators per reduction (SIMD-friendly, fixed summation order)
_BLOCK = 4 * LANES  # elements combined in registers per update of the lane accumulators
_TILE = 4 * _BLOCK  # pass 1's tiles: 4 KiB each in float32 (all four in L1), whole blocks

@intrinsic
def like(typingctx, value, example):
    """``value`` converted to the type of the scalar ``example`` (constants in float32 code)."""
    target = types.unliteral(example)
    source = types.unliteral(value)

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[0], source, target)

    return target(value, example), codegen


# --- noise: upgd_ref.rng term for term ----------------------------------------------

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


@intrinsic
def float64_bits(typingctx, x):
    """The IEEE-754 bit pattern of a float64 as uint64 (a free bitcast)."""
    if x != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint64))

    return types.uint64(types.float64), codegen


@intrinsic
def float64_from_bits(typingctx, bits):
    """The float64 whose IEEE-754 bit pattern is ``bits`` (a free bitcast)."""
    if bits != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return types.float64(types.uint64), codegen


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
    uint64; ``words``: uint32, ``size % 4 == 0``)."""
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


@njit(error_model="numpy")
def fill_tile(tile, first_block, step_lo, step_hi, key0, key1):
    """``tile[4b + lane]`` = lane ``lane`` of block ``first_block + b`` (``tile.size % 4 == 0``).

    Two loops, each starting at 0 over contiguous arrays so that LLVM vectorises it (8 lanes
    per 512-bit register): the Philox words, then the transform. Splitting them keeps the
    transform's registers free of the Philox key schedule (fewer spills: about 10% faster).
    """
    words = np.empty(tile.size, dtype=np.uint32)
    fill_words(words, first_block, step_lo, step_hi, key0, key1)
    fill_normals(tile, words)


@njit(error_model="numpy")
def chunk_normals(logical_start, count, dtype_example, step_lo, step_hi, key0, key1):
    """``(tile, skip)``: ``tile[skip + j]`` is the normal of logical index ``logical_start + j``.

    The tile covers whole blocks, ``4 * ceil((skip + count) / 4)`` values with
    ``skip = logical_start % 4``; its dtype is that of ``dtype_example`` (an array).
    """
    skip = logical_start % 4
    num_blocks = (skip + count + 3) // 4
    tile = np.empty(4 * num_blocks, dtype_example.dtype)
    fill_tile(tile, np.uint64(logical_start) // _FOUR, step_lo, step_hi, key0, key1)
    return tile, skip


# --- element-wise math (scalars, inlined into the loops) -------------------------------


@njit(inline="always")
def ema(beta, old, one_minus_beta, term):
    """``beta * old + (1 - beta) * term`` with both coefficients given in the dtype."""
    return beta * old + one_minus_beta * term


@njit(inline="always")
def is_float32(x):
    """Whether ``x`` is a float32 (a constant LLVM folds: ``1 + 2**-30`` rounds to 1 only there)."""
    return like(1.0 + 2.0**-30, x) == like(1.0, x)


@njit(inline="always")
def two_chain_horner(high, low, y):
    """``P(y) = H(y) y**n + L(y)``, ``n = len(low)``, coefficients given highest degree first.

    Two independent Horner chains, each short enough for LLVM to unroll (a loop left in the
    element loop would stop it from vectorising), and half as long a dependency chain.
    """
    total_high = like(0.0, y)
    for coefficient in high:
        total_high = total_high * y + like(coefficient, y)
    total_low = like(0.0, y)
    power = like(1.0, y)
    for coefficient in low:
        total_low = total_low * y + like(coefficient, y)
        power = power * y
    return total_high * power + total_low


@njit(inline="always")
def tanh_half_unit(w):
    """``tanh(w)`` for ``|w| <= 1/2`` from ``+ - *`` only (vectorisable; no libm call): the
    odd Taylor series, 8 terms in float32 and 17 in float64."""
    w2 = w * w
    if is_float32(w):
        return w * two_chain_horner(TANH_FLOAT32[0], TANH_FLOAT32[1], w2)
    return w * two_chain_horner(TANH_FLOAT64[0], TANH_FLOAT64[1], w2)


@njit(inline="always")
def protection(x):
    """``su = sigmoid(2 (x - 1/2)) = (1 + tanh(x - 1/2)) / 2`` for ``x`` in ``[0, 1]``."""
    half = like(0.5, x)
    return half + half * tanh_half_unit(x - half)


@njit(inline="always")
def clip_unit(x):
    """``clip(x, 0, 1)``."""
    zero, one = like(0.0, x), like(1.0, x)
    return zero if x < zero else (one if x > one else x)


@njit(inline="always")
def updated_param(p, u, m, v, noise, decay, lr, eps, inv_cu, inv_bc1, inv_bc2, u_lo, inv_range):
    """``p (1 - lr wd) - lr (m_hat / (sqrt(v_hat) + eps) + noise) (1 - su)``.

    ``m_hat = m / bc1``, ``v_hat = v / bc2``, ``u / cu`` and the division by the utility
    range are multiplications by reciprocals rounded to the dtype (within the contract's
    ``PARAM_ULPS``: ``specs/kernels.md`` §3).
    """
    d = direction(m, v, inv_bc1, inv_bc2, eps)
    x = clip_unit((u * inv_cu - u_lo) * inv_range)
    return p * decay - lr * (d + noise) * (like(1.0, p) - protection(x))


@njit(inline="always")
def direction(m, v, inv_bc1, inv_bc2, eps):
    """``d = m_hat / (sqrt(v_hat) + eps)`` with ``m_hat = m / bc1``, ``v_hat = v / bc2`` as
    reciprocal products (one expression for pass 1's bound and pass 2's update)."""
    return (m * inv_bc1) / (math.sqrt(v * inv_bc2) + eps)


@njit(inline="always")
def max_protection(u, inv_cu, u_hi):
    """The paper's ``su = 1 / (1 + exp(-((u/cu) / U_hi)))``: no minimum, no clip, a true division
    by ``U_hi`` whatever its sign (``U_hi = 0`` gives NaN for ``u = 0``, as the reference)."""
    one = like(1.0, u)
    return one / (one + math.exp(-((u * inv_cu) / u_hi)))


@njit(inline="always")
def family_param(p, g, u, m, v, noise, decay, step, eps, inv_cu, inv_bc1, inv_bc2, u_lo, inv_range, u_hi,
                 moments_none, protection_max, noise_terms):
    """The update of any family member (``specs/algorithm.md`` §7), ``step = update_factor lr``::

        sum:    p (1 - lr wd) - step (d + noise) (1 - su)
        terms:  p (1 - lr wd) - step (m_hat (1 - su) / (sqrt(v_hat) + eps) + noise (1 - su))
                p (1 - lr wd) - step (g (1 - su) + noise (1 - su))                 (no moments)

    ``d`` is ``m_hat / (sqrt(v_hat) + eps)`` or ``g``; ``m``, ``v`` are not read without
    moments. The expressions are the reference's (:func:`upgd_ref.reference.family_parameter_update`),
    in its order, with the divisions by per-segment scalars as reciprocal products.
    """
    if protection_max:
        su = max_protection(u, inv_cu, u_hi)
    else:
        su = protection(clip_unit((u * inv_cu - u_lo) * inv_range))
    keep = like(1.0, p) - su
    if moments_none:
        if noise_terms:
            bracket = g * keep + noise * keep
        else:
            bracket = (g + noise) * keep
        return p * decay - step * bracket
    if noise_terms:
        m_hat = m * inv_bc1
        return p * decay - step * (m_hat * keep / (math.sqrt(v * inv_bc2) + eps) + noise * keep)
    return p * decay - step * (direction(m, v, inv_bc1, inv_bc2, eps) + noise) * keep


# --- per-chunk loops (each starts at 0 on contiguous views, so LLVM vectorises it) ------


@njit(error_model="numpy")
def scale_in_place(g, factor):
    """``g <- factor * g``."""
    for j in range(g.size):
        g[j] = g[j] * factor


def store_if_writable(g, j, value):
    """``g[j] <- value`` when ``g`` is writable; nothing for a read-only ``g`` (pass 2 gets a
    read-only gradient exactly when it does not scale), chosen when the kernel is typed."""


@overload(store_if_writable, inline="always")
def _store_if_writable(g, j, value):
    if not g.mutable:
        return lambda g, j, value: None

    def store(g, j, value):
        g[j] = value

    return store


@njit(inline="always")
def traces(g, p, u, m, v, beta_u, one_minus_beta_u, beta1, one_minus_beta1, beta2, one_minus_beta2):
    """``(u, m, v)`` updated: ``beta_u u + (1 - beta_u)(-g p)``, ``beta1 m + (1 - beta1) g``,
    ``beta2 v + (1 - beta2) g^2``."""
    return (ema(beta_u, u, one_minus_beta_u, -g * p),
            ema(beta1, m, one_minus_beta1, g),
            ema(beta2, v, one_minus_beta2, g * g))


@njit(inline="always")
def nonfinite_marker(x):
    """0 for a finite ``x``, NaN for an infinite or NaN one (``x * 0``, IEEE-754)."""
    return x * like(0.0, x)


@njit(error_model="numpy")
def traces_check(g, factor, p, u, m, v, k, gt, ut, pt, dt):
    """Pass 1 of one chunk (Adam moments), read-only: the new ``u, m, v`` in registers only.

    Tiles (chunk-sized scratch): ``gt = f g``, ``ut`` the new utility, ``pt = |p|``, ``dt =
    |d|`` with ``d = m_hat / (sqrt(v_hat) + eps)`` as pass 2 forms it, made NaN when any of
    ``g, p`` or the new ``u, m, v`` is not finite (the checks of ``specs/algorithm.md`` §8).
    """
    beta_u, one_minus_beta_u = k[BETA_U], k[ONE_MINUS_BETA_U]
    beta1, one_minus_beta1, beta2, one_minus_beta2 = k[BETA1], k[ONE_MINUS_BETA1], k[BETA2], k[ONE_MINUS_BETA2]
    eps, inv_bc1, inv_bc2 = k[EPS], k[INV_BC1], k[INV_BC2]
    for j in range(g.size):
        gs = g[j] * factor
        pj = p[j]
        u1, m1, v1 = traces(gs, pj, u[j], m[j], v[j], beta_u, one_minus_beta_u, beta1, one_minus_beta1, beta2,
                            one_minus_beta2)
        gt[j] = gs
        ut[j] = u1
        pt[j] = abs(pj)
        dt[j] = abs(direction(m1, v1, inv_bc1, inv_bc2, eps)) + (
            (nonfinite_marker(gs) + nonfinite_marker(pj)) + (nonfinite_marker(u1) + nonfinite_marker(m1))
            + nonfinite_marker(v1))


@njit(error_model="numpy")
def utility_check(g, factor, p, u, k, gt, ut, pt, dt):
    """:func:`traces_check` of a member without moments: ``d = f g``; ``m``, ``v`` not read."""
    beta_u, one_minus_beta_u = k[BETA_U], k[ONE_MINUS_BETA_U]
    for j in range(g.size):
        gs = g[j] * factor
        pj = p[j]
        u1 = ema(beta_u, u[j], one_minus_beta_u, -gs * pj)
        gt[j] = gs
        ut[j] = u1
        pt[j] = abs(pj)
        dt[j] = abs(gs) + (nonfinite_marker(pj) + nonfinite_marker(u1))


@njit(error_model="numpy")
def add_lane_sums(x, sums, squares):
    """Adds ``x`` (whole blocks of ``_BLOCK`` elements, then a tail; its first element at a
    multiple of ``_BLOCK`` of the chunk) to the float64 lane accumulators of :func:`lane_sums`."""
    blocks = x.size // _BLOCK
    for r in range(blocks):
        rows = x[r * _BLOCK : (r + 1) * _BLOCK]
        for lane in range(LANES):
            w0, w1 = np.float64(rows[lane]), np.float64(rows[lane + LANES])
            w2, w3 = np.float64(rows[lane + 2 * LANES]), np.float64(rows[lane + 3 * LANES])
            sums[lane] += (w0 + w1) + (w2 + w3)
            squares[lane] += (w0 * w0 + w1 * w1) + (w2 * w2 + w3 * w3)
    tail = x[blocks * _BLOCK :]
    for j in range(tail.size):
        w = np.float64(tail[j])
        sums[j % LANES] += w
        squares[j % LANES] += w * w


@njit(error_model="numpy")
def lane_totals(sums, squares):
    """The lanes of :func:`add_lane_sums` added in lane order: ``(sum x, sum x^2)``."""
    total, total_sq = 0.0, 0.0
    for lane in range(LANES):
        total += sums[lane]
        total_sq += squares[lane]
    return total, total_sq


@njit(error_model="numpy")
def lane_sums(x):
    """``(sum x, sum x^2)`` in float64, in a fixed order that SIMD can run.

    Element ``j`` goes to lane ``j % LANES``; four rows of ``LANES`` elements are added in
    registers before they meet the lane accumulators; at the end the lanes are added in
    order. (A plain running sum cannot be vectorised without reassociation, i.e. fastmath.)
    """
    sums = np.zeros(LANES)
    squares = np.zeros(LANES)
    add_lane_sums(x, sums, squares)
    return lane_totals(sums, squares)


@njit(error_model="numpy")
def fold_lane_extrema(x, lows, highs):
    """Folds ``x`` (blocks then a tail, as in :func:`add_lane_sums`) into the lane minima
    ``lows`` and maxima ``highs`` (element ``j`` of a block in lane ``j % LANES``; exact, so
    only NaN could tell orders apart, and the order is fixed)."""
    blocks = x.size // _BLOCK
    for r in range(blocks):
        rows = x[r * _BLOCK : (r + 1) * _BLOCK]
        for lane in range(LANES):
            w0, w1, w2, w3 = rows[lane], rows[lane + LANES], rows[lane + 2 * LANES], rows[lane + 3 * LANES]
            low = min(min(w0, w1), min(w2, w3))
            high = max(max(w0, w1), max(w2, w3))
            lows[lane] = low if low < lows[lane] else lows[lane]
            highs[lane] = high if high > highs[lane] else highs[lane]
    tail = x[blocks * _BLOCK :]
    for j in range(tail.size):
        w = tail[j]
        lows[j % LANES] = min(lows[j % LANES], w)
        highs[j % LANES] = max(highs[j % LANES], w)


@njit(error_model="numpy")
def count_nonfinite(x):
    """Number of NaN or infinite elements (an integer reduction: vectorises as is)."""
    count = 0
    for j in range(x.size):
        count += 0 if math.isfinite(x[j]) else 1
    return count



@njit(error_model="numpy")
def traces_and_update(p, g, u, m, v, noise, k, factor, u_lo, inv_range):
    """Pass 2 of one chunk (production): ``f g`` formed as it is read (and written back when
    ``g`` is writable, i.e. when scaled: ``g * 1`` is ``g``, bit for bit), pass 1's ``u``,
    ``m``, ``v`` of it again — the same operations, so the same bits — written once, then
    ``p`` from them with ``std * noise`` (``noise``: the chunk's normals, or zeros when
    nothing is drawn). One branch-free loop, so LLVM vectorises it: every buffer is read
    once and written once."""
    beta_u, one_minus_beta_u = k[BETA_U], k[ONE_MINUS_BETA_U]
    beta1, one_minus_beta1, beta2, one_minus_beta2 = k[BETA1], k[ONE_MINUS_BETA1], k[BETA2], k[ONE_MINUS_BETA2]
    decay, lr, eps, std = k[DECAY], k[LR], k[EPS], k[STD]
    inv_cu, inv_bc1, inv_bc2 = k[INV_CU], k[INV_BC1], k[INV_BC2]
    for j in range(p.size):
        gs = g[j] * factor
        store_if_writable(g, j, gs)
        u1, m1, v1 = traces(gs, p[j], u[j], m[j], v[j], beta_u, one_minus_beta_u, beta1, one_minus_beta1, beta2,
                            one_minus_beta2)
        u[j] = u1
        m[j] = m1
        v[j] = v1
        p[j] = updated_param(p[j], u1, m1, v1, std * noise[j], decay, lr, eps, inv_cu, inv_bc1, inv_bc2, u_lo,
                             inv_range)


@njit(error_model="numpy")
def family_traces_and_update(p, g, u, m, v, noise, k, factor, u_lo, inv_range, u_hi, moments_none,
                             protection_max, noise_terms):
    """:func:`traces_and_update` of any family member (``m``, ``v`` neither read nor written
    without moments)."""
    beta_u, one_minus_beta_u = k[BETA_U], k[ONE_MINUS_BETA_U]
    beta1, one_minus_beta1, beta2, one_minus_beta2 = k[BETA1], k[ONE_MINUS_BETA1], k[BETA2], k[ONE_MINUS_BETA2]
    decay, step, eps, std = k[DECAY], k[LR], k[EPS], k[STD]
    inv_cu, inv_bc1, inv_bc2 = k[INV_CU], k[INV_BC1], k[INV_BC2]
    zero = like(0.0, step)
    for j in range(p.size):
        gs = g[j] * factor
        store_if_writable(g, j, gs)
        pj = p[j]
        if moments_none:
            u1 = ema(beta_u, u[j], one_minus_beta_u, -gs * pj)
            m1 = zero
            v1 = zero
        else:
            u1, m1, v1 = traces(gs, pj, u[j], m[j], v[j], beta_u, one_minus_beta_u, beta1, one_minus_beta1,
                                beta2, one_minus_beta2)
            m[j] = m1
            v[j] = v1
        u[j] = u1
        p[j] = family_param(pj, gs, u1, m1, v1, std * noise[j], decay, step, eps, inv_cu, inv_bc1, inv_bc2, u_lo,
                            inv_range, u_hi, moments_none, protection_max, noise_terms)


# --- one chunk of each kernel -----------------------------------------------------------


@njit(error_model="numpy")
def _pass1_chunk(c, g, p, u, m, v, chunks, present, coefficients, factor, moments_none, partial):
    """Pass 1 of chunk ``c``, one tile of ``_TILE`` elements at a time: the tile's ``f g``, new
    ``u``, ``|p|`` and marked ``|d|`` into four tiles (16 KiB in float32: L1-resident), folded
    at once into the chunk's lane accumulators (the lane orders of :func:`lane_sums` and
    :func:`fold_lane_extrema`, so the chunk's partials are the same bits as from chunk-sized
    tiles); every input is read once."""
    if present[chunks[c, SEGMENT]]:
        a = chunks[c, START]
        n = chunks[c, LENGTH]
        k = coefficients[chunks[c, SEGMENT]]
        tiles = np.empty((4, min(n, _TILE)), p.dtype)
        gt, ut, pt, dt = tiles[0], tiles[1], tiles[2], tiles[3]
        sums, squares = np.zeros(LANES), np.zeros(LANES)
        lanes = np.empty((6, LANES), p.dtype)  # low, high of u, |p|, |d|, from each's first element
        bad = 0
        for start in range(0, n, _TILE):
            size = min(_TILE, n - start)
            i, j = a + start, a + start + size
            if moments_none:
                utility_check(g[i:j], factor, p[i:j], u[i:j], k, gt[:size], ut[:size], pt[:size], dt[:size])
            else:
                traces_check(g[i:j], factor, p[i:j], u[i:j], m[i:j], v[i:j], k, gt[:size], ut[:size], pt[:size],
                             dt[:size])
            if start == 0:
                for row in range(3):
                    lanes[2 * row, :] = tiles[row + 1, 0]
                    lanes[2 * row + 1, :] = tiles[row + 1, 0]
            add_lane_sums(gt[:size], sums, squares)
            fold_lane_extrema(ut[:size], lanes[0], lanes[1])
            fold_lane_extrema(pt[:size], lanes[2], lanes[3])
            fold_lane_extrema(dt[:size], lanes[4], lanes[5])
            bad += count_nonfinite(dt[:size])
        partial[c, SUM], partial[c, SUM_SQ] = lane_totals(sums, squares)
        partial[c, MIN_U], partial[c, MAX_U] = np.float64(lanes[0].min()), np.float64(lanes[1].max())
        partial[c, MAX_P] = np.float64(lanes[3].max())
        partial[c, MAX_D] = np.float64(lanes[5].max())
        partial[c, BAD] = bad


@njit(error_model="numpy")
def _pass2_inputs(c, chunks, p, coefficients, step_lo, step_hi, key0, key1):
    """``(a, b, k, noise)`` of chunk ``c`` of a present segment: ``noise`` holds the chunk's
    normals, or zeros (nothing drawn) when the segment's ``std`` is 0 (``0 * 0`` adds the
    ``+0`` the update without noise adds)."""
    a = chunks[c, START]
    n = chunks[c, LENGTH]
    k = coefficients[chunks[c, SEGMENT]]
    if k[STD] != like(0.0, k[STD]):
        tile, skip = chunk_normals(chunks[c, LOGICAL], n, p, step_lo, step_hi, key0, key1)
        return a, a + n, k, tile[skip : skip + n]
    return a, a + n, k, np.zeros(n, p.dtype)


@njit(error_model="numpy")
def _pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                 step_lo, step_hi, key0, key1):
    if present[chunks[c, SEGMENT]]:
        a, b, k, noise = _pass2_inputs(c, chunks, p, coefficients, step_lo, step_hi, key0, key1)
        traces_and_update(p[a:b], g[a:b], u[a:b], m[a:b], v[a:b], noise, k, factor, u_lo, inv_range)


@njit(error_model="numpy")
def _family_pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                        u_hi, mode, step_lo, step_hi, key0, key1):
    if present[chunks[c, SEGMENT]]:
        a, b, k, noise = _pass2_inputs(c, chunks, p, coefficients, step_lo, step_hi, key0, key1)
        moments_none = (mode & MOMENTS_NONE) != 0
        family_traces_and_update(p[a:b], g[a:b], u[a:b], m if moments_none else m[a:b],
                                 v if moments_none else v[a:b], noise, k, factor, u_lo, inv_range, u_hi, moments_none,
                                 (mode & PROTECTION_MAX) != 0, (mode & NOISE_TERMS) != 0)


@njit(error_model="numpy")
def _noise_chunk(c, out, chunks, step_lo, step_hi, key0, key1):
    a = chunks[c, START]
    n = chunks[c, LENGTH]
    tile, skip = chunk_normals(chunks[c, LOGICAL], n, out, step_lo, step_hi, key0, key1)
    out[a : a + n] = tile[skip : skip + n]


@njit(error_model="numpy")
def _scale_chunk(c, g, chunks, present, factor):
    if present[chunks[c, SEGMENT]]:
        a = chunks[c, START]
        scale_in_place(g[a : a + chunks[c, LENGTH]], factor)


@njit(error_model="numpy")
def _moments_chunk(c, g, chunks, present, partial):
    if present[chunks[c, SEGMENT]]:
        a = chunks[c, START]
        partial[c, SUM], partial[c, SUM_SQ] = lane_sums(g[a : a + chunks[c, LENGTH]])


@njit(error_model="numpy")
def _nonfinite_chunk(c, x, chunks, present, counts):
    if present[chunks[c, SEGMENT]]:
        a = chunks[c, START]
        counts[c] = count_nonfinite(x[a : a + chunks[c, LENGTH]])


# --- kernels: serial and parallel drivers (distinct functions: distinct cache entries) ---


@njit(cache=True, error_model="numpy")
def pass1_serial(g, p, u, m, v, chunks, present, coefficients, factor, moments_none, partial):
    """Pass 1 over every chunk of a present segment, read-only (``specs/kernels.md`` §1): the
    traces of ``f g`` in registers, per chunk ``sum g``, ``sum g^2``, ``min u``, ``max u``,
    ``max |p|``, ``max |d|`` and the non-finite count; one thread. Without moments (the
    family's ``"none"``) ``m`` and ``v`` are not read.

    Bytes per element: reads g, p, u (+ m, v); writes nothing.
    """
    for c in range(chunks.shape[0]):
        _pass1_chunk(c, g, p, u, m, v, chunks, present, coefficients, factor, moments_none, partial)


@njit(cache=True, parallel=True, error_model="numpy")
def pass1_parallel(g, p, u, m, v, chunks, present, coefficients, factor, moments_none, partial):
    """:func:`pass1_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _pass1_chunk(c, g, p, u, m, v, chunks, present, coefficients, factor, moments_none, partial)


@njit(cache=True, error_model="numpy")
def pass2_serial(p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                 step_lo, step_hi, key0, key1):
    """Pass 2 over every chunk of a present segment (production member): ``f g`` (written back
    when ``g`` is writable: the kernel is handed a read-only ``g`` when ``f = 1``), pass 1's
    traces again, written, and the update with the normals generated per chunk; one thread.
    Segments with ``std == 0`` draw nothing.

    Bytes per element: reads g, p, u, m, v; writes u, m, v, p (+ g when f != 1).
    """
    for c in range(chunks.shape[0]):
        _pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                     step_lo, step_hi, key0, key1)


@njit(cache=True, parallel=True, error_model="numpy")
def pass2_parallel(p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                   step_lo, step_hi, key0, key1):
    """:func:`pass2_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                     step_lo, step_hi, key0, key1)


@njit(cache=True, error_model="numpy")
def family_pass2_serial(p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                        u_hi, mode, step_lo, step_hi, key0, key1):
    """Pass 2 of any family member (``mode``: OR of :data:`MOMENTS_NONE`,
    :data:`PROTECTION_MAX`, :data:`NOISE_TERMS`; the ``LR`` column holds ``update_factor lr``,
    ``DECAY`` ``1 - lr wd``); one thread. The production member runs :func:`pass2_serial`.

    Bytes per element: reads g, p, u (+ m, v); writes u (+ m, v), p (+ g when f != 1).
    """
    for c in range(chunks.shape[0]):
        _family_pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo,
                            inv_range, u_hi, mode, step_lo, step_hi, key0, key1)


@njit(cache=True, parallel=True, error_model="numpy")
def family_pass2_parallel(p, g, u, m, v, chunks, present, coefficients, factor, u_lo, inv_range,
                          u_hi, mode, step_lo, step_hi, key0, key1):
    """:func:`family_pass2_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _family_pass2_chunk(c, p, g, u, m, v, chunks, present, coefficients, factor, u_lo,
                            inv_range, u_hi, mode, step_lo, step_hi, key0, key1)


@njit(cache=True, error_model="numpy")
def noise_serial(out, chunks, step_lo, step_hi, key0, key1):
    """The standard normals of every chunk into ``out`` (``upgd_ref.noise``); one thread.

    Bytes per element: writes ``out`` (the normals never exist elsewhere but in a tile).
    """
    for c in range(chunks.shape[0]):
        _noise_chunk(c, out, chunks, step_lo, step_hi, key0, key1)


@njit(cache=True, parallel=True, error_model="numpy")
def noise_parallel(out, chunks, step_lo, step_hi, key0, key1):
    """:func:`noise_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _noise_chunk(c, out, chunks, step_lo, step_hi, key0, key1)


@njit(cache=True, error_model="numpy")
def scale_serial(g, chunks, present, factor):
    """``g <- factor g`` on present segments (``VarianceGradientScaler.scale``); one thread."""
    for c in range(chunks.shape[0]):
        _scale_chunk(c, g, chunks, present, factor)


@njit(cache=True, parallel=True, error_model="numpy")
def scale_parallel(g, chunks, present, factor):
    """:func:`scale_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _scale_chunk(c, g, chunks, present, factor)


@njit(cache=True, error_model="numpy")
def moments_serial(g, chunks, present, partial):
    """Per-chunk ``sum g`` and ``sum g^2`` (``VarianceGradientScaler.update``); one thread."""
    for c in range(chunks.shape[0]):
        _moments_chunk(c, g, chunks, present, partial)


@njit(cache=True, parallel=True, error_model="numpy")
def moments_parallel(g, chunks, present, partial):
    """:func:`moments_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _moments_chunk(c, g, chunks, present, partial)


@njit(cache=True, error_model="numpy")
def nonfinite_serial(x, chunks, present, counts):
    """Per-chunk count of non-finite elements of present segments; one thread."""
    for c in range(chunks.shape[0]):
        _nonfinite_chunk(c, x, chunks, present, counts)


@njit(cache=True, parallel=True, error_model="numpy")
def nonfinite_parallel(x, chunks, present, counts):
    """:func:`nonfinite_serial` with the chunks spread over Numba's threads."""
    for c in prange(chunks.shape[0]):
        _nonfinite_chunk(c, x, chunks, present, counts)


@njit(cache=True, error_model="numpy")
def segment_reductions(chunks, present, partial, num_segments):
    """Per-segment partials (:data:`NUM_PARTIALS` columns) from the chunk partials of present
    segments, sums added in chunk order (``+inf``, ``-inf`` utility extrema, 0 maxima for a
    segment without chunks).

    One thread, a fixed order: the same bits whatever the number of threads that produced
    the partials.
    """
    totals = np.zeros((num_segments, NUM_PARTIALS))
    totals[:, MIN_U] = np.inf
    totals[:, MAX_U] = -np.inf
    for c in range(chunks.shape[0]):
        segment = chunks[c, SEGMENT]
        if present[segment]:
            totals[segment, SUM] += partial[c, SUM]
            totals[segment, SUM_SQ] += partial[c, SUM_SQ]
            totals[segment, MIN_U] = min(totals[segment, MIN_U], partial[c, MIN_U])
            totals[segment, MAX_U] = max(totals[segment, MAX_U], partial[c, MAX_U])
            totals[segment, MAX_P] = max(totals[segment, MAX_P], partial[c, MAX_P])
            totals[segment, MAX_D] = max(totals[segment, MAX_D], partial[c, MAX_D])
            totals[segment, BAD] += partial[c, BAD]
    return totals


#: Every cached top-level kernel (what :func:`upgd_ref.warmup` compiles).
KERNELS = (
    pass1_serial, pass1_parallel, pass2_serial, pass2_parallel, family_pass2_serial, family_pass2_parallel,
    noise_serial, noise_parallel,
    scale_serial, scale_parallel, moments_serial, moments_parallel, nonfinite_serial,
    nonfinite_parallel, segment_reductions,
)
