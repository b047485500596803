"""``upgd-ref tune``: the sweep of :mod:`upgd_ref.tune`, its table and picture."""

from __future__ import annotations

import json
import os
import sys
import time

from ..tune import QUICK_GRID, Grid, format_tuning, plot_tuning, recommend, runs_in, sweep
from .progress import ProgressBar


def run(args) -> int:
    grid = QUICK_GRID if args.quick else Grid()
    os.makedirs(args.out, exist_ok=True)
    progress = ProgressBar(runs_in(grid), enabled=not args.quiet)
    started = time.perf_counter()
    try:
        rows = sweep(grid, progress=progress)
    except RuntimeError as exc:  # scikit-learn missing
        print(f"upgd-ref tune: {exc}", file=sys.stderr)
        return 2
    progress.close()
    print(f"upgd-ref tune: {runs_in(grid)} runs ({len(grid.seeds)} seeds x {grid.epochs} epochs), "
          f"{time.perf_counter() - started:.0f}s{', --quick' if args.quick else ''}\n")
    print(format_tuning(rows))
    png, table = os.path.join(args.out, "tuning.png"), os.path.join(args.out, "tuning.json")
    plot_tuning(rows, png, title=f"upgd-ref tune: 64-64-10 MLP on scikit-learn digits, {grid.epochs} epochs, "
                f"{len(grid.seeds)} seeds")
    with open(table, "w", encoding="utf-8") as fh:
        json.dump({"rows": rows, "recommended": recommend(rows), "quick": args.quick}, fh, indent=1)
    print(f"\nwrote {png} and {table}")
    return 0


def register(subparsers) -> None:
    """Add ``upgd-ref tune``."""
    parser = subparsers.add_parser(
        "tune", help="sweep lr, sigma and VGS alpha of AdaptiveUPGD against Adam on scikit-learn digits",
        description="Measure AdaptiveUPGD's learning rate, sigma and VGS alpha against Adam on scikit-learn's "
                    "digits (a 64-64-10 MLP; needs scikit-learn: pip install 'upgd-ref[tune]'). A few minutes.")
    parser.add_argument("--out", default="tune-out", help="directory for tuning.png and tuning.json (default tune-out)")
    parser.add_argument("--quick", action="store_true", help="a tiny grid in a few seconds (for CI), not for advice")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
