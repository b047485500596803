"""The folded sum (``upgd_ref.folded_sum``, ``specs/adapters-jax.md`` §11): the same bits for
any order and any partition of the additions, within its error bound of the exact sum."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upgd_ref.folded_sum import fold_exponent, fold_sums, fold_total, folded_sum


def _values(rng, n, squares):
    y = rng.standard_normal(n) * np.exp2(rng.integers(-60, 60, n).astype(np.float64))
    return y * y if squares else y


@pytest.mark.parametrize("squares", [False, True], ids=["signed", "squares"])
def test_any_order_and_partition_gives_the_same_bits(squares):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 5000))
        y = _values(rng, n, squares)
        want = folded_sum(y)
        shuffled = y[rng.permutation(n)]
        assert folded_sum(shuffled) == want
        k1 = fold_exponent(np.max(np.abs(y)), n)  # the global max and count, as the devices share them
        parts = np.split(shuffled, np.sort(rng.integers(0, n, 5)))
        sums = [fold_sums(part, k1, n) for part in parts]
        assert fold_total([sum(fold) for fold in zip(*reversed(sums))]) == want


def test_within_its_error_bound_of_the_exact_sum():
    rng = np.random.default_rng(1)
    for squares in (False, True):
        for n in (1, 7, 1000, 100_000):
            y = _values(rng, n, squares)
            exact = math.fsum(y)
            c = n.bit_length() + 1
            bound = np.spacing(abs(exact)) + 2.0 ** (4 * c - 157) * np.max(np.abs(y))
            assert abs(folded_sum(y) - exact) <= bound


def test_edges():
    assert folded_sum(np.zeros(4)) == 0.0
    assert folded_sum(np.zeros(0)) == 0.0
    assert folded_sum(np.array([2.0**-1074, 2.0**-1074])) == 2.0**-1073  # subnormals add exactly
    with np.errstate(invalid="ignore"):
        assert np.isnan(folded_sum(np.array([np.inf, 1.0])))
        assert np.isnan(folded_sum(np.array([np.nan, 1.0])))
