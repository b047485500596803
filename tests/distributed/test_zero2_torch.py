"""``shard_mode="zero2"`` on gloo, 2 and 4 processes: the caller reduce-scatters the
gradients into ``optimizer.grad_shard``, the step updates the rank's range of the
parameters only, ``gather_params()`` all-gathers them (``specs/distributed.md`` §3, §4;
``adapters-torch.md`` §4.1).

After 30 steps (float32 and float64, every member, VGS fused into the step or off, adaptive
noise, a frozen parameter on some steps, shard boundaries inside tensors, maximize) the
gathered parameters, the consolidated state and the VGS statistics are bit-identical to one
process stepping the averaged gradients with the scaler's separate calls on the same backend
(float32 and float64; ``specs/distributed.md`` §3), and the statistics are the same bits for
every world size (1, 2, 4).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .torch_runs import CONFIGS, bits, build, flat, run_steps, step_grads, vgs_bits
from .world import run_world


STEPS, GATHER_AT = 30, 10
MAXIMIZE = ("float32", "AdaptiveUPGD", False)  # also run with maximize=True
RUNS = [(config, False) for config in CONFIGS] + [(MAXIMIZE, True)]


def _local_grads(grads, rank, world_size, k):
    """Rank ``rank``'s unreduced gradients: ``g + e_r`` with ``sum_r e_r = 0``, every partial sum
    exact, so the reduce-scatter's sum divided by ``W`` is ``g`` bit for bit in any order."""
    gen = torch.Generator().manual_seed(1000 + k)
    out = []
    for g in grads:
        if g is None:
            out.append(None)
            continue
        h = (torch.randn(g.shape, generator=gen, dtype=torch.float64) * 256).round().div(512)
        out.append(g + (rank - (world_size - 1) / 2) * h.to(g.dtype))
    return out


def _zero2_rank(rank, world_size):
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = {}
    for config, maximize in RUNS:
        params, optimizer, vgs = build(config, dist.group.WORLD, shard_mode="zero2", maximize=maximize)
        record = optimizer.sharding
        start_params = flat(params)
        for k in range(1, STEPS + 1):
            local = _local_grads(step_grads(params, k), rank, world_size, k)
            for p, g in zip(params, local):
                p.grad = g  # presence: p.grad is None for a frozen parameter
            whole = torch.cat([(torch.zeros(p.shape, dtype=p.dtype) if g is None else g).reshape(-1)
                               for p, g in zip(params, local)])
            dist.reduce_scatter(optimizer.grad_shard, list(whole.split(record.sizes)))
            optimizer.grad_shard.div_(world_size)
            optimizer.step(vgs=vgs)
            if k == 1:  # nothing gathered: the other ranks' ranges are still the start values
                now, mine = flat(params), slice(record.shard.start, record.shard.end)
                outside = np.ones(now.size, dtype=bool)
                outside[mine] = False
                assert now[outside].tobytes() == start_params[outside].tobytes()
                assert now[mine].tobytes() != start_params[mine].tobytes()
            if k == GATHER_AT:
                optimizer.gather_params()
        optimizer.gather_params()
        partition, itemsize = record.partition, 4 if config[0] == "float32" else 8
        # two sums per chunk, five values per segment a rank holds part of (specs/distributed.md §4)
        rows = (world_size - 1) * max(2 * sh.num_pieces + 5 * len(set(sh.parents.tolist()))
                                      for sh in partition.shards) * 8
        gathers = 2 * (world_size - 1) * max(record.sizes) * itemsize
        assert record.bytes_received == STEPS * rows + gathers
        assert record.minimum_bytes() <= rows and (world_size == 1) == (record.minimum_bytes() == 0)
        out[config, maximize] = (flat(params), bits(optimizer.consolidated_state_dict()), vgs_bits(vgs))
    out["refusals"] = _refusals()
    return out


def _refusals():
    """What step(vgs=...) refuses under zero2, before anything changes."""
    import torch.distributed as dist
    from upgd_ref.adapters.torch import VarianceGradientScaler

    seen = []
    params, optimizer, vgs = build(("float32", "AdaptiveUPGD", True), dist.group.WORLD, shard_mode="zero2",
                                   maximize=True)
    for p, g in zip(params, step_grads(params, 1)):
        p.grad = g
    before = flat(params)
    with pytest.raises(ValueError, match="maximize"):
        optimizer.step(vgs=vgs)
    seen.append("maximize")
    with pytest.raises(ValueError, match="exactly the optimizer's parameters"):
        optimizer.step(vgs=VarianceGradientScaler(params[:2]))
    seen.append("other parameters")
    assert flat(params).tobytes() == before.tobytes() and vgs.stats.step == 0
    assert optimizer.sharding.state.step == 0
    return seen


def test_zero2_refusals_without_a_group():
    params, optimizer, vgs = build(("float32", "UPGD", True), None)
    with pytest.raises(ValueError, match="shard_mode='zero2' needs a process_group"):
        build(("float32", "UPGD", False), None, shard_mode="zero2")
    with pytest.raises(ValueError, match="shard_mode must be one of"):
        build(("float32", "UPGD", False), None, shard_mode="zero3")
    with pytest.raises(RuntimeError, match="grad_shard"):
        _ = optimizer.grad_shard  # the property raises
    with pytest.raises(RuntimeError, match="gather_params"):
        optimizer.gather_params()
    for p, g in zip(params, step_grads(params, 1)):
        p.grad = g
    with pytest.raises(ValueError, match="is for shard_mode='zero2'"):
        optimizer.step(vgs=vgs)
    assert optimizer.flat_state.step == 0


def _single(config, maximize):
    params, optimizer, vgs = build(config, None, maximize=maximize)
    run_steps(params, optimizer, vgs, 1, STEPS)
    return flat(params), bits(optimizer.state_dict()), vgs_bits(vgs)


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return {run: _single(*run) for run in RUNS}


@pytest.fixture(scope="module")
def one_rank():
    return run_world(_zero2_rank, 1)[0]


@pytest.mark.parametrize("world_size", [2, 4])
def test_zero2_bit_identical_to_one_process(world_size, single, one_rank):
    ranks = run_world(_zero2_rank, world_size)
    assert all(rank["refusals"] == ["maximize", "other parameters"] for rank in ranks)
    for run in RUNS:
        want_params, want_state, want_statistics = single[run]
        for rank in [one_rank, *ranks]:
            params, state, statistics = rank[run]
            assert params.tobytes() == want_params.tobytes(), (run, "params")
            assert state == want_state, (run, "consolidated state")
            assert statistics == one_rank[run][2], (run, "VGS statistics across world sizes")
            assert statistics == want_statistics, (run, "VGS statistics")
