"""``upgd-ref demo``: the four demo runs (:mod:`upgd_ref.demo`), the seed design's claims
measured (:mod:`upgd_ref.claims`), their tables and the picture (:mod:`upgd_ref.demo_plot`)."""

from __future__ import annotations

import json
import os
import sys
import time

from .. import demo
from ..claims import cases, report, run_claims, summary_json
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
    from ..demo_plot import plot  # matplotlib only when a picture is drawn

    try:
        config = load_config(args.config) if args.config else load_config(demo.DEMO_CONFIG, source="demo defaults")
    except ConfigError as exc:
        print(f"upgd-ref demo: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        steps, workload, config = demo.quick_settings(config, args.seed)
    else:
        steps, workload = args.steps, demo.Workload()
    claim_configs = cases(config, args.seed)
    warmup = max((c.vgs or {}).get("warmup_steps", 0) for c in claim_configs.values())  # claims are measured after it
    if steps <= warmup:
        print(f"upgd-ref demo: --steps must be more than the VGS warmup ({warmup} steps), got {steps}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    progress = ProgressBar((len(demo.RUNS) + len(claim_configs)) * steps, enabled=not args.quiet)
    started = time.perf_counter()
    runs = demo.Runs(workload, steps, args.seed, progress)
    result = demo.run_demo(config, steps=steps, seed=args.seed, runs=runs)
    claims = run_claims(config, runs)
    progress.close()
    print(f"upgd-ref demo: {steps} steps x {len(runs)} runs, seed {args.seed}, {time.perf_counter() - started:.1f}s "
          f"(config: {config.source}{', --quick' if args.quick else ''})")
    probe_steps = min(demo.PROBE_STEPS, steps)
    print(f"calibration norm N = {result['probe_grad_norm']:.4g}: {probe_description(config, probe_steps, args.seed)}")
    print(f"  -> sigma_abs {result['sigma_abs']:.4g} (fixed) <-> sigma_rel {result['sigma_rel']:.4g} (adaptive)")
    print()
    print(report(result, claims))
    png, summary_path = os.path.join(args.out, "demo.png"), os.path.join(args.out, "demo.json")
    plot(result, claims, png, workload, title=f"upgd-ref demo: an 8-32-1 tanh network learning a target function "
         f"redrawn every {workload.drift_every} steps; {steps} steps, seed {args.seed}")
    with open(summary_path, "w", encoding="utf-8") as fh:
        json.dump(summary_json(result, claims) | {"steps": steps, "seed": args.seed, "quick": args.quick,
                                                 "config": config.raw}, fh, indent=1)
    print(f"\nwrote {png} and {summary_path}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="measure the seed design's claims: fixed/adaptive noise x VGS settings on a toy net",
        description=demo.__doc__.split("\n\n")[0].replace("``", ""),
    )
    parser.add_argument("--steps", type=integer_at_least(10), default=demo.DEFAULT_STEPS,
                        help=f"steps per run, more than the VGS warmup (default {demo.DEFAULT_STEPS}, warmup 100)")
    parser.add_argument("--seed", type=seed, default=0,
                        help="data, initial weights and noise seed (overrides the config's seed; default 0)")
    parser.add_argument("--out", default="demo-out", help="directory for demo.png and demo.json (default demo-out)")
    parser.add_argument("--config", help="YAML config (specs/configs/ format) replacing the demo's base")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI mode: {demo.QUICK['steps']} steps, VGS warmup {demo.QUICK['warmup_steps']}, "
                             f"target redrawn every {demo.QUICK['drift_every']} steps (replaces --steps)")
    parser.set_defaults(run=run)
