"""The Variance Gradient Scaler (``specs/algorithm.md`` §2) as an optax transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from upgd_ref import reference as _ref
from upgd_ref.backends import check_backend_name as _check_core_backend
from upgd_ref.checks import NonFiniteStepError, check_nonfinite_policy
from upgd_ref.hyperparams import VGS_DEFAULTS, validate_vgs
from upgd_ref.state import FlatVGSState
from upgd_ref.step import vgs_factor, vgs_scale_step, vgs_update_step

from .kernel_buffers import check_backend, check_eager, jax_view, kernel_layout, pack_leaves
from .hyper import split_arrays, widened
from .normals import without_contraction
from .per_device import check_per_device
from .leaves import (
    all_finite, check_finite, check_leaf_dtype, is_eager, is_params_placeholder, where_finite, x64_scope,
)
from .precision import computed, rounded
from .reductions import leaf_folded_sum
from .state import VarianceGradientScalerState, check_words, host_state, narrow_fields, state_values, wide_fields


def _statistics_update(state, grads, beta, per_device):
    """``reference.vgs_update`` with folded sums (``specs/adapters-jax.md`` §11) inside
    ``shard_map``: ``mean(g_i) = sum g_i / n_i`` and ``mean(g_i**2)``, the sums over every
    device's block, then :func:`upgd_ref.reference.vgs_statistics_update`."""
    per_device.check(grads)
    totals, counts = per_device.totals(grads), [per_device.global_count(g, i) for i, g in enumerate(grads)]
    wide = [g.astype(jnp.float64) for g in grads]
    updated = [n != 0 for n in counts]
    means = [total(w) / n if n else None for total, w, n in zip(totals, wide, counts)]
    square_means = [total(w * w) / n if n else None for total, w, n in zip(totals, wide, counts)]
    return _ref.vgs_statistics_update(state, means, square_means, updated, beta=beta)


def _leaf_statistics_update(state, grads, beta):
    """``reference.vgs_update`` with folded sums (``specs/adapters-jax.md`` §11, §9.2) over
    whole leaves: the sums from the leaves (:func:`.reductions.leaf_folded_sum`, which keeps ``w * w``
    from contraction itself), only the float64 EMAs evaluated :func:`.normals.without_contraction`."""
    counts = [g.size for g in grads]
    updated = [n != 0 for n in counts]
    means = [leaf_folded_sum(g) / n if n else None for g, n in zip(grads, counts)]
    square_means = [leaf_folded_sum(g, square=True) / n if n else None for g, n in zip(grads, counts)]
    ema = without_contraction(lambda c, m, s, b: _ref.vgs_statistics_update(c, m, s, updated, beta=b))
    return ema(state, means, square_means, beta)


def variance_gradient_scaler(enabled=VGS_DEFAULTS["enabled"], beta=VGS_DEFAULTS["beta"], alpha=VGS_DEFAULTS["alpha"],
                             eps=VGS_DEFAULTS["eps"], warmup_steps=VGS_DEFAULTS["warmup_steps"],
                             min_scaling_factor=VGS_DEFAULTS["min_scaling_factor"],
                             variance_cap=VGS_DEFAULTS["variance_cap"], *, backend="native",
                             kernel_backend="auto", nonfinite="raise",
                             per_device=None) -> optax.GradientTransformationExtraArgs:
    """The Variance Gradient Scaler as an optax transformation (``specs/algorithm.md`` §2).

    ``update(grads, state, params=None)`` returns ``f * grads`` with ``f`` computed from the
    statistics of the previous steps, and advances the statistics with those scaled
    gradients. Chain it *before* :func:`adaptive_upgd`. Segments are the leaves of the
    gradient pytree. ``kernel_backend``: the core backend of ``backend="kernels"``.
    ``nonfinite`` (``specs/algorithm.md`` §8): non-finite gradients or statistics leave the
    gradients unscaled and the statistics (and ``count``) unchanged under ``"skip"`` and under
    ``jax.jit``; an eager ``"raise"`` raises :class:`~upgd_ref.checks.NonFiniteStepError`.
    16-bit leaves are scaled in float32 and ``f g`` rounded once to their dtype, the
    statistics read those rounded gradients (the core's ``vgs_scale_step``, ``vgs_update_step``).
    ``per_device``: as :func:`adaptive_upgd` takes it (``update`` inside ``jax.shard_map``).
    """
    plain, arrays = split_arrays(dict(enabled=enabled, beta=beta, alpha=alpha, eps=eps, warmup_steps=warmup_steps,
                                      min_scaling_factor=min_scaling_factor, variance_cap=variance_cap), VGS_DEFAULTS)
    hp = validate_vgs(plain)
    backend = check_backend(backend)
    _check_core_backend(kernel_backend)
    nonfinite = check_nonfinite_policy(nonfinite)
    check_per_device(per_device, backend)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves and not is_params_placeholder(params):
            raise ValueError("variance_gradient_scaler needs at least one array leaf")
        for i, leaf in enumerate(leaves):
            check_leaf_dtype(f"params leaf {i}", leaf)
        with x64_scope():
            state = _ref.vgs_init(jnp, len(leaves))
            return narrow_fields(VarianceGradientScalerState(state.step, state.grad_mean_avg, state.grad_sq_avg))

    @jax.jit
    def native(leaves, state, arrays):
        with x64_scope():
            values = dict(hp, **widened(arrays))
            wide = wide_fields(state)
            core = _ref.VGSState(wide.count, wide.grad_mean_avg, wide.grad_sq_avg)
            factor, _ = _ref.vgs_scaling_factor(core, **values)
            scaled = rounded(_ref.vgs_scale(computed(leaves), factor), leaves)  # 16-bit: f g in float32, rounded once
            if per_device is None:
                new = _leaf_statistics_update(core, scaled, values["beta"])
            else:
                new = without_contraction(lambda c, g, b: _statistics_update(c, g, b, per_device))(core, scaled,
                                                                                                  values["beta"])
            # as optax.apply_if_finite; a non-finite g makes its leaf's folded sums, so a_i, NaN (§7)
            ok = all_finite(new.grad_mean_avg, new.grad_sq_avg)
            if per_device is not None:
                ok = per_device.all_devices(ok)
            scaled = where_finite(ok, scaled, leaves)
            new = where_finite(ok, new, core)
            return scaled, narrow_fields(VarianceGradientScalerState(new.step, new.grad_mean_avg, new.grad_sq_avg)), ok

    def kernels(leaves, state):
        check_eager("kernels", leaves, state)
        layout = kernel_layout(leaves)
        grads = pack_leaves(layout, leaves)
        host = state_values(state)
        flat = FlatVGSState(int(host.count), host.grad_mean_avg.copy(), host.grad_sq_avg.copy())
        factor = vgs_factor(flat, hp)[0]
        if not (vgs_scale_step(layout, grads, factor, backend=kernel_backend, nonfinite=nonfinite)
                and vgs_update_step(layout, grads, flat, hp["beta"], backend=kernel_backend, nonfinite=nonfinite)):
            return list(leaves), state  # skipped: grads (a packed copy) and the statistics as they were
        new = host_state(VarianceGradientScalerState, count=np.int64(flat.step), grad_mean_avg=flat.grad_mean_avg,
                         grad_sq_avg=flat.grad_sq_avg)
        return [jax_view(v) for v in layout.unpack(grads)], new

    def update(updates, state, params=None, **extra_args):
        del params, extra_args
        if not isinstance(state, VarianceGradientScalerState):
            raise TypeError(f"state must be a VarianceGradientScalerState, got {type(state).__name__}")
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        num = state.grad_mean_avg.shape[0] if hasattr(state.grad_mean_avg, "shape") else -1
        if len(leaves) != num:
            raise ValueError(
                f"gradients have {len(leaves)} leaves (structure {treedef}), the VGS state was initialised "
                f"for {num}; the pytree must keep its structure between init and update"
            )
        for i, leaf in enumerate(leaves):
            check_leaf_dtype(f"gradient leaf {i}", leaf)
        check_words(state, ("count", "grad_mean_avg", "grad_sq_avg"), num)
        eager = backend == "native" and is_eager(leaves, state)
        if eager and nonfinite == "raise":
            check_finite("gradient", leaves)
        if backend == "native":
            scaled, new_state, ok = native(leaves, state, arrays)
            if eager and nonfinite == "raise" and not bool(ok):
                raise NonFiniteStepError("variance_gradient_scaler: the statistics a_i, b_i would overflow float64; "
                                         "nothing was changed", field="vgs")
        else:
            scaled, new_state = kernels(leaves, state)
        return jax.tree_util.tree_unflatten(treedef, scaled), new_state

    return optax.GradientTransformationExtraArgs(init, update)
