"""DDP (replicated parameters, averaged gradients) with the torch adapter: 2 gloo processes.

``specs/distributed.md`` §1: the optimizer works unchanged; with the same seed on every rank
the ranks' parameters stay bit-identical, and equal a single process stepping the averaged
gradient.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upgd_ref

from .world import WORLD_TIMEOUT_S, run_world

ROOT = Path(__file__).resolve().parents[2]
STEPS, WORLD = 10, 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1)).double()


def _batch(rank, step):
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1000 * rank + step), dtype=torch.float64)
    return x, x.sum(1, keepdim=True)


def _optimizers(params):
    from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler

    params = list(params)
    return (AdaptiveUPGD(params, lr=1e-2, adaptive_noise=True, sigma=0.01, seed=7),
            VarianceGradientScaler(params, warmup_steps=2))


def _loss(model, rank, step):
    x, y = _batch(rank, step)
    return torch.nn.functional.mse_loss(model(x), y)


def _train(step_fn, model, optimizer, vgs):
    for step in range(STEPS):
        optimizer.zero_grad()
        step_fn(step)
        vgs.scale_gradients()
        optimizer.step()
        vgs.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _ddp_rank(rank, world_size):
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    optimizer, vgs = _optimizers(model.parameters())
    return _train(lambda step: _loss(model, rank, step).backward(), model, optimizer, vgs)


def _single_process():
    """One process stepping the mean of the ranks' gradients (what DDP's all-reduce gives)."""
    torch.set_num_threads(1)
    model = _model()
    optimizer, vgs = _optimizers(model.parameters())

    def averaged(step):
        grads = [torch.autograd.grad(_loss(model, rank, step), list(model.parameters())) for rank in range(WORLD)]
        for p, *per_rank in zip(model.parameters(), *grads):
            p.grad = sum(per_rank) / WORLD

    return _train(averaged, model, optimizer, vgs)


def test_ddp_ranks_bit_identical_and_equal_to_one_process():
    ranks = run_world(_ddp_rank, WORLD)
    assert ranks[0].tobytes() == ranks[1].tobytes()
    assert ranks[0].tobytes() == _single_process().tobytes()


def test_ddp_example_runs_as_written():
    """README's "DDP (2 processes on CPU)": ``examples/ddp_cpu.py`` as a user runs it.

    The Numba kernels are compiled (or loaded from the on-disk cache) here first, so the two
    ranks load them instead of compiling them at once: the example's time is then its own."""
    upgd_ref.warmup(("float32",))
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "ddp_cpu.py")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=WORLD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the example's spawned ranks too
        out, err = proc.communicate()
        pytest.fail(f"examples/ddp_cpu.py did not finish within {WORLD_TIMEOUT_S} s; stdout: {out[-2000:]!r}; "
                    f"stderr: {err[-4000:]!r}")
    assert proc.returncode == 0, err
    assert "ranks bit-identical after 20 steps: True" in out
