"""The bfloat16 training run (``benchmarks/bf16_training_jax.py``), short: ``adaptive_upgd``
on bfloat16 parameters lowers the digits loss comparably to ``optax.adam`` on the same
bfloat16 parameters, batches and learning rate.

The bound: the production step is Adam's direction times ``1 - su`` with ``su = sigmoid(x)``,
``x in [0, 1]`` the min-max normalised utility (``specs/algorithm.md`` §3), so each step is
between ``1 - sigmoid(1) = 0.269`` and ``1/2`` of Adam's; the loss drop over a short run is
required to be at least a quarter of Adam's (the smallest step factor, rounded down)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bf16_training_jax.py"
_spec = importlib.util.spec_from_file_location("bf16_training_jax", SCRIPT)
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

STEP_FACTOR_FLOOR = 1.0 - 1.0 / (1.0 + math.exp(-1.0))  # 0.269: the smallest 1 - su


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_adaptive_upgd_trains_bfloat16_params_comparably_to_adam(rounding):
    results = {name: run.train(tx, steps=100) for name, tx in run.optimizers(rounding).items()}
    adam, ours = results["optax.adam"], results["adaptive_upgd"]
    assert adam["dtypes"] == ours["dtypes"] == {"bfloat16"}
    assert adam["initial_loss"] == ours["initial_loss"]
    adam_drop = adam["initial_loss"] - adam["final_loss"]
    ours_drop = ours["initial_loss"] - ours["final_loss"]
    assert adam_drop > 0.5  # the task is learnable in this many steps
    assert ours_drop >= math.floor(4 * STEP_FACTOR_FLOOR) / 4 * adam_drop, (results, rounding)
