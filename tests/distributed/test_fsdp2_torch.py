"""DTensor parameters through FSDP2 (``torch.distributed.fsdp.fully_shard`` on CPU, gloo), 2 and
4 processes (``specs/distributed.md`` §2a, ``adapters-torch.md`` §4.2).

``fully_shard`` splits every tensor's dim-0 rows over the ranks (torch's ``chunk``: the row
boundaries fall inside chunks and inside 64-byte blocks, a rank may own nothing of a
tensor); the optimizer steps each rank's rows. After 30 steps (float32 and float64, every
member, adaptive noise, a frozen parameter on some steps) the parameters (``full_tensor()``,
and what FSDP's forward all-gathers) and the consolidated state are bit-identical to one
process.
"""

from __future__ import annotations

import pytest
import torch

from .torch_runs import (
    CONFIGS,
    bits,
    build,
    flat,
    make_optimizer,
    make_params,
    run_steps,
    step_grads,
)
from .world import run_world


STEPS = 30
RUNS = sorted({(dtype, member) for dtype, member, _ in CONFIGS})


class Model(torch.nn.Module):
    """The parameters as one module; ``forward()`` returns them flattened (as FSDP gathers them)."""

    def __init__(self, params):
        super().__init__()
        self.weights = torch.nn.ParameterList(params)

    def forward(self):
        return torch.cat([w.reshape(-1) for w in self.weights])


def _fsdp_rank(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for dtype, member in RUNS:
        model = Model(make_params(dtype))
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        optimizer = make_optimizer(member, params)
        for k in range(1, STEPS + 1):
            for p, g in zip(params, step_grads(params, k)):  # the averaged gradient's rows, as FSDP leaves them
                p.grad = None if g is None else distribute_tensor(g, mesh, [Shard(0)])
            optimizer.step()
        with torch.no_grad():
            gathered = model()
        out[dtype, member] = (flat([p.full_tensor() for p in params]), gathered.numpy().copy(),
                              bits(optimizer.consolidated_state_dict()))
    out["refused"] = _refusals(mesh)
    return out


def _refusals(mesh):
    """DTensor parameters the optimizer cannot step are refused, naming the parameter."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    seen = []
    sharded, replicated = (torch.nn.Parameter(distribute_tensor(torch.ones(8, 3), mesh, [placement]))
                           for placement in (Shard(0), Replicate()))
    with pytest.raises(ValueError, match=r"placements \(Replicate\(\),\)"):
        make_optimizer("UPGD", [sharded, replicated])
    seen.append("replicated")
    with pytest.raises(TypeError, match="is not a DTensor"):
        make_optimizer("UPGD", [sharded, torch.nn.Parameter(torch.ones(3))])
    seen.append("mixed")
    return seen


def _single(dtype, member):
    params, optimizer, _ = build((dtype, member, False), None)
    run_steps(params, optimizer, None, 1, STEPS)
    return flat(params), bits(optimizer.state_dict())


@pytest.fixture(scope="module")
def single():
    torch.set_num_threads(1)
    return {run: _single(*run) for run in RUNS}


@pytest.mark.parametrize("world_size", [2, 4])
def test_fully_shard_bit_identical_to_one_process(world_size, single):
    for rank in run_world(_fsdp_rank, world_size):
        assert rank["refused"] == ["replicated", "mixed"]
        for run in RUNS:
            want_params, want_state = single[run]
            params, gathered, state = rank[run]
            assert params.tobytes() == want_params.tobytes(), (run, "params")
            assert gathered.tobytes() == want_params.tobytes(), (run, "FSDP's all-gather")
            assert state == want_state, (run, "consolidated state")
