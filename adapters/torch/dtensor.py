"""DTensor parameters sharded on dim 0 (FSDP2's ``fully_shard``, ``distribute_tensor(..., [Shard(0)])``):
each rank steps its local rows with the global combination (``specs/distributed.md`` §2a).

The optimizer's layout is the global one (the DTensors' shapes); this rank's elements are its
rows of each tensor (:class:`upgd_ref.sharding_rows.RowPartition`, torch's ``chunk`` split,
checked against each local shard). :class:`DTensorBucket` stands in for the flat-buffer
bucket: it copies the local shards into a buffer of the rank's pieces before a step and the
updated pieces back into the local tensors after it (FSDP2's storage is its own: it is
written in place, never re-homed). The step is :func:`upgd_ref.sharding.sharded_step` over
the mesh's process group. No math here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from upgd_ref.precision import state_dtype
from upgd_ref.sharding import ShardState, sharded_step
from upgd_ref.sharding_rows import RowPartition

from .conversions import DTYPE_NAMES
from .distributed import ShardedRecord
from .partition import flat_state_record


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed tensors
        return None
    return DTensor


def sharded_record(layout, params, names, group, noise_ema_init, shard_mode) -> ShardedRecord:
    """The record of a sharded optimizer: over DTensor parameters (the mesh's group), or built
    with ``process_group=group`` (CPU tensors, gloo)."""
    if has_dtensors(params):
        if group is not None:  # the mesh's group is the one, and the gradients are already the rows
            raise ValueError("DTensor parameters: pass no process_group (the device mesh's group is used)")
        return DTensorRecord(layout, params, names, noise_ema_init)
    if params[0].device.type != "cpu":
        raise ValueError(f"process_group: sharded steps run on CPU tensors (gloo) for now, got {params[0].device}")
    return ShardedRecord(layout, group, noise_ema_init, shard_mode=shard_mode)


def has_dtensors(params) -> bool:
    """Whether any parameter is a ``DTensor`` (then every one must be, :func:`check_dtensors`)."""
    kind = _dtensor_type()
    return kind is not None and any(isinstance(p, kind) for p in params)


def check_dtensors(params, names) -> torch.dtype:
    """The parameters' dtype after checking they are CPU DTensors of one 1-D mesh and one
    dtype, placed ``Shard(0)``, their local rows contiguous (the split: :func:`check_split`)."""
    from torch.distributed.tensor import DTensor, Shard

    meshes, dtypes = set(), set()
    for p, name in zip(params, names):
        if not isinstance(p, DTensor):
            raise TypeError(f"{name} is not a DTensor while other parameters are: give one kind")
        if p.device_mesh.ndim != 1 or p.device.type != "cpu":
            raise ValueError(f"{name}: DTensor parameters on a 1-D CPU device mesh only (gloo), got "
                             f"{p.device_mesh} on {p.device}")
        if p.dim() == 0 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"{name}: placements {tuple(p.placements)} of a {p.dim()}-d DTensor; the optimizer "
                             "takes (Shard(dim=0),) of tensors with at least one dimension")
        if not p.to_local().is_contiguous():
            raise ValueError(f"{name}: the local shard is not contiguous")
        if p.dtype not in DTYPE_NAMES:
            raise TypeError(f"{name} has dtype {p.dtype}; only float32, float64, float16 and bfloat16")
        meshes.add(p.device_mesh)
        dtypes.add(p.dtype)
    if len(meshes) != 1 or len(dtypes) != 1:
        raise ValueError("DTensor parameters must share one device mesh and one dtype")
    return dtypes.pop()


def check_split(params, names, shard) -> None:
    """Every local shard holds the rows ``shard`` (torch's ``chunk`` split) gives this rank."""
    for i, (p, name) in enumerate(zip(params, names)):
        want = int(np.asarray(shard.local.sizes)[shard.parents == i].sum()) if shard.local is not None else 0
        if p.to_local().numel() != want:
            raise ValueError(f"{name}: local shard of {p.to_local().numel()} elements; torch.chunk's split of "
                             f"dim 0 gives this rank {want}")


class DTensorBucket:
    """The bucket interface the optimizer's step uses, over this rank's local rows: NumPy
    buffers of the shard's pieces (``param_flat``, ``grad_flat``)."""

    def __init__(self, params, names, shard):
        self.params, self.names, self.shard = list(params), list(names), shard
        self.device = torch.device("cpu")
        self.segment_by_id = {id(p): i for i, p in enumerate(self.params)}
        self.shapes = [p.shape for p in self.params]
        self.param_flat, self.grad_flat = shard.local_zeros(), shard.local_zeros()

    @staticmethod
    def _local(tensor) -> np.ndarray:
        """``tensor``'s local rows (a DTensor's, contiguous) as a flat NumPy view."""
        return tensor.to_local().detach().reshape(-1).numpy()

    def _pieces(self, i):
        """``(piece, start inside the local rows)`` of segment ``i``'s pieces."""
        first = None
        for k in np.flatnonzero(self.shard.parents == i):
            first = self.shard.within[k] if first is None else first
            yield int(k), int(self.shard.within[k] - first)

    #: One dtype, one buffer: the partition interface's single-layout case.
    multi = False

    def home(self) -> None:
        self.ensure_homed()

    def moved(self) -> bool:
        """Never: DTensor parameters are not re-homed, so ``model.to(...)`` needs a new optimizer."""
        return False

    def ensure_homed(self) -> None:
        """The pieces' parameter values from the local shards (the optimizer's step input)."""
        self._copy(self.param_flat, [self._local(p) for p in self.params])

    def _copy(self, target, sources) -> None:
        """``sources[i]`` (segment ``i``'s local rows, or None) into its pieces of ``target``."""
        local = self.shard.local
        for i, source in enumerate(sources):
            for k, at in self._pieces(i) if source is not None else ():
                target[local.segment_slice(k)] = source[at : at + local.sizes[k]]

    def scatter(self, present) -> None:
        """The updated pieces written into the local shards, in place (after a committed step;
        the pieces of absent segments hold their unchanged values)."""
        self._write_back(self.param_flat, self.params)

    def scatter_grads(self) -> None:
        """The pieces of ``grad_flat`` written into the local rows of every present ``p.grad``
        (the gradients a fused VGS step scaled, as ``scale_gradients()`` leaves them)."""
        self._write_back(self.grad_flat, [p.grad for p in self.params])

    def _write_back(self, source, tensors) -> None:
        """Segment ``i``'s pieces of ``source`` into the local rows of ``tensors[i]`` (None: skipped)."""
        local = self.shard.local
        with torch.no_grad():
            for i, tensor in enumerate(tensors):
                rows = None if tensor is None else self._local(tensor)
                for k, at in self._pieces(i) if rows is not None else ():
                    rows[at : at + local.sizes[k]] = source[local.segment_slice(k)]

    def gather_grads(self):
        """``(present, copied)``: presence from ``p.grad``, the local gradient rows copied in."""
        present = [p.grad is not None for p in self.params]
        self._copy(self.grad_flat, [None if p.grad is None else self._local(p.grad) for p in self.params])
        return present, []

    def negate_grads(self, segments) -> None:
        for i in segments:
            for k, _ in self._pieces(i):
                self.grad_flat[self.shard.local.segment_slice(k)] *= -1

    def adopt_grads(self, copied) -> None:
        """Nothing: the gradients stay the caller's DTensors."""

    def state_array(self, state, name: str, i: int) -> np.ndarray:
        """Segment ``i`` of buffer ``name`` of a full-layout state record (the consolidated
        state: :meth:`DTensorRecord.consolidated`)."""
        return getattr(state, name)[self.shard.layout.segment_slice(i)]

    def state_record(self, *, step: int, noise_ema_init: float, segments, skipped_steps: int = 0):
        """A full-layout state record (what :meth:`DTensorRecord.adopt` takes its part of)."""
        return flat_state_record(self.shard.layout, step=step, noise_ema_init=noise_ema_init, segments=segments,
                                 skipped_steps=skipped_steps)

    def state_dtype(self, i: int) -> np.dtype:
        return state_dtype(self.shard.layout.dtype)

    def state_tensor(self, state, name: str, i: int) -> torch.Tensor:
        """:meth:`state_array` as a tensor in the parameter's (global) shape."""
        return torch.from_numpy(self.state_array(state, name, i)).view(self.shapes[i])


class DTensorRecord(ShardedRecord):
    """The sharded record of an optimizer over DTensor parameters: the row partition over the
    mesh's process group, this rank's :class:`~upgd_ref.sharding.ShardState`, and its bucket."""

    def __init__(self, layout, params, names, noise_ema_init):
        self.group = params[0].device_mesh.get_group()
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.partition = RowPartition(layout, self.world_size)
        self.shard = self.partition.shards[self.rank]
        check_split(params, names, self.shard)
        self.state = ShardState.zeros(self.shard, noise_ema_init)
        self.bytes_received, self.shard_mode, self.grad_shard = 0, "dtensor", None
        self.bucket = DTensorBucket(params, names, self.shard)

    @property
    def sizes(self) -> list[int]:
        return [s.num_elements for s in self.partition.shards]

    def consolidated(self) -> dict:
        """The full layout's state (``FlatUPGDState.to_state`` format): every rank's pieces put
        in their places; a collective."""
        parts = [None] * self.world_size
        dist.all_gather_object(parts, self.state.to_state(self.shard), group=self.group)
        layout = self.partition.layout
        out = {k: parts[0][k] for k in ("step", "segment_step", "grad_norm_ema", "skipped_steps")}
        for name in ShardState.BUFFERS:
            full = layout.zeros()
            for shard, part in zip(self.partition.shards, parts):
                shard.put(part[name], full)
            out[name] = np.concatenate([full[layout.segment_slice(i)] for i in range(layout.num_segments)])
        return out

    def placement(self) -> dict:
        """Where this rank's part belongs: the world size, the rank, its ``(segment, first, stop)``
        element ranges (:func:`~upgd_ref.sharding_rows.dim0_ranges`) and the layout."""
        return {"world_size": self.world_size, "rank": self.rank,
                "ranges": [list(r) for r in self.partition.ranges[self.rank]],
                "layout": self.partition.layout.to_dict()}

    def run_step(self, param_flat, grad_flat, request, backend, *, flipped=(), vgs=None):
        """One step on the bucket's pieces; with ``vgs`` (the fused scaler) the scaled gradients
        are written back into the local rows of ``p.grad``, as ``scale_gradients()`` leaves them."""
        stats = sharded_step(self.partition, self.rank, param_flat, grad_flat, self.state, request,
                             all_gather=self._all_gather, vgs=vgs, backend=backend)
        if vgs is not None and not stats.skipped and vgs.factor != 1.0:
            self.bucket.scatter_grads()
        return stats
