"""Counter-based Gaussian noise: Philox4x32-10 and a portable Box-Muller transform.

Normative definition: ``specs/noise.md``. In short, element ``i`` (its *logical* index,
padding excluded) of step ``step`` of a generator seeded with ``seed`` is

    block  = i // 4,  lane = i % 4
    w      = Philox4x32-10(counter=(block_lo, block_hi, step_lo, step_hi),
                           key=(seed_lo, seed_hi))            # four uint32 words
    r      = sqrt(-2 ln u(w[0 or 2]))        u(w) = (w + 0.5) * 2**-32
    theta  = 2 pi u(w[1 or 3])
    z      = r cos(theta)  (lanes 0, 2)   or   r sin(theta)  (lanes 1, 3)

computed in float64 with ``ln``, ``cos`` and ``sin`` built from ``+ - * /`` only, so that
any IEEE-754 implementation that evaluates the same expressions in the same order (without
fused multiply-add) produces the same bits. float32 normals are the float64 normals rounded
once to nearest.

Everything here is written against the Array API (``xp``) with uint32 integer arithmetic
only (no uint64), so it runs unchanged on NumPy, CuPy, PyTorch and ``jax.numpy``.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace

__all__ = [
    "NOISE_VERSIONS",
    "DEFAULT_NOISE_VERSION",
    "check_noise_version",
    "NORMAL_MAX",
    "noise_dtype",
    "philox4x32_10",
    "counter_runs",
    "check_u64",
    "normals_from_words",
    "standard_normals",
    "noise",
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
]

#: The largest magnitude of a normal (word 0: ``r = sqrt(66 ln 2)``, ``specs/noise.md``); the
#: float32 normals, rounded once, stay below ``NORMAL_MAX * (1 + 2**-24)``.
NORMAL_MAX = 6.763705635001895

#: The noise formats (``specs/noise.md``: 1, ``specs/noise-v2.md``: 2, the float32 transform)
#: and the one every run uses unless it asks for another.
NOISE_VERSIONS = (1, 2)
DEFAULT_NOISE_VERSION = 1

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF

# fdlibm e_log.c: ln 2 split so that k * LN2_HI is exact for |k| < 2**11.
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
LG1 = 6.666666666666735130e-01
LG2 = 3.999999999940941908e-01
LG3 = 2.857142874366239149e-01
LG4 = 2.222219843214978396e-01
LG5 = 1.818357216161805012e-01
LG6 = 1.531383769920937332e-01
LG7 = 1.479819860511658591e-01
SQRT2 = 1.4142135623730951
SQRT_HALF = 0.7071067811865476

# fdlibm k_sin.c / k_cos.c minimax polynomials on [-pi/4, pi/4].
S1 = -1.66666666666666324348e-01
S2 = 8.33333333332248946124e-03
S3 = -1.98412698298579493134e-04
S4 = 2.75573137070700676789e-06
S5 = -2.50507602534068634195e-08
S6 = 1.58969099521155010221e-10
C1 = 4.16666666666666019037e-02
C2 = -1.38888888888741095749e-03
C3 = 2.48015872894767294178e-05
C4 = -2.75573143513906633035e-07
C5 = 2.08757232129817482790e-09
C6 = -1.13596475577881948265e-11
PI_OVER_4 = 0.7853981633974483
OCTANT_FRACTION_BITS = 29  # theta's octant is the top 3 bits of the angle word


def as_u32(xp, value):
    """``value`` as a uint32 array of namespace ``xp`` (wrapped to 32 bits)."""
    return xp.asarray(value & _MASK32, dtype=xp.uint32)


def _mulhilo32(xp, a, multiplier: int):
    """(high, low) 32-bit halves of ``a * multiplier`` using 16-bit limbs (no uint64)."""
    m_lo, m_hi = multiplier & 0xFFFF, multiplier >> 16
    a_lo = a & as_u32(xp, 0xFFFF)
    a_hi = a >> as_u32(xp, 16)
    ll = a_lo * as_u32(xp, m_lo)
    lh = a_lo * as_u32(xp, m_hi)
    hl = a_hi * as_u32(xp, m_lo)
    hh = a_hi * as_u32(xp, m_hi)
    low16 = as_u32(xp, 0xFFFF)
    shift = as_u32(xp, 16)
    mid = (ll >> shift) + (lh & low16) + (hl & low16)
    high = hh + (lh >> shift) + (hl >> shift) + (mid >> shift)
    low = a * as_u32(xp, multiplier)  # uint32 multiplication wraps modulo 2**32
    return high, low


def _mulhilo32_wide(xp, a, multiplier: int):
    """(high, low) 32-bit halves of ``a * multiplier`` from one exact uint64 product."""
    p = xp.astype(a, xp.uint64) * xp.asarray(multiplier, dtype=xp.uint64)
    return xp.astype(p >> xp.asarray(32, dtype=xp.uint64), xp.uint32), xp.astype(p, xp.uint32)


def philox4x32_10(counter, key, *, wide: bool = False):
    """Philox4x32-10 (Random123) on arrays of counters.

    ``counter``: four uint32 arrays (broadcastable) ``(c0, c1, c2, c3)``;
    ``key``: two Python ints ``(k0, k1)`` (or two uint32 scalar arrays of the namespace, e.g.
    a traced key). Returns four uint32 arrays. ``wide=True`` forms each ``mulhilo32`` from
    one uint64 product instead of 16-bit limbs (same words; for namespaces with ``uint64``,
    where it is several times cheaper).
    """
    xp = array_namespace(*counter)
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _MASK32, key[1] & _MASK32
    mulhilo = _mulhilo32_wide if wide else _mulhilo32
    for round_index in range(PHILOX_ROUNDS):
        if round_index:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = mulhilo(xp, c0, PHILOX_M0)
        hi1, lo1 = mulhilo(xp, c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ as_u32(xp, k0), lo1, hi0 ^ c3 ^ as_u32(xp, k1), lo0
    return c0, c1, c2, c3


def exponent_split(xp, x, sqrt2, sqrt_half):
    """``(t, k)`` with ``x = t 2**k`` exactly and ``sqrt_half <= t < sqrt2``, for ``0.5 <= x <
    2**32``, in ``x``'s dtype, shared by noise formats 1 and 2 (their own ``SQRT2``,
    ``SQRT_HALF = SQRT2 / 2``). The pair is unique, so every exact method gives the same one
    (``specs/noise.md`` §5): ``frexp`` where the namespace has it (NumPy, ``jax.numpy``; a
    quarter of the operations), else the spec's binary search by powers of two."""
    if not hasattr(xp, "frexp"):  # the array API standard has no frexp
        return _exponent_search(xp, x, sqrt2, sqrt_half)
    m, e = xp.frexp(x)  # x = m 2**e, 0.5 <= m < 1, exact
    t, k = m * 2.0, xp.astype(e - 1, x.dtype)
    big = t >= sqrt2
    return xp.where(big, t * 0.5, t), xp.where(big, k + 1.0, k)


def _exponent_search(xp, x, sqrt2, sqrt_half):
    """:func:`exponent_split` as ``specs/noise.md`` §5 writes it: an exact binary search for
    the exponent (every scaling a power of two)."""
    t, k = x, xp.zeros_like(x)
    for shift in (16, 8, 4, 2, 1):
        big = t >= float(2**shift)
        t = xp.where(big, t * (2.0**-shift), t)
        k = xp.where(big, k + shift, k)
    big = t >= sqrt2
    t = xp.where(big, t * 0.5, t)
    k = xp.where(big, k + 1.0, k)
    small = t < sqrt_half
    t = xp.where(small, t * 2.0, t)
    k = xp.where(small, k - 1.0, k)
    return t, k


def _log_of_uniform(xp, word):
    """ln(u) for u = (word + 0.5) * 2**-32, from + - * / only (fdlibm's log kernel)."""
    t = xp.astype(word, xp.float64) + 0.5  # exact, in [0.5, 2**32)
    t, k = exponent_split(xp, t, SQRT2, SQRT_HALF)
    k = k - 32.0  # u = t * 2**k, t in [sqrt(1/2), sqrt(2))
    f = t - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * (LG2 + w * (LG4 + w * LG6))
    t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)))
    r = t2 + t1
    hfsq = 0.5 * f * f
    return k * LN2_HI - ((hfsq - (s * (hfsq + r) + k * LN2_LO)) - f)


def _kernel_sin(x):
    z = x * x
    v = z * x
    r = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))
    return x + v * (S1 + z * r)


def _kernel_cos(x):
    z = x * x
    r = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))))
    return 1.0 - (0.5 * z - z * r)


def octant_reduction(xp, word):
    """``(octant, reduced)``: the angle word's top 3 bits and its low 29 bits, reflected
    (``2**29 - 1 - low``) in odd octants, so the angle inside the octant is
    ``(reduced + 0.5) 2**-29 pi/4`` (``specs/noise.md`` §6)."""
    octant = word >> as_u32(xp, OCTANT_FRACTION_BITS)
    fraction_mask = (1 << OCTANT_FRACTION_BITS) - 1
    low = word & as_u32(xp, fraction_mask)
    odd = (octant & as_u32(xp, 1)) == as_u32(xp, 1)
    return octant, xp.where(odd, as_u32(xp, fraction_mask) - low, low)  # odd octants reflect


def octant_cos_sin(xp, octant, s, c):
    """``cos, sin`` of the whole angle from the kernels' ``s``, ``c`` of the reduced one: the
    octant's swap and signs (``specs/noise.md`` §6, exact)."""
    swap = ((octant + as_u32(xp, 1)) >> as_u32(xp, 1)) & as_u32(xp, 1)  # octants 1, 2, 5, 6
    cos_negative = ((octant + as_u32(xp, 2)) >> as_u32(xp, 2)) & as_u32(xp, 1)  # octants 2..5
    sin_negative = octant >> as_u32(xp, 2)  # octants 4..7
    one = as_u32(xp, 1)
    cos_mag = xp.where(swap == one, s, c)
    sin_mag = xp.where(swap == one, c, s)
    cos = xp.where(cos_negative == one, -cos_mag, cos_mag)
    sin = xp.where(sin_negative == one, -sin_mag, sin_mag)
    return cos, sin


def _cos_sin_of_turn(xp, word):
    """cos and sin of 2*pi*u, u = (word + 0.5) * 2**-32, via octant reduction."""
    octant, reduced = octant_reduction(xp, word)
    a = ((xp.astype(reduced, xp.float64) + 0.5) * 2.0**-OCTANT_FRACTION_BITS) * PI_OVER_4
    return octant_cos_sin(xp, octant, _kernel_sin(a), _kernel_cos(a))


def box_muller_lanes(xp, log_of_uniform, cos_sin_of_turn, w0, w1, w2, w3):
    """The four normals of a Philox block in lane order (``specs/noise.md`` §4): radius words
    ``w0``, ``w2``, angle words ``w1``, ``w3``, with a noise format's ``ln u`` and ``cos, sin``."""
    r01 = xp.sqrt(-2.0 * log_of_uniform(xp, w0))
    cos01, sin01 = cos_sin_of_turn(xp, w1)
    r23 = xp.sqrt(-2.0 * log_of_uniform(xp, w2))
    cos23, sin23 = cos_sin_of_turn(xp, w3)
    return xp.stack([r01 * cos01, r01 * sin01, r23 * cos23, r23 * sin23], axis=1)


def normals_from_words(xp, w0, w1, w2, w3):
    """Four float64 normals per Philox block, in lane order."""
    return box_muller_lanes(xp, _log_of_uniform, _cos_sin_of_turn, w0, w1, w2, w3)


def check_noise_version(value, where: str = "") -> int:
    """``value`` as a noise format version (an int in :data:`NOISE_VERSIONS`); ``TypeError`` for
    a non-integer, ``ValueError`` for an unknown version, both naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}noise_version must be an int, got {type(value).__name__}")
    if int(value) not in NOISE_VERSIONS:
        raise ValueError(f"{where}noise_version must be one of {NOISE_VERSIONS}, got {value!r}")
    return int(value)


def _transform(version: int):
    """The word-pair transform of noise format ``version``."""
    from . import rng_v2  # format 2 builds on this module's integer reduction

    return normals_from_words if version == 1 else rng_v2.normals_from_words


def check_u64(name: str, value) -> int:
    """``value`` as a Python int in ``[0, 2**64)`` (a seed, step or counter); raises naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {value}")
    return value


def counter_runs(first_block: int, num_blocks: int):
    """``(block, n)``: blocks ``first_block ..`` split into runs of ``n`` consecutive blocks
    within which counter word 0 (the block's low 32 bits) does not wrap (``specs/noise.md`` §4),
    so each run's counters are ``arange(n) + (block mod 2**32)`` with one high word."""
    block, end = first_block, first_block + num_blocks
    while block < end:
        n = min(end, ((block >> 32) + 1) << 32) - block
        yield block, n
        block += n


def standard_normals(seed, step, start, count, *, xp=np, dtype=None, version=DEFAULT_NOISE_VERSION):
    """Standard normals for logical element indices ``start .. start + count - 1``.

    Pure function of ``(seed, step, index)``: any chunking of an index range gives the same
    values. ``dtype`` is ``xp.float64`` (default) or ``xp.float32`` (float64 rounded once).
    ``version``: the noise format (:data:`NOISE_VERSIONS`; version 2 computes float32 normals,
    widened exactly for float64).
    """
    transform = _transform(check_noise_version(version))
    seed = check_u64("seed", seed)
    step = check_u64("step", step)
    start = check_u64("start", start)
    count = check_u64("count", count)
    if start + count > 2**64:
        raise ValueError(f"indices start + count = {start + count} exceed 2**64")
    dtype = xp.float64 if dtype is None else dtype
    if dtype not in (xp.float32, xp.float64):
        raise TypeError(f"noise dtype must be float32 or float64, got {dtype}")
    if count == 0:
        return xp.zeros((0,), dtype=dtype)
    first_block, last_block = start // 4, (start + count - 1) // 4
    key = (seed & _MASK32, seed >> 32)
    step_lo, step_hi = step & _MASK32, step >> 32
    pieces = []
    for block, n in counter_runs(first_block, last_block + 1 - first_block):
        c0 = xp.arange(n, dtype=xp.uint32) + as_u32(xp, block)
        c1 = xp.full((n,), block >> 32, dtype=xp.uint32)
        c2 = xp.full((n,), step_lo, dtype=xp.uint32)
        c3 = xp.full((n,), step_hi, dtype=xp.uint32)
        pieces.append(transform(xp, *philox4x32_10((c0, c1, c2, c3), key)))
    flat = xp.reshape(xp.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0], (-1,))
    skip = start - 4 * first_block
    return xp.astype(flat[skip : skip + count], dtype)


def noise_dtype(layout) -> np.dtype:
    """The dtype of a step's normals: the layout's, float32 for 16-bit layouts (they step in
    float32, ``specs/precision.md``)."""
    return np.dtype(np.float32) if layout.dtype.itemsize == 2 else layout.dtype


def noise(layout, seed, step, dtype=None, version=DEFAULT_NOISE_VERSION):
    """The standard normals that optimizer step ``step`` (1, 2, ...) with ``seed`` uses.

    Returns a flat NumPy buffer shaped like ``layout`` (``layout.unpack`` gives one array per
    segment); padding elements are 0. Element ``j`` of segment ``i`` is the normal of logical
    index ``layout.noise_offsets[i] + j`` (``logical_offsets`` unless the layout is a part of a
    :class:`~upgd_ref.multi.MultiLayout`), so layouts that differ only in padding (for
    example float32 and float64 layouts of the same shapes) draw identical values.
    ``dtype`` defaults to :func:`noise_dtype` (the layout's; float32 for 16-bit layouts).
    ``version``: the noise format (:data:`NOISE_VERSIONS`).
    """
    version = check_noise_version(version)
    dtype = np.dtype(noise_dtype(layout) if dtype is None else dtype)
    if dtype.name not in ("float32", "float64"):
        raise TypeError(f"noise dtype must be float32 or float64, got {dtype.name}")
    out = layout.zeros(dtype=dtype)
    if layout.noise_offsets == layout.logical_offsets:  # one draw for the whole buffer
        start = layout.logical_start  # 0 but for a shard's layout
        values = standard_normals(seed, step, start, layout.num_logical, dtype=np.float64, version=version)
        for offset, logical_offset, size in zip(layout.offsets, layout.logical_offsets, layout.sizes):
            out[offset : offset + size] = values[logical_offset - start : logical_offset - start + size]
        return out
    for offset, noise_offset, size in zip(layout.offsets, layout.noise_offsets, layout.sizes):
        out[offset : offset + size] = standard_normals(seed, step, noise_offset, size, dtype=np.float64,
                                                       version=version)
    return out
