"""Noise format 2 (``specs/noise-v2.md``) on ``jax.numpy`` is the core's, bit for bit: eagerly
and under ``jax.jit``, with ``jax_enable_x64`` on and off, at the counter edges and over a
million draws. The binary32 transform's products are kept from fused multiply-adds
(``specs/adapters-jax.md`` §6); the check that this matters is the contracted evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from upgd_ref import rng
from upgd_ref.adapters import jax as uj

EDGES = [(0, 1, 0, 8), (5, 9, 3, 1001), (2**64 - 1, 2**40 + 3, 2**34 - 2, 6), (0x0123456789ABCDEF, 7, 10**12, 4),
         (2**32, 2**31 + 5, 2**41 + 1, 1_000_003)]


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint64 if x.dtype == np.float64 else np.uint32)


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed,step,start,count", EDGES)
def test_format_2_equals_the_core_eager_and_jitted(seed, step, start, count, dtype, x64):
    expected = _bits(rng.standard_normals(seed, step, start, count, dtype=np.dtype(dtype), version=2))
    with jax.enable_x64(x64):
        eager = uj.standard_normals(seed, step, start, count, getattr(jnp, dtype), version=2)
        step_word = step if x64 else step & 0xFFFFFFFF  # without x64 a traced step is a 32-bit integer
        traced = jnp.asarray(step_word, dtype=jnp.uint64 if x64 else jnp.uint32)
        jitted = jax.jit(lambda s: uj.standard_normals(seed, s, start, count, getattr(jnp, dtype), version=2))(traced)
    np.testing.assert_array_equal(_bits(eager), expected)
    if x64 or step == step_word:
        np.testing.assert_array_equal(_bits(jitted), expected)


def test_contracted_evaluation_is_what_the_guard_prevents():
    """With contraction allowed the binary32 transform may differ in the last bits; strict
    evaluation never does (both compared with the core over 200,000 draws)."""
    expected = rng.standard_normals(3, 2, 0, 200_000, dtype=np.float32, version=2)
    strict = jax.jit(lambda s: uj.standard_normals(3, s, 0, 200_000, jnp.float32, version=2))(jnp.asarray(2))
    loose = jax.jit(lambda s: uj.standard_normals(3, s, 0, 200_000, jnp.float32, strict=False, version=2))(
        jnp.asarray(2))
    np.testing.assert_array_equal(_bits(strict), _bits(expected))
    ulps = np.abs(_bits(loose).astype(np.int64) - _bits(expected).astype(np.int64))
    assert ulps.max() <= 8  # a few ulps at most, whatever XLA fuses


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="noise_version"):
        uj.standard_normals(0, 1, 0, 4, version=3)


def test_edge_words_under_jit_equal_the_core():
    """Words 0, 2**32 - 1, the top-bit and octant boundaries, in both places of a pair."""
    from upgd_ref import rng_v2
    from upgd_ref.adapters.jax import normals

    octants = [o * 2**29 + d for o in range(8) for d in (-1, 0, 1) if 0 <= o * 2**29 + d < 2**32]
    edges = [0, 1, 2**23 - 1, 2**23, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1] + octants
    pairs = np.array([(a, b) for a in edges for b in edges], dtype=np.uint64).astype(np.uint32)
    words = (pairs[:, 0], pairs[:, 1], pairs[:, 1], pairs[:, 0])  # each word as radius and as angle
    expected = rng_v2.normals_from_words(np, *words)
    with uj.x64_scope():
        got = jax.jit(lambda *w: normals._lane_normals(w, True, 2))(*(jnp.asarray(w) for w in words))
    for lane in range(4):
        np.testing.assert_array_equal(_bits(np.asarray(got[lane]).astype(np.float32)), _bits(expected[:, lane]))
