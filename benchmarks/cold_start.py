"""Benchmark: the first ``optimizer.step()`` of the PyTorch adapter (AdaptiveUPGD + VGS, the
issue's cold-start case) on a cold Numba cache and on a warm one.

Run: ``python benchmarks/cold_start.py [--runs 3] [--numel 1000000] [--threads 2]``.

Each run is a fresh Python process (``sys.executable``) with a fresh, empty
``NUMBA_CACHE_DIR`` (a temporary directory): it builds a small model's parameters,
``VarianceGradientScaler`` and ``AdaptiveUPGD`` (the adapter picks its backend as users get
it), and times ``scale_gradients(); step(); vgs.step()`` for the first time (compiling the
kernels that step needs), then the same once more in a second process on the cache the
first one filled (the warm first step of every later process). Imports are not timed. The
child prints on its last line the step's seconds and the CPU seconds of Numba's outermost
compilations during it (``numba:compile`` events, timed with the compiling thread's CPU
clock: less sensitive to other load on the machine than the wall clock) and the CPU seconds
of the child processes it forked and waited for during it (the kernels compiled ahead of
need, ``specs/kernels.md`` §7); this script prints a table with the medians. Nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import resource, sys, time
import torch
from numba.core import event


class CompileClock(event.Listener):
    # CPU seconds of the outermost compilations (the nested ones run inside them; Numba
    # compiles under one process-wide lock, so the events of two threads never interleave)
    def __init__(self):
        self.depth, self.start, self.seconds = 0, 0.0, 0.0

    def on_start(self, ev):
        if self.depth == 0:
            self.start = time.thread_time()
        self.depth += 1

    def on_end(self, ev):
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.thread_time() - self.start


clock = CompileClock()
event.register("numba:compile", clock)
from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler
torch.set_num_threads({threads})
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn({numel} // 4, 4)), torch.nn.Parameter(torch.randn(4))]
for p in params:
    p.grad = torch.randn_like(p)
vgs = VarianceGradientScaler(params, warmup_steps=0)
opt = AdaptiveUPGD(params, seed=1, adaptive_noise=True)


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


children = children_cpu()
start = time.perf_counter()
vgs.scale_gradients()
opt.step()
vgs.step()
print(f"{{time.perf_counter() - start:.3f}} {{clock.seconds:.3f}} {{children_cpu() - children:.3f}}")
"""


def first_step_seconds(cache_dir: str, numel: int, threads: int) -> tuple[float, float, float]:
    """``(seconds, compile CPU seconds, forked children's CPU seconds)`` of the first step in
    a fresh process whose Numba cache is ``cache_dir``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, "-c", CHILD.format(numel=numel, threads=threads)], env=env,
                          capture_output=True, text=True, timeout=600, check=True)
    seconds, compile_cpu, children_cpu = done.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(compile_cpu), float(children_cpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cold, warm, compile_cpu, children_cpu = [], [], [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="numba-cold-") as cache_dir:
            seconds, compiling, children = first_step_seconds(cache_dir, args.numel, args.threads)
            cold.append(seconds)
            compile_cpu.append(compiling)
            children_cpu.append(children)
            warm.append(first_step_seconds(cache_dir, args.numel, args.threads)[0])
    print(f"first step of the torch adapter (AdaptiveUPGD + VGS, {args.numel:,} float32 parameters, "
          f"{args.threads} threads), seconds")
    print(f"  {'':<28} {'runs':<28} {'median':>7}")
    rows = (("cold", cold), ("cold: compiling (CPU)", compile_cpu), ("cold: forked children (CPU)", children_cpu),
            ("warm", warm))
    for name, seconds in rows:
        print(f"  {name:<28} {' '.join(f'{s:7.2f}' for s in seconds):<28} {statistics.median(seconds):>7.2f}")


if __name__ == "__main__":
    main()
