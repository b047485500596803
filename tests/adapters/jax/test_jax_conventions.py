"""optax conventions (specs/adapters-jax.md §3.1): hyper-parameters as (traced) arrays and
schedules through ``optax.inject_hyperparams``, ``init`` on optax's params placeholder
(``optax.tree_utils.tree_map_params``), and the seed in the state (``jax.vmap`` over seeds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from upgd_ref.adapters import jax as uj
from upgd_ref.tolerances import STATE_ULPS, unit_roundoff

# float32-exact values: the injected (float32) hyper-parameters equal these Python floats
HYPER = dict(weight_decay=0.25, beta_utility=0.75, sigma=0.125, beta1=0.5, beta2=0.75, eps=2.0**-20,
             noise_beta=0.875, min_noise_std=2.0**-12, adaptive_noise=True, instant_noise_scale=False)
RTOL = STATE_ULPS * unit_roundoff("float64")  # float64 statistics, traced vs Python coefficients
SCHEDULE = optax.exponential_decay(0.0625, transition_steps=1, decay_rate=0.5)  # 2**-4, 2**-5, ...: exact


def _params():
    r = np.random.default_rng(0)
    return {"w": jnp.asarray(r.standard_normal((5, 3)), jnp.float32),
            "b": jnp.asarray(r.standard_normal(3), jnp.float32)}


def _grads(params, k):
    r = np.random.default_rng(100 + k)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(r.standard_normal(p.shape), p.dtype), params)


def _run(tx, steps=4, params=None):
    params = _params() if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(steps):
        updates, state = update(_grads(params, k), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_same(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("member,kwargs", [
    (uj.adaptive_upgd, HYPER),
    (uj.upgdw, dict(b1=0.5, b2=0.75, eps=2.0**-20, weight_decay=0.25, sigma=0.125)),
    (uj.upgd, dict(weight_decay=0.25, beta_utility=0.75, sigma=0.125)),
])
def test_inject_hyperparams_with_a_schedule_equals_python_values(member, kwargs):
    """Every numeric hyper-parameter traced under jit (inject_hyperparams keeps them in its
    state) gives the bits of the same values passed as Python numbers."""
    injected = optax.inject_hyperparams(member)(learning_rate=SCHEDULE, **kwargs, seed=3)
    params, state = _run(injected)
    expected_params, expected_state = _run(member(SCHEDULE, **kwargs, seed=3))
    _assert_same(params, expected_params)
    # n_i (float64): XLA may contract a traced coefficient's multiply-add, within the state's ulps
    np.testing.assert_allclose(uj.state_values(state.inner_state).grad_norm_ema,
                               uj.state_values(expected_state).grad_norm_ema, rtol=RTOL, atol=0)
    _assert_same(state.inner_state._replace(grad_norm_ema=0), expected_state._replace(grad_norm_ema=0))
    assert float(state.hyperparams["learning_rate"]) == SCHEDULE(3)  # the last step's value


def test_injected_hyperparameter_changed_between_steps():
    """The point of inject_hyperparams: a value set in the state between steps is used."""
    tx = optax.inject_hyperparams(uj.adaptive_upgd)(learning_rate=0.0625, **HYPER)
    params = _params()
    state = tx.init(params)
    state.hyperparams["sigma"] = jnp.asarray(0.5, jnp.float32)
    updates, _ = jax.jit(tx.update)(_grads(params, 0), state, params)
    expected, _ = jax.jit(uj.adaptive_upgd(0.0625, **dict(HYPER, sigma=0.5)).update)(
        _grads(params, 0), uj.adaptive_upgd(0.0625, **HYPER).init(params), params)
    _assert_same(updates, expected)


def test_concrete_array_hyperparameters_are_validated():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        uj.adaptive_upgd(jnp.asarray(-0.1))
    with pytest.raises(ValueError, match="beta1"):
        uj.adaptive_upgd(0.1, beta1=jnp.asarray(1.5))
    with pytest.raises(ValueError, match="scalar"):
        uj.adaptive_upgd(jnp.ones(2))
    with pytest.raises(ValueError, match="seed"):
        uj.adaptive_upgd(0.1, seed=jnp.asarray(-1))
    with pytest.raises(TypeError, match="seed"):
        uj.adaptive_upgd(0.1, seed=jnp.asarray(1.5))


def test_tree_map_params_reaches_the_params_shaped_fields():
    tx = optax.chain(uj.variance_gradient_scaler(), uj.adaptive_upgd(0.01, **HYPER))
    params = _params()
    state = _run(tx, steps=2)[1]
    mapped = optax.tree_utils.tree_map_params(tx, lambda x: jnp.full_like(x, -1), state,
                                              transform_non_params=lambda x: x)
    upgd = mapped[1]
    for tree in (upgd.utility, upgd.first_moment, upgd.second_moment):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
        assert all(np.all(np.asarray(x) == -1) for x in jax.tree_util.tree_leaves(tree))
    _assert_same((mapped[0], upgd.count, upgd.grad_norm_ema, upgd.seed),
                 (state[0], state[1].count, state[1].grad_norm_ema, state[1].seed))
    with pytest.raises(ValueError, match="at least one"):
        uj.adaptive_upgd().init({})  # an empty tree of the user's is still an error


def test_vmap_over_four_seeds_equals_each_single_run():
    """The seed lives in the state: init under vmap over seeds, update under vmap; each member
    equals its own run with a Python int seed bit for bit (and a jax.random key of that seed)."""
    seeds = jnp.asarray([0, 7, 2**32 - 1, 12345], dtype=jnp.uint32)
    kwargs = dict(HYPER, learning_rate=0.0625)
    params = _params()
    states = jax.vmap(lambda s: uj.adaptive_upgd(**kwargs, seed=s).init(params))(seeds)
    tx = uj.adaptive_upgd(**kwargs)  # its own seed is not used: the state's is
    batch = jax.tree_util.tree_map(lambda p: jnp.stack([p] * 4), params)
    update = jax.jit(jax.vmap(tx.update))
    for k in range(3):
        grads = jax.tree_util.tree_map(lambda p: jnp.stack([p] * 4), _grads(params, k))
        updates, states = update(grads, states, batch)
        batch = optax.apply_updates(batch, updates)
    for i, seed in enumerate(np.asarray(seeds)):
        alone = _run(uj.adaptive_upgd(**kwargs, seed=int(seed)), steps=3)
        keyed = _run(uj.adaptive_upgd(**kwargs, seed=jax.random.key(int(seed))), steps=3)
        member = jax.tree_util.tree_map(lambda x: x[i], (batch, states))
        _assert_same(member, alone)
        _assert_same(keyed, alone)


def test_inject_hyperparams_into_the_scaler():
    vgs = dict(beta=0.75, alpha=0.5, warmup_steps=1, min_scaling_factor=0.25, variance_cap=8.0)
    injected = optax.chain(optax.inject_hyperparams(uj.variance_gradient_scaler)(**vgs),
                           uj.adaptive_upgd(0.0625, **HYPER))
    params, state = _run(injected, steps=5)
    expected_params, expected_state = _run(optax.chain(uj.variance_gradient_scaler(**vgs),
                                                       uj.adaptive_upgd(0.0625, **HYPER)), steps=5)
    _assert_same(params, expected_params)
    np.testing.assert_allclose(uj.state_values(state[0].inner_state).grad_sq_avg,
                               uj.state_values(expected_state[0]).grad_sq_avg, rtol=RTOL, atol=0)
