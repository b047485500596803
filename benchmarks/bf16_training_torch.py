"""bfloat16 training (PyTorch): AdaptiveUPGD against torch.optim.Adam, both with bfloat16
parameters, on a small real task.

Run: ``python benchmarks/bf16_training_torch.py [--steps N] [--seed S]``.

The task: scikit-learn's digits (1797 8x8 images, 10 classes; the data set ships inside
scikit-learn), pixels scaled to [0, 1], the first 1400 images for training and the rest for
testing; an MLP 64-128-10 (tanh) whose parameters, activations and logits are bfloat16;
cross-entropy on minibatches of 64 drawn from a fixed generator, the same batches for both
optimizers; the same initial weights. Both optimizers use ``lr=1e-3`` and their other
defaults (AdaptiveUPGD: the production defaults, ``seed=0``; its state is float32 by the
precision policy, ``specs/precision.md`` §3, Adam's bfloat16, torch's convention). The table
shows the training loss before and after (whole training set), the test accuracy and the
wall time of the training loop. Nothing here asserts anything:
``tests/adapters/torch/test_torch_bf16_training.py`` runs a shortened version.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from upgd_ref.adapters.torch import AdaptiveUPGD

TRAIN = 1400
BATCH = 64
LR = 1e-3


def digits():
    """``(x_train, y_train, x_test, y_test)``: bfloat16 pixels in [0, 1], int64 labels."""
    data = load_digits()
    x = torch.from_numpy((data.data / 16.0).astype(np.float32)).to(torch.bfloat16)
    y = torch.from_numpy(data.target.astype(np.int64))
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(torch.bfloat16)


def make_optimizer(name: str, params):
    if name == "AdaptiveUPGD":
        return AdaptiveUPGD(params, lr=LR, seed=0)
    if name == "Adam":
        return torch.optim.Adam(params, lr=LR)
    raise ValueError(f"unknown optimizer {name!r}")


def loss_on(net, x, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(x).float(), y))


def train(name: str, steps: int, seed: int = 0) -> dict:
    """Train the MLP with optimizer ``name`` for ``steps`` minibatches; returns the initial and
    final training loss, the test accuracy and the seconds the loop took."""
    x, y, x_test, y_test = digits()
    net = model(seed)
    optimizer = make_optimizer(name, net.parameters())
    batches = torch.Generator().manual_seed(seed + 1)
    initial = loss_on(net, x, y)
    start = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, TRAIN, (BATCH,), generator=batches)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x[index]), y[index]).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((net(x_test).argmax(dim=1) == y_test).float().mean())
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    return {"initial": initial, "final": loss_on(net, x, y), "accuracy": accuracy, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"digits MLP 64-128-10, bfloat16 parameters, {args.steps} steps of {BATCH}, lr {LR}, seed {args.seed}")
    print(f"{'optimizer':<14}{'initial loss':>14}{'final loss':>12}{'test accuracy':>15}{'wall s':>9}")
    for name in ("AdaptiveUPGD", "Adam"):
        r = train(name, args.steps, args.seed)
        print(f"{name:<14}{r['initial']:>14.4f}{r['final']:>12.4f}{r['accuracy']:>15.3f}{r['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
