"""Benchmark: the cost of one standard normal, ns per normal, our counter-based generator
(``specs/noise.md``, Numba kernels ``upgd_ref/kernels/numba_noise.py``) side by side with
``torch.randn`` and NumPy's ``standard_normal`` for the same count and dtype.

Run: ``python benchmarks/bench_noise.py [--sizes 1000000 10000000] [--reps 7] [--threads 2]
[--dtype float32]``.

Rows (all timed round-robin in one process, repetition ``r`` of every row before repetition
``r + 1`` of any, after an untimed warm-up, so drift on a shared machine hits all rows alike):

* numba serial / numba parallel: ``NumbaBackend.noise`` into a preallocated buffer (one
  thread / ``--threads`` threads), what ``upgd_ref.noise`` and the fused step's pass 2 run;
  the same in noise format 2 (``noise_version=2``, the binary32 transform, ``specs/noise-v2.md``);
* part: ...: where the time of the serial generator goes, each part in a compiled loop over
  one chunk-sized, L1-resident tile (no Python call per tile): the Philox words
  (``fill_words``), the whole transform (``fill_normals``), its radius half
  (``sqrt(-2 LOG)``), its sincos half, and only converting and storing the words; format 2's
  Philox words (the same words, 512-bit vectors) and transform;
* torch.randn: ``torch.randn(n, out=buf)`` with ``torch.set_num_threads(--threads)``;
* numpy standard_normal: ``Generator.standard_normal(n, dtype, out=buf)`` (PCG64, ziggurat,
  one thread).

The table shows the median and the minimum ns per normal and the median's ratio to
``torch.randn`` (the issue's target for the noise: <= 0.2). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numba
import numpy as np
import torch
from numba import njit

from upgd_ref import FlatLayout
from upgd_ref.kernels import NumbaBackend
from upgd_ref.kernels.chunk_abi import CHUNK
from upgd_ref.kernels import numba_noise_v2
from upgd_ref.kernels.numba_noise import cos_sin_of_turn, fill_normals, fill_words, log_of_uniform

SEED, STEP = 12345, 7


@njit(error_model="numpy")
def _philox_loop(n, words, step_lo, key0):
    """The Philox words of ``n`` normals, one chunk-sized tile at a time."""
    for first in range(0, n, words.size):
        fill_words(words, np.uint64(first // 4), step_lo, np.uint64(0), key0, np.uint64(0))


@njit(error_model="numpy")
def _transform_loop(n, tile, words):
    """Box-Muller of ``n`` normals on one tile of fixed words (no Philox)."""
    for _ in range(0, n, tile.size):
        fill_normals(tile, words)


@njit(error_model="numpy")
def _transform_loop_v2(n, tile, words):
    """:func:`_transform_loop` in noise format 2."""
    for _ in range(0, n, tile.size):
        numba_noise_v2.fill_normals(tile, words)


def _pair_loop(pair):
    """A compiled loop storing ``pair(radius word, angle word)`` of each word pair of one tile,
    over ``n`` normals: one part of the transform."""

    @njit(error_model="numpy")
    def loop(n, tile, words):
        for _ in range(0, n, tile.size):
            for i in range(tile.size // 2):
                first, second = pair(np.uint64(words[2 * i]), np.uint64(words[2 * i + 1]))
                tile[2 * i] = first
                tile[2 * i + 1] = second
    return loop


@njit(inline="always")
def _radius(radius_word, angle_word):
    """``r = sqrt(-2 LOG(w))``, twice: the log half of the transform."""
    radius = math.sqrt(-2.0 * log_of_uniform(radius_word))
    return radius, radius


@njit(inline="always")
def _angle(radius_word, angle_word):
    """``(COS, SIN)``: the sincos half of the transform."""
    return cos_sin_of_turn(angle_word)


@njit(inline="always")
def _words(radius_word, angle_word):
    """The words themselves: the conversion and the stores, the floor under the transform."""
    return np.float64(radius_word), np.float64(angle_word)


_RADIUS_LOOP, _ANGLE_LOOP, _WORDS_LOOP = _pair_loop(_radius), _pair_loop(_angle), _pair_loop(_words)


def _profile_rows(n: int, dtype) -> dict:
    """The parts of the generator on one chunk-sized, L1-resident tile, in compiled loops."""
    words = np.random.default_rng(0).integers(0, 2**32, CHUNK, dtype=np.uint32)
    tile = np.empty(CHUNK, dtype)
    scratch = np.empty(CHUNK, np.uint32)
    return {
        "  part: philox words": lambda: _philox_loop(n, scratch, np.uint64(STEP), np.uint64(SEED)),
        "  part: transform (all)": lambda: _transform_loop(n, tile, words),
        "  part: transform, radius only": lambda: _RADIUS_LOOP(n, tile, words),
        "  part: transform, sincos only": lambda: _ANGLE_LOOP(n, tile, words),
        "  part: transform, stores only": lambda: _WORDS_LOOP(n, tile, words),
        "  part: format 2 transform": lambda: _transform_loop_v2(n, tile, words),
    }


def rows(n: int, dtype, threads: int) -> dict:
    """Name -> a callable producing ``n`` normals of ``dtype`` (buffers allocated here, once)."""
    layout = FlatLayout([(n,)], dtype=dtype)
    ours = layout.zeros(dtype=dtype)
    serial, parallel = NumbaBackend(parallel_min_size=2**62), NumbaBackend(parallel_min_size=0)
    torch_out = torch.empty(n, dtype=getattr(torch, dtype))
    numpy_out = np.empty(n, dtype)
    generator = np.random.default_rng(0)

    def numba_parallel(version=1):
        numba.set_num_threads(threads)
        parallel.noise(layout=layout, seed=SEED, step=STEP, out=ours, noise_version=version)

    return {
        "numba serial": lambda: serial.noise(layout=layout, seed=SEED, step=STEP, out=ours),
        f"numba parallel ({threads} thr)": numba_parallel,
        "numba serial, format 2": lambda: serial.noise(layout=layout, seed=SEED, step=STEP, out=ours, noise_version=2),
        f"numba parallel ({threads} thr), format 2": lambda: numba_parallel(2),
        f"torch.randn ({threads} thr)": lambda: torch.randn(n, out=torch_out),
        "numpy standard_normal (1 thr)": lambda: generator.standard_normal(n, dtype=dtype, out=numpy_out),
    } | _profile_rows(n, dtype)


def measure(n: int, dtype, threads: int, reps: int) -> dict:
    """Name -> per-repetition seconds, round-robin over the rows."""
    table = rows(n, dtype, threads)
    for run in table.values():  # warm-up: compile / load kernels, touch buffers
        run()
    times = {name: [] for name in table}
    for _ in range(reps):
        for name, run in table.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def format_table(n: int, dtype, times: dict) -> str:
    torch_name = next(name for name in times if name.startswith("torch.randn"))
    reference = statistics.median(times[torch_name])
    lines = [f"{n:,} normals, {dtype}, {len(next(iter(times.values())))} repetitions",
             f"  {'row':<32} {'median ns/normal':>17} {'min ns/normal':>14} {'x torch.randn':>14}"]
    for name, seconds in times.items():
        median = statistics.median(seconds)
        lines.append(f"  {name:<32} {median / n * 1e9:>17.2f} {min(seconds) / n * 1e9:>14.2f} "
                     f"{median / reference:>14.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"numba {numba.__version__} (threading layer chosen on first parallel launch), "
          f"torch {torch.__version__}, numpy {np.__version__}")
    for n in args.sizes:
        print(format_table(n, args.dtype, measure(n, args.dtype, args.threads, args.reps)))


if __name__ == "__main__":
    main()
