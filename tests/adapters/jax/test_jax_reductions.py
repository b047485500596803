"""The native path's fast folded sums (``adapters/jax/reductions.py``, ``specs/adapters-jax.md``
§9.2): under ``jax.jit`` the bits of the core's :func:`upgd_ref.folded_sum.folded_sum` of
``float64(leaf)`` and of its square, for every leaf dtype, shape, and edge value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgd_ref.adapters.jax.leaves import x64_scope
from upgd_ref.adapters.jax.reductions import leaf_folded_sum, squares_total
from upgd_ref.folded_sum import folded_sum
from upgd_ref.reference import sum_of_squares


@jax.jit
def _sums(leaf):
    with x64_scope():
        return leaf_folded_sum(leaf), leaf_folded_sum(leaf, square=True), sum_of_squares(leaf, squares_total(leaf))


@jax.jit
def _product_sums(leaf, factor):
    """A leaf that is a product (the VGS's ``f g``) must be summed as rounded, not contracted."""
    with x64_scope():
        scaled = leaf * factor
        return leaf_folded_sum(scaled), leaf_folded_sum(scaled, square=True)


def _same(got, want) -> bool:
    got = np.asarray(got)
    return bool(np.isnan(got) and np.isnan(want)) or got.tobytes() == np.float64(want).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_leaf_folded_sum_is_the_core_folded_sum_bit_for_bit(dtype):
    rng = np.random.default_rng(0)
    with x64_scope():
        for trial in range(12):
            n = int(rng.integers(1, 20_000))
            scale = 10.0 ** rng.integers(-4, 4)
            leaf = jnp.asarray(rng.standard_normal(n) * scale, dtype=dtype)
            if trial % 3 == 1:
                leaf = leaf.reshape(n, 1)
            if trial % 3 == 2:
                leaf = leaf.at[(0,) * leaf.ndim].set(0.0)
            wide = np.asarray(leaf.astype(jnp.float64))
            signed, squares, through_reference = _sums(leaf)
            assert _same(signed, folded_sum(wide))
            assert _same(squares, folded_sum(wide * wide))
            assert _same(through_reference, folded_sum(wide * wide))


def test_edges_empty_non_finite_and_float64_products():
    with x64_scope():
        empty = jnp.zeros((0, 3), jnp.float32)
        assert [float(s) for s in _sums(empty)] == [0.0, 0.0, 0.0]
        for bad in (np.nan, np.inf, -np.inf):
            leaf = jnp.asarray([1.0, bad, -2.0], jnp.float32)
            assert all(np.isnan(np.asarray(s)) for s in _sums(leaf))
        huge = jnp.asarray([1e200, -3.0], jnp.float64)  # finite, but its square overflows: NaN like the core
        assert np.isnan(np.asarray(_sums(huge)[1])) and np.isnan(folded_sum(np.asarray(huge) ** 2))
        rng = np.random.default_rng(1)
        for _ in range(40):
            g = rng.standard_normal(int(rng.integers(100, 5000)))
            f = np.float64(rng.uniform(0.1, 1.0))
            signed, squares = _product_sums(jnp.asarray(g), jnp.asarray(f))
            assert _same(signed, folded_sum(g * f))
            assert _same(squares, folded_sum((g * f) ** 2))
