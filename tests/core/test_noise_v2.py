"""Noise format 2 (``specs/noise-v2.md``): known answers, binary32 accuracy, statistics, and
the one keyword that selects it (door, optimizer, state dict, config)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import upgd_ref
from upgd_ref import FlatLayout, rng, rng_v2
from upgd_ref.config import ConfigError, load_config
from upgd_ref.tolerances import unit_roundoff

# specs/noise-v2.md §8: (seed, step, start) -> binary32 bits of the normals from start on.
KNOWN_ANSWERS = [
    (0, 1, 0, [0x3F88A6CB, 0xBED9C6B5, 0xC0178CDF, 0xBE6D0D85, 0x3ECF57D0, 0xBF0D6118, 0xBF887D8A, 0x3F061779]),
    (2**64 - 1, 2**40 + 3, 2**34 - 2, [0x3F692107, 0x3ED7C341, 0xBF7ECA7E, 0xBFB38E6E, 0x3E4FCF97, 0x3F85E68E]),
    (0x0123456789ABCDEF, 7, 10**12, [0xBFC92804, 0xBEE4D9CE, 0x3E839014, 0x3FF190E9]),
]
# specs/noise-v2.md §8.4: word -> binary32 bits of LOG and r, and of COS and SIN.
RADIUS_ANSWERS = {0x844515E1: (0xBF290B98, 0x3F931911), 0x00000000: (0xC1B6FDA9, 0x40D87047),
                  0xFFFFFFFF: (0xAF000000, 0x37800000), 0x7FFFFFFF: (0xBF317218, 0x3F96B55F),
                  0x80000000: (0xBF317218, 0x3F96B55F)}
ANGLE_ANSWERS = {0xF08D6EAA: (0x3F6DD1DD, 0xBEBD8085), 0x83F875F0: (0xBF7EC90D, 0xBDC7440E),
                 0x20000000: (0x3F3504F3, 0x3F3504F3), 0xFFFFFFFF: (0x3F800000, 0xB0490FDB)}


def _u32(values):
    return np.asarray(values, dtype=np.uint64).astype(np.uint32)


def _bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("seed,step,start,expected", KNOWN_ANSWERS)
def test_known_answers(seed, step, start, expected):
    z = rng.standard_normals(seed, step, start, len(expected), dtype=np.float32, version=2)
    assert _bits(z).tolist() == expected
    wide = rng.standard_normals(seed, step, start, len(expected), version=2)
    assert wide.dtype == np.float64 and np.array_equal(wide, z.astype(np.float64))  # widened exactly


def test_intermediate_known_answers():
    for word, (log_bits, r_bits) in RADIUS_ANSWERS.items():
        log = rng_v2.log_of_uniform(np, _u32([word]))
        assert log.dtype == np.float32 and _bits(log)[0] == log_bits
        assert _bits(np.sqrt(np.float32(-2.0) * log))[0] == r_bits
    for word, (cos_bits, sin_bits) in ANGLE_ANSWERS.items():
        cos, sin = rng_v2.cos_sin_of_turn(np, _u32([word]))
        assert (_bits(cos)[0], _bits(sin)[0]) == (cos_bits, sin_bits)


def _edge_and_random_words(count):
    octants = [o * 2**29 + d for o in range(8) for d in (-1, 0, 1) if 0 <= o * 2**29 + d < 2**32]
    edges = [0, 1, 2, 2**23 - 1, 2**23, 2**24, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]
    random = np.random.default_rng(19).integers(0, 2**32, count, dtype=np.uint64)
    return np.concatenate([_u32(edges + octants), random.astype(np.uint32)])


def test_binary32_transform_is_accurate_to_a_few_ulps():
    """specs/noise-v2.md §9: LOG and r within 2 ulps, COS and SIN within 1.1e-7 absolute."""
    words = _edge_and_random_words(200_000)
    u = (words.astype(np.float64) + 0.5) * 2.0**-32
    log = rng_v2.log_of_uniform(np, words).astype(np.float64)
    exact_log = np.log(u)  # float64: exact enough against binary32 ulps
    assert np.max(np.abs(log - exact_log) / np.spacing(np.abs(exact_log).astype(np.float32))) <= 2
    cos, sin = rng_v2.cos_sin_of_turn(np, words)
    theta = 2 * np.pi * u
    assert np.max(np.abs(cos - np.cos(theta))) < 1.1e-7
    assert np.max(np.abs(sin - np.sin(theta))) < 1.1e-7


def test_normals_are_within_four_ulps_of_the_exact_box_muller():
    z = rng.standard_normals(3, 5, 0, 400_000, dtype=np.float32, version=2)
    exact = rng.standard_normals(3, 5, 0, 400_000)  # format 1: float64, within 1.1e-15 of exact
    ulps = np.abs(z.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(np.float32))
    assert np.max(ulps) <= 4
    assert 0.4 < np.mean(z == exact.astype(np.float32)) < 0.8  # a different format, not format 1 renamed


def test_statistics_of_four_million_normals():
    z = rng.standard_normals(0, 1, 0, 4_000_000, dtype=np.float32, version=2).astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    for k in (1, 2, 3, 4):
        expected = math.erfc(k / math.sqrt(2))
        assert abs(np.mean(np.abs(z) > k) - expected) < 5 * math.sqrt(expected / n) + 1e-6
    assert np.all(np.isfinite(z)) and np.all(z != 0)
    assert np.max(np.abs(z)) <= float(np.float32(rng.NORMAL_MAX) * np.float32(1 + 2 * unit_roundoff(np.float32)))


def test_the_extremes():
    """Word 0 gives the largest radius (as format 1), word 2**32 - 1 the smallest, 2**-16."""
    r = np.sqrt(np.float32(-2.0) * rng_v2.log_of_uniform(np, _u32([0, 2**32 - 1])))
    assert r[0] == np.float32(math.sqrt(66 * math.log(2))) and r[1] == np.float32(2.0**-16)


def test_chunking_invariance():
    whole = rng.standard_normals(7, 3, 5, 1000, dtype=np.float32, version=2)
    pieces = [rng.standard_normals(7, 3, 5 + a, b - a, dtype=np.float32, version=2)
              for a, b in ((0, 3), (3, 10), (10, 999), (999, 1000))]
    assert _bits(np.concatenate(pieces)).tolist() == _bits(whole).tolist()


@pytest.mark.parametrize("bad,error", [(3, ValueError), (0, ValueError), ("2", TypeError), (True, TypeError),
                                       (2.0, TypeError)])
def test_bad_versions_raise_naming_the_keyword(bad, error):
    layout = FlatLayout([(4,)], dtype="float32")
    for call in (lambda: rng.standard_normals(0, 1, 0, 4, version=bad),
                 lambda: upgd_ref.noise(layout, 0, 1, noise_version=bad, backend="reference"),
                 lambda: upgd_ref.AdaptiveUPGD(layout, noise_version=bad)):
        with pytest.raises(error, match="noise_version"):
            call()


def test_format_1_stays_the_default_everywhere():
    layout = FlatLayout([(10,), (3, 3)], dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, seed=4)
    assert opt.noise_version == 1 and "noise_version" not in opt.state_dict()
    assert np.array_equal(opt.noise(), rng.noise(layout, 4, 1))


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_the_optimizer_draws_format_2_and_the_state_dict_records_it(backend):
    layout = FlatLayout([(10,), (3, 3)], dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, seed=4, noise_version=2, backend=backend)
    assert _bits(opt.noise()).tolist() == _bits(rng.noise(layout, 4, 1, version=2)).tolist()
    params, grads = layout.zeros(), layout.zeros()
    grads[...] = 0.5
    opt.step(params, grads)
    saved = opt.state_dict()
    assert saved["noise_version"] == 2
    fresh = upgd_ref.AdaptiveUPGD(layout, seed=4)
    fresh.load_state_dict(saved)
    assert fresh.noise_version == 2 and np.array_equal(fresh.noise(), opt.noise())
    older = dict(saved)
    del older["noise_version"]  # a state dict without the field: format 1
    fresh.load_state_dict(older)
    assert fresh.noise_version == 1


def test_a_bad_recorded_version_changes_nothing():
    layout = FlatLayout([(4,)], dtype="float32")
    opt = upgd_ref.AdaptiveUPGD(layout, seed=4, noise_version=2)
    saved = dict(opt.state_dict(), noise_version=5, seed=9)
    with pytest.raises(ValueError, match="noise_version"):
        opt.load_state_dict(saved)
    assert (opt.noise_version, opt.seed) == (2, 4)


def test_config_selects_the_format():
    config = load_config({"optimizer": "AdaptiveUPGD", "optimizer_kwargs": {"noise_version": 2}})
    assert config.noise_version == 2 and config.optimizer_kwargs()["noise_version"] == 2
    assert config.to_dict()["optimizer_kwargs"]["noise_version"] == 2
    assert "noise_version" not in load_config({"optimizer": "AdaptiveUPGD"}).optimizer_kwargs()
    with pytest.raises(ConfigError, match="noise_version"):
        load_config({"optimizer": "AdaptiveUPGD", "optimizer_kwargs": {"noise_version": 7}})
