"""The JAX adapter as optax users meet it (specs/adapters-jax.md).

Composition with ``optax.chain``, one compilation under ``jax.jit``, pytree states with the
64-bit scalar state kept in both x64 modes, learning-rate schedules, the optax update
convention, partitioned optimisers (``optax.multi_transform``), ``optax.apply_if_finite``,
float32/float64, DLPack sharing on the kernel path, and a small jitted training loop whose
state survives an ``.npz`` round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import upgd_ref
from upgd_ref.adapters import jax as uj
from upgd_ref.adapters.jax.kernel_buffers import host_view, jax_view
from upgd_ref.hyperparams import validate_upgd
from upgd_ref.tolerances import unit_roundoff

from tests.helpers.jax_common import lockstep_ratios


def _params(dtype=None, seed=0):
    r = np.random.default_rng(seed)
    dtype = jnp.float32 if dtype is None else dtype
    return {"dense": {"w": jnp.asarray(r.standard_normal((6, 4)), dtype),
                      "b": jnp.asarray(r.standard_normal(4), dtype)},
            "head": [jnp.asarray(r.standard_normal((4, 2)), dtype), jnp.zeros((0, 3), dtype)]}


def _grads(params, seed):
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: jnp.asarray(r.standard_normal(p.shape) + 0.3, p.dtype), params)


def _chain(backend="native", **upgd):
    return optax.chain(uj.variance_gradient_scaler(warmup_steps=2, alpha=0.5, backend=backend),
                       uj.adaptive_upgd(upgd.pop("learning_rate", 0.01), **upgd, backend=backend))


def test_chain_under_jit_compiles_once():
    params, tx = _params(), _chain(adaptive_noise=True, sigma=0.05, seed=3)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for k in range(4):
        params, state = step(params, state, _grads(params, k))
    assert len(traces) == 1
    assert int(uj.state_values(state[1]).count) == 4 and int(uj.state_values(state[0]).count) == 4


def test_state_is_a_pytree_of_arrays_with_64_bit_values_in_words():
    params = _params()
    state = _chain().init(params)
    vgs, upgd = state
    assert isinstance(vgs, uj.VarianceGradientScalerState) and isinstance(upgd, uj.AdaptiveUPGDState)
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(state))
    assert not jax.config.jax_enable_x64  # the default mode: no leaf needs 64-bit types
    words = {name: (x.dtype, x.shape) for name, x in (*vgs._asdict().items(), *upgd._asdict().items())
             if isinstance(x, jax.Array)}
    assert words == {"count": (jnp.uint32, (2,)), "grad_mean_avg": (jnp.uint32, (4, 2)),
                     "grad_sq_avg": (jnp.uint32, (4, 2)), "segment_step": (jnp.uint32, (4, 2)),
                     "grad_norm_ema": (jnp.uint32, (4, 2)), "skipped_steps": (jnp.uint32, (2,)),
                     "seed": (jnp.uint32, (2,))}
    for tree in (upgd.utility, upgd.first_moment, upgd.second_moment):
        assert jax.tree_util.tree_structure(tree) == jax.tree_util.tree_structure(params)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(tree))
    values = uj.state_values(upgd)
    np.testing.assert_array_equal(values.grad_norm_ema, 1.0)  # noise_ema_init default
    assert values.grad_norm_ema.dtype == np.float64 and values.count.dtype == np.int64 and values.seed == 0


@pytest.mark.parametrize("x64", [False, True])
def test_dtypes_follow_the_params(x64):
    """float32 by default, float64 with jax_enable_x64; updates keep the leaves' dtypes."""
    with jax.enable_x64(x64):
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p, dtype=np.float64)), _params())
        expected = jnp.float64 if x64 else jnp.float32
        assert all(p.dtype == expected for p in jax.tree_util.tree_leaves(params))
        tx = _chain()
        updates, state = jax.jit(tx.update)(_grads(params, 1), tx.init(params), params)
        assert all(u.dtype == expected for u in jax.tree_util.tree_leaves(updates))
        assert all(x.dtype == expected for x in jax.tree_util.tree_leaves(state[1].utility))


@pytest.mark.parametrize("backend", ["native", "kernels"])
def test_learning_rate_schedule_within_contract(backend):
    """A schedule is evaluated at the count of completed steps and cast to each leaf's dtype
    (optax's convention); every step lies within the contract of the float64 step whose
    ``lr`` is the schedule's value."""
    schedule = optax.linear_schedule(0.05, 0.001, transition_steps=6)
    hyper = dict(adaptive_noise=True, sigma=0.05, beta_utility=0.9, seed=5)
    tx = uj.adaptive_upgd(schedule, **hyper, backend=backend)
    update = jax.jit(tx.update) if backend == "native" else tx.update
    params = _params()
    state = tx.init(params)
    for k in range(8):
        grads = _grads(params, 100 + k)
        updates, new_state = update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        lr = float(np.float32(schedule(k)))
        per_leaf = [validate_upgd(dict(lr=lr, adaptive_noise=True, sigma=0.05, beta_utility=0.9))] * 4
        ratios = lockstep_ratios(params, grads, state, new_params, new_state, seed=5, hyper=per_leaf)
        assert max(ratios.values()) <= 1.0, (k, ratios)
        params, state = new_params, new_state


def test_three_paths_agree_in_lockstep_on_a_nested_pytree():
    """Native (jit), kernels (DLPack) and the core's stateful API, from the same state each
    step, all within the contract; leaves are the segments in jax.tree_util flatten order."""
    hyper = validate_upgd(dict(lr=0.03, adaptive_noise=True, instant_noise_scale=False, sigma=0.1, beta_utility=0.9))
    kwargs = {k: v for k, v in hyper.items() if k != "lr"}
    native = uj.adaptive_upgd(0.03, **kwargs, noise_norm="global", seed=9)
    kernels = uj.adaptive_upgd(0.03, **kwargs, noise_norm="global", seed=9, backend="kernels")
    params = _params()
    leaves = jax.tree_util.tree_leaves(params)
    layout = upgd_ref.FlatLayout([x.shape for x in leaves], "float32")
    core = upgd_ref.AdaptiveUPGD(layout, **hyper, noise_norm="global", seed=9)
    state = native.init(params)
    native_update = jax.jit(native.update)
    for k in range(12):
        grads = _grads(params, 200 + k)
        outcomes = {}
        for name, update in (("native", native_update), ("kernels", kernels.update)):
            updates, new_state = update(grads, state, params)
            outcomes[name] = (optax.apply_updates(params, updates), new_state)
        flat = layout.pack([np.asarray(x) for x in leaves])
        values = uj.state_values(state)
        core.state = upgd_ref.state.FlatUPGDState(
            step=int(values.count), segment_step=values.segment_step.copy(),
            utility=layout.pack([np.asarray(x) for x in jax.tree_util.tree_leaves(state.utility)]),
            first_moment=layout.pack([np.asarray(x) for x in jax.tree_util.tree_leaves(state.first_moment)]),
            second_moment=layout.pack([np.asarray(x) for x in jax.tree_util.tree_leaves(state.second_moment)]),
            grad_norm_ema=values.grad_norm_ema.copy())
        core.step(flat, layout.pack([np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]))
        treedef = jax.tree_util.tree_structure(params)
        unflat = lambda arrays: jax.tree_util.tree_unflatten(treedef, list(arrays))  # noqa: E731
        # the core's state as a leaf list of the earlier int64/float64 layout, which restore_state reads
        outcomes["core"] = (unflat(layout.unpack(flat)), uj.restore_state(state, [
            np.int64(core.state.step), core.state.segment_step,
            *[x for name in ("utility", "first_moment", "second_moment")
              for x in layout.unpack(getattr(core.state, name))], core.state.grad_norm_ema]))
        for name, (new_params, new_state) in outcomes.items():
            ratios = lockstep_ratios(params, grads, state, new_params, new_state, seed=9, hyper=[hyper] * 4,
                                     noise_norm="global")
            assert max(ratios.values()) <= 1.0, (k, name, ratios)
        params, state = outcomes["native"]
        leaves = jax.tree_util.tree_leaves(params)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_optax_update_convention_rounding(dtype):
    """``apply_updates(p, new_p - p)`` equals the in-place ``new_p`` except for one rounding
    of the difference and one of the sum: ``|q - P| <= u * (2|P| + |p|)``; exact whenever
    ``p/2 <= P <= 2p`` (Sterbenz), specs/adapters-jax.md §4."""
    with jax.enable_x64(dtype == "float64"):
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(np.asarray(p), dtype), _params())
        tx = uj.adaptive_upgd(0.3, sigma=0.3, backend="kernels", seed=1)
        state = tx.init(params)
        leaves = jax.tree_util.tree_leaves(params)
        layout = upgd_ref.FlatLayout([x.shape for x in leaves], dtype)
        grads = _grads(params, 5)
        updates, _ = tx.update(grads, state, params)
        applied = optax.apply_updates(params, updates)
        core = upgd_ref.AdaptiveUPGD(layout, lr=0.3, sigma=0.3, seed=1)
        flat = layout.pack([np.asarray(x) for x in leaves])
        core.step(flat, layout.pack([np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]))
    u = unit_roundoff(dtype)
    exact = 0
    for p, q, P in zip(leaves, jax.tree_util.tree_leaves(applied), layout.unpack(flat)):
        p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
        P = P.astype(np.float64)
        assert np.all(np.abs(q - P) <= u * (2 * np.abs(P) + np.abs(p)))
        sterbenz = (np.sign(p) == np.sign(P)) & (np.abs(P) <= 2 * np.abs(p)) & (np.abs(p) <= 2 * np.abs(P))
        np.testing.assert_array_equal(q[sterbenz], P[sterbenz])
        exact += int(sterbenz.sum())
    assert exact > 0


def test_multi_transform_leaves_are_not_segments():
    """Leaves another transformation owns (optax.MaskedNode inside multi_transform) are not
    segments at all: the rest is exactly adaptive_upgd on the sub-tree."""
    params = {"a": jnp.arange(3.0), "frozen": jnp.ones((2, 2)), "c": jnp.linspace(-1.0, 1.0, 5)}
    labels = {"a": "upgd", "frozen": "none", "c": "upgd"}
    tx = optax.multi_transform({"upgd": uj.adaptive_upgd(0.1, sigma=0.1, seed=4), "none": optax.set_to_zero()},
                               labels)
    sub_tx = uj.adaptive_upgd(0.1, sigma=0.1, seed=4)
    sub = {"a": params["a"], "c": params["c"]}
    state, sub_state = tx.init(params), sub_tx.init(sub)
    for k in range(3):
        grads = _grads(params, 300 + k)
        updates, state = jax.jit(tx.update)(grads, state, params)
        sub_updates, sub_state = jax.jit(sub_tx.update)({"a": grads["a"], "c": grads["c"]}, sub_state, sub)
        for name in ("a", "c"):
            np.testing.assert_array_equal(np.asarray(updates[name]), np.asarray(sub_updates[name]))
        np.testing.assert_array_equal(np.asarray(updates["frozen"]), 0.0)
        params = optax.apply_updates(params, updates)
        sub = {"a": params["a"], "c": params["c"]}


def test_apply_if_finite_skips_a_nan_step_under_jit():
    params, tx = _params(), optax.apply_if_finite(_chain(sigma=0.01), max_consecutive_errors=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    bad = jax.tree_util.tree_map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan) if g.size else g, _grads(params, 1))
    updates, new_state = update(bad, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
    assert int(new_state.notfinite_count) == 1
    for old, new in zip(jax.tree_util.tree_leaves(state.inner_state), jax.tree_util.tree_leaves(new_state.inner_state)):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    updates, new_state = update(_grads(params, 2), new_state, params)
    assert int(uj.state_values(new_state.inner_state[1]).count) == 1
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree_util.tree_leaves(updates))


def test_kernel_path_shares_memory_through_dlpack():
    """Leaves go to NumPy without a copy, results come back as views of one 64-byte aligned
    flat buffer (each leaf at its layout offset)."""
    params = _params()
    leaf = jax.tree_util.tree_leaves(params)[0]
    assert host_view(leaf).ctypes.data == leaf.unsafe_buffer_pointer()
    tx = uj.adaptive_upgd(0.01, backend="kernels")
    updates, state = tx.update(_grads(params, 1), tx.init(params), params)
    leaves = jax.tree_util.tree_leaves(updates)
    layout = upgd_ref.FlatLayout([x.shape for x in leaves], "float32")
    base = leaves[0].unsafe_buffer_pointer()
    assert base % 64 == 0
    for i, x in enumerate(leaves):
        if x.size:
            assert x.unsafe_buffer_pointer() - base == layout.offsets[i] * 4
    view = upgd_ref.layout.aligned_zeros(100, np.float32)[16:]
    assert jax_view(view).unsafe_buffer_pointer() == view.ctypes.data


def _mlp_problem():
    r = np.random.default_rng(42)
    x = jnp.asarray(r.standard_normal((64, 3)), jnp.float32)
    y = jnp.sin(x @ jnp.asarray([[1.0], [-2.0], [0.5]], jnp.float32))
    params = {"l1": {"w": jnp.asarray(r.standard_normal((3, 16)) * 0.5, jnp.float32), "b": jnp.zeros(16, jnp.float32)},
              "l2": {"w": jnp.asarray(r.standard_normal((16, 1)) * 0.5, jnp.float32), "b": jnp.zeros(1, jnp.float32)}}

    def loss(params):
        h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
        return jnp.mean((h @ params["l2"]["w"] + params["l2"]["b"] - y) ** 2)

    return params, loss


def test_mlp_training_loop_with_npz_checkpoint(tmp_path):
    params, loss = _mlp_problem()
    tx = optax.chain(uj.variance_gradient_scaler(warmup_steps=5),
                     uj.adaptive_upgd(0.01, adaptive_noise=True, sigma=0.01, beta_utility=0.9, seed=7))

    @jax.jit
    def train_step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    state = tx.init(params)
    first = float(loss(params))
    for _ in range(60):
        params, state, _ = train_step(params, state)
    np.savez(tmp_path / "state.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(state)])
    np.savez(tmp_path / "params.npz", *[np.asarray(x) for x in jax.tree_util.tree_leaves(params)])
    straight = (params, state)
    for _ in range(40):
        straight = train_step(*straight)[:2]
    assert float(loss(straight[0])) < 0.5 * first

    with np.load(tmp_path / "state.npz") as data:
        saved = [data[f"arr_{i}"] for i in range(len(data.files))]
    with np.load(tmp_path / "params.npz") as data:
        saved_params = [data[f"arr_{i}"] for i in range(len(data.files))]
    restored = uj.restore_state(tx.init(params), saved)
    treedef = jax.tree_util.tree_structure(params)
    resumed = (jax.tree_util.tree_unflatten(treedef, [jnp.asarray(p) for p in saved_params]), restored)
    assert [x.dtype for x in jax.tree_util.tree_leaves(restored)] == [x.dtype for x in jax.tree_util.tree_leaves(state)]
    for _ in range(40):
        resumed = train_step(*resumed)[:2]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # with x64 off, a plain jnp.asarray of the saved arrays keeps every leaf (no 64-bit types)
    naive = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), [jnp.asarray(x) for x in saved])
    resumed = (jax.tree_util.tree_unflatten(treedef, [jnp.asarray(p) for p in saved_params]), naive)
    for _ in range(40):
        resumed = train_step(*resumed)[:2]
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_over_an_ensemble_equals_each_member():
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    tx = _chain(adaptive_noise=True, sigma=0.1, seed=8)
    batch = jax.tree_util.tree_map(lambda p: jnp.stack([p, p * 2.0 - 0.5]), params)
    grads = jax.tree_util.tree_map(lambda p: p * 0.3 + 0.1, batch)
    updates, _ = jax.jit(jax.vmap(tx.update))(grads, jax.vmap(tx.init)(batch), batch)
    for i in range(2):
        member = jax.tree_util.tree_map(lambda x: x[i], batch)
        alone, _ = jax.jit(tx.update)(jax.tree_util.tree_map(lambda x: x[i], grads), tx.init(member), member)
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))


def test_multisteps_inside_the_x64_scope():
    """``x64_scope()`` around optax.MultiSteps (needed by the earlier int64/float64 layout)
    still works and changes nothing (spec §10)."""
    params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    tx = _chain(sigma=0.1, seed=2)
    multi = optax.MultiSteps(tx, every_k_schedule=2)

    @jax.jit
    def step(grads, state, params):
        with uj.x64_scope():
            return multi.update(grads, state, params)

    state = multi.init(params)
    quarter = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.25), params)
    three_quarters = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.75), params)
    _, state = step(quarter, state, params)
    updates, state = step(three_quarters, state, params)
    assert state.inner_opt_state[1].count.dtype == jnp.uint32
    assert int(uj.state_values(state.inner_opt_state[1]).count) == 1
    expected, _ = jax.jit(tx.update)(jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params), tx.init(params),
                                     params)
    for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
