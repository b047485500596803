"""Pytree leaves as the JAX adapter takes them: the float64 scope, telling eager calls from
traced ones, and the checks of leaf dtypes, structures, shapes and values
(``specs/adapters-jax.md`` §7)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from upgd_ref.checks import NonFiniteStepError

SUPPORTED_DTYPES = ("float32", "float64")  # compute (and noise) dtypes
#: Leaf dtypes: 16-bit leaves are stepped in float32 (specs/precision.md, specs/adapters-jax.md §5.2).
LEAF_DTYPES = ("float16", "bfloat16", *SUPPORTED_DTYPES)


def x64_scope():
    """Context in which ``jax.numpy`` keeps float64/int64 even when ``jax_enable_x64`` is off.

    Entered *inside* a trace it makes that trace emit float64 operations (XLA supports them
    on CPU and GPU), so the scalar state (step counts, VGS statistics, gradient-norm
    averages) and the noise transform are float64 in both modes, as the core specifies.
    """
    enable = getattr(jax, "enable_x64", None)
    if callable(enable):  # jax >= 0.6: a configuration state usable as a context manager
        return enable(True)
    from jax.experimental import enable_x64  # older releases

    return enable_x64()


def is_tracer(x) -> bool:
    """True for a value being traced (inside ``jax.jit``, ``grad``, ``vmap``...), not a concrete array."""
    return isinstance(x, jax.core.Tracer)


def is_eager(*trees) -> bool:
    """True when the call runs eagerly: no traced input and no staging trace (``jax.jit``,
    ``lax.cond``) around it; ``lax.cond`` branches can close over concrete arrays, so the
    inputs alone do not tell."""
    if any(is_tracer(x) for tree in trees for x in jax.tree_util.tree_leaves(tree)):
        return False
    return not is_tracer(jnp.zeros(()) + 0)


def is_params_placeholder(params) -> bool:
    """True for a leafless tree from optax (``optax.tree_utils.tree_map_params`` calls ``init``
    with its params placeholder; ``optax.masked`` passes ``MaskedNode``): ``init`` then puts
    that tree where the params-shaped fields go, as optax's own transformations do."""
    return not jax.tree_util.tree_leaves(params) and type(params).__module__.split(".")[0] == "optax"


def check_leaf_dtype(name: str, leaf) -> None:
    """``leaf`` must be an array of a supported dtype; ``name`` says which leaf in the message."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} is a {type(leaf).__name__}, not an array")
    if np.dtype(dtype).name not in LEAF_DTYPES:
        raise TypeError(f"{name} has dtype {np.dtype(dtype).name}; AdaptiveUPGD and the VGS take float16, bfloat16, "
                        "float32 or float64")


def flatten_checked(role: str, tree, treedef, like_leaves, dtypes=None, like_role: str = "the state"):
    """Leaves of ``tree``, checked against ``treedef`` and the shapes of ``like_leaves``;
    dtypes against ``dtypes`` (one per leaf; default the dtypes of ``like_leaves``, ``()``:
    any leaf dtype). ``like_role`` names ``like_leaves`` in the messages."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    if structure != treedef:
        raise ValueError(
            f"{role} have pytree structure {structure}, but the state was initialised for {treedef}; "
            "the params pytree must keep its structure between init and update"
        )
    dtypes = [like.dtype for like in like_leaves] if dtypes is None else dtypes
    for i, (leaf, like) in enumerate(zip(leaves, like_leaves)):
        check_leaf_dtype(f"{role} leaf {i}", leaf)
        if tuple(leaf.shape) != tuple(like.shape):
            raise ValueError(f"{role} leaf {i} has shape {tuple(leaf.shape)}, {like_role} has {tuple(like.shape)}")
        if dtypes and np.dtype(leaf.dtype) != np.dtype(dtypes[i]):
            raise TypeError(f"{role} leaf {i} has dtype {np.dtype(leaf.dtype)}, {like_role} has {np.dtype(dtypes[i])}")
    return leaves


def check_finite(role: str, leaves, what: str = "holds") -> None:
    """A non-finite value is a :class:`~upgd_ref.checks.NonFiniteStepError` naming the leaf
    (its segment) and the index (call only when :func:`is_eager`)."""
    for i, leaf in enumerate(leaves):
        bad = ~np.isfinite(np.asarray(leaf))
        if bad.any():
            flat = int(np.flatnonzero(bad)[0])
            index = np.unravel_index(flat, bad.shape)
            raise NonFiniteStepError(f"{role} leaf {i} {what} a non-finite value at index "
                                     f"{tuple(int(j) for j in index)}", field=role, segment=i, element=flat)


def all_finite(*trees):
    """A traced bool: every leaf of every tree is finite (``optax.apply_if_finite``'s test)."""
    flags = [_finite(leaf) for tree in trees for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(flags))


def _finite(leaf):
    """``all(isfinite(leaf))`` as ``sum(leaf * 0) == 0`` (``inf * 0`` and ``NaN * 0`` are NaN, which
    every summation order propagates): one fused reduction, where XLA:CPU materialises
    ``isfinite`` as a boolean array first. (Not ``max |leaf|``: XLA:CPU's vectorised ``max``
    of a long float32 array drops a NaN.)"""
    return jnp.sum(leaf * jnp.zeros((), leaf.dtype)) == 0


def where_finite(ok, new, old):
    """``new`` where ``ok`` else ``old``, leaf by leaf (no host round trip under ``jax.jit``)."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)
