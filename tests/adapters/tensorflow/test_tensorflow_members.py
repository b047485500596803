"""The Keras optimizers against the member table (``tests/helpers/members.py``): every
member's constructor inputs build and apply gradients, and every error input raises the
core's exception naming the key, in Keras' spelling (``learning_rate``; UPGDW's
``beta_1``/``beta_2``/``epsilon``)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from upgd_ref.adapters import tensorflow as upgd_tf

from tests.helpers.members import MEMBER_DB, Spelling, error_inputs, with_profile

CLASSES = {"AdaptiveUPGD": upgd_tf.AdaptiveUPGD, "UPGD": upgd_tf.UPGD, "UPGDW": upgd_tf.UPGDW}

KERAS = Spelling(
    build=lambda info, kwargs: CLASSES[info.name](**with_profile(info, kwargs)),
    names={"*": {"lr": "learning_rate"}, "UPGDW": {"beta1": "beta_1", "beta2": "beta_2", "eps": "epsilon"}},
)

CASES = [(info, case) for info in MEMBER_DB for case in error_inputs(info)]


@pytest.mark.parametrize("info, inputs", [(i, x) for i in MEMBER_DB for x in i.inputs],
                         ids=lambda v: getattr(v, "id", None) or ",".join(v) or "defaults")
def test_inputs_build_and_apply_gradients(info, inputs):
    opt = KERAS.construct(info, seed=3, **inputs)
    variables = [tf.Variable(np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)), tf.Variable(np.zeros(5, np.float32))]
    for _ in range(2):
        opt.apply_gradients([(0.1 * v + 0.01, v) for v in variables])
    assert all(np.isfinite(v.numpy()).all() for v in variables)


@pytest.mark.parametrize("info, case", CASES, ids=[f"{i.id}-{c.id}" for i, c in CASES])
def test_constructor_refuses_error_inputs(info, case):
    with pytest.raises(case.error, match=KERAS.names_key(info, case.key)):
        KERAS.construct(info, **case.kwargs)
