"""Benchmark: per-step cost of the Keras optimizer against Keras Adam on each Keras backend.

Run: ``python benchmarks/bench_keras.py [--backends tensorflow,jax,torch] [--steps N]
[--reps R] [--width W]``.

Each backend runs in its own subprocess (``KERAS_BACKEND`` is fixed at import). Per backend
and compile mode (TensorFlow: graph without XLA = the host path, and ``jit_compile=True`` =
the native path; JAX: ``jit_compile=True``, the native path; torch: eager, the host path),
an MLP 64-W-W-10 (float32) is trained with ``model.fit`` on random data, one epoch of
``--steps`` batches of 64, after a warm-up epoch that traces and compiles; the time of the
epoch divided by the steps, the minimum over ``--reps`` round-robin repetitions (Adam and
AdaptiveUPGD alternate, so drift on a shared machine hits both alike). Nothing here asserts
a time: the script prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BACKEND_MODES = {"tensorflow": (False, True), "jax": (True,), "torch": (False,)}


def _child(backend: str, steps: int, reps: int, width: int) -> list:
    """Runs under ``KERAS_BACKEND=backend``: the rows of that backend."""
    import keras
    import numpy as np

    from upgd_ref.adapters.tensorflow import AdaptiveUPGD

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64 * steps, 64)).astype("float32")
    y = rng.integers(0, 10, size=(64 * steps,)).astype("int32")
    makers = {"Adam": lambda: keras.optimizers.Adam(1e-3),
              "AdaptiveUPGD": lambda: AdaptiveUPGD(1e-3, sigma=1e-3, adaptive_noise=True, seed=0)}
    rows = []
    for jit in BACKEND_MODES[backend]:
        models = {}
        for name, make in makers.items():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(width, activation="relu"),
                                      keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)])
            model.compile(optimizer=make(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          jit_compile=jit)
            model.fit(x, y, batch_size=64, epochs=1, verbose=0)  # warm-up: trace and compile
            models[name] = model
        best = {name: float("inf") for name in makers}
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model.fit(x, y, batch_size=64, epochs=1, verbose=0)
                best[name] = min(best[name], (time.perf_counter() - start) / steps)
        params = sum(int(np.prod(v.shape)) for v in models["Adam"].trainable_variables)
        rows.append(dict(backend=backend, jit=jit, params=params, adam_ms=1e3 * best["Adam"],
                         upgd_ms=1e3 * best["AdaptiveUPGD"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.reps, args.width)))
        return
    rows = []
    for backend in args.backends.split(","):
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run([sys.executable, __file__, "--child", backend, "--steps", str(args.steps),
                               "--reps", str(args.reps), "--width", str(args.width)],
                              env=env, capture_output=True, text=True, check=True)
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(f"model.fit per step, MLP 64-{args.width}-{args.width}-10, batch 64, min of {args.reps} x {args.steps} steps")
    print("| backend | jit_compile | path | params | Adam ms | AdaptiveUPGD ms | overhead ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        path = "native" if r["backend"] == "jax" or (r["backend"] == "tensorflow" and r["jit"]) else "host"
        print(f"| {r['backend']} | {r['jit']} | {path} | {r['params']:,} | {r['adam_ms']:.2f} | {r['upgd_ms']:.2f} | "
              f"{r['upgd_ms'] - r['adam_ms']:.2f} | {r['upgd_ms'] / r['adam_ms']:.2f} |")


if __name__ == "__main__":
    main()
