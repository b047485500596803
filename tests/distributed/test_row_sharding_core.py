"""Shards of dim-0 row ranges (FSDP2 / DTensor ``Shard(0)``), ranks as threads:
``upgd_ref.sharding_rows``, ``specs/distributed.md`` §2a.

The row boundaries are not chunk boundaries (nor 64-byte boundaries: 750 float32 elements),
a chunk may be shared by 4 ranks and a rank may own nothing of a tensor. On the Numba
kernels, after 30 steps every family member, float32 and float64, VGS on and off, adaptive
noise and a frozen segment on some steps give the single-process door's bits: parameters,
``u``, ``m``, ``v``, the per-segment records and the VGS statistics.
"""

from __future__ import annotations

import numpy as np
import pytest

from upgd_ref.kernels.chunk_abi import CHUNK
from upgd_ref.sharding_rows import RowPartition, dim0_ranges

from .sharded_runs import (
    MEMBER_PROFILES,
    layout_of,
    shard_run,
    single_run,
    thread_world,
)

STEPS = 30


def test_dim0_ranges_follow_torch_chunk():
    layout = layout_of("float32")  # (3000,), (50,), (0,), (70, 90), (5,)
    assert dim0_ranges(layout, 4) == [
        [(0, 0, 750), (1, 0, 13), (3, 0, 18 * 90), (4, 0, 2)],
        [(0, 750, 1500), (1, 13, 26), (3, 1620, 3240), (4, 2, 4)],
        [(0, 1500, 2250), (1, 26, 39), (3, 3240, 4860), (4, 4, 5)],
        [(0, 2250, 3000), (1, 39, 50), (3, 4860, 6300)],
    ]
    partition = RowPartition(layout, 4)
    shared = [int(s) for s in partition.cut_parents]
    assert shared == [0, 0, 1, 3, 3, 3, 4] and partition.has_cuts  # the chunk of segment 1: in 4 ranks
    assert all(n <= CHUNK for n in partition.cut_layout.sizes)
    with pytest.raises(ValueError, match="exactly once"):
        RowPartition(layout, 2, [[(0, 0, 3000)], [(1, 0, 50), (3, 0, 6300)]])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("use_vgs", [False, True])
def test_row_shards_give_the_single_process_bits(world, dtype, use_vgs):
    layout = layout_of(dtype)
    partition = RowPartition(layout, world)
    for member in MEMBER_PROFILES:
        want_params, want_state, want_vgs = single_run(layout, member, STEPS, use_vgs, "numba")
        ranks = thread_world(partition, lambda r, gather, member=member: shard_run(partition, r, member, STEPS, use_vgs,
                                                                                  "numba", gather))
        params = layout.zeros()
        buffers = {name: layout.zeros() for name in ("utility", "first_moment", "second_moment")}
        for shard, (values, part, vgs) in zip(partition.shards, ranks):
            shard.put(values, params)
            for name, full in buffers.items():
                shard.put(part[name], full)
            for key in ("step", "segment_step", "grad_norm_ema", "skipped_steps"):
                assert np.array_equal(part[key], want_state[key]), (member, key)
            assert all(np.array_equal(a, b) for a, b in zip(vgs.to_state().values(), want_vgs.to_state().values()))
        assert params.tobytes() == want_params.tobytes(), member
        for name, full in buffers.items():
            logical = np.concatenate([a.reshape(-1) for a in layout.unpack(full)])
            assert logical.tobytes() == np.asarray(want_state[name]).tobytes(), (member, name)
