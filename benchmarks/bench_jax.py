"""Benchmark: the JAX adapter's jitted native step against ``optax.adam`` on the same pytree
(default 10M float32 parameters in 8 leaves), plus the kernel path and the noise alone.

Run: ``python benchmarks/bench_jax.py [--numel N] [--leaves L] [--reps R] [--draws D]``;
``--members 1000000 10000000`` prints instead, per size, ``optax.adam`` against every family
member noise-free (``sigma=0``, fixed noise), with adaptive noise, and chained after the VGS
(issue 18 scope 4: the jitted native step <= 3x adam, noise bit-identical).

Rows are timed round-robin (repetition ``r`` of every row before repetition ``r + 1`` of any,
so drift on a shared machine hits all rows alike) after an untimed warm-up that includes the
compilation, whose time is reported separately. Each jitted row is a whole training-step
body: ``tx.update`` then ``optax.apply_updates``, parameters and state fed back; one row runs
the step with every hyper-parameter traced (``optax.inject_hyperparams``). The table
prints the median and minimum per call and the ratio to ``optax.adam`` (the issue's target:
jitted native AdaptiveUPGD step <= 3x adam).

A second table measures what the noise evaluation mode does (``specs/adapters-jax.md`` §6):
over ``--draws`` normals under ``jax.jit``, how many float64 and float32 values differ from
``upgd_ref.standard_normals`` with the strict (default) evaluation and with XLA free to
contract multiply-adds (``strict=False``), and the time of each.
Nothing here asserts a time: the script prints tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import upgd_ref
from upgd_ref import rng
from upgd_ref.adapters import jax as uj
from upgd_ref.backends import auto_order

UPGD_HYPER = dict(weight_decay=1e-3, sigma=0.01, adaptive_noise=True, noise_ema_init=0.0)
LR = 1e-3


def shapes_for(numel: int, leaves: int) -> list[tuple[int, ...]]:
    """``leaves`` shapes (alternately matrices of 1000 columns and vectors) summing to ``numel``."""
    sizes = [numel // leaves] * leaves
    sizes[-1] += numel - sum(sizes)
    out = []
    for i, size in enumerate(sizes):
        if i % 2 == 0 and size % 1000 == 0:
            out.append((size // 1000, 1000))
        else:
            out.append((size,))
    return out


def jitted_row(tx, params, grads):
    """A jitted training-step body and its starting carry."""

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)

    def run(carry):
        out = step(carry[0], carry[1], grads)
        jax.block_until_ready(out)
        return out

    return run, (params, state)


def eager_row(tx, params, grads):
    state = tx.init(params)

    def run(carry):
        updates, state = tx.update(grads, carry[1], carry[0])
        out = (optax.apply_updates(carry[0], updates), state)
        jax.block_until_ready(out)
        return out

    return run, (params, state)


def noise_row(params):
    fn = jax.jit(lambda p, s: uj.noise(p, 1234, s))

    def run(carry):
        out = fn(params, carry)
        jax.block_until_ready(out)
        return carry + 1

    return run, jnp.asarray(1)


def timed(rows: dict, reps: int) -> dict:
    carries, compile_s, times = {}, {}, {name: [] for name in rows}
    for name, (run, carry) in rows.items():
        start = time.perf_counter()
        carries[name] = run(carry)  # warm-up: compiles
        compile_s[name] = time.perf_counter() - start
        carries[name] = run(carries[name])
    for _ in range(reps):
        for name, (run, _) in rows.items():
            start = time.perf_counter()
            carries[name] = run(carries[name])
            times[name].append(time.perf_counter() - start)
    return {name: (compile_s[name], statistics.median(t), min(t)) for name, t in times.items()}


def random_tree(numel: int, leaves: int):
    """``(params, grads)``: float32 leaves of :func:`shapes_for`, standard normal."""
    rng_np = np.random.default_rng(0)
    shapes = shapes_for(numel, leaves)
    params = [jnp.asarray(rng_np.standard_normal(s, dtype=np.float32)) for s in shapes]
    grads = [jnp.asarray(rng_np.standard_normal(s, dtype=np.float32)) for s in shapes]
    return params, grads


def print_table(numel: int, leaves: int, reps: int, results: dict, adam_row: str) -> None:
    adam = results[adam_row][1]
    print(f"\n{numel:,} float32 parameters in {leaves} leaves; {os.cpu_count()} CPU cores; jax {jax.__version__}, "
          f"optax {optax.__version__}; {reps} repetitions, round-robin")
    print(f"{'row':<58} {'compile s':>9} {'median ms':>10} {'min ms':>8} {'x adam':>7}")
    for name, (compile_s, median, minimum) in results.items():
        print(f"{name:<58} {compile_s:9.2f} {median * 1e3:10.1f} {minimum * 1e3:8.1f} {median / adam:7.2f}")


def step_table(numel: int, leaves: int, reps: int) -> None:
    params, grads = random_tree(numel, leaves)
    vgs = dict(warmup_steps=0)
    rows = {
        "optax.adam (jit)": jitted_row(optax.adam(LR), params, grads),
        "adaptive_upgd native (jit)": jitted_row(uj.adaptive_upgd(LR, **UPGD_HYPER), params, grads),
        "chain(vgs, adaptive_upgd) native (jit)": jitted_row(
            optax.chain(uj.variance_gradient_scaler(**vgs), uj.adaptive_upgd(LR, **UPGD_HYPER)), params, grads),
        "inject_hyperparams(adaptive_upgd) native (jit)": jitted_row(
            optax.inject_hyperparams(uj.adaptive_upgd)(learning_rate=LR, **UPGD_HYPER), params, grads),
        "noise only, native (jit)": noise_row(params),
        f"adaptive_upgd kernels (eager, core '{auto_order()[0]}')": eager_row(
            uj.adaptive_upgd(LR, **UPGD_HYPER, backend="kernels"), params, grads),
        f"chain(vgs, adaptive_upgd) kernels (eager, core '{auto_order()[0]}')": eager_row(
            optax.chain(uj.variance_gradient_scaler(**vgs, backend="kernels"),
                        uj.adaptive_upgd(LR, **UPGD_HYPER, backend="kernels")), params, grads),
    }
    print_table(numel, leaves, reps, timed(rows, reps), "optax.adam (jit)")


MEMBERS = {"adaptive_upgd": uj.adaptive_upgd, "upgd": uj.upgd, "upgdw": uj.upgdw}


def member_table(numel: int, leaves: int, reps: int) -> None:
    """``optax.adam`` and each member noise-free, noisy and after the VGS, side by side."""
    params, grads = random_tree(numel, leaves)
    rows = {"optax.adam (jit)": jitted_row(optax.adam(LR), params, grads)}
    for name, build in MEMBERS.items():
        rows[f"{name} noise-free (jit)"] = jitted_row(build(LR, sigma=0.0, adaptive_noise=False), params, grads)
        rows[f"{name} adaptive noise (jit)"] = jitted_row(build(LR, sigma=0.01, adaptive_noise=True), params, grads)
        rows[f"chain(vgs, {name}) adaptive noise (jit)"] = jitted_row(
            optax.chain(uj.variance_gradient_scaler(warmup_steps=0), build(LR, sigma=0.01, adaptive_noise=True)),
            params, grads)
    print_table(numel, leaves, reps, timed(rows, reps), "optax.adam (jit)")


def noise_table(draws: int, reps: int) -> None:
    want64 = rng.standard_normals(99, 7, 0, draws)
    want32 = want64.astype(np.float32)
    print(f"\nnoise evaluation under jax.jit, {draws:,} draws (seed 99, step 7) against upgd_ref.standard_normals")
    print(f"{'mode':<34} {'f64 differ':>10} {'max ulps':>8} {'f32 differ':>10} {'median ms':>10}")
    for strict in (True, False):
        fn = jax.jit(lambda s, strict=strict: uj.standard_normals(99, s, 0, draws, strict=strict))
        step = jnp.asarray(7)
        got64 = np.asarray(fn(step))
        got32 = got64.astype(np.float32)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(step))
            times.append(time.perf_counter() - start)
        differ = got64 != want64
        ulps = float(np.max(np.abs(got64 - want64) / np.spacing(np.abs(want64)))) if differ.any() else 0.0
        name = "strict (default)" if strict else "XLA contraction (strict=False)"
        print(f"{name:<34} {int(differ.sum()):10d} {ulps:8.2f} {int((got32 != want32).sum()):10d} "
              f"{statistics.median(times) * 1e3:10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--leaves", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--draws", type=int, default=10_000_000)
    parser.add_argument("--members", type=int, nargs="*", help="sizes of the per-member table (and nothing else)")
    args = parser.parse_args()
    if args.members:
        for numel in args.members:
            member_table(numel, args.leaves, args.reps)
        return
    step_table(args.numel, args.leaves, args.reps)
    noise_table(args.draws, max(3, args.reps // 3))
    print(f"\ncore backends (fastest first): {auto_order()}; upgd_ref {upgd_ref.__version__}")


if __name__ == "__main__":
    main()
