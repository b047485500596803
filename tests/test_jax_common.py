"""Shared helpers of the JAX adapter tests: golden-case replay through optax.

``replay(case, backend)`` runs a golden case (``upgd_ref.golden``) through
``optax.chain(variance_gradient_scaler(...), adaptive_upgd(...))`` and returns its trace, which
``upgd_ref.golden.compare`` judges step by step against the tolerance contract.
"""

from __future__ import annotations

import contextlib

import numpy as np

from upgd_ref.reference import PRODUCTION
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

from upgd_ref.adapters import jax as uj  # noqa: E402
from upgd_ref.trace import TraceWriter  # noqa: E402


def dtype_scope(dtype):
    """``jax_enable_x64`` on for float64 cases (the adapter's float64 mode), else unchanged."""
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def applicable(case) -> bool:
    """Golden cases replayed here: AdaptiveUPGD (production), one parameter group, every
    segment present. The other family members are held to the core classes in
    tests/test_jax_family.py."""
    return (case.config.optimizer == "AdaptiveUPGD" and case.variant == PRODUCTION
            and case.config.param_groups is None and bool(np.all(case.arrays["present"])))


def transformation(case, backend="native"):
    """The optax transformation a golden case describes."""
    kwargs = dict(case.config.hyperparams)
    lr = kwargs.pop("lr")
    upgd = uj.adaptive_upgd(lr, **kwargs, noise_norm=case.config.noise_norm, seed=case.config.seed,
                            backend=backend)
    if case.vgs is None:
        return upgd
    return optax.chain(uj.variance_gradient_scaler(**case.vgs, backend=backend), upgd)


def upgd_state(case, state):
    return state if case.vgs is None else state[1]


def replay(case, backend="native", *, jit=True, record_normals=True) -> dict:
    """Trace arrays of ``case`` run through the adapter (params are a list pytree of segments)."""
    tx = transformation(case, backend)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)
    params = [jnp.asarray(a) for a in case.segments(case.arrays["params0"])]
    state = tx.init(params)
    writer = TraceWriter(case=case.name)
    writer.set_initial([np.asarray(p) for p in params])
    leaves = jax.tree_util.tree_leaves
    for k in range(1, case.steps + 1):
        grads = [jnp.asarray(a) for a in case.segments(case.arrays["grads"][k - 1])]
        fields = {"grads": [np.asarray(g) for g in grads]}
        if record_normals:
            fields["normals"] = [np.asarray(z) for z in uj.noise(params, case.config.seed, k)]
        params, state = step(params, state, grads)
        opt = upgd_state(case, state)
        fields.update(
            params=[np.asarray(p) for p in params],
            utility=[np.asarray(x) for x in leaves(opt.utility)],
            first_moment=[np.asarray(x) for x in leaves(opt.first_moment)],
            second_moment=[np.asarray(x) for x in leaves(opt.second_moment)],
            segment_step=np.asarray(opt.segment_step),
            grad_norm_ema=np.asarray(opt.grad_norm_ema),
        )
        if case.vgs is not None:
            fields.update(vgs_grad_mean_avg=np.asarray(state[0].grad_mean_avg),
                          vgs_grad_sq_avg=np.asarray(state[0].grad_sq_avg))
        writer.add_step(**fields)
    return writer.arrays()


def lockstep_ratios(params, grads, state, new_params, new_state, *, seed, hyper, noise_norm="segment") -> dict:
    """``max |candidate - truth| / bound`` per field for one AdaptiveUPGD step.

    The truth is the float64 reference step (``upgd_ref.tolerances.upgd_step_scales``) from the
    candidate's own pre-step ``params``/``state`` and ``grads``; ``hyper``: one hyper-parameter
    dict per leaf. Values <= 1 are within the tolerance contract.
    """
    from upgd_ref import FlatLayout, noise
    from upgd_ref import reference as ref
    from upgd_ref.tolerances import max_violation, upgd_step_bounds, upgd_step_scales

    leaves = jax.tree_util.tree_leaves
    host = lambda tree: [np.asarray(x) for x in leaves(tree)]  # noqa: E731
    p, g = host(params), host(grads)
    pre = ref.UPGDState(
        step=np.int64(state.count), segment_step=np.asarray(state.segment_step, dtype=np.int64),
        utility=host(state.utility), first_moment=host(state.first_moment),
        second_moment=host(state.second_moment), grad_norm_ema=np.asarray(state.grad_norm_ema, dtype=np.float64),
    )
    layout = FlatLayout([x.shape for x in p], "float64")
    normals = layout.unpack(noise(layout, seed, int(state.count) + 1))
    (truth_params, truth_state, _), scales = upgd_step_scales(p, g, pre, normals, hyper, noise_norm=noise_norm)
    bounds = upgd_step_bounds(scales, p[0].dtype, [x.size for x in p])
    candidates = {"params": host(new_params), "utility": host(new_state.utility),
                  "first_moment": host(new_state.first_moment), "second_moment": host(new_state.second_moment)}
    truths = {"params": truth_params, "utility": truth_state.utility, "first_moment": truth_state.first_moment,
              "second_moment": truth_state.second_moment}
    ratios = {name: max(max_violation(c, t, b) for c, t, b in zip(candidates[name], truths[name], bounds[name]))
              for name in candidates}
    assert int(new_state.count) == int(state.count) + 1
    np.testing.assert_array_equal(np.asarray(new_state.segment_step), np.asarray(truth_state.segment_step))
    return ratios
