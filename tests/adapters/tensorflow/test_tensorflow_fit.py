"""``upgd_ref.adapters.tensorflow.AdaptiveUPGD`` inside ``model.fit``: graph mode
(``run_eagerly=False``) and eager, float32 / float64 / mixed_float16, an Embedding (sparse
gradients) and a weight that never gets a gradient; the trajectory equals the core API and
every step lies within the tolerance contract; save -> load -> continue equals uninterrupted
training; XLA and NaN are clear errors."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import upgd_ref
from upgd_ref.adapters.tensorflow import AdaptiveUPGD

from tests.helpers.tensorflow_common import CoreTwin, contract_violation, keras_state, values

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")

SETTINGS = dict(learning_rate=0.02, weight_decay=0.01, sigma=0.05, adaptive_noise=True, seed=77,
                vgs={"warmup_steps": 3, "alpha": 0.5})


@keras.saving.register_keras_serializable(package="upgd_ref_tests")
class HalfUsed(keras.layers.Layer):
    """A linear map plus a weight that the loss never touches (its gradient is None)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 1), initializer="glorot_uniform", name="kernel")
        self.unused = self.add_weight(shape=(3,), initializer="ones", name="unused")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel)


def make_model(dtype=None, seed=0):
    keras.utils.set_random_seed(seed)
    kwargs = {} if dtype is None else {"dtype": dtype}
    inputs = keras.Input((3,), dtype="int32")
    h = keras.layers.Embedding(10, 4, **kwargs)(inputs)
    h = keras.layers.Flatten(**kwargs)(h)
    h = keras.layers.Dense(8, activation="tanh", **kwargs)(h)
    outputs = HalfUsed(**kwargs)(h)
    return keras.Model(inputs, outputs)


def make_data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 10, size=(n, 3)).astype("int32")
    y = (np.sin(x.sum(axis=1, keepdims=True)) + 0.1 * rng.standard_normal((n, 1))).astype("float32")
    return x, y


class GradientSpy(AdaptiveUPGD):
    """Test double: records the gradients each step hands to the core (nothing else changes)."""

    def build(self, var_list):
        super().build(var_list)
        self.seen = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in var_list]
        self.seen_present = tf.Variable(tf.zeros(len(var_list), tf.bool), trainable=False)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        flags = [False] * len(self.seen)
        for g, v in zip(grads, trainable_variables):
            i = self._get_variable_index(v)
            flags[i] = True
            self.seen[i].assign(tf.cast(tf.convert_to_tensor(g), self.seen[i].dtype))
        self.seen_present.assign(flags)
        super()._backend_update_step(grads, trainable_variables, learning_rate)


class Recorder(keras.callbacks.Callback):
    """Before/after every batch: parameters, optimizer state, gradients the step used."""

    def __init__(self, opt, variables):
        super().__init__()
        self.opt, self.variables, self.steps = opt, variables, []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = (values(self.variables), keras_state(self.opt), int(self.opt.iterations.numpy()))

    def on_train_batch_end(self, batch, logs=None):
        stepped = int(self.opt.iterations.numpy()) > self.before[2]
        grads = [np.array(g.numpy()) for g in self.opt.seen] if stepped else None
        present = [bool(b) for b in self.opt.seen_present.numpy()] if stepped else None
        self.steps.append(dict(before=self.before, grads=grads, present=present,
                               after=(values(self.variables), keras_state(self.opt))))


@pytest.fixture
def policy(request):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16"], indirect=True)
def test_fit_trajectory_equals_the_core_api_and_the_contract(policy, run_eagerly):
    """model.fit for 3 epochs (12 steps): after every batch the model and the optimizer
    state equal the core API stepped with the same gradients, bit for bit; each step is
    within the contract of the float64 reference; the frozen weight never moves; loss falls.
    Under mixed_float16 the loss-scale optimizer skips overflowing steps: nothing moves."""
    model = make_model()
    x, y = make_data()
    variables = model.trainable_variables
    opt = GradientSpy(**SETTINGS)
    if policy == "mixed_float16":
        # A loss scale so large that the first float16 gradients overflow: the loss-scale
        # optimizer skips those steps (the core is not called) and halves the scale.
        compiled = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**20)
    else:
        compiled = opt
    model.compile(optimizer=compiled, loss="mse", run_eagerly=run_eagerly, jit_compile=False)
    opt.build(variables)
    twin = CoreTwin(opt, variables)
    recorder = Recorder(opt, variables)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[recorder])

    dtype = keras.backend.standardize_dtype(variables[0].dtype)
    assert dtype == ("float64" if policy == "float64" else "float32")
    unused = next(i for i, v in enumerate(variables) if v.name == "unused")
    applied = [s for s in recorder.steps if s["grads"] is not None]
    assert len(recorder.steps) == 12
    if policy == "mixed_float16":
        assert model.optimizer.inner_optimizer is opt
        assert 0 < len(applied) < 12  # both skipped and applied steps are exercised
    else:
        assert len(applied) == 12
    for k, s in enumerate(recorder.steps):
        if s["grads"] is None:  # a step the loss-scale optimizer skipped: nothing moved
            for a, b in zip(s["before"][0], s["after"][0]):
                np.testing.assert_array_equal(a, b)
            for name, before in s["before"][1].items():
                np.testing.assert_equal(s["after"][1][name], before, err_msg=name)
            continue
        assert s["present"] == [i != unused for i in range(len(variables))]
        twin.step(s["grads"], s["present"])
        twin.assert_matches(s["after"][0], s["after"][1], what=f"step {k}")
        worst = contract_violation(opt, twin.layout, s["before"][0], s["before"][1], s["grads"], s["present"],
                                   s["after"][0], s["after"][1])
        assert worst <= 1.0, f"step {k}: {worst:.3g} x the contract"
    np.testing.assert_array_equal(values(variables)[unused], np.ones(3))
    assert int(keras_state(opt)["segment_step"][unused]) == 0
    assert int(keras_state(opt)["upgd_step"]) == len(applied)
    assert history.history["loss"][-1] < history.history["loss"][0]


def _train(model, x, y, epochs):
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)


def _assert_same_training_state(a, b):
    for p, q in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=p.path)
    assert len(a.optimizer.variables) == len(b.optimizer.variables)
    for p, q in zip(a.optimizer.variables, b.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(p.numpy()), np.asarray(q.numpy()), err_msg=p.path)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_save_load_continue_equals_uninterrupted_training(tmp_path):
    x, y = make_data()
    uninterrupted = make_model()
    uninterrupted.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse")
    _train(uninterrupted, x, y, 4)

    first = make_model()
    first.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse")
    _train(first, x, y, 2)
    first.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert type(restored.optimizer) is AdaptiveUPGD
    assert restored.optimizer.get_config() == first.optimizer.get_config()
    _assert_same_training_state(first, restored)
    _train(restored, x, y, 2)
    _assert_same_training_state(uninterrupted, restored)

    # tf.train.Checkpoint carries the same state.
    second = make_model()
    second.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse")
    _train(second, x, y, 2)
    path = tf.train.Checkpoint(model=second, optimizer=second.optimizer).save(str(tmp_path / "ckpt"))
    fresh = make_model(seed=5)
    fresh.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_consumed()
    _train(fresh, x, y, 2)
    _assert_same_training_state(uninterrupted, fresh)


@pytest.mark.parametrize("policy", ["float32", "float64", "bfloat16", "float16"], indirect=True)
def test_fit_with_xla_runs_the_native_step_within_the_contract(policy):
    """jit_compile=True: the native step (reference on TensorFlow ops) compiles with the
    model; every step is within the contract of the float64 reference, whose normals the
    test draws as upgd_ref.noise (a wrong noise counter or seed fails, see the helpers'
    test); the weight without a gradient never moves; the loss falls. 16-bit variables step
    in float32 with float32 state and are rounded once (specs/precision.md)."""
    model = make_model()
    x, y = make_data(32)
    variables = model.trainable_variables
    opt = GradientSpy(**SETTINGS)
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    opt.build(variables)
    layout = upgd_ref.FlatLayout([tuple(v.shape) for v in variables], dtype=policy)
    recorder = Recorder(opt, variables)
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[recorder])
    unused = next(i for i, v in enumerate(variables) if v.name == "unused")
    assert len(recorder.steps) == 6
    for k, s in enumerate(recorder.steps):
        assert s["present"] == [i != unused for i in range(len(variables))]
        worst = contract_violation(opt, layout, s["before"][0], s["before"][1], s["grads"], s["present"],
                                   s["after"][0], s["after"][1])
        assert worst <= 1.0, f"step {k}: {worst:.3g} x the contract"
    np.testing.assert_array_equal(values(variables)[unused], np.ones(3))
    assert int(keras_state(opt)["upgd_step"]) == 6
    assert all(u.dtype == np.float32 for u in keras_state(opt)["utility"]) or policy == "float64"
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_fit_on_nan_raises_and_changes_nothing():
    model = make_model()
    x, y = make_data(32)
    y[0, 0] = np.nan  # first batch: NaN loss, NaN gradients
    opt = AdaptiveUPGD(**SETTINGS)
    model.compile(optimizer=opt, loss="mse", jit_compile=False)
    opt.build(model.trainable_variables)
    before = values(model.trainable_variables), [np.array(v.numpy()) for v in opt.variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-finite value"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(before[0], values(model.trainable_variables)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before[1], [np.array(v.numpy()) for v in opt.variables]):
        np.testing.assert_array_equal(a, b)
