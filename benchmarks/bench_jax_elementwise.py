"""Benchmark: what the program-independent element-wise step costs (``specs/adapters-jax.md``
§11, §9.2). Each family member with adaptive noise (and the paper profiles) runs twice in one
process, round-robin with ``optax.adam``: as shipped, and with the step's re-emission
(``elementwise.program_independent``) replaced by a plain call, XLA free to rewrite divisions,
``exp`` and multiply-adds (the results then depend on the program).

Run: ``python benchmarks/bench_jax_elementwise.py [--numel N] [--reps R]``. Prints a table and
the after/before ratios; asserts nothing.
"""

from __future__ import annotations

import argparse

import optax
from bench_jax import LR, MEMBERS, jitted_row, print_table, random_tree, timed

from upgd_ref.adapters.jax import family

SHIPPED = family.program_independent


def _plain_call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _traced_with(impl, row):
    """``row`` with ``family.program_independent`` set to ``impl`` while it runs (it is read
    when the step is traced, at the first call)."""
    run, carry = row

    def wrapped(c):
        family.program_independent = impl
        try:
            return run(c)
        finally:
            family.program_independent = SHIPPED

    return wrapped, carry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    params, grads = random_tree(args.numel, 8)
    rows = {"optax.adam (jit)": jitted_row(optax.adam(LR), params, grads)}
    builds = {name: dict(sigma=0.01, adaptive_noise=True) for name in MEMBERS}
    builds.update({f"{name} paper": dict(sigma=0.01, adaptive_noise=True, profile="paper")
                   for name in ("adaptive_upgd", "upgd")})
    for label, kwargs in builds.items():
        build = MEMBERS[label.split()[0]]
        for when, impl in (("before", _plain_call), ("after", SHIPPED)):
            rows[f"{label} {when}"] = _traced_with(impl, jitted_row(build(LR, **kwargs), params, grads))
    results = timed(rows, args.reps)
    print_table(args.numel, 8, args.reps, results, "optax.adam (jit)")
    for label in builds:
        after, before = results[f"{label} after"], results[f"{label} before"]
        print(f"{label:<24} after/before: median {after[1] / before[1]:.3f}, min {after[2] / before[2]:.3f}")


if __name__ == "__main__":
    main()
