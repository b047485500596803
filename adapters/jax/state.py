"""The optax states of the VGS and the UPGD family (``specs/algorithm.md`` §2.1, §3.1): their
records, their 64-bit fields as uint32 words (:mod:`.words`, ``specs/adapters-jax.md`` §5.1),
and restoring them from saved arrays, in this layout or the earlier int64/float64 one."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .leaves import x64_scope
from .words import host_float, host_int, host_words, join_float, join_int, split_float, split_int


class VarianceGradientScalerState(NamedTuple):
    """VGS state (``specs/algorithm.md`` §2.1); 64-bit values as uint32 ``[lo, hi]`` words."""

    count: Any  # uint32 (2,): k, completed statistics updates (int64 words)
    grad_mean_avg: Any  # uint32 (S, 2): a_i (float64 bit patterns)
    grad_sq_avg: Any  # uint32 (S, 2): b_i (float64 bit patterns)


class AdaptiveUPGDState(NamedTuple):
    """AdaptiveUPGD state (``specs/algorithm.md`` §3.1). ``utility``, ``first_moment`` and
    ``second_moment`` are pytrees shaped like the params; 64-bit values are uint32 ``[lo, hi]``
    words (:func:`state_values` reads them)."""

    count: Any  # uint32 (2,): T, completed steps (noise counter T + 1, schedule argument T)
    segment_step: Any  # uint32 (S, 2): t_i
    utility: Any  # u
    first_moment: Any  # m
    second_moment: Any  # v
    grad_norm_ema: Any  # uint32 (S, 2): n_i (float64 bit patterns)
    skipped_steps: Any = 0  # uint32 (2,): steps skipped by the non-finite policy (specs/algorithm.md §8)
    seed: Any = None  # uint32 (2,): the noise key words [lo, hi] (a traced seed: jax.vmap over seeds)


# The 64-bit fields: how their words read (int64 or float64) and their shape without the words axis.
_WORD_FIELDS = {"count": ("int", False), "step": ("int", False), "segment_step": ("int", True),
                "grad_norm_ema": ("float", True),
                "skipped_steps": ("int", False), "grad_mean_avg": ("float", True), "grad_sq_avg": ("float", True)}


def _convert(state, joins: dict):
    """``state`` with each 64-bit field passed through ``joins["int"]`` or ``joins["float"]``."""
    return state._replace(**{name: joins[kind](getattr(state, name)) for name, (kind, _) in _WORD_FIELDS.items()
                             if name in state._fields})


def wide_fields(state):
    """The state with its word fields as int64/float64 arrays (traced; call inside ``x64_scope``)."""
    return _convert(state, {"int": join_int, "float": join_float})


def narrow_fields(state):
    """The inverse of :func:`wide_fields`: int64/float64 fields back to words (inside ``x64_scope``)."""
    return _convert(state, {"int": split_int, "float": split_float})


def state_values(state):
    """The state with its 64-bit fields read into NumPy int64/float64 arrays (``count`` as a
    0-d int64 array, ``grad_norm_ema`` as float64 ``(S,)``, ...) and ``seed`` as a Python int:
    what the words stand for, to inspect or to hand to the core."""
    values = _convert(state, {"int": lambda w: host_int(np.asarray(w)), "float": lambda w: host_float(np.asarray(w))})
    if isinstance(state, AdaptiveUPGDState):
        lo, hi = (int(w) for w in np.asarray(state.seed, dtype=np.uint32))
        values = values._replace(seed=lo | hi << 32)
    return values


def host_state(record_type, **values):
    """A state of ``record_type`` from NumPy int64/float64 values of its 64-bit fields (the
    kernel path's results) and arrays for the others."""
    out = {}
    with x64_scope():
        for name, value in values.items():
            out[name] = jnp.asarray(host_words(value)) if name in _WORD_FIELDS else value
    return record_type(**out)


def restore_state(like, leaves):
    """A state with the structure, shapes and dtypes of ``like`` from saved ``leaves``.

    ``leaves``: a list in ``jax.tree_util.tree_leaves(like)`` order (for example the arrays
    of an ``.npz`` written from them) or a pytree of the same structure. Saved states of the
    earlier layout (int64/float64 leaves, before the words of ``specs/adapters-jax.md`` §5.1)
    are converted: a list saved before ``seed`` takes ``like``'s seed (the builder's, which
    those states used), one saved before ``skipped_steps`` also 0 there. Raises
    ``ValueError`` on a count or shape mismatch, ``TypeError`` on a dtype that does not
    convert exactly (for example float64 values into a float32 leaf).
    """
    like_leaves, treedef = jax.tree_util.tree_flatten(like)
    if not isinstance(leaves, (list, tuple)):
        structure = jax.tree_util.tree_structure(leaves)
        if structure != treedef:
            raise ValueError(f"saved state has structure {structure}, expected {treedef}")
        leaves = jax.tree_util.tree_leaves(leaves)
    leaves = [np.asarray(x) for x in leaves]
    if leaves and leaves[0].dtype == np.int64 and leaves[0].shape == ():  # the earlier layout: a 64-bit count
        leaves = _from_wide_layout(like, leaves)
    if len(leaves) != len(like_leaves):
        raise ValueError(f"saved state has {len(leaves)} arrays, the state has {len(like_leaves)}")
    out = []
    with x64_scope():
        for i, (saved, template) in enumerate(zip(leaves, like_leaves)):
            if saved.shape != tuple(template.shape):
                raise ValueError(f"saved state array {i} has shape {saved.shape}, expected {tuple(template.shape)}")
            if saved.dtype != np.dtype(template.dtype):
                raise TypeError(f"saved state array {i} has dtype {saved.dtype}, expected {np.dtype(template.dtype)}")
            out.append(jnp.asarray(saved, dtype=template.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _from_wide_layout(like, leaves):
    """Leaves of the earlier layout (int64 counts, float64 statistics) in this layout's order."""
    if isinstance(like, VarianceGradientScalerState):
        return [host_words(x) for x in leaves]
    if not isinstance(like, AdaptiveUPGDState):
        raise TypeError(f"restore_state takes an AdaptiveUPGDState or VarianceGradientScalerState, got {type(like)}")
    n = 3 * len(jax.tree_util.tree_leaves(like.utility))  # u, m, v leaves
    fixed, tail = leaves[:3 + n], leaves[3 + n:]
    if len(fixed) < 3 + n or len(tail) > 2:
        raise ValueError(f"saved state has {len(leaves)} arrays, the earlier layout of this state has {3 + n} to "
                         f"{5 + n}")
    skipped = tail[0] if tail else np.zeros((), dtype=np.int64)  # saved before the skipped-steps counter: 0
    seed = tail[1] if len(tail) > 1 else np.asarray(like.seed)  # saved before the seed: the builder's
    return [host_words(fixed[0]), host_words(fixed[1]), *fixed[2:2 + n], host_words(fixed[2 + n]),
            host_words(skipped), seed]


def check_words(state, names, num_segments: int) -> None:
    """The 64-bit fields must be uint32 words (``count``: ``(2,)``, per segment ``(S, 2)``),
    ``seed`` uint32 ``(2,)``; anything else (an earlier layout, a narrowed array) names
    :func:`restore_state`."""
    for name in names:
        value = getattr(state, name)
        per_segment = _WORD_FIELDS.get(name, ("seed", False))[1]
        shape = (num_segments, 2) if per_segment else (2,)
        dtype = np.dtype(getattr(value, "dtype", type(value)))
        if dtype.name != "uint32" or tuple(getattr(value, "shape", ())) != shape:
            raise TypeError(
                f"state field {name!r} is {dtype.name} of shape {tuple(getattr(value, 'shape', ()))}, expected uint32 "
                f"words of shape {shape}; convert saved or earlier-layout states with "
                "upgd_ref.adapters.jax.restore_state(tx.init(params), leaves)"
            )


def to_leaf_lists(state: AdaptiveUPGDState) -> AdaptiveUPGDState:
    """The state with its pytrees replaced by leaf lists (the core takes lists of segments);
    :func:`from_leaf_lists` turns the core's new state back into pytrees."""
    leaves = jax.tree_util.tree_leaves
    return state._replace(utility=leaves(state.utility), first_moment=leaves(state.first_moment),
                          second_moment=leaves(state.second_moment))


def from_leaf_lists(core, treedef, skipped_steps, seed) -> AdaptiveUPGDState:
    """The optax state of a core state in words (:class:`upgd_ref.reference.UPGDState` passed
    through :func:`narrow_fields`: ``step`` and leaf lists), its buffers rebuilt as pytrees of
    structure ``treedef``."""
    unflatten = functools.partial(jax.tree_util.tree_unflatten, treedef)
    return AdaptiveUPGDState(core.step, core.segment_step, unflatten(core.utility), unflatten(core.first_moment),
                             unflatten(core.second_moment), core.grad_norm_ema, skipped_steps, seed)
