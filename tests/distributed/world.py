"""Run a function on several gloo processes on loopback, bounded in time, shut down on failure.

``run_world(target, world_size, *args)`` spawns ``world_size`` processes; each joins a gloo
process group on 127.0.0.1 (a free port), calls ``target(rank, world_size, *args)`` and
sends back what it returns. A rank that raises, a timeout or a dead process terminates every
process and raises ``RuntimeError`` with the rank's traceback.
"""

from __future__ import annotations

import datetime
import pickle
import queue
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds for the whole world (spawn, imports, the work) and for init_process_group.
WORLD_TIMEOUT_S = 240
INIT_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(target, rank, world_size, port, args, results) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
        try:
            # plain pickle: torch's queue pickler would pass tensors as file descriptors of a
            # process that is about to exit
            results.put((rank, "ok", pickle.dumps(target(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_world(target, world_size: int, *args, timeout: float = WORLD_TIMEOUT_S) -> list:
    """``[target(rank, world_size, *args) for rank in range(world_size)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, rank, world_size, port, args, results), daemon=True)
             for rank in range(world_size)]
    out = {}
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise RuntimeError(f"gloo world of {world_size}: no result within {timeout} s") from None
            if status != "ok":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = pickle.loads(value)
        for p in procs:
            p.join(timeout=INIT_TIMEOUT_S)
        return [out[rank] for rank in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
