"""Flat parameter buffers: one contiguous 1-D buffer per quantity, segments 64-byte aligned.

Normative definition: ``specs/layout.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from array_api_compat import array_namespace, is_numpy_namespace

__all__ = ["FlatLayout", "ALIGNMENT_BYTES", "aligned_zeros"]

ALIGNMENT_BYTES = 64
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


def aligned_zeros(count: int, dtype) -> np.ndarray:
    """A zero-filled 1-D NumPy array whose first element sits on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    raw = np.zeros(count * dtype.itemsize + ALIGNMENT_BYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT_BYTES
    return raw[start : start + count * dtype.itemsize].view(dtype)


def _normalise_shape(index: int, shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"segment {index}: shape must be a tuple of ints, got {shape!r}") from None
    for dim in dims:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise ValueError(f"segment {index}: shape {shape!r} must hold non-negative ints")
    return tuple(int(d) for d in dims)


def _normalise_groups(groups, num_segments: int) -> tuple[int, ...]:
    """Per-segment group ids from either per-segment ids or lists of segment indices."""
    if groups is None:
        return (0,) * num_segments
    groups = list(groups)
    if groups and all(isinstance(g, (int, np.integer)) and not isinstance(g, bool) for g in groups):
        if len(groups) != num_segments:
            raise ValueError(
                f"groups has {len(groups)} entries but the layout has {num_segments} segments"
            )
        if any(g < 0 for g in groups):
            raise ValueError("group ids must be non-negative")
        return tuple(int(g) for g in groups)
    ids = [None] * num_segments
    for group_id, members in enumerate(groups):
        if isinstance(members, (int, np.integer)) or not hasattr(members, "__iter__"):
            raise TypeError("groups must be all segment group ids (ints) or all lists of segment indices")
        for segment in members:
            if isinstance(segment, bool) or not isinstance(segment, (int, np.integer)):
                raise TypeError(f"groups[{group_id}] holds {segment!r}; segment indices are ints")
            if not 0 <= segment < num_segments:
                raise ValueError(f"groups[{group_id}] names segment {segment}, which does not exist")
            if ids[segment] is not None:
                raise ValueError(f"segment {segment} is in groups {ids[segment]} and {group_id}")
            ids[segment] = group_id
    missing = [i for i, g in enumerate(ids) if g is None]
    if missing:
        raise ValueError(f"segments {missing} belong to no group")
    return tuple(ids)


def _layout_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes  # NumPy has no bfloat16; ml_dtypes' is the one JAX uses

        dtype = ml_dtypes.bfloat16
    dtype = np.dtype(dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise TypeError(f"layout dtype must be one of {SUPPORTED_DTYPES}, got {dtype.name}")
    return dtype


def _noise_offsets(offsets, sizes) -> tuple[int, ...]:
    """Per-segment noise offsets: non-negative ints, one per segment, index ranges below 2**64."""
    offsets = list(offsets)
    if len(offsets) != len(sizes):
        raise ValueError(f"noise_offsets has {len(offsets)} entries but the layout has {len(sizes)} segments")
    for i, (offset, size) in enumerate(zip(offsets, sizes)):
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
            raise TypeError(f"segment {i}: noise offset must be an int, got {offset!r}")
        if not 0 <= offset <= 2**64 - size:
            raise ValueError(f"segment {i}: noise offset {offset} must lie in [0, 2**64 - {size}]")
    return tuple(int(o) for o in offsets)


class FlatLayout:
    """Where each segment (parameter tensor) lives inside a flat 1-D buffer.

    Segment ``i`` occupies ``flat[offsets[i] : offsets[i] + sizes[i]]``; every offset is a
    multiple of 64 bytes, the elements between segments (padding) are zero and are never
    read by a reduction nor written by an update. ``logical_offsets[i]`` is the segment's
    start when padding is removed: it is what the noise generator indexes by.
    ``logical_start`` (default 0) is the logical index of the first element: a shard's
    layout (``specs/distributed.md`` §2) covers logical indices ``logical_start ..`` of a
    larger layout, so its normals are that layout's.
    ``noise_offsets[i]`` is the logical index of the segment's
    first element for the noise generator: ``logical_offsets`` unless the layout is one buffer
    of a model held in several (:class:`upgd_ref.multi.MultiLayout` passes the segments'
    indices in the whole model, so the noise does not depend on the grouping).

    >>> layout = FlatLayout([(3, 2), (5,)], dtype="float32")
    >>> layout.offsets, layout.size
    ((0, 16), 32)
    """

    def __init__(self, shapes: Sequence, dtype="float32", groups=None, logical_start: int = 0, noise_offsets=None):
        shapes = list(shapes)
        if not shapes:
            raise ValueError("a FlatLayout needs at least one segment")
        self.shapes = tuple(_normalise_shape(i, s) for i, s in enumerate(shapes))
        dtype = _layout_dtype(dtype)
        self.dtype = dtype
        self.alignment = ALIGNMENT_BYTES // dtype.itemsize
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        if isinstance(logical_start, bool) or not isinstance(logical_start, (int, np.integer)) or logical_start < 0:
            raise ValueError(f"logical_start must be a non-negative int, got {logical_start!r}")
        self.logical_start = int(logical_start)
        offsets, logical, position, logical_position = [], [], 0, self.logical_start
        for size in self.sizes:
            offsets.append(position)
            logical.append(logical_position)
            position += -(-size // self.alignment) * self.alignment
            logical_position += size
        self.offsets = tuple(offsets)
        self.logical_offsets = tuple(logical)
        self.size = position
        self.num_logical = logical_position - self.logical_start
        self.groups = _normalise_groups(groups, len(self.shapes))
        self.noise_offsets = self.logical_offsets if noise_offsets is None else _noise_offsets(noise_offsets, self.sizes)

    @property
    def num_segments(self) -> int:
        return len(self.shapes)

    def __repr__(self) -> str:
        return f"FlatLayout(shapes={list(self.shapes)}, dtype={self.dtype.name!r}, groups={list(self.groups)})"

    def __eq__(self, other) -> bool:
        return isinstance(other, FlatLayout) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.shapes, self.dtype.name, self.groups, self.logical_start, self.noise_offsets))

    def to_dict(self) -> dict:
        out = {
            "shapes": [list(s) for s in self.shapes],
            "dtype": self.dtype.name,
            "groups": list(self.groups),
        }
        if self.logical_start:  # only a shard's layout has one: other layouts' dicts are unchanged
            out["logical_start"] = self.logical_start
        if self.noise_offsets != self.logical_offsets:  # only a part of a MultiLayout: older dicts unchanged
            out["noise_offsets"] = list(self.noise_offsets)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FlatLayout:
        return cls([tuple(s) for s in data["shapes"]], data["dtype"], data.get("groups"), data.get("logical_start", 0),
                   data.get("noise_offsets"))

    def widened(self, dtype) -> FlatLayout:
        """This layout with elements of ``dtype`` (wider) at the same element offsets: a
        16-bit buffer and its float32 copy share offsets, so ``buffer.astype`` converts one
        into the other (``specs/precision.md``)."""
        twin = FlatLayout(self.shapes, dtype, self.groups, self.logical_start, self.noise_offsets)
        if twin.dtype.itemsize < self.dtype.itemsize:
            raise ValueError(f"widened: {twin.dtype.name} is narrower than {self.dtype.name}")
        twin.alignment, twin.offsets, twin.size = self.alignment, self.offsets, self.size
        return twin

    def segment_slice(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.sizes[index])

    def zeros(self, dtype=None) -> np.ndarray:
        """A new zero NumPy buffer for this layout, 64-byte aligned."""
        return aligned_zeros(self.size, self.dtype if dtype is None else dtype)

    def pack(self, arrays: Sequence):
        """A new flat buffer, of the inputs' array type, holding ``arrays`` (one per segment).

        Values are converted to the layout's dtype; NumPy results are 64-byte aligned.
        """
        arrays = list(arrays)
        if len(arrays) != self.num_segments:
            raise ValueError(f"pack got {len(arrays)} arrays for {self.num_segments} segments")
        xp = array_namespace(*arrays)
        for i, (array, shape) in enumerate(zip(arrays, self.shapes)):
            if tuple(array.shape) != shape:
                raise ValueError(f"segment {i}: expected shape {shape}, got {tuple(array.shape)}")
            if getattr(array.dtype, "name", None) != "bfloat16" and not xp.isdtype(array.dtype, "real floating"):
                raise TypeError(f"segment {i}: expected a real floating dtype, got {array.dtype}")
        if is_numpy_namespace(xp):
            out = self.zeros()
            for i, array in enumerate(arrays):
                out[self.segment_slice(i)] = np.reshape(array, (-1,))
            return out
        dtype = getattr(xp, self.dtype.name)
        pieces = []
        for i, array in enumerate(arrays):
            padded = -(-self.sizes[i] // self.alignment) * self.alignment
            pieces.append(xp.astype(xp.reshape(array, (-1,)), dtype))
            pieces.append(xp.zeros((padded - self.sizes[i],), dtype=dtype))
        return xp.concat(pieces)

    def unpack(self, flat) -> list:
        """Per-segment arrays (views where the array type has views) of a flat buffer."""
        shape = tuple(getattr(flat, "shape", ()))
        if shape != (self.size,):
            raise ValueError(f"flat buffer must have shape ({self.size},), got {shape}")
        xp = array_namespace(flat)
        return [xp.reshape(flat[self.segment_slice(i)], s) for i, s in enumerate(self.shapes)]
