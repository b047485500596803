"""Shared helpers of the JAX adapter tests: golden-case replay through optax.

``replay(case, backend)`` runs a golden case (``upgd_ref.golden``) through
``optax.chain(variance_gradient_scaler(...), member)`` (the case's family member: ``adaptive_upgd``,
``upgd`` or ``upgdw``) and returns its trace, which
``upgd_ref.golden.compare`` judges step by step against the tolerance contract.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from upgd_ref.adapters import jax as uj

from upgd_ref.trace import TraceWriter


def dtype_scope(dtype):
    """``jax_enable_x64`` on for float64 cases (the adapter's float64 mode), else unchanged."""
    return jax.enable_x64(True) if np.dtype(dtype) == np.float64 else contextlib.nullcontext()


def applicable(case) -> bool:
    """Golden cases replayed here: every family member, one parameter group, every segment
    present (frozen segments and parameter groups are not expressible, specs/adapters-jax.md §3),
    and no VGS with 16-bit leaves (the chain's VGS returns ``f g`` rounded to the leaf dtype,
    an input the case's fused truth does not have, specs/adapters-jax.md §5.2)."""
    fused_only = case.vgs is not None and np.dtype(case.dtype).itemsize == 2
    return case.config.param_groups is None and bool(np.all(case.arrays["present"])) and not fused_only


def _member(config, backend):
    """The adapter's constructor of ``config``'s family member, called with its hyper-parameters."""
    kwargs = dict(config.hyperparams)
    lr = kwargs.pop("lr")
    common = dict(noise_norm=config.noise_norm, seed=config.seed, backend=backend)
    if config.optimizer == "UPGDW":  # optax's names for betas; the utility decay is tied to b2
        b1, b2 = kwargs.pop("beta1"), kwargs.pop("beta2")
        del kwargs["beta_utility"]
        return uj.upgdw(lr, b1=b1, b2=b2, **kwargs, **common)
    if config.optimizer == "UPGD":  # no moments: beta1, beta2 and eps are unused
        for unused in ("beta1", "beta2", "eps"):
            del kwargs[unused]
        return uj.upgd(lr, **kwargs, **common, profile=config.profile)
    assert config.optimizer == "AdaptiveUPGD", config.optimizer
    return uj.adaptive_upgd(lr, **kwargs, **common, profile=config.profile)


def transformation(case, backend="native"):
    """The optax transformation a golden case describes."""
    upgd = _member(case.config, backend)
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
    leaf = lambda a: jnp.asarray(np.asarray(a).astype(case.dtype))  # noqa: E731  (bfloat16 is stored as float32)
    params = [leaf(a) for a in case.segments(case.arrays["params0"])]
    state = tx.init(params)
    writer = TraceWriter(case=case.name)
    writer.set_initial([np.asarray(p) for p in params])
    leaves = jax.tree_util.tree_leaves
    for k in range(1, case.steps + 1):
        grads = [leaf(a) for a in case.segments(case.arrays["grads"][k - 1])]
        fields = {"grads": [np.asarray(g) for g in grads]}
        if record_normals:
            fields["normals"] = [np.asarray(z) for z in uj.noise(params, case.config.seed, k)]
        params, state = step(params, state, grads)
        opt = upgd_state(case, state)
        values = uj.state_values(opt)
        fields.update(
            params=[np.asarray(p) for p in params],
            utility=[np.asarray(x) for x in leaves(opt.utility)],
            first_moment=[np.asarray(x) for x in leaves(opt.first_moment)],
            second_moment=[np.asarray(x) for x in leaves(opt.second_moment)],
            segment_step=values.segment_step,
            grad_norm_ema=values.grad_norm_ema,
        )
        if case.vgs is not None:
            vgs = uj.state_values(state[0])
            fields.update(vgs_grad_mean_avg=vgs.grad_mean_avg, vgs_grad_sq_avg=vgs.grad_sq_avg)
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
    values, new_values = uj.state_values(state), uj.state_values(new_state)
    pre = ref.UPGDState(
        step=values.count, segment_step=values.segment_step, utility=host(state.utility),
        first_moment=host(state.first_moment), second_moment=host(state.second_moment),
        grad_norm_ema=values.grad_norm_ema,
    )
    layout = FlatLayout([x.shape for x in p], "float64")
    normals = layout.unpack(noise(layout, seed, int(values.count) + 1))
    (truth_params, truth_state, _), scales = upgd_step_scales(p, g, pre, normals, hyper, noise_norm=noise_norm)
    bounds = upgd_step_bounds(scales, p[0].dtype, [x.size for x in p])
    candidates = {"params": host(new_params), "utility": host(new_state.utility),
                  "first_moment": host(new_state.first_moment), "second_moment": host(new_state.second_moment)}
    truths = {"params": truth_params, "utility": truth_state.utility, "first_moment": truth_state.first_moment,
              "second_moment": truth_state.second_moment}
    ratios = {name: max(max_violation(c, t, b) for c, t, b in zip(candidates[name], truths[name], bounds[name]))
              for name in candidates}
    assert int(new_values.count) == int(values.count) + 1
    np.testing.assert_array_equal(new_values.segment_step, np.asarray(truth_state.segment_step))
    return ratios
