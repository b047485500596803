r"""The native step written per device, inside ``jax.shard_map`` (``specs/adapters-jax.md`` §11).

Inside ``shard_map`` the update sees each device's local block of every leaf. The step is
the same as on whole leaves, bit for bit, once three things are global again:

* the noise of a local element is that of its **global** index in the tree
  (``specs/noise.md`` §4), so it is drawn by index (:func:`.normals.normals_at`);
* a segment's sums (``sum g**2``, the VGS means) are :mod:`upgd_ref.folded_sum` sums: the
  global ``max |y|`` by ``pmax``, each device's exact fold sums added by ``psum`` (exact,
  hence in any order), then combined as on one device;
* the utility extrema by ``pmin``/``pmax`` (exact), and the finiteness verdict by ``pmin``.

A leaf replicated over a mesh axis holds the same values on those devices; it is combined
only over the axes that split it. :class:`PerDevice` holds the mesh's axis sizes and each
leaf's ``PartitionSpec`` (the ones given to ``shard_map`` for params and gradients).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from upgd_ref.folded_sum import fold_exponent, fold_sums, fold_total


def _spec_leaves(specs):
    return jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _dim_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one ``PartitionSpec`` entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


class Placement(NamedTuple):
    """Where a device's block of one leaf sits: per dimension, the mesh axes that split it."""

    dims: tuple[tuple[str, ...], ...]
    axes: tuple[str, ...]  # every axis that splits the leaf (combination over these only)


class PerDevice:
    """The placement ``shard_map`` gives the update: ``mesh`` (or a dict of axis sizes) and
    ``specs``, a pytree of ``PartitionSpec`` like the params (a prefix is not accepted)."""

    def __init__(self, mesh, specs):
        self.axis_sizes = dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, dict) else dict(mesh)
        self.specs = specs
        self.placements = []
        for i, spec in enumerate(_spec_leaves(specs)):
            if not isinstance(spec, PartitionSpec):
                raise TypeError(f"specs leaf {i} is a {type(spec).__name__}, not a PartitionSpec")
            dims = tuple(_dim_axes(entry) for entry in spec)
            axes = tuple(a for d in dims for a in d)
            unknown = [a for a in axes if a not in self.axis_sizes]
            if unknown:
                raise ValueError(f"specs leaf {i} names mesh axes {unknown}; the mesh has {list(self.axis_sizes)}")
            self.placements.append(Placement(dims, axes))

    def check(self, leaves) -> None:
        if len(leaves) != len(self.placements):
            raise ValueError(f"per_device has {len(self.placements)} PartitionSpecs, params have {len(leaves)} leaves")
        for i, (leaf, place) in enumerate(zip(leaves, self.placements)):
            if len(place.dims) > leaf.ndim:
                raise ValueError(f"PartitionSpec of leaf {i} has {len(place.dims)} entries, the leaf {leaf.ndim} dims")

    def _split(self, axes) -> int:
        return math.prod(self.axis_sizes[a] for a in axes)

    def global_shape(self, leaf, i: int) -> tuple[int, ...]:
        dims = self.placements[i].dims
        return tuple(n * (self._split(dims[d]) if d < len(dims) else 1) for d, n in enumerate(leaf.shape))

    def global_count(self, leaf, i: int) -> int:
        return math.prod(self.global_shape(leaf, i))

    def global_indices(self, leaves):
        """uint64 global flat index (in the tree, ``specs/noise.md`` §4) of every local element."""
        out, offset = [], 0
        for i, leaf in enumerate(leaves):
            shape, dims = self.global_shape(leaf, i), self.placements[i].dims
            index = jnp.full(leaf.shape, offset, dtype=jnp.uint64)
            stride = 1
            for d in reversed(range(leaf.ndim)):
                position = jax.lax.broadcasted_iota(jnp.uint64, leaf.shape, d)
                if d < len(dims) and dims[d]:
                    position = position + _block_index(dims[d], self.axis_sizes).astype(jnp.uint64) * leaf.shape[d]
                index = index + position * jnp.uint64(stride)
                stride *= shape[d]
            out.append(index)
            offset += stride
        return out

    def totals(self, leaves):
        """Per segment, the folded sum (float64) of a local block over the whole leaf."""
        return [self._total(self.placements[i].axes, self.global_count(leaf, i)) for i, leaf in enumerate(leaves)]

    def extrema(self, leaves):
        """Per segment, ``(min, max)`` of a local block over the whole leaf."""
        return [self._extrema(self.placements[i].axes) for i in range(len(leaves))]

    def all_devices(self, ok):
        """``ok`` on every device (a traced bool, the same everywhere afterwards)."""
        return jax.lax.pmin(ok.astype(jnp.int32), tuple(self.axis_sizes)) > 0

    @staticmethod
    def _total(axes, count):
        def total(y):
            top = jnp.max(jnp.abs(y)) if y.size else jnp.zeros((), y.dtype)
            if axes:
                top = jax.lax.pmax(top, axes)
            sums = fold_sums(y, fold_exponent(top, count), count)
            return fold_total([jax.lax.psum(s, axes) for s in sums] if axes else sums)

        return total

    @staticmethod
    def _extrema(axes):
        def extrema(u):
            lo, hi = jnp.min(u), jnp.max(u)
            return (jax.lax.pmin(lo, axes), jax.lax.pmax(hi, axes)) if axes else (lo, hi)

        return extrema


def check_per_device(per_device, backend: str) -> None:
    """``per_device`` is None or a :class:`PerDevice`, and only with the native path."""
    if per_device is None:
        return
    if not isinstance(per_device, PerDevice):
        raise TypeError(f"per_device must be a PerDevice(mesh, specs), got {type(per_device).__name__}")
    if backend != "native":
        raise ValueError("per_device needs backend='native' (the kernel path runs eagerly on whole arrays)")


def _block_index(axes, sizes):
    """Row-major index of this device's block over ``axes`` (``PartitionSpec`` order)."""
    index = jnp.zeros((), dtype=jnp.int32)
    for a in axes:
        index = index * sizes[a] + jax.lax.axis_index(a)
    return index


def state_specs(state, per_device: PerDevice):
    """``PartitionSpec``s of an optax state for ``shard_map``'s ``in_specs``/``out_specs``:
    the params-shaped fields (``utility``, ``first_moment``, ``second_moment``) take the
    params' specs; every other leaf (counts, per-segment words, the seed) is replicated."""
    from .state import AdaptiveUPGDState

    def specs_of(node):
        if isinstance(node, AdaptiveUPGDState):
            like = {"utility", "first_moment", "second_moment"}
            return AdaptiveUPGDState(*(per_device.specs if name in like else
                                       jax.tree_util.tree_map(lambda _: PartitionSpec(), getattr(node, name))
                                       for name in AdaptiveUPGDState._fields))
        return jax.tree_util.tree_map(lambda _: PartitionSpec(), node)

    return jax.tree_util.tree_map(specs_of, state, is_leaf=lambda n: isinstance(n, AdaptiveUPGDState))
