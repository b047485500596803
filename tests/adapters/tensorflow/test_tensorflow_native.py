"""The native step on the TensorFlow backend (``specs/adapters-tensorflow.md`` §3.3): the
reference on TensorFlow ops (through ``jax2tf``), compiled by XLA."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import upgd_ref
from upgd_ref.adapters.tensorflow import UPGD, AdaptiveUPGD

from tests.helpers.tensorflow_common import contract_violation, keras_state, values


def _zero_step(opt, variables):
    return lambda: opt.apply_gradients([(tf.zeros_like(v.value), v) for v in variables])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_noise_under_xla_is_the_cores_bit_for_bit(dtype):
    """Zero gradients and parameters: the step is ``-lr * sigma * z * (1 - su)``, so the
    native step under XLA equals the host path (the core, whose normals are
    ``upgd_ref.noise``) bit for bit only if every one of its 1,084 normals does; an FMA-
    contracted transform changes about 1% of float64 normals."""
    shapes = [(37, 29), (11,)]
    results = []
    for path in ("native", "host"):
        variables = [keras.Variable(np.zeros(s, dtype)) for s in shapes]
        opt = UPGD(learning_rate=1.0, weight_decay=0.0, sigma=1.0, seed=12345, step_path=path)
        opt.build(variables)

        apply = _zero_step(opt, variables)
        (tf.function(apply, jit_compile=True) if path == "native" else apply)()
        results.append(values(variables))
    for native, host in zip(*results):
        assert np.count_nonzero(host) == host.size
        np.testing.assert_array_equal(native, host)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_native_apply_gradients_with_absent_variables_is_within_the_contract(dtype):
    """Eager ``step_path="native"``: adaptive noise, VGS, a variable absent at every other
    step (unchanged then); each step within the contract."""
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (0,), (5,)]
    variables = [keras.Variable(rng.standard_normal(s).astype(dtype)) for s in shapes]
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.1, adaptive_noise=True, instant_noise_scale=False, seed=9,
                       vgs={"warmup_steps": 1}, step_path="native")
    opt.build(variables)
    layout = upgd_ref.FlatLayout(shapes, dtype=dtype)
    for k in range(5):
        present = [True, True, k % 2 == 0]
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        before = values(variables), keras_state(opt)
        opt.apply_gradients([(tf.constant(g), v) for g, v, p in zip(grads, variables, present) if p])
        after = values(variables), keras_state(opt)
        if not present[2]:
            np.testing.assert_array_equal(after[0][2], before[0][2])
        assert contract_violation(opt, layout, before[0], before[1], grads, present, after[0], after[1]) <= 1.0
    assert int(keras_state(opt)["upgd_step"]) == 5
    assert list(keras_state(opt)["segment_step"]) == [5, 5, 3]


def test_native_step_skips_a_non_finite_step():
    """Under XLA a step cannot raise: a NaN gradient leaves every variable as it was
    (``specs/adapters-tensorflow.md`` §4)."""
    variables = [keras.Variable(np.ones((3,), "float32"))]
    opt = AdaptiveUPGD(learning_rate=0.1, sigma=0.1, step_path="native")
    opt.build(variables)
    before = values(variables), keras_state(opt)
    tf.function(lambda: opt.apply_gradients([(tf.constant([1.0, np.nan, 0.0]), variables[0])]),
                jit_compile=True)()
    np.testing.assert_array_equal(values(variables)[0], before[0][0])
    for name, value in keras_state(opt).items():
        np.testing.assert_equal(value, before[1][name], err_msg=name)


def test_step_path_is_checked_and_kept_in_the_config():
    with pytest.raises(ValueError, match="step_path"):
        AdaptiveUPGD(step_path="device")
    opt = AdaptiveUPGD(step_path="native")
    assert opt.get_config()["step_path"] == "native"
    assert AdaptiveUPGD.from_config(opt.get_config()).step_path == "native"
