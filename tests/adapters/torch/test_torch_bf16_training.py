"""A shortened ``benchmarks/bf16_training_torch.py``: AdaptiveUPGD trains a bfloat16 MLP on
scikit-learn's digits comparably to ``torch.optim.Adam`` in bfloat16 (same lr, model, batches;
the bound is derived in ``tests/helpers/bf16_runs.py``)."""

from __future__ import annotations

from tests.helpers.bf16_runs import LEAST_FRACTION, load_benchmark

STEPS = 100


def test_adaptive_upgd_reduces_the_bf16_loss_comparably_to_adam():
    bench = load_benchmark("bf16_training_torch")
    upgd, adam = bench.train("AdaptiveUPGD", STEPS), bench.train("Adam", STEPS)
    assert upgd["initial"] == adam["initial"]  # same model, same data
    assert adam["final"] < adam["initial"]
    assert upgd["initial"] - upgd["final"] >= LEAST_FRACTION * (adam["initial"] - adam["final"]), (upgd, adam)
