"""The UPGD family (``specs/algorithm.md`` §3, §7) as optax transformations:
:func:`adaptive_upgd`, :func:`upgd`, :func:`upgdw`, and the builder they share."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from upgd_ref import reference as _ref
from upgd_ref.backends import check_backend_name as _check_core_backend
from upgd_ref.checks import check_nonfinite_policy
from upgd_ref.family import MEMBERS
from upgd_ref.hyperparams import UPGD_DEFAULTS, validate_upgd
from upgd_ref.precision import check_rounding
from upgd_ref.state import FlatUPGDState
from upgd_ref.step import StepRequest, check_noise_norm, upgd_step

from .kernel_buffers import check_backend, check_eager, jax_view, kernel_layout, pack_leaves
from .hyper import seed_words, split_arrays, widened
from .leaves import (
    all_finite, check_finite, check_leaf_dtype, flatten_checked, is_eager, is_params_placeholder, is_tracer,
    where_finite, x64_scope,
)
from .elementwise import program_independent
from .normals import leaf_normals, normals_at
from .per_device import check_per_device
from .precision import check_state_dtype, computed, rounded, rounded_params, state_dtype_of
from .reductions import squares_total
from .state import (
    AdaptiveUPGDState, check_words, from_leaf_lists, host_state, narrow_fields, state_values, to_leaf_lists,
    wide_fields,
)
from .words import host_words, split_int


def _scheduled_lr(schedule, count):
    """The schedule's ``lr`` at ``count`` (optax's convention: the count before the update),
    float64 like every array hyper-parameter; checked when it is concrete."""
    value = schedule(count)
    if not is_tracer(value):
        lr = float(np.asarray(value))
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"the learning-rate schedule gave {lr} at count {int(count)}; lr must be finite and >= 0")
    return jnp.asarray(value, dtype=jnp.float64)


def adaptive_upgd(learning_rate=UPGD_DEFAULTS["lr"], weight_decay=UPGD_DEFAULTS["weight_decay"],
                  beta_utility=UPGD_DEFAULTS["beta_utility"], sigma=UPGD_DEFAULTS["sigma"],
                  beta1=UPGD_DEFAULTS["beta1"], beta2=UPGD_DEFAULTS["beta2"], eps=None,
                  adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                  min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                  instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
                  noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *,
                  backend="native", kernel_backend="auto", profile="production", nonfinite="raise",
                  state_dtype=None, rounding="nearest", per_device=None) -> optax.GradientTransformationExtraArgs:
    """AdaptiveUPGD (``specs/algorithm.md`` §3) as an optax transformation.

    Hyper-parameters and defaults as :class:`upgd_ref.AdaptiveUPGD` (``learning_rate`` is
    its ``lr`` and may be an optax schedule of the step count). ``update(grads, state,
    params)`` needs ``params`` and returns ``updates`` with ``optax.apply_updates(params,
    updates)`` = the new parameters. The noise is ``noise(params, seed, count + 1)``,
    bit-identical to :func:`upgd_ref.noise`. ``profile="paper"``: the original paper's
    Adam-style variant (``specs/algorithm.md`` §7; ``eps`` defaults to ``1e-5`` then).

    ``nonfinite`` (``specs/algorithm.md`` §8, ``specs/adapters-jax.md`` §8): a step whose
    inputs or results are not finite is skipped (zero updates, the state unchanged but
    ``skipped_steps``) under ``"skip"``, and under ``jax.jit`` for ``"raise"`` too (no host
    round trip can raise there); an eager call with ``"raise"`` raises
    :class:`~upgd_ref.checks.NonFiniteStepError` naming the field and leaf.

    Leaves may be float16, bfloat16, float32 or float64, mixed in one tree; updates have each
    leaf's dtype. A 16-bit leaf is stepped in float32 and its new value rounded once
    (``specs/adapters-jax.md`` §5.2): ``rounding="nearest"`` (default) or ``"stochastic"``
    (the core's reproducible rounding stream). ``state_dtype``: ``None`` (default; ``u``,
    ``m``, ``v`` in float32 for 16-bit leaves, optax's ``mu_dtype=jnp.float32``) or
    ``"params"`` (in each leaf's dtype, rounded to nearest after each step).

    ``per_device``: a :class:`~upgd_ref.adapters.jax.PerDevice` when ``update`` runs inside
    ``jax.shard_map`` on each device's blocks (``specs/adapters-jax.md`` §11): the results are
    the whole-leaf step's bit for bit (statistics and element-wise fields).
    """
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1, beta2=beta2)
    if eps is not None:  # None: the profile's default (the paper's 1e-5 under "paper")
        hyper["eps"] = eps
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    return _upgd_family("adaptive_upgd", "AdaptiveUPGD", profile, learning_rate, dict(hyper, **noisy), noise_norm,
                        seed, backend, kernel_backend, nonfinite, state_dtype, rounding, per_device)


def upgd(learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
         adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
         min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
         noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
         kernel_backend="auto", profile="production", nonfinite="raise", state_dtype=None,
         rounding="nearest", per_device=None) -> optax.GradientTransformationExtraArgs:
    """Plain UPGD (no moments; ``specs/algorithm.md`` §7) as an optax transformation.

    The step of :class:`upgd_ref.UPGD`: ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``;
    ``profile="paper"`` gives the paper's plain UPGD. The state has the same fields as
    :func:`adaptive_upgd`'s; ``first_moment`` and ``second_moment`` stay zero. Leaf dtypes,
    ``state_dtype`` and ``rounding`` as :func:`adaptive_upgd`.
    """
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    # beta1, beta2, eps are unused without moments: the library defaults fill the validated dict.
    return _upgd_family("upgd", "UPGD", profile, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend, nonfinite, state_dtype, rounding, per_device)


def upgdw(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, sigma=0.001,
          adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
          min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
          noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
          kernel_backend="auto", nonfinite="raise", state_dtype=None,
          rounding="nearest", per_device=None) -> optax.GradientTransformationExtraArgs:
    """UPGDW (``specs/algorithm.md`` §7) as an optax transformation: AdaptiveUPGD with the
    production UPGDW defaults and the utility decay tied to ``b2`` (``beta_utility = b2``),
    the step of :class:`upgd_ref.UPGDW`. ``b1``, ``b2``: optax's names for ``betas``. Leaf
    dtypes, ``state_dtype`` and ``rounding`` as :func:`adaptive_upgd`."""
    hyper = dict(weight_decay=weight_decay, sigma=sigma, beta1=b1, beta2=b2, eps=eps)  # beta_utility: tied to b2
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    return _upgd_family("upgdw", "UPGDW", "production", learning_rate, dict(hyper, **noisy), noise_norm, seed,
                        backend, kernel_backend, nonfinite, state_dtype, rounding, per_device)


def _upgd_family(name, member, profile, learning_rate, hyper, noise_norm, seed, backend,
                 kernel_backend, nonfinite, state_dtype, rounding, per_device) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of one UPGD family member (``variant``, ``specs/algorithm.md``
    §7): the native path runs :func:`upgd_ref.reference.adaptive_upgd_step` with ``variant``,
    the kernel path :func:`upgd_ref.step.upgd_step` on flat buffers packed from the leaves."""
    row = MEMBERS[member]
    variant = row.variant(profile)
    plain, arrays = split_arrays(dict(hyper, lr=0.0 if callable(learning_rate) else learning_rate), UPGD_DEFAULTS)
    hyper = row.hyperparams(plain, profile)
    noise_norm = check_noise_norm(noise_norm)
    seed = seed_words(seed)
    backend = check_backend(backend)
    _check_core_backend(kernel_backend)
    nonfinite = check_nonfinite_policy(nonfinite)
    state_dtype = check_state_dtype(state_dtype)
    rounding = check_rounding(rounding)

    def state_dtypes(leaves):
        """The dtype of ``u``, ``m``, ``v`` per leaf (``specs/adapters-jax.md`` §5.2)."""
        return [state_dtype_of(leaf.dtype, state_dtype) for leaf in leaves]
    check_per_device(per_device, backend)

    def hyper_at(count, arrays):
        """The step's hyper-parameters: the validated Python values, the array ones (float64)
        and the schedule's ``lr`` at ``count``, ties applied after (UPGDW: ``beta_utility = b2``)."""
        with x64_scope():
            values = dict(hyper, **widened(arrays))
            if callable(learning_rate):
                values["lr"] = _scheduled_lr(learning_rate, count)
        return row.tie(values)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves and not is_params_placeholder(params):
            raise ValueError(f"{name} needs at least one array leaf in params")
        for i, leaf in enumerate(leaves):
            check_leaf_dtype(f"params leaf {i}", leaf)
        with x64_scope():
            ema_init = widened(arrays).get("noise_ema_init", hyper["noise_ema_init"])
            ema = jnp.full((len(leaves),), ema_init, dtype=jnp.float64)
            zero = jnp.zeros((), dtype=jnp.int64)
            if not leaves:  # optax's params placeholder (tree_map_params): the params-shaped fields are it
                return narrow_fields(AdaptiveUPGDState(zero, jnp.zeros((0,), jnp.int64), params, params, params, ema,
                                                       zero, seed))
            zeros = [jnp.zeros(leaf.shape, dtype) for leaf, dtype in zip(leaves, state_dtypes(leaves))]
            state = narrow_fields(_ref.upgd_init(zeros, [0.0] * len(leaves))._replace(grad_norm_ema=ema))
            return from_leaf_lists(state, jax.tree_util.tree_structure(params), split_int(zero), seed)

    def step(grads, params, state, arrays):
        """The family step on leaf lists: ``(updates, new core state)``, not yet checked. 16-bit
        leaves (and a 16-bit state) step in float32 copies; the results are rounded once."""
        with x64_scope():
            state = wide_fields(state)
            per_leaf = [hyper_at(state.count, arrays)] * len(params)
            wide = computed(params)
            if per_device is None:
                normals = leaf_normals(wide, state.seed, state.count + 1)
                total, extrema = [squares_total(g) for g in computed(grads)], None
            else:
                per_device.check(params)
                normals = [normals_at(state.seed, state.count + 1, index, w.dtype)
                           for index, w in zip(per_device.global_indices(params), wide)]
                total, extrema = per_device.totals(grads), per_device.extrema(wide)
            core = _ref.UPGDState(state.count, state.segment_step, computed(state.utility),
                                  computed(state.first_moment), computed(state.second_moment), state.grad_norm_ema)
            # the element-wise math with the same bits in every XLA program (specs/adapters-jax.md §11)
            new_params, new, _ = program_independent(_ref.adaptive_upgd_step, wide, computed(grads), core, normals,
                                                     per_leaf, noise_norm=noise_norm, variant=variant, total=total,
                                                     extrema=extrema)
            new_params = rounded_params(new_params, params, rounding, state.seed, state.count + 1)
            new = new._replace(utility=rounded(new.utility, state.utility),
                               first_moment=rounded(new.first_moment, state.first_moment),
                               second_moment=rounded(new.second_moment, state.second_moment))
        return [n - p for n, p in zip(new_params, params)], new

    @jax.jit
    def native(grads, params, state, arrays):
        updates, new = step(grads, params, state, arrays)
        with x64_scope():
            # the finiteness contract (specs/algorithm.md §8) as optax.apply_if_finite: a step with
            # a non-finite input or result changes nothing but the skip counter. A non-finite
            # g or p makes u = beta u + (1 - beta)(-g p) non-finite: not tested apart (§7)
            ok = all_finite(updates, new.utility, new.first_moment, new.second_moment, new.grad_norm_ema)
            if per_device is not None:
                ok = per_device.all_devices(ok)
            wide = wide_fields(state)
            old = _ref.UPGDState(wide.count, wide.segment_step, state.utility, state.first_moment,
                                 state.second_moment, wide.grad_norm_ema)
            new = narrow_fields(where_finite(ok, new, old))
            updates = [jnp.where(ok, u, jnp.zeros_like(u)) for u in updates]
            skipped = split_int(wide.skipped_steps + jnp.where(ok, 0, 1))
        return updates, new, skipped, ok

    unchecked = jax.jit(step)  # the eager "raise" policy's error path: what would be non-finite

    def kernels(grads, params, state, arrays):
        check_eager("kernels", grads, params, state)
        layout = kernel_layout(params)
        state_layout = layout.widened(state_dtypes(params)[0])  # u, m, v: float32 for 16-bit params
        host = state_values(state)
        values = {k: np.asarray(v).item() for k, v in hyper_at(host.count, arrays).items()}
        flat = FlatUPGDState(
            step=int(host.count),
            segment_step=host.segment_step.copy(),
            utility=pack_leaves(state_layout, state.utility),
            first_moment=pack_leaves(state_layout, state.first_moment),
            second_moment=pack_leaves(state_layout, state.second_moment),
            grad_norm_ema=host.grad_norm_ema.copy(),
            skipped_steps=int(host.skipped_steps),
        )
        request = StepRequest(hyper=[validate_upgd(values)] * layout.num_segments, seed=host.seed,
                              noise_norm=noise_norm, variant=variant, nonfinite=nonfinite, rounding=rounding)
        flat_params = pack_leaves(layout, params)
        old_params = flat_params.copy()
        upgd_step(layout, flat_params, pack_leaves(layout, grads), flat, request, backend=kernel_backend)
        np.subtract(flat_params, old_params, out=flat_params)  # the optax update, in place
        new = host_state(_ref.UPGDState, step=np.int64(flat.step), segment_step=flat.segment_step,
                         **{name: [jax_view(v) for v in state_layout.unpack(getattr(flat, name))]
                            for name in FlatUPGDState.BUFFERS}, grad_norm_ema=flat.grad_norm_ema)
        return [jax_view(v) for v in layout.unpack(flat_params)], new, jnp.asarray(host_words(flat.skipped_steps))

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{name} needs the current params: call update(grads, state, params)")
        if not isinstance(state, AdaptiveUPGDState):
            raise TypeError(f"state must be an AdaptiveUPGDState, got {type(state).__name__}")
        like, treedef = jax.tree_util.tree_flatten(state.utility)
        if not like:
            raise ValueError(f"{name} needs at least one array leaf in params (the state holds none)")
        leaves = flatten_checked("params", params, treedef, like, dtypes=())
        grads = flatten_checked("gradient", updates, treedef, leaves, like_role="the params")
        for field in ("utility", "first_moment", "second_moment"):
            flatten_checked(f"state.{field}", getattr(state, field), treedef, leaves, dtypes=state_dtypes(leaves),
                            like_role=f"the state dtype of the params (state_dtype={state_dtype!r})")
        check_words(state, ("count", "segment_step", "grad_norm_ema", "skipped_steps", "seed"), len(like))
        eager = backend == "native" and is_eager(grads, leaves, state)
        if eager:
            if nonfinite == "raise":
                check_finite("gradient", grads)
                check_finite("params", leaves)
            hyper_at(state_values(state).count, arrays)  # raises on an invalid schedule value
        if backend == "native":
            upd, new, skipped, ok = native(grads, leaves, to_leaf_lists(state), arrays)
            if eager and nonfinite == "raise" and not bool(ok):
                _raise_nonfinite(*unchecked(grads, leaves, to_leaf_lists(state), arrays))
        else:
            upd, new, skipped = kernels(grads, leaves, to_leaf_lists(state), arrays)
        return jax.tree_util.tree_unflatten(treedef, upd), from_leaf_lists(new, treedef, skipped, state.seed)

    return optax.GradientTransformationExtraArgs(init, update)


def _raise_nonfinite(updates, new) -> None:
    """The eager ``"raise"`` policy: name the first result that is not finite (the state the
    caller holds is untouched: nothing to undo)."""
    for role, leaves in (("utility", new.utility), ("first_moment", new.first_moment),
                         ("second_moment", new.second_moment), ("params", updates),
                         ("grad_norm_ema", [new.grad_norm_ema])):
        check_finite(role, leaves, what="would hold")
    raise AssertionError("unreachable: a refused step has a non-finite result")
