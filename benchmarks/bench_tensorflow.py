"""Benchmark: the Keras optimizer ``upgd_ref.adapters.tensorflow.AdaptiveUPGD`` against
Keras's own Adam, per training step, on the same models.

Run: ``python benchmarks/bench_tensorflow.py [--models small,medium,large] [--steps N]
[--reps R]``.

Rows, per model (MLPs of about 6k, 270k and 1.9M float32 parameters):

* ``fit``: ``model.fit`` in graph mode (``run_eagerly=False``, ``jit_compile=False``),
  milliseconds per step over ``--steps`` steps of one epoch (tracing done in a warm-up fit).
  SGD shows what the step costs without an optimizer worth the name; Adam is the
  reference; AdaptiveUPGD runs with fixed noise, and with adaptive noise + VGS.
* ``apply``: the optimizer alone: ``apply_gradients`` inside a ``tf.function`` with fixed
  gradients, so the difference to Adam is the optimizer's own cost.
* ``core``: ``upgd_ref.AdaptiveUPGD.step`` on NumPy flat buffers (the core backend the
  adapter calls), i.e. the arithmetic without the TensorFlow bridge (``numpy_function``,
  copies in and out, variable assignments).

Every row of a model is timed in the same process, round-robin (one repetition of each
row in turn, so drift on a shared machine hits all rows alike); the table shows the median
and the minimum per step, the overhead against the Adam row of the same kind
(``fit``/``apply``) by median and by minimum (``Δ``; the minimum is the steadier figure on a
busy machine) and the ratio of the medians. Nothing here asserts a time: the script prints
a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import upgd_ref  # noqa: E402
from upgd_ref.adapters.tensorflow import AdaptiveUPGD  # noqa: E402
from upgd_ref.backends import auto_order  # noqa: E402

MODELS = {
    "small": dict(inputs=32, hidden=(64, 64), outputs=1, batch=64),
    "medium": dict(inputs=784, hidden=(256, 256), outputs=10, batch=128),
    "large": dict(inputs=784, hidden=(1024, 1024), outputs=10, batch=128),
}
UPGD_FIXED = dict(learning_rate=1e-3, sigma=1e-3, seed=1)
UPGD_ADAPTIVE_VGS = dict(learning_rate=1e-3, sigma=0.01, adaptive_noise=True, noise_ema_init=0.0, seed=1,
                         vgs={"warmup_steps": 0})
OPTIMIZERS = {
    "SGD (keras)": lambda: keras.optimizers.SGD(1e-3),
    "Adam (keras)": lambda: keras.optimizers.Adam(1e-3),
    "AdaptiveUPGD": lambda: AdaptiveUPGD(**UPGD_FIXED),
    "AdaptiveUPGD + VGS, adaptive": lambda: AdaptiveUPGD(**UPGD_ADAPTIVE_VGS),
}


def make_model(spec, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((spec["inputs"],))]
    layers += [keras.layers.Dense(h, activation="relu") for h in spec["hidden"]]
    layers += [keras.layers.Dense(spec["outputs"])]
    return keras.Sequential(layers)


def make_data(spec, steps, seed=1):
    rng = np.random.default_rng(seed)
    n = spec["batch"] * steps
    x = rng.standard_normal((n, spec["inputs"])).astype("float32")
    y = rng.standard_normal((n, spec["outputs"])).astype("float32")
    return x, y


def fit_row(spec, make_optimizer, steps):
    model = make_model(spec)
    model.compile(optimizer=make_optimizer(), loss="mse", run_eagerly=False, jit_compile=False)
    x, y = make_data(spec, steps)

    def run():
        model.fit(x, y, batch_size=spec["batch"], epochs=1, shuffle=False, verbose=0)

    run()  # trace and build
    return run


def apply_row(spec, make_optimizer, steps):
    model = make_model(spec)
    variables = model.trainable_variables
    opt = make_optimizer()
    rng = np.random.default_rng(2)
    grads = [tf.constant(rng.standard_normal(v.shape).astype("float32") * 1e-2) for v in variables]

    @tf.function
    def apply_n():
        for _ in tf.range(steps):
            opt.apply_gradients(zip(grads, variables))

    apply_n()  # trace and build
    return apply_n


def core_row(spec, settings, steps):
    model = make_model(spec)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    layout = upgd_ref.FlatLayout(shapes, dtype="float32")
    settings = dict(settings)
    lr, vgs = settings.pop("learning_rate"), settings.pop("vgs", None)
    opt = upgd_ref.AdaptiveUPGD(layout, lr=lr, **settings)
    scaler = None if vgs is None else upgd_ref.VarianceGradientScaler(layout, **vgs)
    rng = np.random.default_rng(2)
    params = layout.pack([v.numpy() for v in model.trainable_variables])
    grads = layout.pack([rng.standard_normal(s) * 1e-2 for s in shapes])
    work = grads.copy()

    def run():
        for _ in range(steps):
            work[...] = grads  # the fused VGS step scales gradients in place
            opt.step(params, work, vgs=scaler)

    run()  # JIT warm-up of kernel backends
    return run


def measure(rows, steps, reps):
    """Round-robin: repetition r of every row before repetition r + 1 of any."""
    times = {name: [] for name in rows}
    for _ in range(reps):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,medium,large", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=50, help="steps per timed repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per row")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}, "
          f"upgd_ref {upgd_ref.__version__} (core backend: {auto_order()[0]}), "
          f"{os.cpu_count()} CPUs, {args.steps} steps x {args.reps} repetitions per row")
    header = (f"{'model':<7} {'params':>9}  {'kind':<5} {'optimizer':<30} {'median ms':>10} {'min ms':>8} "
              f"{'Δ median':>9} {'Δ min':>8} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for name in names:
        spec = MODELS[name]
        count = sum(int(np.prod(v.shape)) for v in make_model(spec).trainable_variables)
        rows = {}
        for label, make in OPTIMIZERS.items():
            rows[("fit", label)] = fit_row(spec, make, args.steps)
        for label, make in OPTIMIZERS.items():
            if label != "SGD (keras)":
                rows[("apply", label)] = apply_row(spec, make, args.steps)
        rows[("core", "AdaptiveUPGD")] = core_row(spec, UPGD_FIXED, args.steps)
        rows[("core", "AdaptiveUPGD + VGS, adaptive")] = core_row(spec, UPGD_ADAPTIVE_VGS, args.steps)
        results = measure(rows, args.steps, args.reps)
        for (kind, label), (median, best) in results.items():
            adam = results.get((kind, "Adam (keras)"))
            if adam is None or label == "Adam (keras)":
                extra, extra_min, ratio = "", "", ""
            else:
                extra, extra_min = f"{median - adam[0]:+9.3f}", f"{best - adam[1]:+8.3f}"
                ratio = f"{median / adam[0]:6.2f}"
            print(f"{name:<7} {count:>9}  {kind:<5} {label:<30} {median:10.3f} {best:8.3f} {extra:>9} {extra_min:>8} "
                  f"{ratio:>6}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
