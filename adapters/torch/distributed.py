"""State sharding on ``torch.distributed`` (ZeRO-1): what an optimizer built with
``process_group=`` runs instead of the single-process door (``specs/distributed.md``).

Every rank holds the full parameters and the full (averaged) gradients in its flat buffers,
and only its range of ``u``, ``m``, ``v`` (:class:`upgd_ref.sharding.ShardState`). A step
takes the rank's range of both buffers, runs :func:`upgd_ref.sharding.sharded_step` with
an all-gather of the chunk partials over the group, and all-gathers the updated ranges into
every rank's parameter buffer. No math here: the partition, the combination order and the
stages are the core's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from upgd_ref.sharding import (
    PARTIAL_COLUMNS,
    Partition,
    ShardState,
    consolidate_states,
    sharded_step,
)

#: The per-rank state dict's extra top-level key, and the version of its entry.
SHARD_KEY = "upgd_ref_shard"
SHARD_FORMAT_VERSION = 1


def refuse_sharded(sharded, what: str) -> None:
    """What a sharded optimizer cannot do (it holds only its range of the state)."""
    if sharded is not None:
        raise RuntimeError(f"{what}: not available with a process_group (each rank holds only its range of the "
                           "state); use consolidated_state_dict(), a collective")


def sharded_record(layout, group, noise_ema_init, device) -> ShardedRecord:
    """The record of an optimizer built with ``process_group=group`` (CPU tensors, gloo)."""
    if device.type != "cpu":
        raise ValueError(f"process_group: sharded steps run on CPU tensors (gloo) for now, got {device}")
    return ShardedRecord(layout, group, noise_ema_init)


class ShardedRecord:
    """A sharded optimizer's partition, this rank's shard and state, its process group, and
    the bytes its collectives moved (``bytes_received``: what this rank received, summed)."""

    def __init__(self, layout, group, noise_ema_init, state: dict | None = None):
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

    def _gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        return self._all_gather(np.ascontiguousarray(rows.reshape(-1, len(PARTIAL_COLUMNS))),
                                [s.num_pieces for s in self.partition.shards])

    def run_step(self, param_flat, grad_flat, request, backend):
        """One sharded step on the full flat buffers (NumPy): the rank's range stepped, then
        every range all-gathered into ``param_flat``."""
        shard = self.shard
        params, grads = shard.take(param_flat), shard.take(grad_flat)
        stats = sharded_step(self.partition, self.rank, params, grads, self.state, request,
                             all_gather=self._gather_rows, backend=backend)
        if stats.skipped:
            return stats
        ranges = self._all_gather(shard.logical(params), [s.end - s.start for s in self.partition.shards])
        for other, values in zip(self.partition.shards, ranges):
            other.put(values, param_flat)
        return stats

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: its ``u``, ``m``, ``v`` and the replicated records."""
        state = self.state
        return sum(getattr(state, n).nbytes for n in (*ShardState.BUFFERS, "segment_step", "grad_norm_ema"))

    def minimum_bytes(self) -> int:
        """The bytes per step this rank must receive at least (``specs/distributed.md`` §4): the
        other ranks' parameters, two sums per chunk of theirs, five values per segment piece."""
        others = [s for s in self.partition.shards if s is not self.shard]
        itemsize = self.partition.layout.dtype.itemsize
        return sum((s.end - s.start) * itemsize + s.num_pieces * 16 + np.unique(s.parents).size * 5 * 8
                   for s in others)

    def consolidated(self) -> dict:
        """The full layout's state (``FlatUPGDState.to_state`` format): a collective, every
        rank must call it; every rank gets the result."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, self.state.to_state(self.shard), group=self.group)
        return consolidate_states(parts)

    def shard_entry(self) -> dict:
        """The per-rank state-dict entry: this rank's part and where it belongs."""
        return {"version": SHARD_FORMAT_VERSION, "world_size": self.world_size, "rank": self.rank,
                "bounds": list(self.partition.bounds), "layout": self.partition.layout.to_dict(),
                "state": self.state.to_state(self.shard)}

    def adopt(self, entry: dict | None, full_state: dict) -> ShardState:
        """The state after a load: ``entry`` (a per-rank state dict's) when given, else this
        rank's range of ``full_state`` (a consolidated or single-process state dict's)."""
        self.state = self.load_shard_entry(entry) if entry is not None else ShardState.from_state(full_state,
                                                                                                   self.shard)
        return self.state

    def load_shard_entry(self, entry: dict) -> ShardState:
        """The state of a per-rank entry written by the same rank of the same partition."""
        mine = {"world_size": self.world_size, "rank": self.rank, "bounds": list(self.partition.bounds),
                "layout": self.partition.layout.to_dict()}
        for key, value in mine.items():
            if entry.get(key) != value:
                raise ValueError(f"per-rank state dict field 'upgd_ref_shard.{key}' is {entry.get(key)!r}, this "
                                 f"rank's is {value!r}; load a consolidated state dict to change the world size")
        return ShardState.from_part(entry["state"], self.shard)
