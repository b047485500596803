"""States without ``jax_enable_x64`` (specs/adapters-jax.md §5.1): every leaf is representable
in JAX's default mode (64-bit values as uint32 words), so pickle, ``np.savez``, orbax and
``optax.MultiSteps`` round trips work there, bit-identical to the x64 mode; states of the
earlier int64/float64 layout still load through ``restore_state``."""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from upgd_ref.adapters import jax as uj

STEPS = 6


def _params():
    r = np.random.default_rng(1)
    return {"w": jnp.asarray(r.standard_normal((5, 3)), jnp.float32),
            "b": jnp.asarray(r.standard_normal(3), jnp.float32),
            "head": [jnp.asarray(r.standard_normal((3, 2)), jnp.float32)]}


def _grads(params, k):
    r = np.random.default_rng(50 + k)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(r.standard_normal(p.shape) + 0.2, jnp.float32), params)


def _tx():
    return optax.chain(uj.variance_gradient_scaler(warmup_steps=2, alpha=0.5),
                       uj.adaptive_upgd(0.01, adaptive_noise=True, instant_noise_scale=False, sigma=0.05,
                                        seed=2**40 + 3))


def _steps(tx, params, state, first, last):
    update = jax.jit(tx.update)
    for k in range(first, last):
        updates, state = update(_grads(params, k), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _host(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_same(a, b):
    for x, y in zip(_host(a), _host(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def x64_run():
    """``STEPS`` steps in the x64 mode (float32 params): the reference every round trip meets."""
    with jax.enable_x64(True):
        tx = _tx()
        params, state = _steps(tx, _params(), tx.init(_params()), 0, STEPS)
        return _host(params), _host(state)


def _round_trip_run(round_trip):
    """Half the steps, ``round_trip`` of (params, state), the other half, all with x64 off."""
    with jax.enable_x64(False):
        tx = _tx()
        params, state = _steps(tx, _params(), tx.init(_params()), 0, STEPS // 2)
        params, state = round_trip(tx, params, state)
        return _steps(tx, params, state, STEPS // 2, STEPS)


def test_every_state_leaf_is_32_bit_in_the_default_mode():
    with jax.enable_x64(False):
        state = _tx().init(_params())
    assert {np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(state)} == {"uint32", "float32"}


def test_pickle(x64_run):
    result = _round_trip_run(lambda tx, p, s: pickle.loads(pickle.dumps((p, s))))
    _assert_same(result, x64_run)


@pytest.mark.parametrize("restore", ["jnp.asarray", "restore_state"])
def test_npz(tmp_path, x64_run, restore):
    def round_trip(tx, params, state):
        np.savez(tmp_path / "ckpt.npz", *_host((params, state)))
        with np.load(tmp_path / "ckpt.npz") as data:
            saved = [data[f"arr_{i}"] for i in range(len(data.files))]
        n = len(jax.tree_util.tree_leaves(params))
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [jnp.asarray(x) for x in saved[:n]])
        if restore == "restore_state":
            return params, uj.restore_state(tx.init(params), saved[n:])
        structure = jax.tree_util.tree_structure(state)
        return params, jax.tree_util.tree_unflatten(structure, [jnp.asarray(x) for x in saved[n:]])

    _assert_same(_round_trip_run(round_trip), x64_run)


def test_orbax_standard_checkpointer(tmp_path, x64_run):
    def round_trip(tx, params, state):
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp_path / "ckpt", {"params": params, "state": state})
        checkpointer.wait_until_finished()
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"params": params, "state": state})
        restored = checkpointer.restore(tmp_path / "ckpt", target)
        checkpointer.close()
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                             jax.tree_util.tree_leaves(restored["state"]))
        return restored["params"], state

    _assert_same(_round_trip_run(round_trip), x64_run)


def test_multisteps_in_the_default_mode():
    """optax.MultiSteps (its lax.cond needs the inner update to keep every leaf's dtype) runs
    with x64 off, bit-identical to the x64 mode: two inner updates in four mini-steps."""
    def run():
        multi = optax.MultiSteps(_tx(), every_k_schedule=2)
        params = _params()
        state = multi.init(params)
        step = jax.jit(multi.update)
        for k in range(4):
            updates, state = step(_grads(params, k), state, params)
            params = optax.apply_updates(params, updates)
        assert int(uj.state_values(state.inner_opt_state[1]).count) == 2
        return _host((params, state))

    with jax.enable_x64(False):
        off = run()
    with jax.enable_x64(True):
        on = run()
    _assert_same(off, on)


def test_vmap_over_seeds_in_the_default_mode():
    with jax.enable_x64(False):
        tx = _tx()
        seeds = jnp.arange(4, dtype=jnp.uint32) + 11
        states = jax.vmap(lambda s: optax.chain(uj.variance_gradient_scaler(warmup_steps=2, alpha=0.5),
                                                uj.adaptive_upgd(0.01, adaptive_noise=True, instant_noise_scale=False,
                                                                 sigma=0.05, seed=s)).init(_params()))(seeds)
        grads = jax.tree_util.tree_map(lambda g: jnp.stack([g] * 4), _grads(_params(), 0))
        batch = jax.tree_util.tree_map(lambda p: jnp.stack([p] * 4), _params())
        updates, _ = jax.jit(jax.vmap(tx.update))(grads, states, batch)
    assert len({np.asarray(u).tobytes() for u in jax.tree_util.tree_leaves(updates)[0]}) == 4  # four noises


def test_earlier_int64_float64_layout_still_loads():
    """A leaf list saved before the word layout (int64 counts, float64 statistics; with and
    without skipped_steps and seed) restores to the same state."""
    with jax.enable_x64(False):
        tx = _tx()
        params, state = _steps(tx, _params(), tx.init(_params()), 0, 3)
    vgs, upgd = (uj.state_values(s) for s in state)
    wide = [vgs.count, vgs.grad_mean_avg, vgs.grad_sq_avg]
    np.testing.assert_array_equal(wide[0], 3)
    _assert_same(uj.restore_state(state[0], wide), state[0])
    flat = [upgd.count, upgd.segment_step, *_host((upgd.utility, upgd.first_moment, upgd.second_moment)),
            upgd.grad_norm_ema]
    seed_words = np.asarray(state[1].seed)
    for tail in ([], [upgd.skipped_steps], [upgd.skipped_steps, seed_words]):
        _assert_same(uj.restore_state(state[1], flat + tail), state[1])
    assert uj.state_values(state[1]).seed == 2**40 + 3
    with pytest.raises(ValueError, match="earlier layout"):
        uj.restore_state(state[1], flat[:-1])
