"""``upgd-ref migrate-config``: a fixed-sigma config turned into adaptive (relative) noise,
written over the original YAML so its comments stay (:func:`upgd_ref.config.migrate`)."""

from __future__ import annotations

import os
import sys

from ..config import load_config, migrate, migrated_yaml, typical_norm_from_npz
from .arguments import integer_at_least, positive_float, seed
from .demo import probe_description


def _norm(args, config) -> tuple[float, str]:
    """The typical gradient norm N and where it came from."""
    if args.grad_norm is not None:
        return args.grad_norm, "given with --grad-norm"
    if args.probe == "demo":
        from ..demo import probe_grad_norm  # the demo's network, only when asked for

        norm = probe_grad_norm(config, steps=args.probe_steps, seed=args.probe_seed)
        return norm, (f"{probe_description(config, args.probe_steps, args.probe_seed)}; a toy network: "
                      "prefer --grad-norm or --probe GRADS.npz from your own training")
    norm = typical_norm_from_npz(args.probe, config.noise_norm)
    return norm, f"median {config.noise_norm} norm of the gradients in {args.probe}"


def default_out(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.adaptive{ext or '.yaml'}"


def run(args) -> int:
    out = args.out or default_out(args.config)
    if os.path.abspath(out) == os.path.abspath(args.config):
        print("upgd-ref migrate-config: --out must differ from the input config", file=sys.stderr)
        return 2
    if os.path.exists(out) and not args.force:
        print(f"upgd-ref migrate-config: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        norm, where = _norm(args, config)
        new, lines = migrate(config, float(norm), where)
    except ValueError as exc:  # ConfigError, or a probe that measured no gradient at all
        print(f"upgd-ref migrate-config: {exc}", file=sys.stderr)
        return 2
    with open(args.config, encoding="utf-8") as fh:
        original = fh.read()
    old_kwargs = config.raw.get("optimizer_kwargs") or {}
    changed = [f"optimizer_kwargs.{k}" for k, v in (new.get("optimizer_kwargs") or {}).items()
               if k not in old_kwargs or old_kwargs[k] != v]
    header = [f"Migrated by `upgd-ref migrate-config` from {os.path.basename(args.config)}:", *lines,
              f"The comments below are {os.path.basename(args.config)}'s; new values: {', '.join(changed)}."]
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(migrated_yaml(original, new, "\n".join(header)))
    print(f"{args.config} -> {out}")
    for line in lines:
        print(line)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "migrate-config", help="convert a fixed-sigma config to adaptive (relative) noise",
        description="Turn the absolute sigma of a fixed-noise config into a relative one, "
                    "sigma_rel = sigma_abs / N, N a typical gradient norm. The new file keeps the "
                    "old one's comments and layout; the reasoning goes on top as comments.",
    )
    parser.add_argument("config", help="the old YAML config (specs/configs/ format)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grad-norm", type=positive_float, help="typical per-segment gradient norm N")
    source.add_argument("--probe", metavar="demo|GRADS.npz",
                        help="measure N: 'demo' trains the demo workload with the config's hyper-parameters "
                             "(the number `upgd-ref demo --config CONFIG` prints as its calibration norm); "
                             "an .npz holds one member per segment shaped (steps, ...) of recorded "
                             "gradients (before VGS)")
    parser.add_argument("--probe-steps", type=integer_at_least(1), default=200,
                        help="steps of the demo probe (default 200, as the demo)")
    parser.add_argument("--probe-seed", type=seed, default=0, help="data and noise seed of the demo probe (default 0)")
    parser.add_argument("--out", help="new YAML (default: OLD.adaptive.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.set_defaults(run=run)
