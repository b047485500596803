"""16-bit leaves and mixed trees in the JAX adapter (``specs/adapters-jax.md`` §5.2,
``specs/precision.md``): optax's dtype conventions (ported from optax's own
``alias_test.test_preserve_dtype`` and ``test_state_shape_dtype_shard_stability``), the
``state_dtype`` option, and each step of a mixed tree (float32, bfloat16, float16 leaves)
under ``jax.jit`` against the float64 truth (``specs/tolerances.md`` §2a, lockstep) and
against the core door (:func:`upgd_ref.step.upgd_step` on a ``MultiLayout`` with one buffer
per dtype), x64 on and off."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import upgd_ref
from upgd_ref import tolerances
from upgd_ref import reference as ref
from upgd_ref.layout import FlatLayout
from upgd_ref.multi import MultiLayout, MultiUPGDState
from upgd_ref.precision import is_low_precision
from upgd_ref.state import FlatUPGDState
from upgd_ref.step import StepRequest, upgd_step
from upgd_ref.adapters import jax as uj

from tests.helpers.members import MEMBER_DB, member_info, paired, with_profile

FACTORIES = {"AdaptiveUPGD": uj.adaptive_upgd, "UPGD": uj.upgd, "UPGDW": uj.upgdw}
OPTAX_NAMES = {"lr": "learning_rate", "beta1": "b1", "beta2": "b2"}
LOW = (jnp.bfloat16, jnp.float16)


def x64_mode(on: bool):
    return jax.enable_x64(True) if on else contextlib.nullcontext()


def build(info, state_dtype=None, rounding="nearest", **kwargs):
    """The optax transformation of member ``info`` with ``kwargs`` in reference names."""
    names = {k: (OPTAX_NAMES.get(k, k) if info.name == "UPGDW" or k == "lr" else k) for k in kwargs}
    return FACTORIES[info.name](**with_profile(info, {names[k]: v for k, v in kwargs.items()}),
                                state_dtype=state_dtype, rounding=rounding)


def mixed_tree(seed=0):
    """float32 weights, bfloat16 embeddings, a float16 head, a zero-size bfloat16 leaf."""
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
            "emb": jnp.asarray(rng.standard_normal((40,)), jnp.bfloat16),
            "head": jnp.asarray(rng.standard_normal((3, 7)), jnp.float16),
            "z": jnp.zeros((0,), jnp.bfloat16)}


@pytest.mark.parametrize("dtype, x64", [(jnp.bfloat16, False), (jnp.float16, False), (jnp.float32, False),
                                        (jnp.bfloat16, True), (jnp.float16, True)],
                         ids=["bfloat16-x64_off", "float16-x64_off", "float32-x64_off", "bfloat16-x64_on",
                              "float16-x64_on"])
@pytest.mark.parametrize("which", [info.id for info in MEMBER_DB] + ["vgs"])
def test_preserve_dtype(which, dtype, x64):
    """optax's ``test_preserve_dtype``: updates have the gradients' dtype, under ``jit``."""
    with x64_mode(x64):
        opt = uj.variance_gradient_scaler(warmup_steps=0) if which == "vgs" else build(member_info(which), lr=0.1)
        fun = lambda x: jnp.sum(x**2)  # noqa: E731
        params = jnp.array([1.0, 2.0], dtype=dtype)
        grads = jax.grad(fun)(params)
        state = jax.jit(opt.init)(params)
        updates, _ = jax.jit(opt.update)(grads, state, params)
        assert updates.dtype == grads.dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("member, x64", [(info.id, False) for info in MEMBER_DB] + [("adaptive", True)])
def test_state_shape_and_dtype_are_stable_on_a_mixed_tree(member, x64):
    """optax's ``test_state_shape_dtype_shard_stability`` on a mixed tree: two steps through a
    ``lax.cond`` keep every param's dtype and every state leaf's shape and dtype."""
    with x64_mode(x64):
        tx = optax.chain(uj.variance_gradient_scaler(warmup_steps=0), build(member_info(member), lr=0.05))
        params = mixed_tree()
        objective = lambda p: sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(p))  # noqa: E731

        @jax.jit
        def step(params, state):
            grads = jax.grad(objective)(params)
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(cond, lambda: tx.update(grads, state, params),
                                          lambda: (jax.tree_util.tree_map(jnp.zeros_like, params), state))
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state)
        for _ in range(2):
            new_params, state = step(params, state)
            assert jax.tree_util.tree_map(lambda x: x.dtype, new_params) == \
                jax.tree_util.tree_map(lambda x: x.dtype, params)
            assert jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), state) == shapes
            params = new_params


def test_state_dtype_option():
    params = mixed_tree()
    default = uj.adaptive_upgd(0.1).init(params)
    kept = uj.adaptive_upgd(0.1, state_dtype="params").init(params)
    for field in ("utility", "first_moment", "second_moment"):
        assert {k: v.dtype for k, v in getattr(default, field).items()} == {
            "w": jnp.float32, "emb": jnp.float32, "head": jnp.float32, "z": jnp.float32}
        assert {k: v.dtype for k, v in getattr(kept, field).items()} == {k: v.dtype for k, v in params.items()}
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    with pytest.raises(TypeError, match=r"state.utility leaf 0 has dtype float32, .*state_dtype='params'"):
        uj.adaptive_upgd(0.1, state_dtype="params").update(grads, default, params)
    with pytest.raises(TypeError, match=r"state.utility leaf 0 has dtype bfloat16, .*state_dtype=None"):
        jax.jit(uj.adaptive_upgd(0.1).update)(grads, kept, params)
    with pytest.raises(TypeError, match=r"gradient leaf 0 has dtype float32, the params has bfloat16"):
        uj.adaptive_upgd(0.1).update(dict(grads, emb=grads["emb"].astype(jnp.float32)), default, params)
    for factory in FACTORIES.values():
        with pytest.raises(ValueError, match="state_dtype"):
            factory(state_dtype="bfloat16")
        with pytest.raises(ValueError, match="rounding"):
            factory(rounding="up")


def _pre_state(state, leaves):
    """The JAX state before a step as the core's reference record (NumPy, state dtypes)."""
    values = uj.state_values(state)
    host = lambda tree: [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    return ref.UPGDState(np.int64(values.count), values.segment_step.copy(), host(state.utility),
                         host(state.first_moment), host(state.second_moment), values.grad_norm_ema.copy())


def _door_step(pre, params, grads, hyper, request_kwargs, backend):
    """The core door's step on a MultiLayout with one buffer per dtype, from ``pre``: new
    per-segment ``(params, utility, first_moment, second_moment)`` lists."""
    dtypes = sorted({p.dtype.name for p in params})
    multi = MultiLayout([p.shape for p in params], [dtypes.index(p.dtype.name) for p in params], dtypes)
    state_dtypes = {k: pre.utility[multi.segments[k][0]].dtype if multi.segments[k] else None
                    for k in range(len(dtypes))}
    parts = []
    for k, (part, segments) in enumerate(zip(multi.parts, multi.segments)):
        state_layout = part.widened(state_dtypes[k])
        buffers = [state_layout.pack([getattr(pre, name)[i] for i in segments])
                   for name in FlatUPGDState.BUFFERS]
        parts.append(FlatUPGDState(int(pre.step), pre.segment_step[list(segments)].copy(), *buffers,
                                   pre.grad_norm_ema[list(segments)].copy()))
    state = MultiUPGDState(int(pre.step), pre.segment_step.copy(), pre.grad_norm_ema.copy(), parts)
    flat_params = multi.pack(params)
    upgd_step(multi, flat_params, multi.pack(grads), state, StepRequest(hyper=hyper, **request_kwargs),
              backend=backend)
    return multi.unpack(flat_params), {name: _unpack_state(multi, state, name) for name in FlatUPGDState.BUFFERS}


def _unpack_state(multi, state, name):
    out = [None] * multi.num_segments
    for part, segments, buffers in zip(multi.parts, multi.segments, state.parts):
        buffer = getattr(buffers, name)
        for i, view in zip(segments, part.widened(buffer.dtype).unpack(buffer)):
            out[i] = view
    return out


def _judge(candidate, truth, bounds, name, convention=None):
    """``max error / bound`` over leaves: 16-bit values by §2a, the others by the float32 rows;
    ``convention``: ``(params, updates)`` of an optax step, whose 16-bit parameters carry the
    update convention's roundings (``tolerances.update_convention_bound``)."""
    worst = 0.0
    for i, (got, want) in enumerate(zip(candidate, truth)):
        got = np.asarray(got)
        bound = bounds[name][i]
        if is_low_precision(got.dtype):
            bound = tolerances.low_precision_bound(got, want, bound, got.dtype)
            if convention is not None:
                p, d = convention[0][i], convention[1][i]
                bound = bound + tolerances.update_convention_bound(p, d, got, got.dtype)
        worst = max(worst, tolerances.max_violation(got, want, bound))
    return worst


CASES = [(m, None, "nearest", False) for m in [i.id for i in MEMBER_DB]] + [
    ("adaptive", None, "stochastic", True), ("adaptive", "params", "nearest", True),
    ("adaptive", "params", "stochastic", False), ("upgdw", "params", "stochastic", False)]


@pytest.mark.parametrize("member, state_dtype, rounding, x64", CASES)
def test_mixed_tree_steps_within_the_contract_and_against_the_core_door(member, state_dtype, rounding, x64):
    info = member_info(member)
    kwargs = dict(lr=0.05, weight_decay=0.01, sigma=0.05, adaptive_noise=member.startswith("adaptive"))
    hyper_one = info.member.hyperparams(paired(info, kwargs), info.profile)
    variant = info.member.variant(info.profile)
    rng = np.random.default_rng(3)
    worst = {}
    with x64_mode(x64):
        tx = build(info, state_dtype, rounding, seed=7, **kwargs)
        params = mixed_tree(1)
        state = tx.init(params)
        step = jax.jit(tx.update)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        hyper = [hyper_one] * len(leaves)
        for k in range(1, 6):
            grads = jax.tree_util.tree_unflatten(treedef, [
                jnp.asarray(rng.standard_normal(x.shape) * 10 ** rng.uniform(-1.5, 0.5), x.dtype) for x in leaves])
            p, g = [np.asarray(x) for x in leaves], [np.asarray(x) for x in jax.tree_util.tree_leaves(grads)]
            pre = _pre_state(state, leaves)
            updates, state = step(grads, state, params)
            d = [np.asarray(x) for x in jax.tree_util.tree_leaves(updates)]
            params = optax.apply_updates(params, updates)
            leaves = jax.tree_util.tree_leaves(params)
            assert [x.dtype for x in leaves] == [x.dtype for x in p]
            normals = FlatLayout([x.shape for x in p], "float64")
            normals = normals.unpack(upgd_ref.noise(normals, 7, k))
            (truth_p, truth_s, _), scales = tolerances.upgd_step_scales(p, g, pre, normals, hyper, variant=variant)
            bounds = tolerances.upgd_step_bounds(scales, np.float32, [x.size for x in p])
            truths = {"params": truth_p, **{n: getattr(truth_s, n) for n in FlatUPGDState.BUFFERS}}
            new = _pre_state(state, leaves)
            candidates = {"jax": {"params": [np.asarray(x) for x in leaves],
                                  **{n: getattr(new, n) for n in FlatUPGDState.BUFFERS}}}
            request = dict(seed=7, variant=variant, rounding=rounding)
            for backend in ("reference", "numba"):
                door_p, door_s = _door_step(pre, p, g, hyper, request, backend)
                candidates[backend] = {"params": door_p, **door_s}
            for who, fields in candidates.items():
                for name, values in fields.items():
                    convention = (p, d) if who == "jax" and name == "params" else None
                    ratio = _judge(values, truths[name], bounds, name, convention)
                    worst[(who, name)] = max(worst.get((who, name), 0.0), ratio)
                    assert ratio <= 1.0, (who, name, k, ratio)
                    assert [np.asarray(v).dtype for v in values] == [np.asarray(v).dtype
                                                                     for v in candidates["jax"][name]], (who, name)
            np.testing.assert_array_equal(new.segment_step, np.full(len(p), k))
