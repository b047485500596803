"""The UPGD family (``specs/algorithm.md`` §3, §7) as optax transformations:
:func:`adaptive_upgd`, :func:`upgd`, :func:`upgdw`, and the builder they share."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from upgd_ref import reference as _ref
from upgd_ref.backends import check_backend_name as _check_core_backend
from upgd_ref.family import MEMBERS, PAPER_EPS
from upgd_ref.hyperparams import NOISE_NORMS, UPGD_DEFAULTS, validate_upgd
from upgd_ref.state import FlatUPGDState
from upgd_ref.step import StepRequest, upgd_step

from .kernel_buffers import check_backend, check_eager, jax_view, kernel_layout, pack_leaves
from .leaves import check_finite, check_leaf_dtype, flatten_checked, is_eager, is_tracer, x64_scope
from .normals import leaf_normals
from .state import AdaptiveUPGDState, check_wide, from_leaf_lists, to_leaf_lists


def _learning_rate(learning_rate, count, leaves):
    """Per-leaf ``lr``: the float itself, or the schedule's value at ``count`` cast to each
    leaf's dtype (optax's convention for schedules)."""
    if not callable(learning_rate):
        return [learning_rate] * len(leaves)
    value = learning_rate(count)
    if not is_tracer(value):
        lr = float(np.asarray(value))
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"the learning-rate schedule gave {lr} at count {int(count)}; lr must be finite and >= 0")
    return [jnp.asarray(value, dtype=leaf.dtype) for leaf in leaves]


def adaptive_upgd(learning_rate=UPGD_DEFAULTS["lr"], weight_decay=UPGD_DEFAULTS["weight_decay"],
                  beta_utility=UPGD_DEFAULTS["beta_utility"], sigma=UPGD_DEFAULTS["sigma"],
                  beta1=UPGD_DEFAULTS["beta1"], beta2=UPGD_DEFAULTS["beta2"], eps=None,
                  adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                  min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                  instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
                  noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *,
                  backend="native", kernel_backend="auto",
                  profile="production") -> optax.GradientTransformationExtraArgs:
    """AdaptiveUPGD (``specs/algorithm.md`` §3) as an optax transformation.

    Hyper-parameters and defaults as :class:`upgd_ref.AdaptiveUPGD` (``learning_rate`` is
    its ``lr`` and may be an optax schedule of the step count). ``update(grads, state,
    params)`` needs ``params`` and returns ``updates`` with ``optax.apply_updates(params,
    updates)`` = the new parameters. The noise is ``noise(params, seed, count + 1)``,
    bit-identical to :func:`upgd_ref.noise`. ``profile="paper"``: the original paper's
    Adam-style variant (``specs/algorithm.md`` §7; ``eps`` defaults to ``1e-5`` then).
    """
    variant = MEMBERS["AdaptiveUPGD"].variant(profile)
    if eps is None:
        eps = PAPER_EPS if profile == "paper" else UPGD_DEFAULTS["eps"]
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1, beta2=beta2,
                 eps=eps)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    return _upgd_family("adaptive_upgd", variant, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend)


def upgd(learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
         adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
         min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
         noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
         kernel_backend="auto", profile="production") -> optax.GradientTransformationExtraArgs:
    """Plain UPGD (no moments; ``specs/algorithm.md`` §7) as an optax transformation.

    The step of :class:`upgd_ref.UPGD`: ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``;
    ``profile="paper"`` gives the paper's plain UPGD. The state has the same fields as
    :func:`adaptive_upgd`'s; ``first_moment`` and ``second_moment`` stay zero.
    """
    variant = MEMBERS["UPGD"].variant(profile)
    hyper = dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)

    # beta1, beta2, eps are unused without moments: the library defaults fill the validated dict.
    return _upgd_family("upgd", variant, learning_rate, dict(hyper, **noisy), noise_norm, seed, backend,
                        kernel_backend)


def upgdw(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, sigma=0.001,
          adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
          min_noise_std=UPGD_DEFAULTS["min_noise_std"], instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"],
          noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], noise_norm="segment", seed=0, *, backend="native",
          kernel_backend="auto") -> optax.GradientTransformationExtraArgs:
    """UPGDW (``specs/algorithm.md`` §7) as an optax transformation: AdaptiveUPGD with the
    production UPGDW defaults and the utility decay tied to ``b2`` (``beta_utility = b2``),
    the step of :class:`upgd_ref.UPGDW`. ``b1``, ``b2``: optax's names for ``betas``."""
    variant = MEMBERS["UPGDW"].variant()
    hyper = dict(weight_decay=weight_decay, sigma=sigma, beta1=b1, beta2=b2, eps=eps)
    noisy = dict(adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                 instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
    # Checked before the tie copies b2 into beta_utility, so a bad b2 is blamed as beta2.
    hyper = MEMBERS["UPGDW"].tie(validate_upgd(dict(hyper, **noisy)))
    return _upgd_family("upgdw", variant, learning_rate, hyper, noise_norm, seed, backend, kernel_backend)


def _upgd_family(name, variant, learning_rate, hyper, noise_norm, seed, backend,
                 kernel_backend) -> optax.GradientTransformationExtraArgs:
    """The optax transformation of one UPGD family member (``variant``, ``specs/algorithm.md``
    §7): the native path runs :func:`upgd_ref.reference.adaptive_upgd_step` with ``variant``,
    the kernel path :func:`upgd_ref.step.upgd_step` on flat buffers packed from the leaves."""
    hyper = validate_upgd(dict(hyper, lr=0.0 if callable(learning_rate) else learning_rate))
    if noise_norm not in NOISE_NORMS:
        raise ValueError(f"noise_norm must be one of {NOISE_NORMS}, got {noise_norm!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    seed = int(seed)
    backend = check_backend(backend)
    _check_core_backend(kernel_backend)

    def init(params):
        leaves = jax.tree_util.tree_leaves(params)
        if not leaves:
            raise ValueError(f"{name} needs at least one array leaf in params")
        for i, leaf in enumerate(leaves):
            check_leaf_dtype(f"params leaf {i}", leaf)
        with x64_scope():
            state = _ref.upgd_init(leaves, [hyper["noise_ema_init"]] * len(leaves))
        return from_leaf_lists(state, jax.tree_util.tree_structure(params))

    @jax.jit
    def native(grads, params, state):
        with x64_scope():
            lrs = _learning_rate(learning_rate, state.count, params)
            per_leaf = [dict(hyper, lr=lr) for lr in lrs]
            normals = leaf_normals(params, seed, state.count + 1)
            core = _ref.UPGDState(state.count, state.segment_step, state.utility, state.first_moment,
                                  state.second_moment, state.grad_norm_ema)
            new_params, new, _ = _ref.adaptive_upgd_step(params, grads, core, normals, per_leaf,
                                                         noise_norm=noise_norm, variant=variant)
            updates = [n - p for n, p in zip(new_params, params)]
        return updates, new

    def kernels(grads, params, state):
        check_eager("kernels", grads, params, state)
        layout = kernel_layout(params)
        lr = learning_rate
        if callable(learning_rate):
            with x64_scope():
                lr = _learning_rate(learning_rate, state.count, params[:1])[0]
            lr = float(np.asarray(lr, dtype=np.float64))
        flat = FlatUPGDState(
            step=int(state.count),
            segment_step=np.array(state.segment_step, dtype=np.int64),
            utility=pack_leaves(layout, state.utility),
            first_moment=pack_leaves(layout, state.first_moment),
            second_moment=pack_leaves(layout, state.second_moment),
            grad_norm_ema=np.array(state.grad_norm_ema, dtype=np.float64),
        )
        request = StepRequest(hyper=[validate_upgd(dict(hyper, lr=lr))] * layout.num_segments, seed=seed,
                              noise_norm=noise_norm, variant=variant)
        flat_params = pack_leaves(layout, params)
        old_params = flat_params.copy()
        upgd_step(layout, flat_params, pack_leaves(layout, grads), flat, request, backend=kernel_backend)
        np.subtract(flat_params, old_params, out=flat_params)  # the optax update, in place
        with x64_scope():
            new = _ref.UPGDState(jnp.asarray(flat.step, dtype=jnp.int64), jnp.asarray(flat.segment_step),
                                 *[[jax_view(v) for v in layout.unpack(getattr(flat, name))]
                                   for name in FlatUPGDState.BUFFERS],
                                 jnp.asarray(flat.grad_norm_ema))
        return [jax_view(v) for v in layout.unpack(flat_params)], new

    def update(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(f"{name} needs the current params: call update(grads, state, params)")
        if not isinstance(state, AdaptiveUPGDState):
            raise TypeError(f"state must be an AdaptiveUPGDState, got {type(state).__name__}")
        like, treedef = jax.tree_util.tree_flatten(state.utility)
        grads = flatten_checked("gradient", updates, treedef, like)
        leaves = flatten_checked("params", params, treedef, like)
        for field in ("first_moment", "second_moment"):
            flatten_checked(f"state.{field}", getattr(state, field), treedef, like)
        check_wide(state, ("count", "segment_step", "grad_norm_ema"), len(like))
        if backend == "native" and is_eager(grads, leaves, state):
            check_finite("gradient", grads)
            check_finite("params", leaves)
            with x64_scope():
                _learning_rate(learning_rate, state.count, leaves[:1])  # raises on an invalid value
        if backend == "native":
            upd, new = native(grads, leaves, to_leaf_lists(state))
        else:
            upd, new = kernels(grads, leaves, to_leaf_lists(state))
        return jax.tree_util.tree_unflatten(treedef, upd), from_leaf_lists(new, treedef)

    return optax.GradientTransformationExtraArgs(init, update)
