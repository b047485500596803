"""Element-wise float operations whose bits do not depend on the XLA program they land in
(``specs/adapters-jax.md`` §11): the native step is traced to a jaxpr and re-emitted
(:func:`reemit`, also the noise transform's strict evaluation, §6) with three kinds of
operation changed, so the unsharded program and every sharded or per-device one compute the
same parameters and state.

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
- ``a * b`` feeding an addition: LLVM may contract the pair into a fused multiply-add, and
  whether it does depends on how the program fuses; the product is re-emitted through
  :func:`uncontracted`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as _jcore

from .leaves import is_tracer, x64_scope

_INLINE_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_ADDITIVE = frozenset({"add", "sub", "neg", "add_any"})


def uncontracted(x):
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


def reemit(jaxpr, consts, args, rule):
    """Evaluate ``jaxpr`` equation by equation, each through ``rule(name, values, bind,
    feeds_sum)`` (``bind()``: the equation's own outputs; ``feeds_sum``: its output is an
    operand of an addition, subtraction or negation, or of the jaxpr's outputs), which returns
    the outputs to use. Nested ``jit`` calls are inlined so their equations go through
    ``rule`` too."""
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
            outs = reemit(inner.jaxpr, inner.consts, values, rule)
        else:
            def bind(eqn=eqn, values=values):
                out = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
                return out if eqn.primitive.multiple_results else [out]
            outs = rule(eqn.primitive.name, values, bind, eqn.outvars[0] in feeds_sum)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, _jcore.DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _program_independent_rule(name, values, bind, feeds_sum):
    """:func:`reemit`'s rule for the step: the replacements of :func:`_rewritten`, and every
    float product that feeds an addition kept from contraction."""
    out = _rewritten(name, values)
    outs = bind() if out is None else [out]
    if name == "mul" and feeds_sum and _is_float(outs[0]):
        return [uncontracted(outs[0])]
    return outs


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or is_tracer(x)


def program_independent(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its divisions by scalars, its float32 ``exp`` and its
    products that feed additions re-emitted (module docstring). The array leaves of the
    arguments are traced; every other leaf (Python and NumPy scalars, strings, functions) is a
    constant of the trace, as it is in ``fn``."""
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
    flat = reemit(closed.jaxpr, closed.consts, values, _program_independent_rule)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), flat)
