r"""Sharded steps: each rank owns a contiguous range of a layout's elements (``specs/distributed.md``).

A :class:`Partition` cuts the logical elements of a :class:`~upgd_ref.layout.FlatLayout` into
``world_size`` contiguous ranges ``[start_r, end_r)``, in rank order, each boundary on a
chunk boundary (a segment's first element plus a multiple of ``CHUNK = 2048``, or its end;
``specs/kernels.md`` §2): a boundary may cut a tensor, never a chunk. Rank ``r``'s
:class:`Shard` sees its range as a layout of *pieces*, one per chunk, whose logical
indices are the full layout's (``FlatLayout(logical_start=start_r)``), so it draws the same
normals.

A step on a shard (:func:`sharded_step`) is the door's stages (``specs/step.md`` §2) with the
combination spread over the ranks:

1. pass 1 on the shard's pieces (any backend): one row of partials per chunk,
   ``(sum g, sum g^2, min u, max u, max|p|, max|d|, nonfinite)``;
2. ``all_gather`` of every rank's rows, sent compactly (:func:`pack_partials`: the two sums
   per chunk, the order-free columns once per segment); :func:`combine_chunk_partials` folds them in global
   chunk order (rank order is chunk order): per segment ``S = ((0 + c_0) + c_1) + ...``,
   exactly the kernels' host combination, and min/max (exact in any order);
3. the plan, VGS statistics and refusal of the door (:mod:`upgd_ref.stages`) on the combined
   per-segment values, computed identically on every rank (replicated per-segment records);
4. pass 2 on the pieces with the plan taken to them.

Every rank holds the same per-segment records (``t_i``, ``n_i``, the VGS ``a_i``, ``b_i``)
and only its range of ``u``, ``m``, ``v``. The result is the same bits for every world size
and every partition; on the chunked kernel backends (Numba, CUDA), whose single-process sums
are these chunk partials in chunk order, it is also the single-process step's bits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .backends import select_backend
from .checkpoint import MAX_STEP
from .checks import NonFiniteStepError, check_distinct, check_flat_buffer, check_not_aliased
from .hyperparams import check_coefficients
from .kernels.chunk_abi import CHUNK
from .layout import FlatLayout
from .reference import StepStats
from .stages import SegmentReductions, StepPlan, commit, plan_step, refusal, vgs_commit, vgs_next
from .state import UPGD_FORMAT, UPGD_VERSION, FlatUPGDState
from .step import StepRequest, VGSRequest, check_vgs_request

__all__ = ["Partition", "PieceBuffers", "Shard", "ShardState", "chunk_boundaries", "combine_chunk_partials", "sharded_step",
           "consolidate_states", "pack_partials", "unpack_partials", "message_length", "PARTIAL_COLUMNS"]

#: The columns of a shard's partials table, one row per chunk (the fields of SegmentReductions).
PARTIAL_COLUMNS = SegmentReductions._fields
#: The columns that depend on the order of the elements (the two sums): sent per chunk. The
#: others (extrema, non-finite count) are exact in any order: sent combined per segment.
SUM_COLUMNS = (0, 1)
ORDER_FREE_COLUMNS = tuple(c for c in range(len(PARTIAL_COLUMNS)) if c not in SUM_COLUMNS)


def _fold(column: int):
    """How partials of ``column`` combine: the minimum of the utility minima, the maximum of
    the maxima, else a sum."""
    name = PARTIAL_COLUMNS[column]
    return {"utility_min": np.minimum}.get(name, np.maximum if name.endswith("max") else np.add)


def _neutral(column: int) -> float:
    """The value of ``column`` that its fold leaves unchanged."""
    fold = _fold(column)
    return np.inf if fold is np.minimum else -np.inf if fold is np.maximum else 0.0


def message_length(parents) -> int:
    """Length of a rank's partials message (:func:`pack_partials`) for pieces of segments ``parents``."""
    return len(SUM_COLUMNS) * len(parents) + len(ORDER_FREE_COLUMNS) * np.unique(parents).size


def pack_partials(rows, parents) -> np.ndarray:
    """A rank's partials as it sends them (``specs/distributed.md`` §4): its pieces' two sums,
    piece by piece, then per segment of its pieces (ascending) the order-free columns folded
    over its pieces of that segment, from their neutral values."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, len(PARTIAL_COLUMNS))
    segments, inverse = np.unique(np.asarray(parents, dtype=np.int64), return_inverse=True)
    combined = np.empty((len(ORDER_FREE_COLUMNS), segments.size))
    with np.errstate(all="ignore"):
        for values, column in zip(combined, ORDER_FREE_COLUMNS):
            values[...] = _neutral(column)
            _fold(column).at(values, inverse, rows[:, column])  # row by row, in piece order
    return np.concatenate([rows[:, SUM_COLUMNS].ravel(), combined.T.ravel()])


def unpack_partials(message, parents) -> np.ndarray:
    """The ``(P, 7)`` rows a :func:`pack_partials` message stands for: each piece's sums, the
    combined order-free values on the first piece of each segment, neutral values on the
    others. Folded in the same order they give the same bits as the original rows (min and
    max are exact and keep the first of equal values, the counts are small integers)."""
    parents = np.asarray(parents, dtype=np.int64)
    n, message = parents.size, np.asarray(message, dtype=np.float64)
    if message.size != message_length(parents):
        raise ValueError(f"a partials message of {message.size} values for {n} pieces; expected "
                         f"{message_length(parents)}")
    rows = np.empty((n, len(PARTIAL_COLUMNS)))
    rows[:, SUM_COLUMNS] = message[: len(SUM_COLUMNS) * n].reshape(n, len(SUM_COLUMNS))
    for column in ORDER_FREE_COLUMNS:
        rows[:, column] = _neutral(column)
    first = np.unique(parents, return_index=True)[1]
    rows[np.ix_(first, ORDER_FREE_COLUMNS)] = message[len(SUM_COLUMNS) * n :].reshape(-1, len(ORDER_FREE_COLUMNS))
    return rows


def chunk_boundaries(layout: FlatLayout) -> np.ndarray:
    """The logical indices where a shard may start: every chunk's first element, and the end."""
    starts = [np.arange(o, o + n, CHUNK, dtype=np.int64) for o, n in zip(layout.logical_offsets, layout.sizes)]
    return np.unique(np.concatenate([*starts, [layout.num_logical]]))


class PieceBuffers:
    """Moving values between a flat buffer of the full ``layout`` and a buffer of a shard's
    pieces (``local``; piece ``k`` is elements ``within[k] ..`` of segment ``parents[k]``);
    the values of a shard are its pieces' elements in piece order."""

    layout: FlatLayout
    parents: np.ndarray
    within: np.ndarray
    local: FlatLayout | None

    @property
    def num_pieces(self) -> int:
        return int(self.parents.size)

    @property
    def num_elements(self) -> int:
        """How many of the layout's elements the pieces hold."""
        return 0 if self.local is None else int(sum(self.local.sizes))

    def local_zeros(self, dtype=None) -> np.ndarray:
        """A zero flat buffer of the pieces (length 0 for an empty shard)."""
        return np.zeros(0, dtype=self.layout.dtype) if self.local is None else self.local.zeros(dtype)

    def take(self, full) -> np.ndarray:
        """This rank's elements of a flat buffer of the full layout, as a buffer of the pieces."""
        out = self.local_zeros()
        for k in range(self.num_pieces):
            source = self.layout.offsets[self.parents[k]] + self.within[k]
            out[self.local.segment_slice(k)] = full[source : source + self.local.sizes[k]]
        return out

    def logical(self, local) -> np.ndarray:
        """The pieces' elements in piece order (padding removed; a Shard's are in logical order)."""
        if self.local is None:
            return np.zeros(0, dtype=self.layout.dtype)
        return np.concatenate([local[self.local.segment_slice(k)] for k in range(self.num_pieces)])

    def pieces(self, logical_values) -> np.ndarray:
        """A buffer of the pieces holding this rank's logical values (inverse of :meth:`logical`)."""
        out = self.local_zeros()
        position = 0
        for k in range(self.num_pieces):
            n = int(self.local.sizes[k])
            out[self.local.segment_slice(k)] = logical_values[position : position + n]
            position += n
        return out

    def put(self, logical_values, full) -> None:
        """Write this rank's logical values into a flat buffer of the full layout."""
        position = 0
        for k in range(self.num_pieces):
            n, target = int(self.local.sizes[k]), self.layout.offsets[self.parents[k]] + self.within[k]
            full[target : target + n] = logical_values[position : position + n]
            position += n


@dataclass(frozen=True)
class Shard(PieceBuffers):
    """Rank ``rank``'s part of ``layout``: logical elements ``[start, end)`` as chunk-sized pieces.

    ``parents[k]`` is the segment of piece ``k``, ``within[k]`` its first element inside that
    segment; ``local`` is the pieces' layout (one segment of shape ``(n,)`` per piece, the
    full layout's logical indices). A rank whose range is empty has ``local = None``.
    """

    layout: FlatLayout
    rank: int
    start: int
    end: int
    parents: np.ndarray
    within: np.ndarray
    local: FlatLayout | None

    @classmethod
    def of(cls, layout: FlatLayout, rank: int, start: int, end: int) -> Shard:
        bounds = chunk_boundaries(layout)
        for name, value in (("start", start), ("end", end)):
            if value not in bounds:
                raise ValueError(f"shard {rank}: {name} = {value} is not a chunk boundary of the layout "
                                 f"(a segment's first element plus a multiple of {CHUNK}, or its end)")
        if start > end:
            raise ValueError(f"shard {rank}: start {start} > end {end}")
        firsts = bounds[(bounds >= start) & (bounds < end)]
        ends = np.append(firsts[1:], end)
        logical = np.asarray(layout.logical_offsets, dtype=np.int64)
        nonempty = np.flatnonzero(np.asarray(layout.sizes) > 0)  # an empty segment has no chunk
        parents = nonempty[np.searchsorted(logical[nonempty], firsts, side="right") - 1]
        within = firsts - logical[parents]
        local = None if firsts.size == 0 else FlatLayout(
            [(int(n),) for n in ends - firsts], layout.dtype, groups=[layout.groups[int(i)] for i in parents],
            logical_start=int(start))
        return cls(layout, rank, int(start), int(end), parents.astype(np.int64), within.astype(np.int64), local)

class Partition:
    """``world_size`` contiguous shards of ``layout`` on chunk boundaries, in rank order.

    ``bounds``: the ``world_size + 1`` logical indices ``0 = b_0 <= ... <= b_W = num_logical``
    (default: the chunk boundaries nearest to ``r num_logical / W``, the most even split).
    """

    def __init__(self, layout: FlatLayout, world_size: int, bounds: Sequence[int] | None = None):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if layout.logical_start:
            raise ValueError("a shard's layout cannot be partitioned again")
        if bounds is None:
            candidates = chunk_boundaries(layout)
            targets = [r * layout.num_logical / world_size for r in range(1, world_size)]
            inner = [int(candidates[np.argmin(np.abs(candidates - t))]) for t in targets]
            bounds = [0, *inner, layout.num_logical]
        bounds = [int(b) for b in bounds]
        if len(bounds) != world_size + 1 or bounds[0] != 0 or bounds[-1] != layout.num_logical:
            raise ValueError(f"bounds must be {world_size + 1} indices from 0 to {layout.num_logical}, got {bounds}")
        if any(a > b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"bounds must not decrease, got {bounds}")
        self.layout, self.world_size, self.bounds = layout, world_size, tuple(bounds)
        self.shards = tuple(Shard.of(layout, r, a, b) for r, (a, b) in enumerate(itertools.pairwise(bounds)))

    #: Shards on chunk boundaries share no chunk (:class:`~upgd_ref.sharding_rows.RowPartition`'s may).
    has_cuts = False

    def __repr__(self) -> str:
        return f"Partition({self.layout!r}, world_size={self.world_size}, bounds={list(self.bounds)})"


def combine_chunk_partials(layout: FlatLayout, parents: Sequence[np.ndarray],
                           tables: Sequence[np.ndarray]) -> SegmentReductions:
    """Per-segment reductions from every rank's chunk partials, in rank (= global chunk) order.

    ``tables[r]``: rank ``r``'s ``(P_r, 7)`` rows (columns :data:`PARTIAL_COLUMNS`), ``parents[r]``
    their segments. Sums and counts are added one row at a time starting from 0 (the kernels'
    host order, ``specs/kernels.md`` §2); extrema are exact in any order. A segment without
    chunks keeps ``0``, ``+inf``, ``-inf``.
    """
    out = SegmentReductions.empty(layout.num_segments)
    segments = np.concatenate([np.asarray(p, dtype=np.int64) for p in parents])
    rows = np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1, len(PARTIAL_COLUMNS)) for t in tables])
    if rows.shape[0] != segments.size:
        raise ValueError(f"{rows.shape[0]} partial rows for {segments.size} chunks")
    with np.errstate(all="ignore"):  # non-finite sums are refused by the plan's checks
        for column, combined in enumerate(out):
            _fold(column).at(combined, segments, rows[:, column])  # unbuffered: row by row, in order
    return out


@dataclass
class ShardState:
    """One rank's optimizer state: the per-segment records of the whole layout (the same on
    every rank) and ``u``, ``m``, ``v`` of its range only (flat buffers of the pieces)."""

    step: int
    segment_step: np.ndarray  # int64 (S,)
    grad_norm_ema: np.ndarray  # float64 (S,)
    utility: np.ndarray
    first_moment: np.ndarray
    second_moment: np.ndarray
    skipped_steps: int = 0

    BUFFERS = FlatUPGDState.BUFFERS

    @classmethod
    def zeros(cls, shard: Shard, noise_ema_init) -> ShardState:
        s = shard.layout.num_segments
        return cls(0, np.zeros(s, dtype=np.int64), np.broadcast_to(np.asarray(noise_ema_init, np.float64), (s,)).copy(),
                   *(shard.local_zeros() for _ in cls.BUFFERS))

    @classmethod
    def from_state(cls, state: dict, shard: Shard) -> ShardState:
        """This rank's part of a consolidated state (``FlatUPGDState.to_state`` of the full
        layout, e.g. ``AdaptiveUPGD.state_dict()["state"]``, checked by the full layout's reader)."""
        full = FlatUPGDState.from_state_dict({"format": UPGD_FORMAT, "version": UPGD_VERSION, "state": state},
                                             shard.layout)
        return cls(full.step, full.segment_step, full.grad_norm_ema,
                   *(shard.take(getattr(full, name)) for name in cls.BUFFERS), skipped_steps=full.skipped_steps)

    @classmethod
    def from_part(cls, part: dict, shard: Shard) -> ShardState:
        """The inverse of :meth:`to_state` for the same shard (a per-rank state dict)."""
        s, n = shard.layout.num_segments, shard.num_elements
        buffers = {}
        for name in cls.BUFFERS:
            values = np.asarray(part[name], dtype=shard.layout.dtype)
            if values.shape != (n,):
                raise ValueError(f"state field {name!r} has shape {values.shape}; shard {shard.rank} owns {n} elements")
            buffers[name] = shard.pieces(values)
        records = {"segment_step": np.asarray(part["segment_step"], dtype=np.int64),
                   "grad_norm_ema": np.asarray(part["grad_norm_ema"], dtype=np.float64)}
        for name, values in records.items():
            if values.shape != (s,):
                raise ValueError(f"state field {name!r} has shape {values.shape}; the layout has {s} segments")
        return cls(int(part["step"]), **records, **buffers, skipped_steps=int(part.get("skipped_steps", 0)))

    def to_state(self, shard: Shard) -> dict:
        """This rank's part of the state: the records and its logical range of each buffer."""
        return {"step": self.step, "segment_step": self.segment_step.copy(), "grad_norm_ema": self.grad_norm_ema.copy(),
                "skipped_steps": self.skipped_steps, **{n: shard.logical(getattr(self, n)) for n in self.BUFFERS}}

    def pieces(self, shard: Shard) -> FlatUPGDState:
        """The state record a backend's passes take for the shard's pieces (records per piece)."""
        return FlatUPGDState(self.step, self.segment_step[shard.parents], self.utility, self.first_moment,
                             self.second_moment, self.grad_norm_ema[shard.parents])


def consolidate_states(parts: Sequence[dict]) -> dict:
    """The full layout's state (``FlatUPGDState.to_state`` format) from every rank's
    :meth:`ShardState.to_state`, in rank order: records of rank 0, buffers concatenated."""
    first = parts[0]
    for r, part in enumerate(parts[1:], 1):
        if part["step"] != first["step"] or not np.array_equal(part["segment_step"], first["segment_step"]):
            raise ValueError(f"rank {r}'s per-segment records differ from rank 0's: not one sharded optimizer")
    return {**{k: first[k] for k in ("step", "segment_step", "grad_norm_ema", "skipped_steps")},
            **{n: np.concatenate([part[n] for part in parts]) for n in ShardState.BUFFERS}}


def _on_pieces(plan: StepPlan, shard: Shard) -> StepPlan:
    """The plan's per-segment values taken to the shard's pieces (global ones unchanged)."""
    p = shard.parents
    return plan._replace(segment_step=plan.segment_step[p], grad_norm_ema=plan.grad_norm_ema[p], std=plan.std[p])


def _cut_chunk_sums(partition, fragments, impl, request: StepRequest, factor: float) -> np.ndarray:
    """The partials rows of the chunks that several ranks share (a row partition's cut chunks),
    assembled whole from every rank's gradient values: pass 1 on them (the lane order of an
    unsharded chunk); only the two sums are used."""
    cut, parents = partition.cut_layout, partition.cut_parents
    present = np.asarray(request.present, dtype=np.bool_)[parents].tolist()
    reductions = impl.first_pass(layout=cut, params=cut.zeros(), grads=partition.assemble_cut_chunks(fragments),
                                 state=FlatUPGDState.zeros(cut, 0.0), present=present,
                                 hyper=[request.hyper[i] for i in parents], vgs_factor=factor, variant=request.variant)
    return np.stack(reductions, axis=1)


def sharded_step(partition: Partition, rank: int, params, grads, state: ShardState, request: StepRequest, *,
                 all_gather: Callable[[np.ndarray, list[int]], Sequence[np.ndarray]], vgs: VGSRequest | None = None,
                 backend="auto") -> StepStats:
    """One step of rank ``rank`` on its shard: ``params``, ``state`` (and ``grads`` with ``vgs``)
    updated in place, bit-identical on every rank to the same step of any other partition.

    ``params``, ``grads``: flat buffers of the shard's pieces (:meth:`Shard.take` of the full
    ones); ``request``: the full layout's :class:`~upgd_ref.step.StepRequest` (the same on
    every rank); ``vgs``: the full layout's :class:`~upgd_ref.step.VGSRequest` (replicated
    statistics). ``all_gather(values, lengths)`` returns every rank's 1-D ``values`` in rank
    order, rank ``r``'s of length ``lengths[r]``: the partials messages (:func:`pack_partials`;
    every rank calls it exactly once per step, also when the step is refused), and for a
    :class:`~upgd_ref.sharding_rows.RowPartition` with cut chunks a second time, the gradient
    values of the cut pieces.
    """
    shard, layout = partition.shards[rank], partition.layout
    request = request.checked(layout.num_segments)
    vgs = None if vgs is None else check_vgs_request(vgs, layout)
    local = shard.local
    if local is not None:
        check_flat_buffer("params", params, local, writable=True)
        check_flat_buffer("grads", grads, local, writable=vgs is not None)
        check_distinct(params=params, grads=grads)
        check_not_aliased({"params": params, "grads": grads}, {f"state.{n}": getattr(state, n) for n in state.BUFFERS})
    for i, h in enumerate(request.hyper):
        if request.present[i]:
            check_coefficients(h, layout.dtype, request.variant, where=f"segment {i}: ")
    if state.step >= MAX_STEP:
        raise OverflowError(f"the step count has reached {MAX_STEP}, the largest a checkpoint can hold")
    factor = 1.0 if vgs is None else vgs.factor
    present = np.asarray(request.present, dtype=np.bool_)
    if local is None:
        rows = np.zeros((0, len(PARTIAL_COLUMNS)))
    else:
        impl = select_backend(backend, params)
        local_present = present[shard.parents].tolist()
        local_hyper = [request.hyper[i] for i in shard.parents]
        reductions = impl.first_pass(layout=local, params=params, grads=grads, state=state.pieces(shard),
                                     present=local_present, hyper=local_hyper, vgs_factor=factor,
                                     variant=request.variant)
        rows = np.stack(reductions, axis=1)
    messages = all_gather(pack_partials(rows, shard.parents), [message_length(s.parents) for s in partition.shards])
    gathered = [unpack_partials(m, s.parents) for m, s in zip(messages, partition.shards)]
    if partition.has_cuts:  # the shared chunks' sums from their whole gradient, in global chunk order
        fragments = all_gather(shard.cut_values(grads), [s.cut_size for s in partition.shards])
        cut_rows = _cut_chunk_sums(partition, fragments, select_backend(backend, params), request, factor)
        folded = partition.fold_rows(gathered, cut_rows)
        reductions = combine_chunk_partials(layout, [folded[0]], [folded[1]])
    else:
        reductions = combine_chunk_partials(layout, [s.parents for s in partition.shards], gathered)
    plan = plan_step(layout.dtype, state, request.present, request.hyper, reductions, request.noise_norm)
    vgs_new = None if vgs is None else vgs_next(vgs.state, reductions, layout.sizes, request.present, vgs.beta)
    refused = refusal(layout.dtype, plan, reductions, request.hyper, request.present, request.variant, vgs_new)
    if refused is not None:  # every rank refuses the same step: the reductions are the same
        if request.nonfinite == "skip":
            state.skipped_steps += 1
            return plan.stats._replace(skipped=True)
        raise NonFiniteStepError(f"{refused.message}; nothing was changed", field=refused.field,
                                 segment=refused.segment)
    if plan.run and local is not None:
        impl.second_pass(layout=local, params=params, grads=grads, state=state.pieces(shard),
                         present=local_present, hyper=local_hyper, plan=_on_pieces(plan, shard), seed=request.seed,
                         variant=request.variant, vgs_factor=factor, noise_version=request.noise_version)
    commit(state, plan)
    if vgs is not None:
        vgs_commit(vgs.state, vgs_new)
    return plan.stats

