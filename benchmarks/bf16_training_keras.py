"""Keras training with bfloat16 variables: AdaptiveUPGD against Keras Adam on a small real
task (``specs/adapters-tensorflow.md`` §5).

Run: ``python benchmarks/bf16_training_keras.py [--epochs N]`` (KERAS_BACKEND selects the
backend; TensorFlow by default).

Task: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; no download), an MLP
64-64-10 under the ``"bfloat16"`` dtype policy (bfloat16 variables, bfloat16 compute),
fixed seed, 1,437 training and 360 test images, batch 64. Each row starts from the same
initial weights (rounded to its variables' dtype). The table gives the training loss
before and after, its relative decrease, the test accuracy and the seconds of ``fit``. Nothing here asserts: the test
``tests/adapters/tensorflow/test_keras_bf16_training.py`` checks the loss decrease.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from upgd_ref.adapters.tensorflow import AdaptiveUPGD  # noqa: E402

SEED = 0
OPTIMIZERS = {
    # A learning rate and noise a practitioner would start from for each.
    "Adam": lambda: keras.optimizers.Adam(learning_rate=3e-3),
    "AdaptiveUPGD": lambda: AdaptiveUPGD(learning_rate=3e-3, sigma=1e-3, weight_decay=0.0, seed=SEED),
}
#: The rows: optimizer and dtype policy. Keras Adam computes in its variables' dtype; with
#: bfloat16 variables its loss does not move at all here (0.999 rounds to 1.0 in bfloat16,
#: which zeroes its bias-corrected step size; specs/precision.md §3 on 16-bit state). The
#: mixed_bfloat16 row (float32 variables) shows what Adam reaches with float32 state.
ROWS = (("Adam", "bfloat16"), ("Adam", "mixed_bfloat16"), ("AdaptiveUPGD", "bfloat16"))


def digits():
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.default_rng(SEED).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def train(name: str, policy: str = "bfloat16", epochs: int = 10) -> dict:
    """Train the MLP with optimizer ``name`` under dtype ``policy``; the loss before and
    after (full training set), test accuracy, seconds of ``fit``."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(SEED)
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10)])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=OPTIMIZERS[name](), loss=loss, metrics=["accuracy"])
        x, y, x_test, y_test = digits()
        before = float(model.evaluate(x, y, verbose=0)[0])
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
        seconds = time.perf_counter() - start
        after = float(model.evaluate(x, y, verbose=0)[0])
        accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
        dtype = keras.backend.standardize_dtype(model.trainable_variables[0].dtype)
    finally:
        keras.config.set_dtype_policy(previous)
    return dict(optimizer=name, policy=policy, dtype=dtype, before=before, after=after, decrease=(before - after) / before,
                accuracy=accuracy, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = [train(name, policy, args.epochs) for name, policy in ROWS]
    print(f"backend {keras.backend.backend()}, digits MLP, {args.epochs} epochs")
    print("| optimizer | policy (variables) | loss before | loss after | decrease | test accuracy | fit seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['policy']} ({r['dtype']}) | {r['before']:.4f} | {r['after']:.4f} | "
              f"{100 * r['decrease']:.1f}% | "
              f"{r['accuracy']:.3f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
