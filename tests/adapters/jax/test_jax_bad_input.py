"""Bad input to the JAX adapter: clear errors eagerly, documented behaviour under jax.jit.

specs/adapters-jax.md §7: structure, shape and dtype problems are static, so they raise at
trace time as well; non-finite values raise eagerly (naming the leaf) and, under ``jax.jit``
where values are unknown, skip the step (as ``optax.apply_if_finite`` does, ``specs/algorithm.md`` §8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from upgd_ref.adapters import jax as uj


def _params():
    return {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.full((2,), 0.5, jnp.float32)}


def _grads():
    return {"w": jnp.full((3, 2), 0.1, jnp.float32), "b": jnp.full((2,), -0.2, jnp.float32)}


def _modes(tx):
    """The update called eagerly and under jax.jit."""
    return [tx.update, jax.jit(tx.update)]


@pytest.mark.parametrize("mode", [0, 1], ids=["eager", "jit"])
def test_structure_change_between_init_and_update(mode):
    tx = uj.adaptive_upgd(0.01)
    state = tx.init(_params())
    update = _modes(tx)[mode]
    bigger = dict(_params(), extra=jnp.zeros(3))
    with pytest.raises(ValueError, match="structure"):
        update(dict(_grads(), extra=jnp.zeros(3)), state, bigger)
    renamed = {"w": _params()["w"], "bias": _params()["b"]}
    with pytest.raises(ValueError, match="structure"):
        update({"w": _grads()["w"], "bias": _grads()["b"]}, state, renamed)
    with pytest.raises(ValueError, match="structure"):
        update(_grads(), state, [_params()["b"], _params()["w"]])
    vgs = uj.variance_gradient_scaler()
    vgs_update = _modes(vgs)[mode]
    with pytest.raises(ValueError, match="leaves"):
        vgs_update(dict(_grads(), extra=jnp.zeros(3)), vgs.init(_params()))


@pytest.mark.parametrize("mode", [0, 1], ids=["eager", "jit"])
def test_shape_and_dtype_mismatches(mode):
    tx = uj.adaptive_upgd(0.01)
    state = tx.init(_params())
    update = _modes(tx)[mode]
    with pytest.raises(ValueError, match="shape"):
        update(dict(_grads(), w=jnp.zeros((2, 3), jnp.float32)), state, _params())
    with jax.enable_x64(True):
        wide = {k: v.astype(jnp.float64) for k, v in _grads().items()}
        with pytest.raises(TypeError, match="dtype float64"):
            update(wide, state, _params())
        with pytest.raises(TypeError, match="dtype"):
            update(wide, state, wide)  # state is float32
    with pytest.raises(TypeError, match="int32"):
        update({k: v.astype(jnp.int32) for k, v in _grads().items()}, state, _params())


def test_unsupported_leaf_dtypes_and_empty_trees():
    for dtype in (jnp.int32, jnp.int8, jnp.complex64):  # 16-bit floats are leaves (test_jax_precision.py)
        bad = {"w": jnp.ones((2,), dtype)}
        for tx in (uj.adaptive_upgd(), uj.variance_gradient_scaler()):
            with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
                tx.init(bad)
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            uj.noise(bad, 0, 1)
    for tx in (uj.adaptive_upgd(), uj.variance_gradient_scaler()):
        with pytest.raises(ValueError, match="at least one"):
            tx.init({})


@pytest.mark.parametrize("backend", ["native", "kernels"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_raise_eagerly(backend, bad):
    tx = uj.adaptive_upgd(0.01, backend=backend)
    state = tx.init(_params())
    grads = dict(_grads(), b=jnp.asarray([0.1, bad], jnp.float32))
    with pytest.raises(ValueError, match="non-finite"):
        tx.update(grads, state, _params())
    params = dict(_params(), w=_params()["w"].at[2, 1].set(bad))
    with pytest.raises(ValueError, match="non-finite"):
        tx.update(_grads(), state, params)
    vgs = uj.variance_gradient_scaler(backend=backend)
    with pytest.raises(ValueError, match="non-finite"):
        vgs.update(grads, vgs.init(_params()))


def test_native_eager_error_names_the_leaf_and_index():
    tx = uj.adaptive_upgd(0.01)
    grads = dict(_grads(), w=_grads()["w"].at[1, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=r"gradient leaf 1 .* index \(1, 0\)"):  # flatten order: b, w
        tx.update(grads, tx.init(_params()), _params())


def test_non_finite_gradient_under_jit_skips_the_step_as_documented():
    """Under jit a NaN gradient cannot raise: the step is skipped (zero updates, the UPGD and
    VGS states unchanged but the UPGD's ``skipped_steps``), without a host round trip."""
    tx = optax.chain(uj.variance_gradient_scaler(warmup_steps=0), uj.adaptive_upgd(0.01))
    grads = dict(_grads(), b=jnp.asarray([0.1, jnp.nan], jnp.float32))
    start = tx.init(_params())
    updates, (vgs, upgd) = jax.jit(tx.update)(grads, start, _params())
    assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
    for new, old in zip(jax.tree_util.tree_leaves((vgs, upgd._replace(skipped_steps=0))),
                        jax.tree_util.tree_leaves((start[0], start[1]._replace(skipped_steps=0)))):
        assert np.array_equal(np.asarray(new), np.asarray(old))
    assert int(uj.state_values(upgd).skipped_steps) == 1 and int(uj.state_values(upgd).count) == 0


def test_missing_params_and_foreign_state():
    tx = uj.adaptive_upgd(0.01)
    state = tx.init(_params())
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(_grads(), state)
    with pytest.raises(TypeError, match="AdaptiveUPGDState"):
        tx.update(_grads(), optax.adam(0.1).init(_params()), _params())
    with pytest.raises(TypeError, match="VarianceGradientScalerState"):
        uj.variance_gradient_scaler().update(_grads(), state)


@pytest.mark.parametrize("mode", [0, 1], ids=["eager", "jit"])
def test_narrowed_state_is_a_clear_error(mode):
    """A state of the earlier int64/float64 layout narrowed by jnp.asarray with x64 off
    (int32/float32 leaves instead of uint32 words) names restore_state."""
    tx = uj.adaptive_upgd(0.01)
    state = tx.init(_params())
    values = uj.state_values(state)
    narrowed = state._replace(count=jnp.asarray(values.count), grad_norm_ema=jnp.asarray(values.grad_norm_ema))
    assert narrowed.count.dtype == jnp.int32
    with pytest.raises(TypeError, match="restore_state"):
        _modes(tx)[mode](_grads(), narrowed, _params())
    vgs = uj.variance_gradient_scaler()
    vstate = vgs.init(_params())
    with pytest.raises(TypeError, match="restore_state"):
        _modes(vgs)[mode](_grads(), vstate._replace(grad_sq_avg=jnp.asarray(uj.state_values(vstate).grad_sq_avg)))


@pytest.mark.parametrize("make,error", [
    (lambda: uj.adaptive_upgd(-1.0), ValueError),
    (lambda: uj.adaptive_upgd(0.1, beta1=1.0), ValueError),
    (lambda: uj.adaptive_upgd(0.1, sigma=float("nan")), ValueError),
    (lambda: uj.adaptive_upgd(0.1, adaptive_noise=1), TypeError),
    (lambda: uj.adaptive_upgd(0.1, noise_norm="layer"), ValueError),
    (lambda: uj.adaptive_upgd(0.1, seed=-1), ValueError),
    (lambda: uj.adaptive_upgd(0.1, seed=True), TypeError),
    (lambda: uj.adaptive_upgd(0.1, backend="gpu"), ValueError),
    (lambda: uj.adaptive_upgd(0.1, kernel_backend="fortran"), ValueError),
    (lambda: uj.variance_gradient_scaler(beta=1.0), ValueError),
    (lambda: uj.variance_gradient_scaler(warmup_steps=1.5), TypeError),
    (lambda: uj.variance_gradient_scaler(min_scaling_factor=0.0), ValueError),
    (lambda: uj.variance_gradient_scaler(backend="cuda"), ValueError),
])
def test_invalid_hyperparameters(make, error):
    with pytest.raises(error):
        make()


def test_schedule_with_invalid_value_raises_eagerly():
    for backend in ("native", "kernels"):
        tx = uj.adaptive_upgd(lambda count: -0.1 + 0.0 * count, backend=backend)
        with pytest.raises(ValueError, match="schedule gave"):
            tx.update(_grads(), tx.init(_params()), _params())


def test_kernel_path_refuses_traces_and_mixed_dtypes():
    tx = uj.adaptive_upgd(0.01, backend="kernels")
    state = tx.init(_params())
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.jit(tx.update)(_grads(), state, _params())
    vgs = uj.variance_gradient_scaler(backend="kernels")
    with pytest.raises(TypeError, match="cannot be traced"):
        jax.jit(vgs.update)(_grads(), vgs.init(_params()))
    with jax.enable_x64(True):
        mixed = dict(_params(), b=jnp.zeros(2, jnp.float64))
        with pytest.raises(TypeError, match="one dtype"):
            tx.update(dict(_grads(), b=jnp.zeros(2, jnp.float64)), tx.init(mixed), mixed)


def test_restore_state_checks_what_it_restores():
    state = uj.adaptive_upgd(0.01).init(_params())
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]
    restored = uj.restore_state(state, leaves)
    assert [x.dtype for x in jax.tree_util.tree_leaves(restored)] == [x.dtype for x in jax.tree_util.tree_leaves(state)]
    with pytest.raises(ValueError, match="arrays"):
        uj.restore_state(state, leaves[:-1])
    with pytest.raises(ValueError, match="shape"):
        uj.restore_state(state, [np.zeros(7) if i == 2 else x for i, x in enumerate(leaves)])
    with pytest.raises(TypeError, match="dtype"):
        uj.restore_state(state, [x.astype(np.int32) if x.dtype == np.uint32 else x for x in leaves])
    with pytest.raises(ValueError, match="structure"):
        uj.restore_state(state, {"not": "a state"})
