"""The finiteness contract (``specs/algorithm.md`` §8) through the Keras optimizer.

A gradient spike just above the float32 threshold of ``g*g`` (~1.8e19) in one element of one
variable: ``nonfinite="raise"`` fails the step naming the field and the variable with every
variable unchanged; ``"skip"`` leaves every variable (parameters and optimizer state)
unchanged and reports the skip in ``last_step_info``; just below the threshold the step runs
and everything stays finite.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from upgd_ref.adapters.tensorflow import UPGD, UPGDW, AdaptiveUPGD
from upgd_ref.checks import NonFiniteStepError

BELOW, ABOVE = 1.8e19, 1.9e19


def _setup(member=AdaptiveUPGD, **kwargs):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(s).astype("float32"), name=f"w{i}")
                 for i, s in enumerate([(3, 2), (4,)])]
    opt = member(learning_rate=0.01, vgs={"warmup_steps": 0}, seed=3, **kwargs)
    grads = [np.full((3, 2), 0.1, "float32"), np.full((4,), -0.2, "float32")]
    opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))  # one ordinary step first
    return variables, opt, grads


def _everything(opt, variables):
    return [np.array(v.numpy()) for v in variables] + [np.array(v.numpy()) for v in opt.variables
                                                         if "iteration" not in v.name]


def _apply(opt, grads, variables, execution):
    tensors = [tf.constant(g) for g in grads]
    if execution == "eager":
        opt.apply_gradients(zip(tensors, variables))
    else:
        tf.function(lambda gs: opt.apply_gradients(zip(gs, variables)))(tensors)


@pytest.mark.parametrize("execution", ["eager", "tf.function"])
@pytest.mark.parametrize("member", [AdaptiveUPGD, UPGDW])
def test_an_overflowing_square_raises_naming_field_and_variable(member, execution):
    variables, opt, grads = _setup(member)
    grads[1][2] = ABOVE
    before = _everything(opt, variables)
    error = NonFiniteStepError if execution == "eager" else tf.errors.InvalidArgumentError
    with pytest.raises(error, match=r"second_moment: segment 1.*element 2.*segment 1 is variable 'w1'"):
        _apply(opt, grads, variables, execution)
    for a, b in zip(before, _everything(opt, variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("execution", ["eager", "tf.function"])
@pytest.mark.parametrize("member, spike", [(AdaptiveUPGD, ABOVE), (AdaptiveUPGD, np.nan), (UPGD, np.inf)])
def test_skip_leaves_every_variable_unchanged(member, execution, spike):
    variables, opt, grads = _setup(member, nonfinite="skip")
    grads[1][2] = spike
    before = _everything(opt, variables)
    _apply(opt, grads, variables, execution)
    for a, b in zip(before, _everything(opt, variables)):
        np.testing.assert_array_equal(a, b)
    info = opt.last_step_info
    assert info.skipped and info.skipped_steps == 1 and info.step == 1
    assert opt.get_config()["nonfinite"] == "skip"


def test_a_spike_below_the_threshold_steps_and_stays_finite():
    variables, opt, grads = _setup()
    grads[1][2] = BELOW
    _apply(opt, grads, variables, "eager")
    assert not opt.last_step_info.skipped and opt.last_step_info.step == 2
    assert all(np.isfinite(x).all() for x in _everything(opt, variables))


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="nonfinite"):
        AdaptiveUPGD(nonfinite="ignore")
