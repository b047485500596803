"""The finiteness contract (``specs/algorithm.md`` §8) through the JAX adapter.

Spikes at the float32 overflow threshold of ``g*g`` (~1.8e19) in one element of one leaf:
eagerly with ``nonfinite="raise"`` a :class:`~upgd_ref.checks.NonFiniteStepError` naming the
field and leaf; with ``"skip"``, and under ``jax.jit`` for either policy, zero updates and the
state unchanged but ``skipped_steps`` (``jnp.where`` on a finiteness flag, no host round trip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from upgd_ref.adapters import jax as uj
from upgd_ref.checks import NonFiniteStepError

BELOW, ABOVE = 1.8e19, 1.9e19  # |g| whose float32 square is finite / overflows


def _params():
    return {"b": jnp.full((2,), 0.5, jnp.float32), "w": jnp.ones((3, 2), jnp.float32)}


def _grads(spike=None):
    w = jnp.full((3, 2), 0.1, jnp.float32)
    if spike is not None:
        w = w.at[1, 0].set(spike)  # leaf 1 ("w"), flat element 2
    return {"b": jnp.full((2,), -0.2, jnp.float32), "w": w}


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("backend", ["native", "kernels"])
def test_an_overflowing_square_raises_eagerly_naming_field_and_leaf(backend):
    tx = uj.adaptive_upgd(0.01, backend=backend)
    state = tx.init(_params())
    with pytest.raises(NonFiniteStepError, match="second_moment") as caught:
        tx.update(_grads(ABOVE), state, _params())
    assert (caught.value.field, caught.value.segment, caught.value.element) == ("second_moment", 1, 2)


@pytest.mark.parametrize("backend", ["native", "kernels"])
@pytest.mark.parametrize("spike", [ABOVE, np.nan, np.inf])
def test_skip_leaves_the_state_and_returns_zero_updates(backend, spike):
    tx = uj.adaptive_upgd(0.01, backend=backend, nonfinite="skip")
    state = tx.init(_params())
    updates, new = tx.update(_grads(spike), state, _params())
    assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
    assert _same(new._replace(skipped_steps=0), state._replace(skipped_steps=0))
    assert int(uj.state_values(new).skipped_steps) == 1


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_under_jit_a_refused_step_is_skipped_without_a_host_round_trip(policy):
    tx = uj.upgd(0.01, nonfinite=policy)
    params = jax.tree_util.tree_map(lambda p: 4 * p, _params())
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, new = update(_grads(1e38), state, params)  # g p = 4e38 overflows the utility
    assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
    assert int(uj.state_values(new).skipped_steps) == 1 and int(uj.state_values(new).count) == 0
    updates, newer = update(_grads(), new, params)  # the next finite step runs as a first step
    fresh_updates, fresh = update(_grads(), state, params)
    values = uj.state_values(newer)
    assert _same(updates, fresh_updates) and int(values.count) == 1 and int(values.skipped_steps) == 1


def test_a_spike_below_the_threshold_steps_and_stays_finite():
    tx = uj.adaptive_upgd(0.01)
    updates, new = tx.update(_grads(BELOW), tx.init(_params()), _params())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves((updates, new)))
    assert int(uj.state_values(new).count) == 1 and int(uj.state_values(new).skipped_steps) == 0


@pytest.mark.parametrize("backend", ["native", "kernels"])
def test_the_scaler_skips_an_overflowing_statistics_update(backend):
    vgs = uj.variance_gradient_scaler(warmup_steps=0, backend=backend, nonfinite="skip")
    with uj.x64_scope():  # two squares of 1e154 overflow the float64 sum (and b_i), each alone does not
        grads = {"b": jnp.full((2,), 1e154, jnp.float64), "w": jnp.ones((3, 2), jnp.float64)}
        assert np.isfinite(np.asarray(grads["b"])).all()
        params = jax.tree_util.tree_map(lambda g: jnp.ones_like(g), grads)
        state = vgs.init(params)
        scaled, new = vgs.update(grads, state)
    assert _same(new, state) and _same(scaled, grads)


def test_optax_chain_with_skip_keeps_training():
    tx = optax.chain(uj.variance_gradient_scaler(warmup_steps=0, nonfinite="skip"),
                     uj.adaptive_upgd(0.01, nonfinite="skip"))
    params, state = _params(), tx.init(_params())
    for spike in (None, np.nan, None):
        updates, state = tx.update(_grads(spike), state, params)
        params = optax.apply_updates(params, updates)
    assert int(uj.state_values(state[1]).count) == 2 and int(uj.state_values(state[1]).skipped_steps) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_the_finiteness_flag_sees_one_nan_or_infinity_anywhere(dtype):
    """``all_finite``'s fused reduction sees a single NaN or infinity at either end or in the
    middle of short and long leaves (XLA:CPU's vectorised ``max`` of a long float32 array drops a
    NaN, so the flag must not be ``max |x| < inf``)."""
    from upgd_ref.adapters.jax.leaves import all_finite

    flag = jax.jit(lambda x: all_finite([x]))
    for shape in ((1,), (7,), (4097,), (125_000,), (129, 33)):
        x = np.ones(shape, np.float32).reshape(-1)
        assert bool(flag(jnp.asarray(x.reshape(shape), dtype)))
        for position in (0, x.size // 2, x.size - 1):
            for bad in (np.nan, np.inf, -np.inf):
                y = x.copy()
                y[position] = bad
                assert not bool(flag(jnp.asarray(y.reshape(shape), dtype))), (shape, position, bad)
