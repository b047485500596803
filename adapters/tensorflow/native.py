r"""The native step: one step of the family as a pure JAX function of arrays
(``specs/adapters-tensorflow.md`` §3.3), which XLA compiles with the model.

Every formula is the core's Array-API reference run on ``jax.numpy``
(:func:`upgd_ref.reference.adaptive_upgd_step`, ``vgs_scaling_factor``, ``vgs_scale``,
``vgs_update``), and the normals are the JAX adapter's :func:`~upgd_ref.adapters.jax.standard_normals`,
bit-identical to :func:`upgd_ref.noise` under XLA (its FMA guard, ``specs/adapters-jax.md``
§6). This module only arranges the arrays: the Keras backend JAX calls :func:`native_step`
directly, the TensorFlow backend runs it as TensorFlow ops (``jax2tf``), so both compile
with the model (``jit_compile=True``) and run on the variables' device.

The scalar state is int64 / float64 (the ``wide`` format of the TensorFlow and torch
backends), or ``[lo, hi]`` uint32 words (``words=True``: the JAX backend, whose variables
cannot hold 64-bit values with ``jax_enable_x64`` off; ``specs/adapters-jax.md`` §5.1).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp

from upgd_ref import reference as _ref
from upgd_ref.adapters.jax import standard_normals, x64_scope
from upgd_ref.adapters.jax.words import join_float, join_int, split_float, split_int

# The six scalar state variables in their order, and how their words read.
SCALARS = ("segment_step", "grad_norm_ema", "upgd_step", "vgs_step", "vgs_grad_mean_avg", "vgs_grad_sq_avg")
_KIND = {"segment_step": "int", "upgd_step": "int", "vgs_step": "int", "grad_norm_ema": "float",
         "vgs_grad_mean_avg": "float", "vgs_grad_sq_avg": "float"}
_JOIN = {"int": join_int, "float": join_float}
_SPLIT = {"int": split_int, "float": split_float}


def _normals(seed: int, step, shapes, dtype):
    """``upgd_ref.noise(layout, seed, step)`` per segment: segment ``i`` takes the logical
    indices from ``sum(sizes[:i])`` (``specs/noise.md`` §4)."""
    out, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(jnp.reshape(standard_normals(seed, step, offset, size, dtype), shape))
        offset += size
    return out


def _all_finite(*groups):
    ok = jnp.asarray(True)
    for group in groups:
        for x in group:
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def native_step(lr, values, grads, utility, first, second, scalars, *, present, hyper, vgs, seed,
                noise_norm, variant, words, exact_lr=None):
    """One step: ``(new values, utility, first, second, scalars, ok)``.

    ``values``, ``grads``, ``utility``, ``first``, ``second``: one array per variable (every
    variable; ``present[i]`` False: its gradient is not read and nothing of it changes;
    ``first``/``second`` empty for members without moments). ``scalars``: the six state
    arrays of :data:`SCALARS`. ``lr``: the learning rate (may be traced), read as ``exact_lr``
    while it holds that float's rounding (``specs/adapters-tensorflow.md`` §1.1); ``hyper``: the
    per-variable hyper-parameter dicts (Python numbers, ties applied) without ``lr``;
    ``vgs``: the validated VGS settings or ``None``. A step with a non-finite input or
    result changes nothing (``ok`` False; ``specs/algorithm.md`` §8).
    """
    with x64_scope():
        wide = {name: (_JOIN[_KIND[name]](x) if words else x) for name, x in zip(SCALARS, scalars)}
        rate = jnp.asarray(lr)
        lr = rate.astype(jnp.float64)
        if exact_lr is not None:
            rounded = jnp.asarray(exact_lr, dtype=rate.dtype)
            lr = jnp.where(rate == rounded, jnp.asarray(exact_lr, dtype=jnp.float64), lr)
        hyper = [dict(h, lr=lr) for h in hyper]
        # 16-bit parameters step in float32 copies and are rounded once (specs/precision.md §2)
        dtype = values[0].dtype
        compute = jnp.float32 if jnp.dtype(dtype).itemsize == 2 else dtype
        params = [v.astype(compute) for v in values]
        grads = [g.astype(compute) if p else jnp.zeros_like(v) for g, v, p in zip(grads, params, present)]
        moments = (list(first), list(second)) if first else ([jnp.zeros_like(u) for u in utility],) * 2
        vgs_state = _ref.VGSState(wide["vgs_step"], wide["vgs_grad_mean_avg"], wide["vgs_grad_sq_avg"])
        if vgs is not None:  # scale -> two-pass step -> statistics update (specs/algorithm.md §1)
            factor, _ = _ref.vgs_scaling_factor(vgs_state, **vgs)
            # f g rounded to the parameter dtype, as the door does for 16-bit (specs/precision.md §2)
            grads = [g.astype(dtype).astype(compute) for g in _ref.vgs_scale(grads, factor, present)]
        state = _ref.UPGDState(wide["upgd_step"], wide["segment_step"], list(utility), *moments,
                               wide["grad_norm_ema"])
        normals = _normals(seed, state.step + 1, [tuple(v.shape) for v in values], compute)
        new_params, new, _ = _ref.adaptive_upgd_step(params, grads, state, normals, hyper, present=present,
                                                     noise_norm=noise_norm, variant=variant)
        new_values = [n.astype(dtype) for n in new_params]
        if vgs is not None:
            vgs_state = _ref.vgs_update(vgs_state, grads, beta=vgs["beta"], present=present)
        live = [i for i, p in enumerate(present) if p]

        def pick(xs):
            return [xs[i] for i in live]

        ok = _all_finite(pick(grads), pick(params), pick(new_params), pick(new_values), pick(new.utility),
                         pick(new.first_moment) if first else [], pick(new.second_moment) if first else [],
                         [new.grad_norm_ema])
        keep = functools.partial(jnp.where, ok)  # a refused step leaves every array as it was
        out = {"segment_step": new.segment_step, "grad_norm_ema": new.grad_norm_ema, "upgd_step": new.step,
               "vgs_step": vgs_state.step, "vgs_grad_mean_avg": vgs_state.grad_mean_avg,
               "vgs_grad_sq_avg": vgs_state.grad_sq_avg}
        out = [keep(out[name], wide[name]).astype(wide[name].dtype) for name in SCALARS]
        if words:
            out = [_SPLIT[_KIND[name]](x) for name, x in zip(SCALARS, out)]
        new_values = [keep(n, v) for n, v in zip(new_values, values)]
        new_utility = [keep(n, u) for n, u in zip(new.utility, utility)]
        new_first = [keep(n, m) for n, m in zip(new.first_moment, first)]
        new_second = [keep(n, m) for n, m in zip(new.second_moment, second)]
        return new_values, new_utility, new_first, new_second, out, ok
