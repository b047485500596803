"""DTensor (FSDP2) optimizers: per-rank and consolidated state dicts, and the VGS scaler fused
into the step (``specs/distributed.md`` §2a, §3, §5; ``adapters-torch.md`` §4.2), on gloo.

4 ranks, then 2: 30 steps with ``optimizer.step(vgs=scaler)`` (float32 and float64, with and
without the scaler, a frozen parameter on some steps, row boundaries inside chunks) give
parameters, scaled gradients, consolidated state and VGS statistics bit-identical to one
process calling ``scale_gradients()``, ``step()``, ``vgs.step()``. A per-rank state dict saved
at step 10 resumes on the same rank and world size to the same bits; one from another rank or
world size is refused naming both; a consolidated one saved with 4 ranks resumes with 2 ranks
and with 1 process, bit for bit. The scaler's own calls are refused on DTensor parameters.
"""

from __future__ import annotations

import pytest
import torch

from .torch_runs import bits, flat, make_optimizer, make_params, make_scaler, single_process, step_grads, vgs_bits
from .world import run_world

STEPS, SAVE_AT = 30, 10
CONFIGS = [("float64", "AdaptiveUPGD", True), ("float32", "UPGD", True), ("float64", "UPGDW", False)]


class Model(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.weights = torch.nn.ParameterList(params)


def _sharded(config, mesh, values=None):
    """``(params, optimizer, scaler or None)`` over ``fully_shard``'s DTensors of ``values``
    (default: the tests' start parameters)."""
    from torch.distributed.fsdp import fully_shard

    dtype, member, use_vgs = config
    start = make_params(dtype) if values is None else [torch.nn.Parameter(v.clone()) for v in values]
    model = Model(start)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    return params, make_optimizer(member, params), make_scaler(params) if use_vgs else None


def _steps(params, optimizer, vgs, mesh, first, last):
    """Steps ``first..last``: the averaged gradient's rows, as FSDP leaves them; the scaler fused."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for k in range(first, last + 1):
        for p, g in zip(params, step_grads(params, k)):
            p.grad = None if g is None else distribute_tensor(g, mesh, [Shard(0)])
        optimizer.step(vgs=vgs)


def _result(params, optimizer, vgs):
    """Parameters, scaled gradients of the last step, consolidated state, VGS statistics (bits)."""
    return (flat([p.full_tensor() for p in params]), flat([p.grad.full_tensor() for p in params]),
            bits(optimizer.consolidated_state_dict()), vgs_bits(vgs))


def _load_local(params, rows):
    with torch.no_grad():
        for p, values in zip(params, rows):
            p.to_local().copy_(values)


def _rank(rank, world_size, saved):
    """Per config: the run (saving at step 10), its per-rank resume, and (``saved``: another
    world's checkpoints) the consolidated resume and the refusal of its per-rank dict."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world_size,))
    out = {}
    for config in CONFIGS:
        params, optimizer, vgs = _sharded(config, mesh)
        _steps(params, optimizer, vgs, mesh, 1, SAVE_AT)
        scaler_state = None if vgs is None else vgs.state_dict()
        consolidated = ([p.full_tensor() for p in params], optimizer.consolidated_state_dict(), scaler_state)
        per_rank = ([p.to_local().clone() for p in params], optimizer.state_dict(), scaler_state)
        _steps(params, optimizer, vgs, mesh, SAVE_AT + 1, STEPS)
        results = {"run": _result(params, optimizer, vgs)}

        params, optimizer, vgs = _sharded(config, mesh)  # per-rank resume: same rank, same world size
        _load_local(params, per_rank[0])
        optimizer.load_state_dict(per_rank[1])
        if vgs is not None:
            vgs.load_state_dict(per_rank[2])
        _steps(params, optimizer, vgs, mesh, SAVE_AT + 1, STEPS)
        results["per-rank resume"] = _result(params, optimizer, vgs)
        results["refused"] = _refusals(rank, world_size, optimizer, vgs, per_rank[1], saved and saved[config])

        if saved is not None:  # another world size's consolidated checkpoint
            values, state, scaler_state = saved[config]["consolidated"]
            params, optimizer, vgs = _sharded(config, mesh, values)
            optimizer.load_state_dict(state)
            if vgs is not None:
                vgs.load_state_dict(scaler_state)
            _steps(params, optimizer, vgs, mesh, SAVE_AT + 1, STEPS)
            results["consolidated resume"] = _result(params, optimizer, vgs)
        out[config] = results | {"consolidated": consolidated, "per-rank": per_rank[1]}
    return out


def _refusals(rank, world_size, optimizer, vgs, mine, other_world):
    """Per-rank dicts of another rank or world size, and the scaler's own calls, are refused
    and change nothing."""
    import torch.distributed as dist

    seen = []
    before = bits(optimizer.consolidated_state_dict()), vgs_bits(vgs)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, mine)
    with pytest.raises(ValueError, match=rf"'upgd_ref_shard.rank' is {(rank + 1) % world_size}, this rank's is {rank}"):
        optimizer.load_state_dict(everyone[(rank + 1) % world_size])
    seen.append("other rank")
    if other_world is not None:
        theirs = other_world["per-rank"]
        found = theirs["upgd_ref_shard"]["world_size"]
        with pytest.raises(ValueError, match=rf"'upgd_ref_shard.world_size' is {found}, this rank's is {world_size}"):
            optimizer.load_state_dict(theirs)
        seen.append("other world size")
    if vgs is not None:
        for call in (vgs.scale_gradients, vgs.step):
            with pytest.raises(RuntimeError, match=r"DTensor parameters .* optimizer.step\(vgs=scaler\)"):
                call()
        seen.append("scaler's own calls")
    assert (bits(optimizer.consolidated_state_dict()), vgs_bits(vgs)) == before
    return seen


def _single(config, resume=None):
    """One process: the scaler's separate calls; from ``resume`` (a consolidated checkpoint) at step 11."""
    params, optimizer, vgs = single_process(config, resume, 1 if resume is None else SAVE_AT + 1, STEPS)
    return flat(params), flat([p.grad for p in params]), bits(optimizer.state_dict()), vgs_bits(vgs)


def _same(got, want) -> list[str]:
    """Which of parameters, scaled gradients, state, VGS statistics differ (arrays by their bytes)."""
    names = ("params", "scaled grads", "state", "VGS statistics")
    return [name for name, a, b in zip(names, got, want)
            if (a.tobytes() != b.tobytes() if hasattr(a, "tobytes") else a != b)]


def test_dtensor_state_dicts_and_fused_scaler_four_then_two_ranks():
    torch.set_num_threads(1)
    single = {config: _single(config) for config in CONFIGS}
    four = run_world(_rank, 4, None)
    saved = {config: four[0][config] for config in CONFIGS}
    two = run_world(_rank, 2, saved)
    for config in CONFIGS:
        refused = ["other rank", "other world size"] + (["scaler's own calls"] if config[2] else [])
        for world, keys in ((four, ("run", "per-rank resume")),
                            (two, ("run", "per-rank resume", "consolidated resume"))):
            for rank in world:
                for key in keys:
                    assert _same(rank[config][key], single[config]) == [], (config, len(world), key)
                assert rank[config]["refused"] == (refused if world is two else refused[:1] + refused[2:])
        resumed = _single(config, saved[config]["consolidated"])  # one process from 4 ranks' step 10
        assert _same(resumed, single[config]) == [], (config, "one process")
