"""Shared helpers of the TensorFlow adapter tests (and a check that the helpers themselves
can fail): the core API run side by side with the Keras optimizer, bit-exact comparisons and
the lockstep tolerance-contract check (``specs/tolerances.md``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from upgd_ref.adapters.tensorflow import AdaptiveUPGD  # noqa: E402

import upgd_ref  # noqa: E402
from upgd_ref import reference as ref  # noqa: E402
from upgd_ref import tolerances  # noqa: E402
from upgd_ref.hyperparams import UPGD_DEFAULTS  # noqa: E402
from upgd_ref.precision import is_low_precision  # noqa: E402

UPGD_KEYS = tuple(k for k in UPGD_DEFAULTS if k != "lr")
STATE_BUFFERS = ("utility", "first_moment", "second_moment")


def keras_state(opt) -> dict:
    """Copies of the Keras optimizer's state variables, by role (64-bit values as int64 /
    float64 on every backend)."""
    return opt.state_values()


def values(variables) -> list:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


class CoreTwin:
    """The core API (``upgd_ref.AdaptiveUPGD`` [+ ``VarianceGradientScaler``]) configured from
    a Keras optimizer's ``get_config`` and started from the variables' current values."""

    def __init__(self, opt, variables, param_groups=None):
        config = opt.get_config()
        dtype = keras.backend.standardize_dtype(variables[0].dtype)
        self.layout = upgd_ref.FlatLayout([tuple(v.shape) for v in variables], dtype=dtype)
        self.core = upgd_ref.AdaptiveUPGD(
            self.layout, lr=config["learning_rate"], seed=config["seed"], noise_norm=config["noise_norm"],
            param_groups=param_groups, **{k: config[k] for k in UPGD_KEYS},
        )
        self.scaler = None if config["vgs"] is None else upgd_ref.VarianceGradientScaler(self.layout, **config["vgs"])
        self.params = self.layout.pack(values(variables))

    def step(self, grads, present=None):
        """``grads``: one array per variable (any value where absent)."""
        layout = self.layout
        present = [True] * layout.num_segments if present is None else list(present)
        buffer = layout.pack([g if p else np.zeros(s) for g, p, s in zip(grads, present, layout.shapes)])
        self.last_factor = float("nan")
        if self.scaler is not None:
            self.last_factor = self.scaler.scale(buffer, present)
        info = self.core.step(self.params, buffer, present)
        if self.scaler is not None:
            self.scaler.update(buffer, present)
        return info

    def assert_bit_identical(self, opt, variables, what=""):
        """Parameters and every piece of optimizer state equal the Keras side, bit for bit."""
        self.assert_matches(values(variables), keras_state(opt), what)

    def assert_matches(self, params, got, what=""):
        """Like :meth:`assert_bit_identical`, against recorded values and state."""
        layout, state = self.layout, self.core.state
        for i, (mine, theirs) in enumerate(zip(layout.unpack(self.params), params)):
            np.testing.assert_array_equal(theirs, mine, err_msg=f"{what} variable {i}")
        names = STATE_BUFFERS
        if self.core.variant.moments == "none":  # members without moments keep no m, v
            names = STATE_BUFFERS[:1]
            assert "first_moment" not in got and "second_moment" not in got
        for name in names:
            for i, (mine, theirs) in enumerate(zip(layout.unpack(getattr(state, name)), got[name])):
                np.testing.assert_array_equal(theirs, mine, err_msg=f"{what} {name}[{i}]")
        assert int(got["upgd_step"]) == state.step, what
        np.testing.assert_array_equal(got["segment_step"], state.segment_step, err_msg=what)
        np.testing.assert_array_equal(got["grad_norm_ema"], state.grad_norm_ema, err_msg=what)
        if self.scaler is not None:
            assert int(got["vgs_step"]) == self.scaler.state.step, what
            np.testing.assert_array_equal(got["vgs_grad_mean_avg"], self.scaler.state.grad_mean_avg, err_msg=what)
            np.testing.assert_array_equal(got["vgs_grad_sq_avg"], self.scaler.state.grad_sq_avg, err_msg=what)


def contract_violation(opt, layout, before_params, before_state, grads, present, after_params, after_state):
    """Largest ``error / bound`` of one Keras step against the float64 reference step run from
    the Keras side's own pre-step values (lockstep, ``specs/tolerances.md`` §1). The normals of
    the truth are ``upgd_ref.noise(layout, seed, T)``, drawn here, not by the adapter."""
    config = opt.get_config()
    hyper = [dict({k: config[k] for k in UPGD_KEYS}, lr=config["learning_rate"])] * layout.num_segments
    grads = [np.asarray(g) for g in grads]
    if config["vgs"] is not None:
        vgs_state = ref.VGSState(np.int64(before_state["vgs_step"]), before_state["vgs_grad_mean_avg"],
                                 before_state["vgs_grad_sq_avg"])
        factor, _ = ref.vgs_scaling_factor(vgs_state, **config["vgs"])
        if is_low_precision(layout.dtype):  # f g in float32, rounded once to the 16-bit dtype (precision.md §2)
            grads = [g.astype(layout.dtype) for g in ref.vgs_scale([g.astype(np.float32) for g in grads],
                                                                   float(factor), present)]
        else:
            grads = ref.vgs_scale(grads, float(factor), present)
    start = ref.UPGDState(
        step=np.int64(before_state["upgd_step"]), segment_step=before_state["segment_step"],
        utility=before_state["utility"], first_moment=before_state["first_moment"],
        second_moment=before_state["second_moment"], grad_norm_ema=before_state["grad_norm_ema"],
    )
    step = int(before_state["upgd_step"]) + 1
    normals = layout.unpack(upgd_ref.noise(layout, config["seed"], step, dtype="float64"))
    truth, scales = tolerances.upgd_step_scales(before_params, grads, start, normals, hyper, present=present,
                                                noise_norm=config["noise_norm"])
    # 16-bit parameters: the float32 step's bounds, then one rounding (specs/tolerances.md §2a)
    low = is_low_precision(layout.dtype)
    bounds = tolerances.upgd_step_bounds(scales, "float32" if low else layout.dtype, layout.sizes)
    new_params, new_state, _ = truth
    worst = 0.0
    for i, is_present in enumerate(present):
        if not is_present:
            continue
        bound = bounds["params"][i]
        if low:
            bound = tolerances.low_precision_bound(after_params[i], new_params[i], bound, layout.dtype)
        worst = max(worst, tolerances.max_violation(after_params[i], new_params[i], bound))
        for name in STATE_BUFFERS:
            worst = max(worst, tolerances.max_violation(after_state[name][i], getattr(new_state, name)[i],
                                                        bounds[name][i]))
    assert [int(t) for t in after_state["segment_step"]] == [int(t) for t in new_state.segment_step]
    return worst


def test_helpers_detect_a_wrong_step():
    """The comparison helpers are not vacuous: a perturbed result fails both of them."""
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal((3, 2)).astype("float32")), keras.Variable(np.zeros(2, "float32"))]
    opt = AdaptiveUPGD(learning_rate=0.1, sigma=0.5, seed=5)
    twin = CoreTwin(opt, variables)
    grads = [rng.standard_normal(v.shape).astype("float32") for v in variables]
    before_params = values(variables)
    opt.build(variables)
    before = keras_state(opt)
    opt.apply_gradients(zip([tf.constant(g) for g in grads], variables))
    twin.step(grads)
    twin.assert_bit_identical(opt, variables)
    after, after_params = keras_state(opt), values(variables)
    assert contract_violation(opt, twin.layout, before_params, before, grads, [True, True], after_params,
                              after) <= 1.0
    # Using the wrong step's noise is caught by the contract check.
    shifted = dict(before, upgd_step=np.int64(before["upgd_step"] + 1))
    assert contract_violation(opt, twin.layout, before_params, shifted, grads, [True, True], after_params,
                              after) > 1.0
    # So is a parameter one step of 1e-3 off, and the bit-exact comparison catches it too.
    variables[0].assign(variables[0] + 1e-3)
    with pytest.raises(AssertionError):
        twin.assert_bit_identical(opt, variables)
    assert contract_violation(opt, twin.layout, before_params, before, grads, [True, True], values(variables),
                              after) > 1.0
