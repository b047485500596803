"""The JAX adapter's noise is the core's noise, bit for bit (specs/noise.md, specs/adapters-jax.md §6).

The native path computes the counter-based normals with ``jax.numpy`` (Philox in uint32
operations, the Box-Muller transform in float64 inside the adapter's float64 scope) and keeps
XLA from contracting the transform's products into fused multiply-adds. These tests compare
with ``upgd_ref.standard_normals`` / ``upgd_ref.noise`` exactly: eagerly, under ``jax.jit``, in
float32 and float64, at the counter edges and over 10M draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import upgd_ref
from upgd_ref import rng
from upgd_ref.adapters import jax as uj

EDGES = [
    # (seed, step, start, count): ordinary, unaligned start, 64-bit seed and step words,
    # the block_hi boundary at index 2**34, and a start past 2**40.
    (0, 1, 0, 8),
    (5, 9, 3, 1001),
    (2**64 - 1, 2**40 + 3, 2**34 - 2, 6),
    (0x0123456789ABCDEF, 7, 10**12, 4),
    (5, 2**32 + 5, 2**34 - 7, 50),
    (2**32, 2**63 - 1, 2**41 + 1, 17),
]


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint64 if x.dtype == np.float64 else np.uint32)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed,step,start,count", EDGES)
def test_standard_normals_equal_the_core(seed, step, start, count, dtype):
    expected = _bits(rng.standard_normals(seed, step, start, count, dtype=np.dtype(dtype)))
    with uj.x64_scope():
        traced_step = jnp.asarray(step, dtype=jnp.uint64)
    jitted = jax.jit(lambda s: uj.standard_normals(seed, s, start, count, getattr(jnp, dtype)))
    np.testing.assert_array_equal(_bits(jitted(traced_step)), expected)
    np.testing.assert_array_equal(_bits(uj.standard_normals(seed, step, start, count, getattr(jnp, dtype))), expected)


def _tree(total):
    """A params pytree of ``total`` float32 elements in uneven leaves (unaligned offsets)."""
    third = total // 3
    return {"a": jax.ShapeDtypeStruct((third - 1,), jnp.float32),
            "b": jax.ShapeDtypeStruct((7, (total - 2 * third) // 7), jnp.float32),
            "c": jax.ShapeDtypeStruct((third + 1,), jnp.float32)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ten_million_draws_under_jit_are_bit_identical(dtype):
    """specs/adapters-jax.md §6: zero mismatches over >= 10M draws, in both x64 modes."""
    spec = _tree(10_000_005)
    with uj.x64_scope() if dtype == "float64" else jax.enable_x64(False):
        params = {k: jnp.zeros(v.shape, dtype) for k, v in spec.items()}
        normals = jax.jit(lambda p, s: uj.noise(p, 20240601, s))(params, jnp.asarray(3))
        leaves = jax.tree_util.tree_leaves(normals)
    total = sum(leaf.size for leaf in leaves)
    assert total >= 10_000_000
    layout = upgd_ref.FlatLayout([leaf.shape for leaf in leaves], dtype)
    expected = layout.unpack(upgd_ref.noise(layout, 20240601, 3))
    for got, want in zip(leaves, expected):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(_bits(got), _bits(want))


def test_float32_noise_is_the_same_in_both_x64_modes():
    params = [jnp.zeros((33,), jnp.float32), jnp.zeros((4, 5), jnp.float32)]
    narrow = jax.tree_util.tree_leaves(jax.jit(lambda s: uj.noise(params, 11, s))(5))
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_leaves(jax.jit(lambda s: uj.noise(params, 11, s))(5))
    for a, b in zip(narrow, wide):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_optimizer_noise_counter_is_the_step_number():
    """The n-th update draws ``noise(params, seed, n)``: an update from zero gradients, zero
    parameters and no weight decay is ``-lr * sigma * xi * (1 - sigmoid(-1))`` in float64,
    where every other term is exactly zero (the core's own step gives the same)."""
    with jax.enable_x64(True):
        params = {"w": jnp.zeros((3, 5)), "b": jnp.zeros((4,))}
        tx = uj.adaptive_upgd(0.5, weight_decay=0.0, sigma=0.25, seed=77)
        state = tx.init(params)
        for n in (1, 2, 3):
            updates, state = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
            layout = upgd_ref.FlatLayout([(4,), (3, 5)], "float64")  # flatten order: "b", "w"
            core = upgd_ref.AdaptiveUPGD(layout, lr=0.5, weight_decay=0.0, sigma=0.25, seed=77)
            core.state.step = n - 1
            flat = layout.zeros()
            core.step(flat, layout.zeros())
            for got, want in zip(jax.tree_util.tree_leaves(updates), layout.unpack(flat)):
                np.testing.assert_array_equal(np.asarray(got), want)
            xi = jax.tree_util.tree_leaves(uj.noise(params, 77, n))
            assert all(np.all(np.sign(np.asarray(u)) == -np.sign(np.asarray(z)))
                       for u, z in zip(jax.tree_util.tree_leaves(updates), xi))


def test_contracted_evaluation_stays_within_a_few_ulps():
    """``strict=False`` (XLA may fuse multiply-adds) is the measured alternative of §5: its
    float64 values differ from the core's in some draws, by at most a few ulps."""
    with uj.x64_scope():
        got = np.asarray(jax.jit(lambda s: uj.standard_normals(3, s, 0, 200_000, strict=False))(jnp.asarray(2)))
    want = rng.standard_normals(3, 2, 0, 200_000)
    ulps = np.abs(got - want) / np.spacing(np.abs(want))
    assert ulps.max() <= 4.0


@pytest.mark.parametrize("bad,error", [
    (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError), (dict(seed=1.5), TypeError),
    (dict(start=-3), ValueError), (dict(count=True), TypeError), (dict(step=2**64), ValueError),
    (dict(dtype=jnp.int32), TypeError), (dict(count=2**32), ValueError),
])
def test_standard_normals_reject_bad_arguments(bad, error):
    args = dict(seed=1, step=1, start=0, count=4, dtype=None)
    args.update(bad)
    with pytest.raises(error):
        uj.standard_normals(args["seed"], args["step"], args["start"], args["count"], args["dtype"])
