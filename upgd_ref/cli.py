"""The ``upgd-ref`` command line.

Subcommands live in their own modules; each module in :data:`SUBCOMMAND_MODULES` has a
``register(subparsers)`` that adds its parser and sets ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import numpy as np

from . import __version__
from .backends import BACKENDS
from .layout import FlatLayout
from .optimizer import AdaptiveUPGD
from .rng import standard_normals
from .scaler import VarianceGradientScaler


def _example(args) -> int:
    """A tiny worked example: a linear regression whose gradients VGS shrinks."""
    rng = np.random.default_rng(args.seed)
    layout = FlatLayout([(4, 3), (3,)], dtype="float64")
    weights_true = rng.standard_normal((4, 3))
    params = layout.zeros()
    opt = AdaptiveUPGD(layout, lr=args.lr, sigma=args.sigma, adaptive_noise=True, seed=args.seed)
    vgs = VarianceGradientScaler(layout, warmup_steps=10)
    print(f"{'step':>5} {'loss':>10} {'vgs f':>7} {'|g| seg0':>10} {'noise std':>10} {'NSR':>7}")
    for step in range(1, args.steps + 1):
        w, b = layout.unpack(params)
        x = rng.standard_normal((32, 4))
        err = x @ w + b - x @ weights_true
        grads = layout.pack([x.T @ err / 32, err.mean(axis=0)])
        factor = vgs.scale(grads)
        info = opt.step(params, grads)
        vgs.update(grads)
        if step % max(1, args.steps // 10) == 0 or step == 1:
            print(f"{step:5d} {0.5 * np.mean(err**2):10.4g} {factor:7.4f} {info.grad_norm[0]:10.4g} "
                  f"{info.noise_std[0]:10.4g} {info.noise_to_signal[0]:7.4f}")
    print(f"noise-to-signal stays at sigma={args.sigma} whatever VGS does (adaptive, instant noise).")
    return 0


def _noise(args) -> int:
    values = standard_normals(args.seed, args.step, args.start, args.count, dtype=np.dtype(args.dtype))
    for index, value in enumerate(values, start=args.start):
        print(f"{index}\t{float(value).hex()}\t{float(value):.17g}")
    return 0


def _info(args) -> int:
    print(f"upgd_ref {__version__}")
    print(f"numpy {np.__version__}")
    print(f"backends: {', '.join(BACKENDS)}")
    return 0


SUBCOMMAND_MODULES: list[str] = ["upgd_ref.demo", "upgd_ref.tune_command", "upgd_ref.config", "upgd_ref.golden", "upgd_ref.bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upgd-ref",
        description="Reference AdaptiveUPGD + Variance Gradient Scaler: examples, noise, diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"upgd_ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    example = sub.add_parser("example", help="run a tiny worked example and print its trace")
    example.add_argument("--steps", type=int, default=200)
    example.add_argument("--seed", type=int, default=0)
    example.add_argument("--lr", type=float, default=0.05)
    example.add_argument("--sigma", type=float, default=0.01, help="relative noise (adaptive)")
    example.set_defaults(run=_example)

    noise = sub.add_parser("noise", help="print the standard normals of (seed, step, index range)")
    noise.add_argument("--seed", type=int, default=0)
    noise.add_argument("--step", type=int, default=1)
    noise.add_argument("--start", type=int, default=0)
    noise.add_argument("--count", type=int, default=8)
    noise.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    noise.set_defaults(run=_noise)

    info = sub.add_parser("info", help="versions and available backends")
    info.set_defaults(run=_info)

    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
