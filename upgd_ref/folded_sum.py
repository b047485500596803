r"""A sum of float64 values that does not depend on the order of its additions
(``specs/adapters-jax.md`` §11): the per-segment sums of the JAX native path.

XLA chooses its own reduction order, and under ``jax.jit`` with sharded arrays the SPMD
partitioner adds per-device partial sums, so a plain ``jnp.sum`` changes its last bits with
the sharding. Here every value ``y`` is split, ReproBLAS-style (Demmel and Nguyen,
"Reproducible summation", 2015), into ``FOLDS`` pieces on fixed grids that depend only on
``top = max |y|`` and the count ``n`` (both order-independent):

.. math::

    c = \mathrm{bitlen}(n) + 1,\quad k_1 = e(top) + c,\quad k_{f+1} = k_f - 53 + c,\quad
    B_f = 1.5 \cdot 2^{k_f},\quad h_f = (r_f + B_f) - B_f,\quad r_{f+1} = r_f - h_f,\quad r_1 = y

with ``e(top)`` the exponent of ``frexp`` (``top < 2**e``). Each ``h_f`` is ``r_f`` rounded to
a multiple of ``2**(k_f - 52)`` and ``|h_f| <= 2**(k_f - c) + 2**(k_f - 53)``, so any partial
sum of the ``n`` pieces is a multiple of that quantum below ``2**53`` quanta: **every fold's
sum is exact**, hence the same for any order, grouping or partition of the additions. The
result is ``(S_1 + S_2) + S_3``, rounded in that order. Its error against the exact sum is at
most one rounding of the result plus ``n * 2**(k_3 - 53)`` (the dropped residuals), which is
``<= 2**(4c - 158)`` relative to ``top``: below ``2**-50`` up to ``n = 2**25``.

Non-finite values give NaN (``B`` absorbs an infinity into ``inf - inf``), and so do values
with ``top >= 2**(1022 - c)`` (``B`` overflows); both make the step non-finite, which the
finiteness contract (``specs/algorithm.md`` §8) refuses.

Written against ``xp`` with ``frexp`` and ``ldexp`` (NumPy, ``jax.numpy``).
"""

from __future__ import annotations

from array_api_compat import array_namespace

__all__ = ["FOLDS", "fold_exponent", "fold_grids", "fold_pieces", "fold_sums", "fold_total", "folded_sum"]

#: Pieces per value: 3 keep the dropped residual below 2**-50 of max |y| up to 2**25 values.
FOLDS = 3
_MANTISSA = 53


def _margin(count: int) -> int:
    """``c``: bits of headroom so that ``count`` pieces add up below ``2**53`` quanta."""
    return max(int(count), 1).bit_length() + 1


def fold_exponent(top, count: int):
    """``k_1 = e(top) + c`` for ``top = max |y|`` (float64 scalar) over ``count`` values."""
    xp = array_namespace(top)
    _, exponent = xp.frexp(top)
    return exponent + _margin(count)


def fold_grids(k1, count: int, like):
    """The ``FOLDS`` grid values ``B_f = 1.5 * 2**k_f`` (scalars of ``like``'s dtype) from ``k1``."""
    xp = array_namespace(like)
    grids, k = [], k1
    for _ in range(FOLDS):
        grids.append(xp.ldexp(xp.asarray(1.5, dtype=like.dtype), k))
        k = k - _MANTISSA + _margin(count)
    return grids


def fold_pieces(y, grids):
    """The pieces ``h_f = (r_f + B_f) - B_f``, ``r_{f+1} = r_f - h_f`` of ``y`` (arrays like ``y``)."""
    pieces, r = [], y
    for b in grids:
        h = (r + b) - b
        r = r - h
        pieces.append(h)
    return pieces


def fold_sums(y, k1, count: int):
    """The ``FOLDS`` exact sums ``S_f`` of the pieces of ``y`` (float64, any shape) on the
    grids of ``k1`` (:func:`fold_exponent` of the *global* ``max |y|`` and count): the
    partial sums of any subset of the values, added in any order, give the same totals."""
    xp = array_namespace(y)
    return [xp.sum(h) for h in fold_pieces(y, fold_grids(k1, count, y))]


def fold_total(sums):
    """``(S_1 + S_2) + S_3``: the sum, from the exact fold sums (added across parts first)."""
    total = sums[0]
    for s in sums[1:]:
        total = total + s
    return total


def folded_sum(y):
    """``sum(y)`` of a float64 array, independent of the order of the additions."""
    xp = array_namespace(y)
    count = 1
    for d in y.shape:
        count *= int(d)
    top = xp.max(xp.abs(y)) if count else xp.asarray(0.0, dtype=y.dtype)
    return fold_total(fold_sums(y, fold_exponent(top, count), count))
