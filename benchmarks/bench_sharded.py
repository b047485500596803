"""Sharded AdaptiveUPGD on gloo (loopback): state memory per rank, bytes per step, step time.

``python benchmarks/bench_sharded.py [--size N] [--steps K] [--worlds 1 2 4]`` prints one row
per world size and shard mode: the optimizer state one rank keeps (its ``u``, ``m``, ``v``
and the replicated per-segment records), the bytes it received per step through the
optimizer's all-gathers (counted from the collectives' buffers: chunk partials, and under
``zero1`` the parameters), the minimum the design needs (``specs/distributed.md`` §4) and
the mean step time relative to world 1 (on a small machine the ranks share cores). World 1
is the unsharded optimizer. ``zero2`` rows: the gradients reduce-scattered by the caller into
``grad_shard`` before each step (not timed; its bytes in the last column), the parameters
left sharded (``gather_params()`` not called).
"""

from __future__ import annotations

import argparse
import datetime
import pickle
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _shapes(size: int):
    """Four tensors of about ``size`` float32 elements in all, none a multiple of the chunk."""
    side = int((size * 0.6) ** 0.5)
    return [(side, side), (size // 4 + 7,), (size // 8 + 3, 1), (257,)]


def _rank(rank, world, port, size, steps, mode, out):
    from upgd_ref.adapters.torch import AdaptiveUPGD

    torch.set_num_threads(1)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        group = dist.group.WORLD
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in _shapes(size)]
        extra = {"process_group": group, "shard_mode": mode} if group is not None else {}
        optimizer = AdaptiveUPGD(params, lr=1e-3, adaptive_noise=True, seed=1, **extra)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        record = optimizer.sharding
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        scattered = 0

        def reduce_scatter():  # the caller's part under zero2: this rank's range of the summed gradient
            dist.reduce_scatter(optimizer.grad_shard, list(flat.split(record.sizes)))
            return (world - 1) * record.sizes[rank] * flat.element_size()  # received: the others' parts of it

        if mode == "zero2":
            reduce_scatter()
        optimizer.step()  # compile / warm up
        before = record.bytes_received if record else 0
        seconds = 0.0
        for _ in range(steps):
            if mode == "zero2":
                scattered += reduce_scatter()
            start = time.perf_counter()
            optimizer.step()
            seconds += time.perf_counter() - start
        seconds /= steps
        if record is None:
            state = optimizer.flat_state
            state_bytes = sum(getattr(state, n).nbytes for n in ("utility", "first_moment", "second_moment",
                                                                 "segment_step", "grad_norm_ema"))
            received, minimum = 0, 0
        else:
            state_bytes, minimum = record.state_bytes(), record.minimum_bytes()
            received = (record.bytes_received - before) / steps
        out.put(pickle.dumps((rank, state_bytes, received, minimum, seconds, scattered / steps)))
    finally:
        if group is not None:
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, size: int, steps: int, mode: str = "zero1") -> list[tuple]:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, size, steps, mode, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        rows = sorted(pickle.loads(out.get(timeout=600)) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    n = sum(torch.Size(s).numel() for s in _shapes(args.size))
    print(f"AdaptiveUPGD float32, {n} parameters in {len(_shapes(args.size))} tensors, gloo on loopback, "
          f"{args.steps} steps; per rank (max over ranks)")
    print(f"{'world':>5} {'mode':>5} {'state MiB':>10} {'state / W=1':>11} {'received KiB/step':>18} "
          f"{'minimum KiB/step':>17} {'ratio':>6} {'step ms':>8} {'step / W=1':>10} {'reduce-scatter KiB':>18}")
    base = None
    for world in args.worlds:
        for mode in ("zero1", "zero2") if world > 1 else ("zero1",):
            rows = run(world, args.size, args.steps, mode)
            state, seconds = max(r[1] for r in rows), max(r[4] for r in rows)
            base = base or (state, seconds)
            received, minimum = max(r[2] for r in rows), max(r[3] for r in rows)
            ratio = f"{received / minimum:6.3f}" if minimum else "     -"
            scattered = f"{max(r[5] for r in rows) / 1024:>18.1f}" if mode == "zero2" else f"{'-':>18}"
            print(f"{world:>5} {mode if world > 1 else '-':>5} {state / 2**20:>10.3f} {state / base[0]:>11.3f} "
                  f"{received / 1024:>18.1f} {minimum / 1024:>17.1f} {ratio} {seconds * 1e3:>8.2f} "
                  f"{seconds / base[1]:>10.2f} {scattered}")


if __name__ == "__main__":
    main()
