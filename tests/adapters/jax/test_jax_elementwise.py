"""The program-independent element-wise operations of the native step
(``upgd_ref.adapters.jax.elementwise``, ``specs/adapters-jax.md`` §11), each against the
IEEE operation computed by NumPy, under ``jax.jit`` where XLA:CPU would otherwise rewrite it:
a division by a scalar (a reciprocal multiplication), a float32 ``exp`` of a short array
(the C library's ``expf`` instead of XLA's polynomial), a multiply-add (one FMA)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgd_ref.adapters.jax.elementwise import program_independent
from upgd_ref.tolerances import unit_roundoff


def _independent(fn):
    return jax.jit(lambda *args: program_independent(fn, *args))


def test_a_division_by_a_scalar_is_a_division():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(100_000).astype(np.float32)
    s = np.float32(rng.uniform(0.5, 2.0))
    want = a / s
    plain = np.asarray(jax.jit(lambda a, s: a / s)(a, s))
    got = np.asarray(_independent(lambda a, s: a / s)(a, s))
    assert np.any(plain != want)  # XLA's reciprocal: the rewrite this guards against is there
    np.testing.assert_array_equal(got, want)


def test_a_division_keeps_nan_and_infinities():
    a = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 3.0], dtype=np.float32)
    for s in (np.float32(2.0), np.float32(0.0), np.float32(np.inf), np.float32(np.nan)):
        with np.errstate(divide="ignore", invalid="ignore"):
            want = a / s
        np.testing.assert_array_equal(np.asarray(_independent(lambda a, s: a / s)(a, s)), want)


@pytest.mark.parametrize("size", [1, 3, 6, 7, 48, 100_003])
def test_float32_exp_is_the_float64_exp_rounded_once_at_every_length(size):
    x = np.random.default_rng(size).uniform(-3.0, 3.0, size).astype(np.float32)
    edges = np.array([0.0, -0.0, 88.7, 89.0, -103.0, -104.0, -200.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    x = np.concatenate([x, edges])
    got = np.asarray(_independent(jnp.exp)(x))
    assert got.dtype == np.float32
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    want[np.abs(want) < np.finfo(np.float32).tiny] = 0.0  # XLA:CPU flushes subnormal results to zero
    # one float32 ulp: XLA's float64 exp and NumPy's may differ in their last bit, which can move
    # the one rounding to float32 by one ulp; inf, 0 and NaN exactly
    np.testing.assert_allclose(got, want, rtol=2 * unit_roundoff(np.float32), atol=0)


def test_float32_exp_is_the_same_in_short_and_long_arrays():
    x = np.random.default_rng(5).uniform(-2.0, 2.0, 6000).astype(np.float32)
    long = np.asarray(_independent(jnp.exp)(x))
    short = np.concatenate([np.asarray(_independent(jnp.exp)(x[i:i + 6])) for i in range(0, 600, 6)])
    plain_long = np.asarray(jax.jit(jnp.exp)(x))
    plain_short = np.concatenate([np.asarray(jax.jit(jnp.exp)(x[i:i + 6])) for i in range(0, 600, 6)])
    assert np.any(plain_long[:600] != plain_short)  # XLA's own exp against expf: the difference this removes
    np.testing.assert_array_equal(long[:600], short)


def test_products_feeding_additions_round_twice():
    rng = np.random.default_rng(7)
    a, b, c, d = (rng.standard_normal(100_000).astype(np.float32) for _ in range(4))
    want = a * b + c * d - a * d  # NumPy: every product rounded, then each addition
    fn = _independent(lambda a, b, c, d: a * b + c * d - a * d)
    np.testing.assert_array_equal(np.asarray(fn(a, b, c, d)), want)
    nan = np.array([np.nan, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(fn(nan, nan, nan, nan)), np.array([np.nan, 1.0], np.float32))


def test_static_leaves_and_pytrees_pass_through():
    def fn(tree, scale, name):
        assert name == "x" and tree["n"] == 2  # strings and Python numbers are constants of the trace
        return {"y": tree["a"] / tree["s"] * scale}

    a = np.arange(1.0, 5.0, dtype=np.float32)
    out = program_independent(fn, {"a": jnp.asarray(a), "s": jnp.float32(3.0), "n": 2}, 0.5, "x")
    np.testing.assert_array_equal(np.asarray(out["y"]), a / np.float32(3) * np.float32(0.5))
