"""The optax states of the VGS and the UPGD family (``specs/algorithm.md`` §2.1, §3.1): their
records, the 64-bit width of their scalar fields, and restoring them from saved arrays."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .leaves import x64_scope


class VarianceGradientScalerState(NamedTuple):
    """VGS state (``specs/algorithm.md`` §2.1): all arrays, float64/int64 in both x64 modes."""

    count: Any  # int64 scalar: k, completed statistics updates
    grad_mean_avg: Any  # float64 (S,): a_i
    grad_sq_avg: Any  # float64 (S,): b_i


class AdaptiveUPGDState(NamedTuple):
    """AdaptiveUPGD state (``specs/algorithm.md`` §3.1). ``utility``, ``first_moment`` and
    ``second_moment`` are pytrees shaped like the params."""

    count: Any  # int64 scalar: T, completed steps (noise counter T + 1, schedule argument T)
    segment_step: Any  # int64 (S,): t_i
    utility: Any  # u
    first_moment: Any  # m
    second_moment: Any  # v
    grad_norm_ema: Any  # float64 (S,): n_i
    skipped_steps: Any = 0  # int64 scalar: steps skipped by the non-finite policy (specs/algorithm.md §8)
    seed: Any = None  # uint32 (2,): the noise key words [lo, hi] (a traced seed: jax.vmap over seeds)


_WIDE_FIELDS = {"count": "int64", "segment_step": "int64", "grad_norm_ema": "float64",
                "grad_mean_avg": "float64", "grad_sq_avg": "float64", "seed": "uint32"}
_SHAPES = {"count": lambda s: (), "seed": lambda s: (2,)}


def restore_state(like, leaves):
    """A state with the structure, shapes and dtypes of ``like`` from saved ``leaves``.

    ``leaves``: a list in ``jax.tree_util.tree_leaves(like)`` order (for example the arrays
    of an ``.npz`` written from them) or a pytree of the same structure. A list saved from an
    :class:`AdaptiveUPGDState` before it had ``seed`` (its last leaf) takes ``like``'s seed (the
    builder's, which those states used), and before ``skipped_steps`` also 0 there. The int64/float64
    leaves keep their width with ``jax_enable_x64`` off (``jnp.asarray`` alone would
    narrow them). Raises ``ValueError`` on a count or shape mismatch, ``TypeError`` on a
    dtype that does not convert exactly (for example float64 values into a float32 leaf).
    """
    like_leaves, treedef = jax.tree_util.tree_flatten(like)
    if not isinstance(leaves, (list, tuple)):
        structure = jax.tree_util.tree_structure(leaves)
        if structure != treedef:
            raise ValueError(f"saved state has structure {structure}, expected {treedef}")
        leaves = jax.tree_util.tree_leaves(leaves)
    leaves = list(leaves)
    missing = len(like_leaves) - len(leaves)
    if isinstance(like, AdaptiveUPGDState) and missing in (1, 2):  # saved before the seed (and skipped_steps)
        leaves += [np.zeros((), dtype=np.int64)] * (missing - 1) + [np.asarray(like.seed)]
    if len(leaves) != len(like_leaves):
        raise ValueError(f"saved state has {len(leaves)} arrays, the state has {len(like_leaves)}")
    out = []
    with x64_scope():
        for i, (saved, template) in enumerate(zip(leaves, like_leaves)):
            saved = np.asarray(saved)
            if saved.shape != tuple(template.shape):
                raise ValueError(f"saved state array {i} has shape {saved.shape}, expected {tuple(template.shape)}")
            if saved.dtype != np.dtype(template.dtype):
                raise TypeError(f"saved state array {i} has dtype {saved.dtype}, expected {np.dtype(template.dtype)}")
            out.append(jnp.asarray(saved, dtype=template.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def check_wide(state, names, num_segments: int) -> None:
    """The scalar state must keep its int64/float64 width (a plain jnp.asarray narrows it)."""
    for name in names:
        value = getattr(state, name)
        expected = _WIDE_FIELDS[name]
        dtype = np.dtype(getattr(value, "dtype", type(value)))
        if dtype.name != expected:
            raise TypeError(
                f"state field {name!r} has dtype {dtype.name}, expected {expected}; restore saved states with "
                "upgd_ref.adapters.jax.restore_state (jnp.asarray narrows 64-bit arrays when jax_enable_x64 is off)"
            )
        shape = _SHAPES.get(name, lambda s: (s,))(num_segments)
        if tuple(value.shape) != shape:
            raise ValueError(f"state field {name!r} has shape {tuple(value.shape)}, expected {shape}")


def to_leaf_lists(state: AdaptiveUPGDState) -> AdaptiveUPGDState:
    """The state with its pytrees replaced by leaf lists (the core takes lists of segments);
    :func:`from_leaf_lists` turns the core's new state back into pytrees."""
    leaves = jax.tree_util.tree_leaves
    return AdaptiveUPGDState(state.count, state.segment_step, leaves(state.utility), leaves(state.first_moment),
                             leaves(state.second_moment), state.grad_norm_ema, state.skipped_steps, state.seed)


def from_leaf_lists(core, treedef, skipped_steps, seed) -> AdaptiveUPGDState:
    """The optax state of a core state (:class:`upgd_ref.reference.UPGDState`: ``step`` and
    leaf lists), its buffers rebuilt as pytrees of structure ``treedef``."""
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    return AdaptiveUPGDState(core.step, core.segment_step, unflatten(core.utility), unflatten(core.first_moment),
                             unflatten(core.second_moment), core.grad_norm_ema, skipped_steps, seed)
