"""State sharding on ``torch.distributed``: what an optimizer built with ``process_group=``
runs instead of the single-process door (``specs/distributed.md``, ``adapters-torch.md`` §4.1).

Every rank holds the full parameters in its flat buffer and only its range of ``u``, ``m``,
``v`` (:class:`upgd_ref.sharding.ShardState`). A step runs
:func:`upgd_ref.sharding.sharded_step` on the rank's range with an all-gather of the chunk
partials over the group. ``shard_mode="zero1"``: the gradients are the full averaged ones
(DDP), and the updated ranges are all-gathered into every rank's parameters.
``shard_mode="zero2"``: the caller reduce-scatters the gradients into :attr:`grad_shard`
(this rank's range, logical order), the step updates the rank's range of the parameters
only, and :meth:`ShardedRecord.gather_params` all-gathers them when the caller needs them.
No math here: the partition, the combination order and the stages are the core's.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from upgd_ref.sharding import (
    Partition,
    ShardState,
    consolidate_states,
    sharded_step,
)
from upgd_ref.state import UPGD_FORMAT, UPGD_VERSION, FlatUPGDState
from upgd_ref.step import VGSRequest

from .state_views import StateSource, StateView

#: The per-rank state dict's extra top-level key, and the version of its entry.
SHARD_KEY = "upgd_ref_shard"
SHARD_FORMAT_VERSION = 1
#: ``"zero1"``: averaged full gradients in, full parameters out; ``"zero2"``: the rank's
#: gradient range in (:attr:`ShardedRecord.grad_shard`), its parameter range updated.
SHARD_MODES = ("zero1", "zero2")
#: The records whose ranks hold only their part of the gradient, which ``step(vgs=scaler)``
#: serves (a DTensor record's mode is ``"dtensor"``).
FUSED_VGS_MODES = ("zero2", "dtensor")


def refuse_sharded(sharded, what: str) -> None:
    """What a sharded optimizer cannot do (it holds only its range of the state)."""
    if sharded is not None:
        raise RuntimeError(f"{what}: not available with a process_group (each rank holds only its range of the "
                           "state); use consolidated_state_dict(), a collective")


def check_shard_mode(process_group, shard_mode) -> str:
    """``shard_mode`` checked: one of :data:`SHARD_MODES`, and ``"zero2"`` only with a group."""
    if shard_mode not in SHARD_MODES:
        raise ValueError(f"shard_mode must be one of {SHARD_MODES}, got {shard_mode!r}")
    if shard_mode != "zero1" and process_group is None:
        raise ValueError(f"shard_mode={shard_mode!r} needs a process_group")
    return shard_mode


def zero2_record(sharded, what: str) -> ShardedRecord:
    """``sharded`` when it is a ``shard_mode="zero2"`` record, else a ``RuntimeError`` naming ``what``."""
    if sharded is None or sharded.grad_shard is None:
        raise RuntimeError(f"{what}: only with process_group= and shard_mode='zero2'")
    return sharded


def fused_vgs(scaler, layout, sharded, flipped) -> VGSRequest | None:
    """The core's fused VGS request of a ``VarianceGradientScaler`` over the optimizer's
    parameters (``optimizer.step(vgs=scaler)`` under ``shard_mode="zero2"`` or with DTensor
    parameters, the optimizer's
    record ``sharded``): its statistics (advanced in place by the step), factor and ``beta``.
    Refused with maximized segments (``flipped``): the fused sums are of the step's ``-g``,
    where the scaler's own step sums ``g``."""
    if scaler is None:
        return None
    if sharded is None or sharded.shard_mode not in FUSED_VGS_MODES:
        raise ValueError("step(vgs=scaler) is for shard_mode='zero2' and DTensor parameters (each rank holds its "
                         "part of the gradient); otherwise call the scaler's scale_gradients() and step() around "
                         "optimizer.step()")
    stats = scaler.stats
    if stats.grad_mean_avg.shape != (layout.num_segments,) or scaler._layout is None \
            or scaler._layout.sizes != layout.sizes:
        raise ValueError("step(vgs=scaler): the scaler must track exactly the optimizer's parameters, in its order")
    if flipped:
        raise ValueError("step(vgs=scaler) with maximize=True: the fused statistics would be those of -g; "
                         "not supported")
    return VGSRequest(stats, scaler.get_scaling_factor(), scaler.beta)


class ShardedRecord:
    """A sharded optimizer's partition, this rank's shard and state, its process group, and
    the bytes its collectives moved (``bytes_received``: what this rank received, summed)."""

    def __init__(self, layout, group, noise_ema_init, state: dict | None = None, shard_mode: str = "zero1"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group given but torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.partition = Partition(layout, self.world_size)
        self.shard = self.partition.shards[self.rank]
        self.state = (ShardState.zeros(self.shard, noise_ema_init) if state is None
                      else ShardState.from_state(state, self.shard))
        self.bytes_received = 0
        self.shard_mode = shard_mode
        #: ``"zero2"``: this rank's range of the (reduced) gradient, in logical order, which the
        #: caller writes (e.g. the output of ``dist.reduce_scatter``) before each step.
        self.grad_shard = (torch.zeros(self.shard.end - self.shard.start, dtype=getattr(torch, layout.dtype.name))
                           if shard_mode == "zero2" else None)

    @property
    def sizes(self) -> list[int]:
        """Every rank's element count, in rank order: how to split a flat logical gradient
        (``flat.split(sizes)``) into the inputs of ``dist.reduce_scatter``."""
        return [s.end - s.start for s in self.partition.shards]

    def _all_gather(self, local: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
        """Every rank's ``local`` (its first axis ``lengths[r]`` long), in rank order; padded to
        the longest because gloo's all-gather takes equal sizes."""
        longest = max(lengths)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=torch.from_numpy(local[:0]).dtype)
        padded[: local.shape[0]] = torch.from_numpy(local)
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded, group=self.group)
        self.bytes_received += (self.world_size - 1) * padded.numel() * padded.element_size()
        return [t[:n].numpy() for t, n in zip(out, lengths)]

    def run_step(self, param_flat, grad_flat, request, backend, *, flipped=(), vgs=None):
        """One sharded step on the full flat buffers (NumPy). ``"zero1"``: the rank's range of
        ``grad_flat`` stepped, then every range all-gathered into ``param_flat``. ``"zero2"``:
        the gradients are :attr:`grad_shard` (negated for the ``flipped`` segments: maximize;
        scaled in place by ``vgs``, the fused scaler), and only this rank's range of
        ``param_flat`` is written."""
        shard = self.shard
        params = shard.take(param_flat)
        if self.shard_mode == "zero1":
            grads = shard.take(grad_flat)
        else:
            grads = shard.pieces(self._signed(self.grad_shard.numpy(), flipped))
        stats = sharded_step(self.partition, self.rank, params, grads, self.state, request,
                             all_gather=self._all_gather, vgs=vgs, backend=backend)
        if stats.skipped:
            return stats
        if self.shard_mode == "zero1":
            self.gather_params(param_flat, params)
        else:
            shard.put(shard.logical(params), param_flat)
            if vgs is not None:  # the scaled gradients, as scale_gradients() leaves them
                self.grad_shard.copy_(torch.from_numpy(self._signed(shard.logical(grads), flipped)))
        return stats

    def _signed(self, logical_values: np.ndarray, flipped) -> np.ndarray:
        """``logical_values`` (this rank's range) with the ``flipped`` segments negated (exact)."""
        out, local = logical_values.copy(), self.shard.local
        for piece, parent in enumerate(self.shard.parents):
            if parent in flipped:
                first = local.logical_offsets[piece] - self.shard.start
                out[first : first + local.sizes[piece]] *= -1
        return out

    def gather_params(self, param_flat, local_params=None) -> None:
        """Every rank's range of the parameters (this rank's: ``local_params``, a buffer of its
        pieces, or its range of ``param_flat``) all-gathered into ``param_flat``: a collective."""
        shard = self.shard
        mine = shard.logical(shard.take(param_flat) if local_params is None else local_params)
        for other, values in zip(self.partition.shards, self._all_gather(mine, self.sizes)):
            other.put(values, param_flat)

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: its ``u``, ``m``, ``v`` and the replicated records."""
        state = self.state
        return sum(getattr(state, n).nbytes for n in (*ShardState.BUFFERS, "segment_step", "grad_norm_ema"))

    def minimum_bytes(self) -> int:
        """The bytes per step this rank must receive at least (``specs/distributed.md`` §4): two
        sums per chunk of the other ranks, five values per segment piece of theirs, and
        (``"zero1"``) their parameters."""
        others = [s for s in self.partition.shards if s is not self.shard]
        itemsize = self.partition.layout.dtype.itemsize if self.shard_mode == "zero1" else 0
        return sum((s.end - s.start) * itemsize + s.num_pieces * 16 + np.unique(s.parents).size * 5 * 8
                   for s in others)

    def consolidated(self) -> dict:
        """The full layout's state (``FlatUPGDState.to_state`` format): a collective, every
        rank must call it; every rank gets the result."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, self.state.to_state(self.shard), group=self.group)
        return consolidate_states(parts)

    def placement(self) -> dict:
        """Where this rank's part belongs (the per-rank entry's fields besides its state): the
        world size, the rank, the partition's ``bounds`` and the layout; checked on load."""
        return {"world_size": self.world_size, "rank": self.rank, "bounds": list(self.partition.bounds),
                "layout": self.partition.layout.to_dict()}

    def shard_entry(self) -> dict:
        """The per-rank state-dict entry: this rank's part and where it belongs."""
        return {"version": SHARD_FORMAT_VERSION, **self.placement(), "state": self.state.to_state(self.shard)}

    def adopt(self, entry: dict | None, full_state: dict) -> ShardState:
        """The state after a load: ``entry`` (a per-rank state dict's) when given, else this
        rank's range of ``full_state`` (a consolidated or single-process state dict's)."""
        self.state = self.load_shard_entry(entry) if entry is not None else ShardState.from_state(full_state,
                                                                                                   self.shard)
        return self.state

    def load_shard_entry(self, entry: dict) -> ShardState:
        """The state of a per-rank entry written by the same rank of the same partition."""
        if not isinstance(entry, Mapping) or entry.get("version") != SHARD_FORMAT_VERSION:
            found = entry.get("version") if isinstance(entry, Mapping) else type(entry).__name__
            raise ValueError(f"per-rank state dict entry 'upgd_ref_shard': version {found!r}, this reader takes "
                             f"{SHARD_FORMAT_VERSION}")
        for key, value in self.placement().items():
            if entry.get(key) != value:
                raise ValueError(f"per-rank state dict field 'upgd_ref_shard.{key}' is {entry.get(key)!r}, this "
                                 f"rank's is {value!r}; load a consolidated state dict to change the world size "
                                 "or the partition")
        return ShardState.from_part(entry["state"], self.shard)


class ShardedAccess:
    """The sharded optimizer's public surface, mixed into the torch optimizers: the record,
    ZeRO-2's gradient range and parameter gather, and the consolidated state dict (which
    every optimizer has: without sharding it is :meth:`state_dict`)."""

    @property
    def sharding(self):
        """With a ``process_group``: the :class:`~.distributed.ShardedRecord` (partition, this
        rank's shard and state, bytes received by its collectives); else None."""
        return self._sharded

    @property
    def grad_shard(self) -> torch.Tensor:
        """``shard_mode="zero2"``: this rank's range of the flat gradient (logical order), which
        the caller fills before each step (``specs/adapters-torch.md`` §4.1)."""
        return zero2_record(self._sharded, "grad_shard").grad_shard

    def gather_params(self) -> None:
        """``shard_mode="zero2"``: every rank's updated range all-gathered into the parameters (a collective)."""
        zero2_record(self._sharded, "gather_params()").gather_params(self._partition.param_flat)

    def consolidated_state_dict(self) -> dict:
        """With a ``process_group``: the state dict one process would have (the production
        format, :meth:`state_dict` of the unsharded optimizer), gathered from every rank. A
        collective: every rank calls it and gets it. Without a group: :meth:`state_dict`."""
        if self._sharded is None:
            return self.state_dict()
        full = FlatUPGDState.from_state_dict({"format": UPGD_FORMAT, "version": UPGD_VERSION,
                                              "state": self._sharded.consolidated()}, self._layout)
        source = StateSource(full, self._partition, self.param_groups, self._STATE_KEYS, self._extras,
                             self._noise_ema_init, self._raise_counter)
        return self._production_state_dict(StateView(lambda: source).read, {})
