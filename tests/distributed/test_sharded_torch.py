"""``AdaptiveUPGD(..., process_group=group)`` (and ``UPGD``, ``UPGDW``) on gloo, 2 and 4 processes.

After 30 steps (float32 and float64, every member, VGS on and off, adaptive noise, a frozen
parameter on some steps, shard boundaries inside tensors) every rank's parameters and the
consolidated state dict are bit-identical to one process; a run saved at step 10 with 4
ranks resumes with 2 ranks and with 1 process, bit for bit (``specs/distributed.md``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .torch_runs import CONFIGS, SHAPES, bits, build, flat, run_steps, single_process
from .world import run_world


STEPS, SAVE_AT = 30, 10


def _sharded_rank(rank, world_size, resume):
    """Every config: 30 steps (or from ``resume[config]``'s step 10), the consolidated state
    dict, the step-10 checkpoint, and the per-rank state bytes."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = {}
    for config in CONFIGS:
        params, optimizer, vgs = build(config, dist.group.WORLD)
        first = 1
        if resume is not None:
            saved_params, saved_optimizer, saved_vgs = resume[config]
            with torch.no_grad():
                for p, values in zip(params, saved_params):
                    p.copy_(values)
            optimizer.load_state_dict(saved_optimizer)
            if vgs is not None:
                vgs.load_state_dict(saved_vgs)
            first = SAVE_AT + 1
        checkpoint = None
        for last in (SAVE_AT, STEPS) if first == 1 else (STEPS,):
            run_steps(params, optimizer, vgs, first, last)
            first = last + 1
            if last == SAVE_AT:
                checkpoint = ([p.detach().clone() for p in params], optimizer.consolidated_state_dict(),
                              None if vgs is None else vgs.state_dict())
        record = optimizer.sharding  # the bytes of specs/distributed.md §4, counted per step
        partition, itemsize = record.partition, 4 if config[0] == "float32" else 8
        partials = max(2 * sh.num_pieces + 5 * len(set(sh.parents.tolist())) for sh in partition.shards) * 8
        per_step = (world_size - 1) * (partials + max(sh.end - sh.start for sh in partition.shards) * itemsize)
        assert record.bytes_received == (STEPS - (SAVE_AT if resume else 0)) * per_step
        assert 0 < record.minimum_bytes() <= per_step
        per_rank = optimizer.state_dict()
        assert per_rank["state"] == {} and per_rank["upgd_ref_shard"]["rank"] == rank
        out[config] = (flat(params), bits(optimizer.consolidated_state_dict()), checkpoint,
                       per_rank["upgd_ref_shard"]["state"]["utility"].nbytes)
    return out


def _single(config, resume=None):
    params, optimizer, _ = single_process(config, resume, 1 if resume is None else SAVE_AT + 1, STEPS)
    return flat(params), bits(optimizer.state_dict())


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return {config: _single(config) for config in CONFIGS}


def _check(ranks, single):
    for config in CONFIGS:
        want_params, want_state = single[config]
        for rank in ranks:
            params, state, _, _ = rank[config]
            assert params.tobytes() == want_params.tobytes(), (config, "params")
            assert state == want_state, (config, "consolidated state")


def test_four_ranks_then_resume_with_two_and_one(single):
    four = run_world(_sharded_rank, 4, None)
    _check(four, single)
    utility_bytes = [rank[CONFIGS[0]][3] for rank in four]
    assert sum(utility_bytes) == sum(int(np.prod(s)) for s in SHAPES) * 4 and max(utility_bytes) < 3 * 9355
    saved = {config: four[0][config][2] for config in CONFIGS}
    _check(run_world(_sharded_rank, 2, saved), single)
    for config in CONFIGS:  # a single process loads the consolidated state dict
        params, state = _single(config, saved[config])
        assert params.tobytes() == single[config][0].tobytes() and state == single[config][1]


def test_per_rank_state_dict_and_refusals():
    results = run_world(_per_rank, 2)
    assert results == [["per-rank round trip", "other rank refused", "other version refused", "core_format", "pickling",
                       "rebuild"]] * 2


def _per_rank(rank, world_size):
    """A per-rank state dict reloads into the same rank (the continuation is the same bits)
    and is refused by another rank; what needs the whole state is refused."""
    import copy

    import torch.distributed as dist

    config = ("float32", "AdaptiveUPGD", False)
    params, optimizer, _ = build(config, dist.group.WORLD)
    run_steps(params, optimizer, None, 1, 3)
    saved_params, saved = [p.detach().clone() for p in params], optimizer.state_dict()
    run_steps(params, optimizer, None, 4, 6)
    other_params, other, _ = build(config, dist.group.WORLD)
    with torch.no_grad():
        for p, values in zip(other_params, saved_params):
            p.copy_(values)
    other.load_state_dict(saved)
    run_steps(other_params, other, None, 4, 6)
    seen = []
    if flat(other_params).tobytes() == flat(params).tobytes():
        seen.append("per-rank round trip")
    mine = [None, None]
    dist.all_gather_object(mine, saved)
    with pytest.raises(ValueError, match="upgd_ref_shard.rank"):
        other.load_state_dict(mine[1 - rank])
    seen.append("other rank refused")
    with pytest.raises(ValueError, match="'upgd_ref_shard': version 2, this reader takes 1"):
        other.load_state_dict({**saved, "upgd_ref_shard": {**saved["upgd_ref_shard"], "version": 2}})
    seen.append("other version refused")
    with pytest.raises(RuntimeError, match="process_group"):
        optimizer.core_format()
    seen.append("core_format")
    with pytest.raises(RuntimeError, match="process_group"):
        copy.deepcopy(optimizer)
    seen.append("pickling")
    with pytest.raises(ValueError, match="cannot change after construction"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    seen.append("rebuild")
    return seen
