"""``upgd-ref example``: a tiny worked example whose trace shows adaptive noise following VGS."""

from __future__ import annotations

import numpy as np

from ..layout import FlatLayout
from ..optimizer import AdaptiveUPGD
from ..scaler import VarianceGradientScaler
from .arguments import integer_at_least, positive_float, seed


def run(args) -> int:
    """A linear regression whose gradients VGS shrinks; prints every tenth step."""
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


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "example", help="run a tiny worked example and print its trace",
        description="Fit a 4x3 linear map with AdaptiveUPGD (adaptive noise) and VGS; print the loss, "
                    "the VGS factor, the gradient norm, the noise std and the noise-to-signal ratio.")
    parser.add_argument("--steps", type=integer_at_least(1), default=200, help="optimizer steps (default 200)")
    parser.add_argument("--seed", type=seed, default=0, help="data and noise seed (default 0)")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default 0.05)")
    parser.add_argument("--sigma", type=positive_float, default=0.01,
                        help="relative noise: noise std = sigma * ||g|| per segment (default 0.01)")
    parser.set_defaults(run=run)
