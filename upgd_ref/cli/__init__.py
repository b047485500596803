"""The ``upgd-ref`` command line: argparse, printing and exit codes, one module per subcommand.

Each module in :data:`SUBCOMMANDS` has ``register(subparsers)``, which adds its parser and
sets ``run(args) -> int``. The library modules they call return values and strings; only
this package prints (``specs/architecture.md``).
"""

from __future__ import annotations

import argparse
import importlib

from .. import __version__

SUBCOMMANDS: tuple[str, ...] = ("example", "noise", "info", "demo", "tune", "migrate_config", "golden", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upgd-ref",
        description="Reference AdaptiveUPGD + Variance Gradient Scaler: examples, noise, golden vectors, "
                    "benchmarks, diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"upgd_ref {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
