"""Run in a subprocess (``python -m tests.helpers.keras_backends MODE OUT.json``) with
``KERAS_BACKEND`` set: trains a small model with the Keras optimizer and writes what the
tests check to ``OUT.json``.

Modes: ``fit`` (``model.fit`` with ``jit_compile`` as the backend allows, one step per
call; each step's gradients recorded by a test double; per step the largest ``error /
bound`` against the float64 reference (``contract_violation``) and, for the host path, the
bit-identity with the core API; then save -> load -> continue against uninterrupted
training) and ``mirrored`` (TensorFlow: ``MirroredStrategy`` over two logical CPU devices
against one device, both compiled with XLA).
"""

from __future__ import annotations

import json
import os
import sys

import keras
import numpy as np

from upgd_ref.adapters.tensorflow import AdaptiveUPGD

from tests.helpers.tensorflow_common import CoreTwin, contract_violation, keras_state, values

SETTINGS = dict(learning_rate=0.02, weight_decay=0.01, sigma=0.05, adaptive_noise=True, seed=77,
                vgs={"warmup_steps": 2, "alpha": 0.5})
STEPS = 6


@keras.saving.register_keras_serializable(package="upgd_ref_tests")
class GradientSpy(AdaptiveUPGD):
    """Test double: keeps the gradients of the latest step in optimizer variables."""

    def build(self, var_list):
        super().build(var_list)
        self.seen = [self.add_variable_from_reference(v, name="seen") for v in var_list]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        for g, v in zip(grads, trainable_variables):
            self.seen[self._get_variable_index(v)].assign(keras.ops.cast(g, v.dtype))
        super()._backend_update_step(grads, trainable_variables, learning_rate)


def make_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])


def make_data(n=32):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 5)).astype("float32")
    return x, np.sin(x.sum(axis=1, keepdims=True)).astype("float32")


def _jit():
    return keras.backend.backend() != "torch"  # Keras' torch trainer runs eagerly


def _fit_steps(model, x, y, steps):
    for _ in range(steps):  # one batch per call: the variables are synced after each step
        model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def fit_mode() -> dict:
    x, y = make_data()
    model = make_model()
    opt = GradientSpy(**SETTINGS)
    model.compile(optimizer=opt, loss="mse", jit_compile=_jit())
    variables = model.trainable_variables
    opt.build(variables)
    twin = CoreTwin(opt, variables)
    worst, identical, losses = [], [], []
    for _ in range(STEPS):
        before = values(variables), keras_state(opt)
        losses.append(float(model.evaluate(x, y, verbose=0)))
        _fit_steps(model, x, y, 1)
        grads = [np.array(keras.ops.convert_to_numpy(g.value)) for g in opt.seen]
        after = values(variables), keras_state(opt)
        present = [True] * len(variables)
        worst.append(contract_violation(opt, twin.layout, before[0], before[1], grads, present, after[0], after[1]))
        twin.step(grads, present)
        try:
            twin.assert_matches(after[0], after[1])
            identical.append(True)
        except AssertionError:
            identical.append(False)
    losses.append(float(model.evaluate(x, y, verbose=0)))
    return dict(backend=keras.backend.backend(), worst=worst, identical=identical, losses=losses,
                upgd_step=int(keras_state(opt)["upgd_step"]), resumed_equal=_save_load_continue(x, y))


def _save_load_continue(x, y) -> bool:
    """Train 4 steps; train 2, save, load, train 2: every variable equal, bit for bit."""
    path = os.path.join(os.environ["UPGD_TEST_TMP"], "model.keras")
    uninterrupted = make_model()
    uninterrupted.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse", jit_compile=_jit())
    _fit_steps(uninterrupted, x, y, 4)
    first = make_model()
    first.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse", jit_compile=_jit())
    _fit_steps(first, x, y, 2)
    first.save(path)
    restored = keras.saving.load_model(path)
    _fit_steps(restored, x, y, 2)
    pairs = list(zip(uninterrupted.trainable_variables, restored.trainable_variables))
    pairs += list(zip(uninterrupted.optimizer.variables, restored.optimizer.variables))
    same_count = len(uninterrupted.optimizer.variables) == len(restored.optimizer.variables)
    return same_count and all(np.array_equal(values([a])[0], values([b])[0]) for a, b in pairs)


def mirrored_mode() -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    x, y = make_data()
    single = make_model()
    single.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse", jit_compile=True)
    _fit_steps(single, x, y, STEPS)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = make_model()
        mirrored.compile(optimizer=AdaptiveUPGD(**SETTINGS), loss="mse", jit_compile=False)
    _fit_steps(mirrored, x, y, STEPS)
    opt = mirrored.optimizer
    replicas_equal = all(
        all(np.array_equal(np.asarray(a), np.asarray(parts[0])) for a in parts)
        for v in [*mirrored.trainable_variables, *opt.variables]
        for parts in [[t.numpy() for t in strategy.experimental_local_results(getattr(v, "value", v))]]
    )
    a, b = values(single.trainable_variables), values(mirrored.trainable_variables)
    scale = max(float(np.max(np.abs(p))) for p in a)
    return dict(replicas=strategy.num_replicas_in_sync, replicas_equal=replicas_equal,
                max_difference=max(float(np.max(np.abs(p - q))) for p, q in zip(a, b)) / scale,
                upgd_step=int(keras_state(opt)["upgd_step"]))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    result = {"fit": fit_mode, "mirrored": mirrored_mode}[mode]()
    with open(out, "w") as f:
        json.dump(result, f)
