"""The bfloat16 training run (``benchmarks/bf16_training_jax.py``), short: ``adaptive_upgd``
on bfloat16 parameters lowers the digits loss comparably to ``optax.adam`` on the same
bfloat16 parameters, batches and learning rate.

The bound is derived in ``tests/helpers/bf16_runs.py``."""

from __future__ import annotations

import pytest

from tests.helpers.bf16_runs import LEAST_FRACTION, load_benchmark

run = load_benchmark("bf16_training_jax")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_adaptive_upgd_trains_bfloat16_params_comparably_to_adam(rounding):
    results = {name: run.train(tx, steps=100) for name, tx in run.optimizers(rounding).items()}
    adam, ours = results["optax.adam"], results["adaptive_upgd"]
    assert adam["dtypes"] == ours["dtypes"] == {"bfloat16"}
    assert adam["initial_loss"] == ours["initial_loss"]
    adam_drop = adam["initial_loss"] - adam["final_loss"]
    ours_drop = ours["initial_loss"] - ours["final_loss"]
    assert adam_drop > 0.5  # the task is learnable in this many steps
    assert ours_drop >= LEAST_FRACTION * adam_drop, (results, rounding)
