"""``upgd-ref bench``: the kernels timed against the NumPy reference and the baselines
(:mod:`upgd_ref.bench`; the CUDA kernels with ``--backend cupy``, :mod:`upgd_ref.bench_cuda`)."""

from __future__ import annotations

import argparse
import json
import sys

from .. import bench
from .arguments import integer_at_least
from .progress import StatusLine


def size(text: str) -> int:
    """A parameter count: ``4096``, ``250k``, ``1M``, ``1B``."""
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    try:
        value = float(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1B, 1M, 250k, 4096)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive whole number, got {text!r}")
    return int(value)


def sizes(text: str) -> list[int]:
    return [size(part) for part in text.split(",") if part]


def dtypes(text: str) -> list[str]:
    chosen = [part for part in text.split(",") if part]
    bad = [d for d in chosen if d not in bench.ALL_DTYPES]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"dtypes must be among {bench.ALL_DTYPES}, got {text!r}")
    return chosen


def _baselines(args) -> list:
    """The baseline modules: --baseline files, else the checkout's (none with --no-torch)."""
    if args.no_torch:
        return []
    return [bench.load_baseline(path) for path in (args.baseline or bench.default_baselines())]


def run(args) -> int:
    progress = StatusLine(quiet=args.quiet)
    try:
        if args.backend == "cupy":
            from ..bench_cuda import DEFAULT_CUDA_SIZES, format_cuda_report, run_cuda_benchmark

            result = run_cuda_benchmark(args.sizes or DEFAULT_CUDA_SIZES, args.dtypes or ["float32"],
                                        args.segments, args.repeats, progress=progress)
            report = format_cuda_report(result)
        else:
            result = bench.run_benchmark(args.sizes or bench.DEFAULT_SIZES, args.dtypes or bench.DEFAULT_DTYPES,
                                         args.threads, args.segments, args.repeats, baselines=_baselines(args),
                                         cold_jit=args.cold_jit, progress=progress,
                                         scaling_sizes=bench.DEFAULT_SCALING_SIZES if args.scaling is None
                                         else args.scaling)
            report = bench.format_report(result)
    except (ImportError, RuntimeError, ValueError, FileNotFoundError) as exc:
        progress.done()
        print(f"upgd-ref bench: error: {exc}", file=sys.stderr)
        return 2
    progress.done()
    print(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the Numba kernels against the NumPy reference and PyTorch",
        description="Time one optimizer step of the Numba kernels, the NumPy reference and the baselines "
                    "(PyTorch: benchmarks/production_torch.py, found in a checkout or given with "
                    "--baseline), side by side; prints one table in ns/parameter and ms/step.",
    )
    parser.add_argument("--backend", choices=("numba", "cupy"), default="numba",
                        help="numba (default): the CPU kernels against NumPy and PyTorch; cupy: the CUDA "
                             "kernels against the GPU's device-to-device copy bandwidth")
    parser.add_argument("--sizes", type=sizes, default=None,
                        help="comma-separated parameter counts, e.g. 1M,10M (default; 1M,100M,1B with "
                             "--backend cupy) or 4096")
    parser.add_argument("--scaling", type=sizes, default=None, metavar="SIZES",
                        help="sizes of the scaling table (float32 full and noise-free steps and a copy; default "
                             + ",".join(bench.size_label(n) for n in bench.DEFAULT_SCALING_SIZES)
                             + "; an empty string for none)")
    parser.add_argument("--dtypes", type=dtypes, default=None,
                        help="comma-separated, from float32,float64,float16,bfloat16 (default float32,float64; float32 "
                             "with --backend cupy; 16-bit: specs/precision.md)")
    parser.add_argument("--threads", type=integer_at_least(1), default=None,
                        help="Numba and torch threads (default: NUMBA_NUM_THREADS)")
    parser.add_argument("--segments", type=integer_at_least(1), default=bench.DEFAULT_SEGMENTS,
                        help=f"segments (tensors) the parameters are split into (default {bench.DEFAULT_SEGMENTS})")
    parser.add_argument("--repeats", type=integer_at_least(1), default=bench.DEFAULT_REPEATS,
                        help=f"timed repetitions per row (default {bench.DEFAULT_REPEATS}; rows slower than "
                             f"{bench.SLOW_CALL_SECONDS} s per call get {bench.MIN_SLOW_REPEATS})")
    parser.add_argument("--baseline", action="append", metavar="FILE",
                        help="a baseline file whose rows are timed too (repeatable; default: "
                             "benchmarks/production_torch.py when running from a checkout)")
    parser.add_argument("--no-torch", action="store_true", help="leave out the baseline (PyTorch) rows")
    parser.add_argument("--cold-jit", action="store_true",
                        help="also time compiling every kernel from scratch (a fresh process, empty cache)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to FILE as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    parser.set_defaults(run=run)
