"""DDP (2 processes on CPU): AdaptiveUPGD and the VGS scaler under DistributedDataParallel.

DDP averages the gradients across processes before ``optimizer.step()``, so every process
steps the same parameters with the same gradients; the optimizers then stay bit-identical
if they draw the same noise, i.e. were built with the same ``seed`` (or after
``torch.manual_seed`` with the same value on every process). ``specs/distributed.md`` §1.

Run: ``python examples/ddp_cpu.py`` (gloo on 127.0.0.1, a free port; prints one line).
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler

WORLD_SIZE, STEPS = 2, 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(rank: int, port: int, done) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # the same model and the same optimizer seed on every process
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)))
        optimizer = AdaptiveUPGD(model.parameters(), lr=1e-2, adaptive_noise=True, sigma=0.01)
        vgs = VarianceGradientScaler(model.parameters(), warmup_steps=2)
        data = torch.Generator().manual_seed(100 + rank)  # each process its own batches
        for _ in range(STEPS):
            x = torch.randn(16, 8, generator=data)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)).backward()  # DDP averages grads
            vgs.scale_gradients()
            optimizer.step()
            vgs.step()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered[1:])
            print(f"ranks bit-identical after {STEPS} steps: {same}; seed {optimizer.seed} on every rank")
    finally:
        dist.destroy_process_group()
        done.put(rank)  # the rank's work is over (see the end of the file)


if __name__ == "__main__":
    done = mp.get_context("spawn").SimpleQueue()
    ranks = mp.spawn(train, args=(free_port(), done), nprocs=WORLD_SIZE, join=False)
    finished = 0
    while finished < WORLD_SIZE:
        if done.empty():
            ranks.join(timeout=1)  # raises if a rank failed
        else:
            finished += done.get() is not None
    # Every rank has left its process group. Under heavy load a rank was seen to hang in
    # interpreter teardown after that (specs/distributed.md §1): give each a few seconds to
    # exit, then end it; its work is complete.
    for process in ranks.processes:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
    sys.exit(0)
