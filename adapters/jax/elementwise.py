"""Element-wise float operations whose bits do not depend on the XLA program they land in
(``specs/adapters-jax.md`` §11): the native step is traced to a jaxpr and re-emitted with two
operations replaced, so the unsharded program and every sharded or per-device one compute
the same parameters and state.

- ``a / s``, ``s`` a scalar and ``a`` an array: XLA's algebraic simplifier rewrites a
  division by a broadcast scalar into a multiplication by its reciprocal (``1/s`` rounded,
  then a product: up to one ulp from the quotient) in some programs and not in others. The
  divisor is re-emitted as ``select(a == a, s, a)``, ``s`` wherever ``a`` is not NaN (a NaN
  ``a`` gives NaN either way), an array that is no broadcast: every program divides.
- ``exp`` of float32: XLA:CPU replaces LLVM's vector ``exp`` by its own polynomial only at
  the vector widths it expects; a loop that LLVM narrows (a device's block of 6 elements:
  ``<6 x float>``) calls the C library's ``expf`` instead, which differs in the last bit for
  about one argument in ten. It is re-emitted as ``exp`` of the float64 value rounded once
  to float32: XLA emits the float64 ``exp`` as its own function (``xla.exp.v8f64``) at
  every width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as _jcore

from .leaves import x64_scope

_INLINE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_ADDITIVE = frozenset({"add", "sub", "neg", "add_any"})


def _uncontracted(x):
    """``x`` through a ``select`` LLVM cannot fold into a fused multiply-add (``x - x``, NaN, for a NaN)."""
    return jax.lax.select(x == x, x, x - x)


def _divide(a, s):
    """``a / s`` for an array ``a`` and a scalar ``s``, through a divisor that is not a broadcast."""
    divisor = jax.lax.select(a == a, jnp.broadcast_to(s, a.shape).astype(a.dtype), a)
    return jax.lax.div(a, divisor)


def _exp(x):
    """``exp(x)``: float32 (and narrower) through float64, rounded once to ``x``'s dtype."""
    if jnp.dtype(x.dtype) == jnp.float64:
        return jax.lax.exp(x)
    with x64_scope():
        return jax.lax.exp(x.astype(jnp.float64)).astype(x.dtype)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def _rewritten(name, values):
    """The replacement of one equation, or None to bind it as it is."""
    if not all(_is_float(v) for v in values):
        return None
    if name == "exp":
        return _exp(values[0])
    if name == "div" and jnp.ndim(values[1]) == 0 and jnp.ndim(values[0]) > 0:
        return _divide(*values)
    return None


def _evaluate(jaxpr, consts, args):
    """Evaluate ``jaxpr`` with :func:`_rewritten`'s replacements; nested ``jit`` calls are
    inlined so their operations are replaced too."""
    env = {}

    def read(v):
        return v.val if isinstance(v, _jcore.Literal) else env[v]

    feeds_sum = {v for e in jaxpr.eqns if e.primitive.name in _ADDITIVE for v in e.invars
                 if not isinstance(v, _jcore.Literal)}
    feeds_sum.update(v for v in jaxpr.outvars if not isinstance(v, _jcore.Literal))
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr")
        if eqn.primitive.name in _INLINE_CALLS and isinstance(inner, _jcore.ClosedJaxpr):
            outs = _evaluate(inner.jaxpr, inner.consts, values)
        else:
            out = _rewritten(eqn.primitive.name, values)
            if out is None:
                out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = out if eqn.primitive.multiple_results else [out]
            if eqn.primitive.name == "mul" and eqn.outvars[0] in feeds_sum and _is_float(outs[0]):
                outs = [_uncontracted(outs[0])]
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, _jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer)) or hasattr(x, "__array__") and hasattr(x, "dtype")


def program_independent(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its divisions by scalars and its float32 ``exp`` replaced
    (module docstring). The array leaves of the arguments are traced; every other leaf (Python
    numbers, strings, functions) is a constant of the trace."""
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    traced = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def call(*values):
        full = list(leaves)
        for i, value in zip(traced, values):
            full[i] = value
        a, k = jax.tree_util.tree_unflatten(tree, full)
        return fn(*a, **k)

    values = [leaves[i] for i in traced]
    closed, shape = jax.make_jaxpr(call, return_shape=True)(*values)
    flat = _evaluate(closed.jaxpr, closed.consts, values)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat)
