"""The UPGD family in the TensorFlow adapter (specs/adapters-tensorflow.md): ``AdaptiveUPGD``
(production and ``profile="paper"``), ``UPGD`` and ``UPGDW`` equal the core API classes
(:class:`upgd_ref.AdaptiveUPGD`, :class:`upgd_ref.UPGD`, :class:`upgd_ref.UPGDW`) bit for bit,
with eager ``apply_gradients`` and inside ``model.fit``; UPGD has no moment variables; UPGDW
ties the utility decay to ``beta_2`` and rejects ``amsgrad=True``; configs round-trip."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import upgd_ref
from upgd_ref.adapters import tensorflow as upgd_tf
from upgd_ref.reference import UPGDVariant

from tests.helpers.tensorflow_common import CoreTwin, keras_state, values

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")

SHAPES = [(4, 3), (3,), (0,), (2, 2, 2)]
NOISE = dict(sigma=0.3, adaptive_noise=True, vgs={"warmup_steps": 2, "alpha": 0.5})

MEMBERS = {
    "adaptive-production": (lambda **kw: upgd_tf.AdaptiveUPGD(learning_rate=0.05, weight_decay=0.01,
                                                              beta_utility=0.9, **kw),
                            UPGDVariant(moments="adam")),
    "adaptive-paper": (lambda **kw: upgd_tf.AdaptiveUPGD(learning_rate=0.05, weight_decay=0.01, beta_utility=0.9,
                                                         profile="paper", **kw),
                       UPGDVariant(moments="adam", protection="max", update_factor=2.0, noise_placement="terms")),
    "upgd-production": (lambda **kw: upgd_tf.UPGD(learning_rate=0.05, weight_decay=0.01, beta_utility=0.9, **kw),
                        UPGDVariant(moments="none")),
    "upgd-paper": (lambda **kw: upgd_tf.UPGD(learning_rate=0.05, weight_decay=0.01, beta_utility=0.9,
                                             profile="paper", **kw),
                   UPGDVariant(moments="none", protection="max", update_factor=2.0)),
    "upgdw": (lambda **kw: upgd_tf.UPGDW(learning_rate=0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-6,
                                         weight_decay=0.02, **kw),
              UPGDVariant(moments="adam")),
}


class FamilyTwin(CoreTwin):
    """The core API class of a Keras family optimizer, configured from its ``get_config``
    (stepping and the bit-for-bit comparison are :class:`CoreTwin`'s)."""

    def __init__(self, opt, variables):
        config = opt.get_config()
        dtype = keras.backend.standardize_dtype(variables[0].dtype)
        self.layout = layout = upgd_ref.FlatLayout([tuple(v.shape) for v in variables], dtype=dtype)
        noise = {k: config[k] for k in ("sigma", "weight_decay", "adaptive_noise", "noise_beta", "min_noise_std",
                                        "instant_noise_scale", "noise_ema_init")}
        common = dict(lr=config["learning_rate"], seed=config["seed"], noise_norm=config["noise_norm"], **noise)
        if isinstance(opt, upgd_tf.UPGDW):
            self.core = upgd_ref.UPGDW(layout, betas=(config["beta_1"], config["beta_2"]), eps=config["epsilon"],
                                       **common)
        elif isinstance(opt, upgd_tf.UPGD):
            self.core = upgd_ref.UPGD(layout, beta_utility=config["beta_utility"], profile=config["profile"],
                                      **common)
        else:
            self.core = upgd_ref.AdaptiveUPGD(layout, beta_utility=config["beta_utility"], beta1=config["beta1"],
                                              beta2=config["beta2"], eps=config["eps"], profile=config["profile"],
                                              **common)
        self.scaler = None if config["vgs"] is None else upgd_ref.VarianceGradientScaler(layout, **config["vgs"])
        self.params = layout.pack(values(variables))


def make_variables(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.standard_normal(s).astype(dtype), name=f"w{i}") for i, s in enumerate(SHAPES)]


def gradient_stream(variables, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(v.shape) * 10 ** rng.uniform(-1, 0.5) + 0.2).astype(v.dtype) for v in variables]
            for _ in range(steps)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_eager_steps_equal_the_core_class(member, dtype):
    make, variant = MEMBERS[member]
    variables = make_variables(dtype)
    opt = make(seed=1234, **NOISE)
    assert opt.variant == variant
    twin = FamilyTwin(opt, variables)
    assert twin.core.variant == variant
    opt.build(variables)
    absent = {3: (1,), 6: (0, 3)}
    for k, grads in enumerate(gradient_stream(variables, 10)):
        present = [i not in absent.get(k, ()) for i in range(len(variables))]
        opt.apply_gradients([(tf.constant(g) if p else None, v) for g, p, v in zip(grads, present, variables)])
        info = twin.step(grads, present)
        assert info.utility_max > 0  # the paper profile's well-defined regime (specs/algorithm.md §7.3)
        twin.assert_matches(values(variables), keras_state(opt), what=f"step {k}")
        np.testing.assert_array_equal(opt.last_step_info.grad_norm, info.grad_norm)
    assert int(opt.iterations.numpy()) == 10


class _Spy:
    """Records the gradients each step hands to the core (nothing else changes)."""

    def build(self, var_list):
        super().build(var_list)
        self.seen = [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in var_list]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        for g, v in zip(grads, trainable_variables):
            self.seen[self._get_variable_index(v)].assign(tf.cast(tf.convert_to_tensor(g), v.dtype))
        super()._backend_update_step(grads, trainable_variables, learning_rate)


class _Recorder(keras.callbacks.Callback):
    def __init__(self, opt, variables):
        super().__init__()
        self.opt, self.variables, self.steps = opt, variables, []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(([np.array(g.numpy()) for g in self.opt.seen], values(self.variables),
                           keras_state(self.opt)))


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_fit_equals_the_core_class(member, run_eagerly):
    make, _ = MEMBERS[member]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((32, 3)).astype("float32")
    y = (np.sin(x.sum(axis=1, keepdims=True)) + 0.5).astype("float32")
    base = make(seed=9, sigma=0.01)
    opt = type("Spy" + type(base).__name__, (_Spy, type(base)), {}).from_config(base.get_config())
    model.compile(optimizer=opt, loss="mse", run_eagerly=run_eagerly, jit_compile=False)
    variables = model.trainable_variables
    opt.build(variables)
    twin = FamilyTwin(opt, variables)
    recorder = _Recorder(opt, variables)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[recorder])
    assert len(recorder.steps) == 8
    for k, (grads, params, state) in enumerate(recorder.steps):
        twin.step(grads)
        twin.assert_matches(params, state, what=f"step {k}")


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_config_round_trips(member):
    make, _ = MEMBERS[member]
    opt = make(seed=2**63 + 5, sigma=0.05, adaptive_noise=True, noise_norm="global", vgs={"warmup_steps": 5},
               clipnorm=1.0)
    config = opt.get_config()
    clone = type(opt).from_config(config)
    assert clone.get_config() == config and clone.variant == opt.variant
    serialized = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(serialized) is type(opt) and serialized.get_config() == config


def test_family_configs_use_each_members_names_and_defaults():
    upgd, upgdw, paper = upgd_tf.UPGD(), upgd_tf.UPGDW(), upgd_tf.AdaptiveUPGD(profile="paper")
    c = upgd.get_config()
    assert (c["learning_rate"], c["weight_decay"], c["beta_utility"], c["sigma"], c["profile"]) == (
        1e-5, 0.001, 0.999, 0.001, "production")
    assert not {"beta1", "beta2", "eps"} & set(c)
    c = upgdw.get_config()
    assert (c["learning_rate"], c["beta_1"], c["beta_2"], c["epsilon"], c["weight_decay"], c["sigma"],
            c["amsgrad"]) == (1e-4, 0.9, 0.999, 1e-8, 0.01, 0.001, False)
    assert not {"beta_utility", "beta1", "beta2", "eps", "profile"} & set(c)
    assert paper.get_config()["eps"] == 1e-5 and paper.variant.protection == "max"
    assert upgd_tf.AdaptiveUPGD().get_config()["profile"] == "production"


def test_upgd_creates_no_moment_variables():
    variables = make_variables("float32")
    opt = upgd_tf.UPGD()
    opt.build(variables)
    names = {v.name for v in opt.variables}
    assert not any("moment" in n for n in names), names
    assert "first_moment" not in opt.state_variables()


def test_upgdw_rejects_amsgrad():
    with pytest.raises(ValueError, match="amsgrad"):
        upgd_tf.UPGDW(amsgrad=True)


@pytest.mark.parametrize("cls", [upgd_tf.AdaptiveUPGD, upgd_tf.UPGD])
def test_unknown_profile_is_rejected(cls):
    with pytest.raises(ValueError, match="profile"):
        cls(profile="papers")


def test_upgdw_beta_2_edit_moves_the_utility_decay():
    """Editing ``beta_2`` between steps changes ``beta_utility`` too (the tie holds at every step)."""
    variables = make_variables("float64")
    opt = upgd_tf.UPGDW(learning_rate=0.05, seed=3)
    twin = FamilyTwin(opt, variables)
    opt.build(variables)
    for k, grads in enumerate(gradient_stream(variables, 4)):
        if k == 2:
            opt.beta_2 = 0.9
            for group in twin.core.param_groups:
                group["beta2"] = 0.9
        opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
        twin.step(grads)
        twin.assert_matches(values(variables), keras_state(opt), what=f"step {k}")
