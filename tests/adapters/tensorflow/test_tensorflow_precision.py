"""float16 and bfloat16 variables (``specs/precision.md``, ``specs/adapters-tensorflow.md``
§2, §5): they step in float32 with float32 ``u``, ``m``, ``v`` and are rounded once."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import upgd_ref
from upgd_ref.adapters.tensorflow import AdaptiveUPGD

from tests.helpers.tensorflow_common import CoreTwin, contract_violation, keras_state, values

SHAPES = [(4, 3), (0,), (5,)]


def _variables(dtype, rng):
    return [keras.Variable(rng.standard_normal(s).astype("float32"), dtype=dtype) for s in SHAPES]


def _grads(variables, rng):
    return [keras.ops.convert_to_numpy(keras.ops.cast(rng.standard_normal(v.shape).astype("float32"), v.dtype))
            for v in variables]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_host_path_equals_the_core_on_16_bit_variables(dtype):
    """Eager (host path): 5 steps with adaptive noise and an absent variable equal the core
    API on a 16-bit layout bit for bit; the state variables are float32. (Without VGS: the
    core's fused scale-and-step keeps ``f g`` in float32 where the standalone scaler that
    ``CoreTwin`` runs rounds it to the 16-bit dtype first, specs/precision.md §2.)"""
    rng = np.random.default_rng(0)
    variables = _variables(dtype, rng)
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.1, adaptive_noise=True, seed=9)
    twin = CoreTwin(opt, variables)
    for k in range(5):
        present = [True, True, k % 2 == 0]
        grads = _grads(variables, rng)
        opt.apply_gradients([(tf.constant(g), v) for g, v, p in zip(grads, variables, present) if p])
        twin.step(grads, present)
        twin.assert_bit_identical(opt, variables, what=f"step {k}")
    assert all(u.dtype == np.float32 for u in keras_state(opt)["utility"])
    assert keras.backend.standardize_dtype(variables[0].dtype) == dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_native_path_on_16_bit_variables_is_within_the_contract(dtype):
    """Native path under XLA: each step within the contract (the float32 step's bounds plus
    one rounding to the 16-bit dtype, specs/tolerances.md §2a)."""
    rng = np.random.default_rng(1)
    variables = _variables(dtype, rng)
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.1, adaptive_noise=True, seed=9, vgs={"warmup_steps": 1},
                       step_path="native")
    opt.build(variables)
    layout = upgd_ref.FlatLayout(SHAPES, dtype=dtype)
    step = tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)), jit_compile=True)
    for k in range(4):
        grads = _grads(variables, rng)
        before = values(variables), keras_state(opt)
        step([tf.constant(g) for g in grads])
        after = values(variables), keras_state(opt)
        worst = contract_violation(opt, layout, before[0], before[1], grads, [True] * 3, after[0], after[1])
        assert worst <= 1.0, f"step {k}: {worst:.3g} x the contract"
