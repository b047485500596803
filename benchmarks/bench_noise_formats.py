"""Benchmark: noise formats 1 and 2 (``specs/noise.md``, ``specs/noise-v2.md``) in the fused
step and alone, round-robin in one process (``specs/kernels.md`` §6.4).

Run: ``python benchmarks/bench_noise_formats.py [--size 10000000] [--rounds 9] [--threads 2]``.

Rows, timed in turn (round ``r`` of every row before round ``r + 1`` of any, so drift on a
shared machine hits all rows alike), float32, 16 segments, ``upgd-ref bench``'s
hyper-parameters: the full step (VGS + adaptive noise) and ``upgd_ref.noise(..., out=)`` in
each format, and the noise-free step. Prints medians and minima in ns per parameter and the
issue-19 ratios (full / noise-free, and format 2's noise over format 1's). Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

import upgd_ref
from upgd_ref import AdaptiveUPGD, FlatLayout, VarianceGradientScaler
from upgd_ref.bench import STEP_HYPER, VGS_HYPER


def rows(size: int) -> dict:
    """Name -> (call, untimed preparation)."""
    layout = FlatLayout([(size // 16,)] * 16, dtype="float32")
    data = np.random.default_rng(0)
    params0 = layout.pack([data.standard_normal(s) for s in layout.shapes])
    grads0 = layout.pack([0.1 * data.standard_normal(s) for s in layout.shapes])
    out, table = layout.zeros(), {}
    for version in (1, 2):
        params, grads = params0.copy(), grads0.copy()
        opt = AdaptiveUPGD(layout, backend="numba", noise_version=version, **STEP_HYPER)
        vgs = VarianceGradientScaler(layout, backend="numba", **VGS_HYPER)
        table[f"full step, format {version}"] = (lambda opt=opt, vgs=vgs, p=params, g=grads: opt.step(p, g, vgs=vgs),
                                                 lambda g=grads: np.copyto(g, grads0))
        table[f"noise alone, format {version}"] = (
            lambda v=version: upgd_ref.noise(layout, 0, 5, out=out, backend="numba", noise_version=v), lambda: None)
    params = params0.copy()
    quiet = AdaptiveUPGD(layout, backend="numba", **dict(STEP_HYPER, sigma=0.0, adaptive_noise=False))
    table["noise-free step"] = (lambda: quiet.step(params, grads0), lambda: None)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    numba.set_num_threads(args.threads)
    table = rows(args.size)
    for call, prepare in table.values():  # warm-up: compile / load kernels, touch buffers
        prepare()
        call()
    times = {name: [] for name in table}
    for _ in range(args.rounds):
        for name, (call, prepare) in table.items():
            prepare()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    per = {name: (statistics.median(t) / args.size * 1e9, min(t) / args.size * 1e9) for name, t in times.items()}
    print(f"{args.size:,} float32 parameters, {args.threads} threads, {args.rounds} rounds: median [min] ns/param")
    for name, (median, low) in per.items():
        print(f"  {name:<24} {median:8.2f} [{low:.2f}]")
    for k, label in ((0, "median"), (1, "min")):
        full = [per[f"full step, format {v}"][k] / per["noise-free step"][k] for v in (1, 2)]
        noise = per["noise alone, format 2"][k] / per["noise alone, format 1"][k]
        print(f"  {label}: full / noise-free {full[0]:.2f} (format 1), {full[1]:.2f} (format 2); "
              f"noise format 2 / format 1 {noise:.2f}")


if __name__ == "__main__":
    main()
