"""The reference math and the noise are written against the Array API standard only.

``array_api_strict`` implements the standard and nothing else: running the reference through
it proves there is no NumPy-only call in the math, so JAX, CuPy and PyTorch namespaces can
reuse it (specs/algorithm.md).
"""

from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest

from upgd_ref import reference as ref
from upgd_ref import rng
from upgd_ref.hyperparams import validate_upgd


def _to_strict(arrays):
    return [xps.asarray(a) for a in arrays]


def test_noise_through_array_api_strict_is_bit_identical():
    words = [xps.asarray(np.array([0, 1, 2**31, 2**32 - 1], dtype=np.uint32)) for _ in range(4)]
    strict = rng.philox4x32_10(tuple(words), (5, 6))
    plain = rng.philox4x32_10(tuple(np.asarray(w) for w in words), (5, 6))
    for a, b in zip(strict, plain):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(
        np.asarray(rng.standard_normals(3, 4, 5, 33, xp=xps)), rng.standard_normals(3, 4, 5, 33)
    )


@pytest.mark.parametrize("noise_norm", ["segment", "global"])
def test_reference_step_through_array_api_strict(noise_norm):
    generator = np.random.default_rng(0)
    shapes = [(3, 2), (0,), (5,)]
    params = [generator.standard_normal(s) for s in shapes]
    normals = [generator.standard_normal(s) for s in shapes]
    hyper = [validate_upgd(dict(adaptive_noise=True, instant_noise_scale=False, lr=0.1, sigma=0.1))] * 3
    present = [True, True, False]
    state_np = ref.upgd_init(params, [1.0] * 3)
    state_x = ref.upgd_init(_to_strict(params), [1.0] * 3)
    vgs_np = ref.vgs_init(np, 3)
    vgs_x = ref.vgs_init(xps, 3)
    p_np, p_x = params, _to_strict(params)
    for _ in range(3):
        grads = [generator.standard_normal(s) for s in shapes]
        p_np, state_np, stats_np = ref.adaptive_upgd_step(p_np, grads, state_np, normals, hyper,
                                                          present=present, noise_norm=noise_norm)
        p_x, state_x, stats_x = ref.adaptive_upgd_step(p_x, _to_strict(grads), state_x, _to_strict(normals), hyper,
                                                       present=present, noise_norm=noise_norm)
        vgs_np = ref.vgs_update(vgs_np, grads, beta=0.9, present=present)
        vgs_x = ref.vgs_update(vgs_x, _to_strict(grads), beta=0.9, present=present)
        for a, b in zip(p_x, p_np):
            np.testing.assert_array_equal(np.asarray(a), b)
        np.testing.assert_array_equal(np.asarray(stats_x.noise_std), np.asarray(stats_np.noise_std))
    vgs_kwargs = dict(enabled=True, beta=0.9, alpha=0.5, eps=1e-8, warmup_steps=0, min_scaling_factor=0.1,
                      variance_cap=50.0)
    f_x, g_x = ref.vgs_scaling_factor(vgs_x, **vgs_kwargs)
    f_np, g_np = ref.vgs_scaling_factor(vgs_np, **vgs_kwargs)
    assert float(f_x) == float(f_np) and float(g_x) == float(g_np)
