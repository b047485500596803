r"""Shards of dim-0 row ranges (FSDP2, DTensor ``Shard(0)``): the partition of ``specs/distributed.md`` §2a.

Rank ``r`` owns, in every tensor, a range of its dim-0 rows (:func:`dim0_ranges`: torch's
``chunk`` split, as ``distribute_tensor(..., [Shard(0)])`` and ``fully_shard`` cut), so its
elements are one logical range per tensor, whose ends in general are not chunk boundaries.
Its pieces are those ranges cut at the segment's chunk boundaries (``CHUNK = 2048``): whole
chunks, and *cut pieces* (part of a chunk that other ranks share). The pieces' layout
carries their global logical indices as ``noise_offsets``, so they draw the unsharded
normals.

Exactness: the order-free partials (``min u``, ``max u``, ``max|p|``, ``max|d|``, the
non-finite count) combine from any cut. The two sums of a cut chunk are taken whole: every
rank's gradient values of its cut pieces are all-gathered, every rank assembles each cut
chunk and reduces it with the backend's pass 1 (the kernels' lane order), and
:meth:`RowPartition.fold_rows` puts those sums in the chunk's place, in global chunk order,
where the cut pieces' own sums are replaced by ``+0`` (an exact no-op for a running sum that
starts at ``+0``). The per-segment sums are then the unsharded kernels' bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .kernels.chunk_abi import CHUNK
from .layout import FlatLayout
from .sharding import SUM_COLUMNS, PieceBuffers

__all__ = ["RowPartition", "RowShard", "dim0_ranges"]


def dim0_ranges(layout: FlatLayout, world_size: int) -> list[list[tuple[int, int, int]]]:
    """Per rank, its ``(segment, first, stop)`` element ranges: rows ``[r c, (r + 1) c)`` of each
    tensor, ``c = ceil(rows / W)`` (``torch.chunk``, FSDP2's split); a 0-d tensor is rank 0's."""
    out = [[] for _ in range(world_size)]
    for i, shape in enumerate(layout.shapes):
        rows = shape[0] if shape else 1
        row_size = math.prod(shape[1:]) if shape else 1
        per_rank = -(-rows // world_size) if rows else 0
        for r in range(world_size):
            first, stop = min(r * per_rank, rows), min((r + 1) * per_rank, rows)
            if stop > first:
                out[r].append((i, first * row_size, stop * row_size))
    return out


@dataclass(frozen=True)
class RowShard(PieceBuffers):
    """Rank ``rank``'s pieces: ``parents[k]`` the segment, ``within[k]`` the first element inside
    it; ``cut[k]``: the piece is part of a chunk shared with other ranks; ``local``: the
    pieces' layout (None without pieces). Values in piece order (:class:`~upgd_ref.sharding.PieceBuffers`)."""

    layout: FlatLayout
    rank: int
    parents: np.ndarray
    within: np.ndarray
    cut: np.ndarray
    local: FlatLayout | None

    @classmethod
    def of(cls, layout: FlatLayout, rank: int, ranges: Sequence[tuple[int, int, int]]) -> RowShard:
        parents, within, lengths, cut = [], [], [], []
        for segment, first, stop in ranges:
            size = layout.sizes[segment]
            if not 0 <= first < stop <= size:
                raise ValueError(f"shard {rank}: range [{first}, {stop}) is not inside segment {segment} of {size}")
            start = first
            while start < stop:
                chunk = start - start % CHUNK
                end = min(chunk + CHUNK, stop)
                parents.append(segment)
                within.append(start)
                lengths.append(end - start)
                cut.append(start != chunk or end != min(chunk + CHUNK, size))
                start = end
        local = None if not parents else FlatLayout(
            [(n,) for n in lengths], layout.dtype, groups=[layout.groups[i] for i in parents],
            noise_offsets=[layout.logical_offsets[i] + w for i, w in zip(parents, within)])
        as_array = lambda values, dtype=np.int64: np.asarray(values, dtype=dtype)
        return cls(layout, rank, as_array(parents), as_array(within), as_array(cut, np.bool_), local)

    @property
    def cut_size(self) -> int:
        """How many elements the cut pieces hold (this rank's part of the shared chunks)."""
        return 0 if self.local is None else int(np.asarray(self.local.sizes)[self.cut].sum())

    def cut_values(self, local) -> np.ndarray:
        """The values of the cut pieces of a buffer of the pieces, in piece order."""
        if self.local is None:
            return np.zeros(0, dtype=self.layout.dtype)
        parts = [local[self.local.segment_slice(k)] for k in np.flatnonzero(self.cut)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.layout.dtype)


class RowPartition:
    """Every rank's :class:`RowShard` of ``layout`` (default ranges: :func:`dim0_ranges`), and the
    chunks their cuts share: ``cut_layout`` (one segment per cut chunk, shapes ``(n,)``),
    ``cut_parents`` (their segments)."""

    def __init__(self, layout: FlatLayout, world_size: int, ranges=None):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        ranges = dim0_ranges(layout, world_size) if ranges is None else ranges
        if len(ranges) != world_size:
            raise ValueError(f"{len(ranges)} rank ranges for world_size {world_size}")
        self.layout, self.world_size = layout, world_size
        #: Per rank, its ``(segment, first, stop)`` element ranges.
        self.ranges = tuple(tuple((int(i), int(a), int(b)) for i, a, b in rs) for rs in ranges)
        self.shards = tuple(RowShard.of(layout, r, rs) for r, rs in enumerate(self.ranges))
        owned = np.zeros(layout.num_logical, dtype=np.int64)
        for shard in self.shards:
            for k in range(shard.num_pieces):
                first = layout.logical_offsets[shard.parents[k]] + shard.within[k]
                owned[first : first + shard.local.sizes[k]] += 1
        if not (owned == 1).all():
            raise ValueError("the ranks' ranges must cover every element of the layout exactly once")
        chunks = sorted({(int(s.parents[k]), int(s.within[k] - s.within[k] % CHUNK))
                         for s in self.shards for k in np.flatnonzero(s.cut)})
        self._chunk_index = {key: c for c, key in enumerate(chunks)}
        self.cut_parents = np.asarray([segment for segment, _ in chunks], dtype=np.int64)
        self.cut_layout = None if not chunks else FlatLayout(
            [(min(CHUNK, layout.sizes[s] - w),) for s, w in chunks], layout.dtype,
            groups=[layout.groups[s] for s, _ in chunks])

    @property
    def has_cuts(self) -> bool:
        return self.cut_layout is not None

    def assemble_cut_chunks(self, fragments: Sequence[np.ndarray]) -> np.ndarray:
        """A flat buffer of ``cut_layout`` from every rank's :meth:`RowShard.cut_values`, in rank order."""
        out = self.cut_layout.zeros()
        for shard, values in zip(self.shards, fragments):
            position = 0
            for k in np.flatnonzero(shard.cut):
                segment, start, n = int(shard.parents[k]), int(shard.within[k]), int(shard.local.sizes[k])
                chunk = self._chunk_index[segment, start - start % CHUNK]
                target = self.cut_layout.offsets[chunk] + start % CHUNK
                out[target : target + n] = values[position : position + n]
                position += n
        return out

    def fold_rows(self, tables: Sequence[np.ndarray], cut_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(parents, rows)`` in global chunk order for :func:`~upgd_ref.sharding.combine_chunk_partials`:
        every rank's piece rows (``tables``, rank order) by ``(segment, first element)``, the cut
        pieces' sums set to ``+0``, each cut chunk's row of sums (``cut_rows``, its other
        columns neutral) placed before the chunk's pieces."""
        segments = np.concatenate([s.parents for s in self.shards] + [self.cut_parents])
        firsts = np.concatenate([s.within for s in self.shards]
                                + [np.asarray([w for _, w in self._chunk_index], dtype=np.int64)])
        rows = [np.asarray(t, dtype=np.float64).reshape(-1, 7).copy() for t in tables]
        for shard, table in zip(self.shards, rows):
            table[np.ix_(shard.cut, SUM_COLUMNS)] = 0.0
        extra = np.zeros((self.cut_parents.size, 7))
        extra[:, 2], extra[:, 3] = np.inf, -np.inf  # min u, max u neutral; the maxima of |.| and the count 0
        extra[:, SUM_COLUMNS] = np.asarray(cut_rows)[:, SUM_COLUMNS]
        rows = np.concatenate([*rows, extra])
        is_piece = np.concatenate([np.ones(segments.size - self.cut_parents.size), np.zeros(self.cut_parents.size)])
        order = np.lexsort((is_piece, firsts, segments))
        return segments[order], rows[order]
