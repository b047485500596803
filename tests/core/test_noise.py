"""The noise generator: Random123 known answers, the normal transform, index invariance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import upgd_ref
from upgd_ref.rng import _cos_sin_of_turn, _log_of_uniform, philox4x32_10, standard_normals

# Random123 tests/kat_vectors, philox4x32_10 (counter; key -> output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("wide", [False, True], ids=["limbs", "uint64"])
@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected, wide):
    words = philox4x32_10(tuple(np.array([c], dtype=np.uint32) for c in counter), key, wide=wide)
    assert tuple(int(w[0]) for w in words) == expected


def test_philox_products_agree_on_random_counters():
    counters = tuple(np.random.default_rng(k).integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
                     for k in range(4))
    for a, b in zip(philox4x32_10(counters, (2**32 - 1, 12345)), philox4x32_10(counters, (2**32 - 1, 12345), wide=True)):
        np.testing.assert_array_equal(a, b)


def _all_word_samples():
    rng = np.random.default_rng(0)
    edges = np.array([0, 1, 2, 2**29 - 1, 2**29, 2**30, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=np.uint32)
    octant_edges = (np.arange(8, dtype=np.uint64) << np.uint64(29)).astype(np.uint32)
    return np.concatenate([edges, octant_edges, octant_edges - np.uint32(1),
                           rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)])


def test_log_transform_is_accurate():
    words = _all_word_samples()
    u = (words.astype(np.float64) + 0.5) * 2.0**-32
    log = _log_of_uniform(np, words)
    assert np.max(np.abs(log - np.log(u)) / np.abs(np.log(u))) < 4 * 2.0**-52


def test_cos_sin_transform_is_accurate():
    words = _all_word_samples()
    theta = 2 * np.pi * ((words.astype(np.float64) + 0.5) * 2.0**-32)
    cos, sin = _cos_sin_of_turn(np, words)
    # theta itself carries a rounding error of up to 2*pi*2**-53, hence 8 ulp of 1.
    assert np.max(np.abs(cos - np.cos(theta))) < 8 * 2.0**-52
    assert np.max(np.abs(sin - np.sin(theta))) < 8 * 2.0**-52
    assert np.max(np.abs(cos * cos + sin * sin - 1)) < 8 * 2.0**-52


def test_normals_have_standard_moments():
    z = standard_normals(11, 3, 0, 400_000)
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / n)
    assert np.all(np.isfinite(z))


def test_float32_normals_are_float64_rounded_once():
    z64 = standard_normals(5, 9, 100, 1000)
    z32 = standard_normals(5, 9, 100, 1000, dtype=np.float32)
    assert z32.dtype == np.float32
    np.testing.assert_array_equal(z32, z64.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    step=st.integers(0, 2**64 - 1),
    start=st.integers(0, 2**40),
    cuts=st.lists(st.integers(0, 70), min_size=1, max_size=5),
)
def test_chunked_generation_equals_whole(seed, step, start, cuts):
    total = sum(cuts)
    whole = standard_normals(seed, step, start, total)
    pieces, position = [], start
    for n in cuts:
        pieces.append(standard_normals(seed, step, position, n))
        position += n
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_block_high_word_boundary_is_continuous():
    start = 4 * 2**32 - 6  # crosses block index 2**32, where the counter's high word changes
    whole = standard_normals(1, 1, start, 12)
    left = standard_normals(1, 1, start, 6)
    right = standard_normals(1, 1, start + 6, 6)
    np.testing.assert_array_equal(whole, np.concatenate([left, right]))
    assert not np.array_equal(left, right)


def test_seed_step_and_index_all_change_the_draws():
    base = standard_normals(1, 1, 0, 64)
    for other in (standard_normals(2, 1, 0, 64), standard_normals(1, 2, 0, 64), standard_normals(1, 1, 64, 64),
                  standard_normals(1 + 2**32, 1, 0, 64), standard_normals(1, 1 + 2**32, 0, 64)):
        assert not np.any(base == other)


def test_noise_buffer_follows_logical_indices():
    shapes = [(3, 5), (0,), (7,), (2, 2, 2)]
    for dtype in ("float32", "float64"):
        layout = upgd_ref.FlatLayout(shapes, dtype=dtype)
        flat = upgd_ref.noise(layout, seed=42, step=7)
        assert flat.dtype == layout.dtype and flat.shape == (layout.size,)
        logical = standard_normals(42, 7, 0, layout.num_logical, dtype=layout.dtype)
        np.testing.assert_array_equal(np.concatenate([s.reshape(-1) for s in layout.unpack(flat)]), logical)
        mask = np.ones(layout.size, bool)
        for i in range(layout.num_segments):
            mask[layout.segment_slice(i)] = False
        assert np.all(flat[mask] == 0)  # padding


def test_layouts_differing_only_in_padding_draw_identical_noise():
    shapes = [(5,), (3, 3), (1,)]
    a = upgd_ref.FlatLayout(shapes, "float32")
    b = upgd_ref.FlatLayout(shapes, "float64")
    assert a.offsets != b.offsets
    for x, y in zip(a.unpack(upgd_ref.noise(a, 3, 1)), b.unpack(upgd_ref.noise(b, 3, 1))):
        np.testing.assert_array_equal(x, y.astype(np.float32))


def test_optimizer_uses_the_public_noise(tmp_path):
    """With lr = 1, no moments, no decay and flat utility the update is -std * xi * (1 - su)."""
    layout = upgd_ref.FlatLayout([(6,), (4,)], dtype="float64")
    opt = upgd_ref.AdaptiveUPGD(layout, lr=1.0, weight_decay=0.0, sigma=0.5, seed=99, beta1=0.0, beta2=0.0)
    params, grads = layout.zeros(), layout.zeros()  # zero gradient: u stays 0, x = 0, su = sigmoid(-1)
    for step in (1, 2, 3):
        before = params.copy()
        opt.step(params, grads)
        xi = upgd_ref.noise(layout, 99, step)
        expected = before - 0.5 * xi * (1 - 1 / (1 + np.exp(1.0)))
        np.testing.assert_allclose(params, expected, rtol=1e-15, atol=1e-300)
        np.testing.assert_array_equal(opt.noise(step), xi)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True, "3"])
def test_seed_and_step_must_be_64_bit_integers(bad):
    with pytest.raises((TypeError, ValueError)):
        standard_normals(bad, 1, 0, 4)
    with pytest.raises((TypeError, ValueError)):
        standard_normals(1, bad, 0, 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_frexp_exponent_split_equals_the_binary_search(dtype):
    """``exponent_split`` through ``frexp`` (NumPy, ``jax.numpy``) gives the spec's search's
    ``(t, k)`` bit for bit: every power of two and its neighbours around ``SQRT2`` (the halving
    threshold), and random words (an exhaustive run over every word agreed, ``specs/noise.md`` §5)."""
    from upgd_ref import rng, rng_v2
    from upgd_ref.rng import _exponent_search, exponent_split

    sqrt2, sqrt_half = (rng.SQRT2, rng.SQRT_HALF) if dtype == np.float64 else (rng_v2.SQRT2, rng_v2.SQRT_HALF)
    anchors = np.array([2.0**e * s for e in range(-1, 32) for s in (1.0, sqrt2, 2.0 - 2.0**-20)], dtype)
    near = np.concatenate([np.nextafter(anchors, np.inf, dtype=dtype), anchors, np.nextafter(anchors, 0, dtype=dtype)])
    words = np.random.default_rng(3).integers(0, 2**32, 100_000, dtype=np.uint64).astype(dtype) + dtype(0.5)
    x = np.concatenate([near[near >= 0.5], words])
    for got, want in zip(exponent_split(np, x, sqrt2, sqrt_half), _exponent_search(np, x, sqrt2, sqrt_half)):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
