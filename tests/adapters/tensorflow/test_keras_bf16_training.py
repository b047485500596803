"""A real bfloat16 training run (``benchmarks/bf16_training_keras.py``, digits MLP, bfloat16
variables, fixed seed): AdaptiveUPGD lowers the training loss about as much as Keras Adam
does with float32 variables (``mixed_bfloat16``; the bound is derived in
``tests/helpers/bf16_runs.py``), and more than Adam with bfloat16
variables, whose bfloat16 moments stall (``specs/adapters-tensorflow.md`` §5)."""

from __future__ import annotations

from tests.helpers.bf16_runs import LEAST_FRACTION, load_benchmark

EPOCHS = 5


def test_bfloat16_training_decreases_the_loss_comparably_to_adam():
    script = load_benchmark("bf16_training_keras")
    ours = script.train("AdaptiveUPGD", "bfloat16", EPOCHS)
    adam32 = script.train("Adam", "mixed_bfloat16", EPOCHS)
    adam16 = script.train("Adam", "bfloat16", EPOCHS)
    assert ours["dtype"] == "bfloat16" and adam32["dtype"] == "float32"
    assert ours["decrease"] >= LEAST_FRACTION * adam32["decrease"], (ours, adam32)
    assert ours["decrease"] > adam16["decrease"], (ours, adam16)
