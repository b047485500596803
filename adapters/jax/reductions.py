"""The native path's per-segment reductions with fewer passes over memory in XLA:CPU
(``specs/adapters-jax.md`` §9.2): the same values, bit for bit, as the definitions they
replace.

XLA:CPU runs a ``max``/``sum`` of a leaf (or of an element-wise expression of one) as one
fused pass, but materialises an array-sized temporary for a value that two reductions
read, and compiled :func:`upgd_ref.folded_sum.folded_sum` into four such temporaries (``y``
and each fold's pieces, each recomputed from the previous). Here ``top`` is taken from the
leaf itself and the three fold sums are one variadic ``lax.reduce`` over the pieces
computed in its loop: two passes, no temporary. Each fold's sum is exact, so the order of
its additions does not matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from upgd_ref.folded_sum import FOLDS, fold_exponent, fold_grids, fold_pieces, fold_total

from .elementwise import uncontracted


def _add_each(left, right):
    return tuple(a + b for a, b in zip(left, right))


def leaf_folded_sum(leaf, square: bool = False):
    """:func:`upgd_ref.folded_sum.folded_sum` of ``w = float64(leaf)`` (``square``: of
    ``w * w``), bit for bit. ``top = max |w|`` (``square``: its square, the largest ``w * w``
    since rounding is monotonic) is one fused pass over the leaf in its own dtype (exact);
    the ``FOLDS`` fold sums are one variadic reduction."""
    count = leaf.size
    if count == 0:
        return jnp.zeros((), jnp.float64)
    top = jnp.max(jnp.abs(leaf)).astype(jnp.float64)
    # through a select LLVM cannot fold into the pieces' first addition: a leaf that is a
    # product (f g) stays as rounded, as the definition has it, whatever XLA fuses
    y = uncontracted(leaf.astype(jnp.float64))
    if square:
        top, y = top * top, uncontracted(y * y)
    grids = fold_grids(fold_exponent(top, count), count, y)
    zero = jnp.zeros((), jnp.float64)
    sums = jax.lax.reduce(tuple(fold_pieces(y, grids)), (zero,) * FOLDS, _add_each, tuple(range(y.ndim)))
    return fold_total(list(sums))


def squares_total(leaf):
    """The ``total`` that :func:`upgd_ref.reference.sum_of_squares` applies to ``y = w * w``
    (``w = float64(leaf)``): ``folded_sum(y)``, computed from ``leaf`` (``y``, the same
    values, is left unused, so XLA drops it)."""
    return lambda y: leaf_folded_sum(leaf, square=True)
