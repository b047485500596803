"""Sharded and single-process runs of the same steps, for the sharding tests.

:func:`single_run` steps the full layout with the door; :func:`shard_run` steps one rank's
shard with :func:`upgd_ref.sharding.sharded_step` given an ``all_gather``; :func:`thread_world`
runs every rank of a partition in threads of this process (a barrier as the all-gather).
"""

from __future__ import annotations

import threading

import numpy as np

from upgd_ref.family import MEMBERS
from upgd_ref.hyperparams import UPGD_DEFAULTS, validate_upgd
from upgd_ref.layout import FlatLayout
from upgd_ref.sharding import Partition, ShardState, chunk_boundaries, sharded_step
from upgd_ref.state import VGS_FORMAT, VGS_VERSION, FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, VGSRequest, upgd_step, vgs_factor

#: Segments of 3000, 50, 0, 70x90 and 5 elements: 8 chunks, tensors longer than a chunk.
SHAPES = [(3000,), (50,), (0,), (70, 90), (5,)]
VGS_HYPER = {"beta": 0.9, "warmup_steps": 2}
MEMBER_PROFILES = (("AdaptiveUPGD", "production"), ("AdaptiveUPGD", "paper"), ("UPGD", "production"),
                   ("UPGD", "paper"), ("UPGDW", "production"))


def layout_of(dtype) -> FlatLayout:
    return FlatLayout(SHAPES, dtype)


def inner_bounds(layout, world_size) -> list[int]:
    """Bounds that cut tensors: every other chunk boundary inside segment 0 and segment 3."""
    inside = [int(b) for b in chunk_boundaries(layout) if b not in layout.logical_offsets and b < layout.num_logical]
    picks = [inside[(k * len(inside)) // world_size] for k in range(1, world_size)]
    return [0, *picks, layout.num_logical]


def inputs(layout, step):
    """Step ``step``'s gradients (full layout), presence and start parameters (step 0)."""
    rng = np.random.default_rng(step)
    grads = layout.pack([rng.standard_normal(s) * (1 + i) for i, s in enumerate(layout.shapes)])
    present = [not (step % 3 == 2 and i == 1) for i in range(layout.num_segments)]  # segment 1 frozen some steps
    return grads, present


def request(layout, member, present) -> StepRequest:
    name, profile = member
    hyper = validate_upgd(dict(UPGD_DEFAULTS, lr=1e-2, sigma=1e-2, adaptive_noise=True))
    return StepRequest(hyper=[hyper] * layout.num_segments, present=present, seed=12345,
                       variant=MEMBERS[name].variant(profile))


def start_params(layout):
    rng = np.random.default_rng(99)
    return layout.pack([rng.standard_normal(s) for s in layout.shapes])


def single_run(layout, member, steps, use_vgs, backend):
    params, state = start_params(layout), FlatUPGDState.zeros(layout, [1.0] * layout.num_segments)
    vgs_state = FlatVGSState.zeros(layout.num_segments)
    for k in range(1, steps + 1):
        grads, present = inputs(layout, k)
        vgs = VGSRequest(vgs_state, vgs_factor(vgs_state, VGS_HYPER)[0], VGS_HYPER["beta"]) if use_vgs else None
        upgd_step(layout, params, grads, state, request(layout, member, present), vgs=vgs, backend=backend)
    return params, state.to_state(layout), vgs_state


def shard_run(partition, rank, member, steps, use_vgs, backend, all_gather, resume=None):
    """Rank ``rank``'s run: ``(logical params of its range, its state part, VGS state)``;
    ``resume``: ``(full params, consolidated state, VGS state)`` to continue from."""
    layout, shard = partition.layout, partition.shards[rank]
    if resume is None:
        params, state = shard.take(start_params(layout)), ShardState.zeros(shard, 1.0)
        vgs_state = FlatVGSState.zeros(layout.num_segments)
    else:
        params, state = shard.take(resume[0]), ShardState.from_state(resume[1], shard)
        vgs_state = FlatVGSState.from_state_dict({"format": VGS_FORMAT, "version": VGS_VERSION,
                                                  "state": resume[2].to_state()}, layout.num_segments)
    for k in range(state.step + 1, steps + 1):
        grads, present = inputs(layout, k)
        vgs = VGSRequest(vgs_state, vgs_factor(vgs_state, VGS_HYPER)[0], VGS_HYPER["beta"]) if use_vgs else None
        sharded_step(partition, rank, params, shard.take(grads), state, request(layout, member, present),
                     all_gather=all_gather, vgs=vgs, backend=backend)
    return shard.logical(params), state.to_state(shard), vgs_state


def thread_world(partition: Partition, body, timeout=120.0) -> list:
    """``[body(rank, all_gather) for each rank]``, the ranks in threads meeting at a barrier."""
    world = partition.world_size
    barrier, slots, results, errors = threading.Barrier(world, timeout=timeout), [None] * world, [None] * world, []

    def run(rank):
        def all_gather(values, lengths):
            assert values.shape == (lengths[rank],), (values.shape, lengths[rank])
            slots[rank] = values
            barrier.wait()
            gathered = list(slots)
            barrier.wait()
            return gathered

        try:
            results[rank] = body(rank, all_gather)
        except BaseException as exc:  # noqa: BLE001 - re-raised below; the others must not wait forever
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return results
