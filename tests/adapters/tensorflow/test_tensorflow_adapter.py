"""The Keras optimizer ``upgd_ref.adapters.tensorflow.AdaptiveUPGD`` driven directly
(``apply_gradients``, eagerly and inside ``tf.function``): equality with the core API,
the tolerance contract, frozen variables, sparse and bad gradients, configuration."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import upgd_ref
from upgd_ref.adapters.tensorflow import AdaptiveUPGD, VGSConfig
from upgd_ref.hyperparams import VGS_DEFAULTS

from tests.helpers.tensorflow_common import CoreTwin, contract_violation, keras_state, values

pytestmark = pytest.mark.filterwarnings("ignore:Gradients do not exist for variables:UserWarning")

SHAPES = [(4, 3), (3,), (0,), (2, 2, 2)]

MODES = [
    pytest.param(dict(sigma=0.5), id="fixed-noise"),
    pytest.param(dict(sigma=0.3, adaptive_noise=True), id="adaptive-instant"),
    pytest.param(dict(sigma=0.3, adaptive_noise=True, instant_noise_scale=False, noise_ema_init=0.0,
                      vgs={"warmup_steps": 2, "alpha": 0.5}), id="adaptive-ema-vgs"),
    pytest.param(dict(sigma=0.3, adaptive_noise=True, noise_norm="global", vgs=True), id="global-norm-vgs"),
]


def make_variables(dtype, seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.standard_normal(s).astype(dtype), name=f"w{i}") for i, s in enumerate(shapes)]


def gradient_stream(variables, steps, seed=1, absent=None):
    """Per step: a list of gradients (None for variables absent at that step)."""
    rng = np.random.default_rng(seed)
    absent = absent or {}
    out = []
    for k in range(steps):
        grads = []
        for i, v in enumerate(variables):
            g = (rng.standard_normal(v.shape) * 10 ** rng.uniform(-2, 0.5)).astype(v.dtype)
            grads.append(None if i in absent.get(k, ()) else g)
        out.append(grads)
    return out


def apply_eager(opt, grads, variables):
    opt.apply_gradients([(None if g is None else tf.constant(g), v) for g, v in zip(grads, variables)])


def make_eager_apply(opt):
    return lambda grads, variables: apply_eager(opt, grads, variables)


def make_graph_apply(opt):
    """``run(grads, variables)`` through one ``tf.function`` per variable list (variables are
    closed over: as arguments they would become tensors)."""
    compiled = {}

    def run(grads, variables):
        key = tuple(id(v) for v in variables)
        if key not in compiled:
            compiled[key] = tf.function(lambda grads: opt.apply_gradients(zip(grads, variables)))
        compiled[key]([None if g is None else tf.constant(g) for g in grads])

    return run


def assert_same_info(got, want, vgs_factor):
    """StepInfo equality; the twin steps unfused (scale, step, update), so the VGS factor
    is compared with the one its ``scale`` returned."""
    got, want = got.to_dict(), want.to_dict()
    assert got.keys() == want.keys()
    np.testing.assert_array_equal(got.pop("vgs_factor", vgs_factor), vgs_factor)
    got.pop("vgs_normalized_variance", None)
    for key in got:
        np.testing.assert_array_equal(np.asarray(got[key], dtype=object if key == "present" else None),
                                      np.asarray(want[key], dtype=object if key == "present" else None), err_msg=key)


def snapshot(opt, variables):
    return values(variables), [np.array(v.numpy()) for v in opt.variables]


def assert_unchanged(before, after):
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)
    assert len(before[1]) == len(after[1])
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)


# --- equality with the core API and the tolerance contract --------------------------------


@pytest.mark.parametrize("execution", ["eager", "tf.function"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_steps_equal_the_core_api_and_stay_within_the_contract(dtype, mode, execution):
    """10 steps (a zero-size variable, variables without a gradient at some steps): the
    Keras optimizer equals the core API bit for bit, and every step lies within the tolerance
    contract of the float64 reference run from the Keras side's own pre-step state."""
    variables = make_variables(dtype)
    opt = AdaptiveUPGD(learning_rate=0.05, weight_decay=0.01, beta_utility=0.9, seed=1234, **mode)
    twin = CoreTwin(opt, variables)
    apply = make_eager_apply(opt) if execution == "eager" else make_graph_apply(opt)
    opt.build(variables)
    factors = []
    for k, grads in enumerate(gradient_stream(variables, 10, absent={3: (1,), 4: (1, 3), 7: (0,)})):
        present = [g is not None for g in grads]
        before_params, before = values(variables), keras_state(opt)
        apply(grads, variables)
        info = twin.step(grads, present)
        twin.assert_bit_identical(opt, variables, what=f"step {k}")
        assert_same_info(opt.last_step_info, info, twin.last_factor)
        factors.append(twin.last_factor)
        worst = contract_violation(opt, twin.layout, before_params, before,
                                   [g if g is not None else np.zeros(v.shape, dtype) for g, v in zip(grads, variables)],
                                   present, values(variables), keras_state(opt))
        assert worst <= 1.0, f"step {k}: {worst:.3g} x the contract"
        for i in range(len(variables)):
            if not present[i]:
                np.testing.assert_array_equal(values(variables)[i], before_params[i])
    assert int(opt.iterations.numpy()) == 10
    if isinstance(mode.get("vgs"), dict):  # past its warm-up the scaler really scales
        assert min(factors) < 1.0


def test_graph_and_eager_application_agree_bit_for_bit():
    variables_a, variables_b = make_variables("float32"), make_variables("float32")
    opt_a = AdaptiveUPGD(learning_rate=0.05, sigma=0.2, adaptive_noise=True, vgs={"warmup_steps": 1}, seed=9)
    opt_b = AdaptiveUPGD.from_config(opt_a.get_config())
    graph_apply = make_graph_apply(opt_b)
    for grads in gradient_stream(variables_a, 6, absent={2: (3,)}):
        apply_eager(opt_a, grads, variables_a)
        graph_apply(grads, variables_b)
    assert_unchanged(snapshot(opt_a, variables_a), snapshot(opt_b, variables_b))


def test_values_read_before_a_graph_step_are_not_changed_by_it():
    """In a graph TensorFlow aliases aligned numpy_function outputs: the adapter must never
    write a buffer it handed back, or tensors read earlier would change behind TF's back."""
    variables = make_variables("float32", shapes=[(64,), (16, 4)])
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.2, seed=2)
    apply = make_graph_apply(opt)
    stream = gradient_stream(variables, 4)
    apply(stream[0], variables)
    watched = [*variables, *opt.state_variables()["utility"], *opt.state_variables()["second_moment"]]
    for grads in stream[1:]:
        held = [tf.identity(v.value) for v in watched]
        copies = [np.array(t.numpy()) for t in held]
        apply(grads, variables)
        for t, c in zip(held, copies):
            np.testing.assert_array_equal(t.numpy(), c)
        assert not np.array_equal(values(variables)[0], copies[0])


def test_learning_rate_reaches_the_core_exactly():
    """``learning_rate=1e-2`` runs the core with lr = 1e-2 (not Keras's float32 copy); the
    setter keeps that; a value assigned to the variable directly or from a schedule is used
    as the float it is."""
    variables = make_variables("float64", shapes=[(5,), (2, 3)])
    opt = AdaptiveUPGD(learning_rate=1e-2, sigma=0.1, seed=2)
    layout = upgd_ref.FlatLayout([v.shape for v in variables], dtype="float64")
    core = upgd_ref.AdaptiveUPGD(layout, lr=1e-2, sigma=0.1, seed=2)
    params = layout.pack(values(variables))
    stream = gradient_stream(variables, 4)

    def both(grads, lr):
        apply_eager(opt, grads, variables)
        core.param_groups[0]["lr"] = lr
        core.step(params, layout.pack(grads))
        for mine, theirs in zip(layout.unpack(params), values(variables)):
            np.testing.assert_array_equal(theirs, mine)

    both(stream[0], 1e-2)
    opt.learning_rate = 3e-3
    both(stream[1], 3e-3)
    opt.learning_rate.assign(4e-3)  # bypasses the setter: the variable's float32 value counts
    both(stream[2], float(np.float32(4e-3)))
    assert float(np.float32(4e-3)) != 4e-3
    assert opt.get_config()["learning_rate"] == float(np.float32(4e-3))

    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    variables = make_variables("float32", shapes=[(3,)])
    opt = AdaptiveUPGD(learning_rate=schedule, seed=4)
    twin = CoreTwin(AdaptiveUPGD(learning_rate=0.1, seed=4), variables)
    for grads in gradient_stream(variables, 3):
        lr = float(schedule(opt.iterations).numpy())
        apply_eager(opt, grads, variables)
        twin.core.param_groups[0]["lr"] = lr
        twin.step(grads)
        np.testing.assert_array_equal(values(variables)[0], twin.layout.unpack(twin.params)[0])


def test_weight_decay_is_the_algorithms_and_respects_exclusions():
    """``weight_decay`` is applied once, by the core; excluded variables get 0."""
    variables = [keras.Variable(np.ones((3, 2), "float32"), name="kernel"),
                 keras.Variable(np.ones(2, "float32"), name="bias")]
    opt = AdaptiveUPGD(learning_rate=0.1, weight_decay=0.5, seed=1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    twin = CoreTwin(opt, variables, param_groups=[{"segments": [1], "weight_decay": 0.0}])
    for grads in gradient_stream(variables, 3):
        apply_eager(opt, grads, variables)
        twin.step(grads)
        twin.assert_bit_identical(opt, variables)


def test_hyperparameter_edits_apply_at_the_next_step_and_bad_ones_change_nothing():
    variables = make_variables("float32", shapes=[(4,), (2, 2)])
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.1, seed=8)
    apply = make_graph_apply(opt)  # compiled once: edits must still reach the core
    twin = CoreTwin(opt, variables)
    stream = gradient_stream(variables, 3)
    apply(stream[0], variables)
    twin.step(stream[0])
    opt.sigma = 0.4
    twin.core.param_groups[0]["sigma"] = 0.4
    apply(stream[1], variables)
    twin.step(stream[1])
    twin.assert_bit_identical(opt, variables)
    opt.beta1 = 1.5
    before = snapshot(opt, variables)
    with pytest.raises(tf.errors.InvalidArgumentError, match="beta1 must be in"):
        apply(stream[2], variables)
    assert_unchanged(before, snapshot(opt, variables))
    opt.beta1 = 0.9
    apply(stream[2], variables)
    twin.step(stream[2])
    twin.assert_bit_identical(opt, variables)


def test_gradient_accumulation_steps_the_core_with_the_mean_gradient():
    """Keras's ``gradient_accumulation_steps=2``: every second call steps the core with the
    mean of the two gradients (Keras's own arithmetic: ``(g + acc) / 2`` in the dtype)."""
    variables = make_variables("float32", shapes=[(3, 2), (4,)])
    opt = AdaptiveUPGD(learning_rate=0.05, sigma=0.1, seed=4, gradient_accumulation_steps=2)
    twin = CoreTwin(opt, variables)
    stream = gradient_stream(variables, 6)
    for k, grads in enumerate(stream):
        apply_eager(opt, grads, variables)
        if k % 2 == 1:
            twin.step([(g + a) / np.float32(2) for g, a in zip(grads, stream[k - 1])])
        twin.assert_bit_identical(opt, variables, what=f"call {k}")
    assert int(keras_state(opt)["upgd_step"]) == 3


# --- sparse, missing and bad gradients ----------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_indexed_slices_are_densified_duplicates_summed(dtype):
    """An IndexedSlices gradient (what Embedding layers produce) acts as the dense gradient
    with the rows' values summed (values chosen so that every sum is exact)."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((6, 3)).astype(dtype)
    other = rng.standard_normal(4).astype(dtype)
    sparse_vars = [keras.Variable(table), keras.Variable(other)]
    dense_vars = [keras.Variable(table), keras.Variable(other)]
    opt_sparse = AdaptiveUPGD(learning_rate=0.1, sigma=0.1, seed=6)
    opt_dense = AdaptiveUPGD.from_config(opt_sparse.get_config())
    for _ in range(3):
        indices = rng.integers(0, 6, size=5)
        rows = (rng.integers(-16, 16, size=(5, 3)) / 8).astype(dtype)
        dense = np.zeros((6, 3), dtype)
        np.add.at(dense, indices, rows)
        g_other = rng.standard_normal(4).astype(dtype)
        sparse = tf.IndexedSlices(tf.constant(rows), tf.constant(indices), dense_shape=tf.constant([6, 3]))
        opt_sparse.apply_gradients([(sparse, sparse_vars[0]), (tf.constant(g_other), sparse_vars[1])])
        opt_dense.apply_gradients([(tf.constant(dense), dense_vars[0]), (tf.constant(g_other), dense_vars[1])])
    assert_unchanged(snapshot(opt_sparse, sparse_vars), snapshot(opt_dense, dense_vars))
    assert not np.array_equal(values(sparse_vars)[0], table)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("execution", ["eager", "tf.function"])
def test_non_finite_gradients_raise_naming_the_variable_and_change_nothing(bad, execution):
    variables = make_variables("float32", shapes=[(3, 2), (4,)])
    opt = AdaptiveUPGD(learning_rate=0.1, sigma=0.1, vgs={"warmup_steps": 0}, seed=3)
    apply = make_eager_apply(opt) if execution == "eager" else make_graph_apply(opt)
    stream = gradient_stream(variables, 2)
    apply(stream[0], variables)
    before = snapshot(opt, variables)
    grads = [g.copy() for g in stream[1]]
    grads[1][2] = bad
    error = ValueError if execution == "eager" else tf.errors.InvalidArgumentError
    with pytest.raises(error, match=r"segment 1 holds a non-finite value.*segment 1 is variable 'w1'"):
        apply(grads, variables)
    assert_unchanged(before, snapshot(opt, variables))
    assert int(opt.iterations.numpy()) == 1


def test_non_finite_gradient_of_a_frozen_variable_is_not_read():
    variables = make_variables("float32", shapes=[(3,), (2,)])
    opt = AdaptiveUPGD(learning_rate=0.1, seed=3)
    twin = CoreTwin(opt, variables)
    grads = gradient_stream(variables, 1)[0]
    apply_eager(opt, [grads[0], None], variables)
    twin.step([grads[0], np.full(2, np.nan, "float32")], [True, False])
    twin.assert_bit_identical(opt, variables)


def test_gradient_of_the_wrong_shape_raises_and_changes_nothing():
    variables = make_variables("float32", shapes=[(3, 2), (4,)])
    opt = AdaptiveUPGD(learning_rate=0.1)
    opt.build(variables)
    before = snapshot(opt, variables)
    with pytest.raises(ValueError, match=r"gradient for variable 'w0' has shape \(2, 3\)"):
        opt.apply_gradients([(tf.zeros((2, 3)), variables[0]), (tf.zeros(4), variables[1])])
    assert_unchanged(before, snapshot(opt, variables))


@pytest.mark.parametrize("corrupt, match", [
    (lambda sv: sv["segment_step"].assign([5, 0]), "'upgd_step' .* and 'segment_step' .* are inconsistent"),
    (lambda sv: sv["grad_norm_ema"].assign([-1.0, 1.0]), "'grad_norm_ema' must be >= 0"),
    (lambda sv: sv["vgs_grad_sq_avg"].assign([-1.0, 0.0]), "'vgs_grad_sq_avg' are corrupt"),
])
def test_corrupted_state_variables_raise_and_change_nothing(corrupt, match):
    """A hand-edited or corrupted checkpoint is caught at the next step."""
    variables = make_variables("float32", shapes=[(3,), (2,)])
    opt = AdaptiveUPGD(learning_rate=0.1, vgs=True)
    stream = gradient_stream(variables, 2)
    apply_eager(opt, stream[0], variables)
    corrupt(opt.state_variables())
    before = snapshot(opt, variables)
    with pytest.raises(ValueError, match=match):
        apply_eager(opt, stream[1], variables)
    assert_unchanged(before, snapshot(opt, variables))


def test_all_gradients_missing_is_an_error():
    variables = make_variables("float32", shapes=[(3,)])
    opt = AdaptiveUPGD()
    opt.build(variables)
    with pytest.raises(ValueError, match="No gradients"):
        opt.apply_gradients([(None, variables[0])])


@pytest.mark.parametrize("dtypes, match", [
    (["int32"], "supports float32, float64, float16, bfloat16 variables"),
    (["float32", "float64"], "all variables in one dtype"),
    (["bfloat16", "float32"], "all variables in one dtype"),
])
def test_unsupported_variable_dtypes_are_rejected_before_anything_is_created(dtypes, match):
    variables = [keras.Variable(np.ones(3), dtype=d) for d in dtypes]
    opt = AdaptiveUPGD()
    with pytest.raises(TypeError, match=match):
        opt.apply_gradients([(tf.ones(3, dtype=v.dtype), v) for v in variables])
    assert not opt.built
    assert len(opt.variables) == 2  # Keras's iteration count and learning rate only


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error", [
    (dict(beta1=1.0), ValueError), (dict(beta_utility=-0.1), ValueError), (dict(sigma=-1.0), ValueError),
    (dict(eps=math.nan), ValueError), (dict(learning_rate=-0.1), ValueError),
    (dict(adaptive_noise="yes"), TypeError), (dict(seed=-1), ValueError), (dict(seed=2**64), ValueError),
    (dict(seed=1.5), TypeError), (dict(noise_norm="layer"), ValueError), (dict(vgs={"beta": 1.5}), ValueError),
    (dict(vgs={"bogus": 1}), ValueError), (dict(vgs={"warmup_steps": 2.5}), TypeError), (dict(vgs="on"), TypeError),
    (dict(bogus=1), ValueError),
])
def test_invalid_settings_raise_at_construction(kwargs, error):
    with pytest.raises(error):
        AdaptiveUPGD(**kwargs)


def test_config_round_trips_and_vgs_settings_forms_are_equivalent():
    opt = AdaptiveUPGD(learning_rate=3e-4, weight_decay=0.02, beta_utility=0.99, sigma=0.05, beta1=0.8,
                       beta2=0.99, eps=1e-6, adaptive_noise=True, noise_beta=0.9, min_noise_std=1e-5,
                       instant_noise_scale=False, vgs=VGSConfig(warmup_steps=5, alpha=0.2), seed=2**63 + 5,
                       noise_norm="global", noise_ema_init=0.0, clipnorm=1.0, name="upgd")
    config = opt.get_config()
    assert AdaptiveUPGD.from_config(config).get_config() == config
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(clone) is AdaptiveUPGD and clone.get_config() == config
    assert config["vgs"] == dict(VGS_DEFAULTS, warmup_steps=5, alpha=0.2)
    assert config["learning_rate"] == 3e-4 and config["seed"] == 2**63 + 5 and config["clipnorm"] == 1.0
    assert AdaptiveUPGD(vgs={"warmup_steps": 5, "alpha": 0.2}).vgs == config["vgs"]
    assert AdaptiveUPGD(vgs=True).vgs == VGS_DEFAULTS
    assert AdaptiveUPGD(vgs=None).vgs is None and AdaptiveUPGD(vgs=False).vgs is None
    with pytest.raises(AttributeError):
        opt.seed = 1  # the noise key is fixed


def test_per_variable_update_path_is_refused():
    opt = AdaptiveUPGD()
    variable = keras.Variable(np.ones(2, "float32"))
    opt.build([variable])
    with pytest.raises(RuntimeError, match="all variables at once"):
        opt.update_step(tf.ones(2), variable, 0.1)
