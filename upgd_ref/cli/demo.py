"""``upgd-ref demo``: the four demo runs (:mod:`upgd_ref.demo`), their table, findings, plot."""

from __future__ import annotations

import json
import os
import sys
import time

from .. import demo
from ..config import ConfigError, load_config
from .arguments import integer_at_least, seed
from .progress import ProgressBar


def probe_description(config, steps: int, seed: int) -> str:
    """What :func:`upgd_ref.demo.probe_grad_norm` measured, in words (both commands print it)."""
    h = config.hyperparams
    norm = "per-segment" if config.noise_norm == "segment" else "global"
    return (f"median {norm} gradient norm before VGS over the first {steps} steps of the demo workload, "
            f"trained with lr {h['lr']:g} from {config.source} (noise fixed at sigma {h['sigma']:g}, "
            f"VGS off, seed {seed})")


def run(args) -> int:
    try:
        config = load_config(args.config) if args.config else load_config(demo.DEMO_CONFIG, source="demo defaults")
    except ConfigError as exc:
        print(f"upgd-ref demo: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    progress = ProgressBar(len(demo.RUNS) * args.steps, enabled=not args.quiet)
    started = time.perf_counter()
    result = demo.run_demo(config, steps=args.steps, seed=args.seed, progress=progress)
    progress.close()
    elapsed = time.perf_counter() - started
    print(f"upgd-ref demo: {args.steps} steps x {len(demo.RUNS)} runs, seed {args.seed}, {elapsed:.1f}s "
          f"(config: {config.source})")
    probe_steps = min(demo.PROBE_STEPS, args.steps)
    print(f"calibration norm N = {result['probe_grad_norm']:.4g}: {probe_description(config, probe_steps, args.seed)}")
    print(f"  -> sigma_abs {result['sigma_abs']:.4g} (fixed) <-> sigma_rel {result['sigma_rel']:.4g} (adaptive)")
    print()
    print(demo.format_table(result["summaries"]))
    print()
    for line in demo.findings(result["summaries"], result["sigma_rel"]):
        print(line)
    png = os.path.join(args.out, "demo.png")
    demo.plot(result, png)
    summary_path = os.path.join(args.out, "demo.json")
    with open(summary_path, "w", encoding="utf-8") as fh:
        json.dump({k: result[k] for k in ("summaries", "probe_grad_norm", "sigma_abs", "sigma_rel")}
                  | {"steps": args.steps, "seed": args.seed, "config": config.raw}, fh, indent=1)
    print(f"\nwrote {png} and {summary_path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train a toy continual-learning net with fixed/adaptive noise x VGS off/on",
        description=demo.__doc__.split("\n\n")[0].replace("``", ""),
    )
    parser.add_argument("--steps", type=integer_at_least(10), default=2000, help="steps per run, >= 10 (default 2000)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="data, initial weights and noise seed (overrides the config's seed; default 0)")
    parser.add_argument("--out", default="demo-out", help="directory for demo.png and demo.json (default demo-out)")
    parser.add_argument("--config", help="YAML config (specs/configs/ format) replacing the demo's base")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
