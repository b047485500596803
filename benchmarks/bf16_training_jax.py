"""A bfloat16 training run in JAX: ``adaptive_upgd`` against ``optax.adam``, both on bfloat16
parameters (``specs/adapters-jax.md`` §5.2, issue 15's acceptance run).

Task: scikit-learn's digits (1797 8x8 images, 10 classes; 1437 train, 360 test, fixed split),
an MLP 64-64-10 with bfloat16 weights and biases (the forward pass in bfloat16, the loss in
float32), mini-batches of 128 drawn with a fixed seed, the same initial parameters and batches
for both optimizers, ``learning_rate = 1e-3`` for both and every other hyper-parameter at its
default (``adaptive_upgd``: float32 state, rounding to nearest). The step is jitted.

Run: ``python benchmarks/bf16_training_jax.py [--steps N] [--seed S] [--rounding nearest|stochastic]``.
Prints a table: initial and final training loss (full training set), test accuracy, and the
wall time of the run (compilation included). Nothing here asserts anything; the short version
is ``tests/adapters/jax/test_jax_bf16_training.py``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from upgd_ref.adapters import jax as uj

LR = 1e-3
BATCH = 128
HIDDEN = 64


def digits(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: digits scaled to [0, 1], a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = (data.data[order] / 16.0).astype(np.float32), data.target[order].astype(np.int32)
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def init_params(seed: int, dtype=jnp.bfloat16):
    """He-initialised MLP 64-HIDDEN-10 in ``dtype``."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, HIDDEN)) * np.sqrt(2.0 / 64)
    w2 = rng.standard_normal((HIDDEN, 10)) * np.sqrt(2.0 / HIDDEN)
    return {"w1": jnp.asarray(w1, dtype), "b1": jnp.zeros(HIDDEN, dtype),
            "w2": jnp.asarray(w2, dtype), "b2": jnp.zeros(10, dtype)}


def logits(params, x):
    dtype = params["w1"].dtype
    h = jax.nn.relu(x.astype(dtype) @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"]).astype(jnp.float32)


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def optimizers(rounding: str = "nearest") -> dict:
    return {"optax.adam": optax.adam(LR), "adaptive_upgd": uj.adaptive_upgd(LR, seed=0, rounding=rounding)}


def train(tx, steps: int, seed: int = 0) -> dict:
    """Train the MLP with ``tx`` for ``steps`` mini-batch steps; the run's numbers."""
    x_train, y_train, x_test, y_test = digits(seed)
    params = init_params(seed)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    batches = np.random.default_rng(seed + 1).integers(0, len(y_train), size=(steps, BATCH))
    first = float(loss(params, x_train, y_train))
    start = time.perf_counter()
    for index in batches:
        params, state = step(params, state, x_train[index], y_train[index])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    accuracy = float(jnp.mean(jnp.argmax(logits(params, x_test), axis=1) == y_test))
    dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)}
    return {"initial_loss": first, "final_loss": float(loss(params, x_train, y_train)),
            "test_accuracy": accuracy, "seconds": seconds, "dtypes": dtypes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
    args = parser.parse_args()
    print(f"digits MLP 64-{HIDDEN}-10, bfloat16 params, {args.steps} steps of {BATCH}, lr {LR}, seed {args.seed}, "
          f"jax {jax.__version__}, optax {optax.__version__}")
    print("| optimizer | initial loss | final loss | test accuracy | seconds |")
    print("|---|---|---|---|---|")
    for name, tx in optimizers(args.rounding).items():
        run = train(tx, args.steps, args.seed)
        assert run["dtypes"] == {"bfloat16"}, run["dtypes"]
        print(f"| {name} | {run['initial_loss']:.4f} | {run['final_loss']:.4f} | {run['test_accuracy']:.3f} | "
              f"{run['seconds']:.2f} |")


if __name__ == "__main__":
    main()
