"""A shortened ``benchmarks/bf16_training_torch.py``: AdaptiveUPGD trains a bfloat16 MLP on
scikit-learn's digits comparably to ``torch.optim.Adam`` in bfloat16 (same lr, model, batches)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bf16_training_torch.py"
STEPS = 100
#: AdaptiveUPGD's step is Adam's direction times the protection factor ``1 - su`` with
#: ``su = sigmoid(2 (x - 1/2))``, ``x`` in [0, 1] (``../shared/SEMANTICS.md``), so at least
#: ``1 - sigmoid(1) = 0.269`` of it: at the same lr it is Adam at no less than about a quarter
#: of its lr. Comparable: at least that fraction of Adam's loss reduction.
LEAST_FRACTION = 1.0 - 1.0 / (1.0 + math.exp(-1.0))


def _benchmark():
    spec = importlib.util.spec_from_file_location("bf16_training_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adaptive_upgd_reduces_the_bf16_loss_comparably_to_adam():
    bench = _benchmark()
    upgd, adam = bench.train("AdaptiveUPGD", STEPS), bench.train("Adam", STEPS)
    assert upgd["initial"] == adam["initial"]  # same model, same data
    assert adam["final"] < adam["initial"]
    assert upgd["initial"] - upgd["final"] >= LEAST_FRACTION * (adam["initial"] - adam["final"]), (upgd, adam)
