"""What the bfloat16 training-run tests share: loading a ``benchmarks/bf16_training_*.py``
script, and the bound that makes AdaptiveUPGD's loss decrease "comparable" to Adam's.

The bound: the production step is Adam's direction times the protection ``1 - su`` with
``su = sigmoid(2 (x - 1/2))``, ``x`` in [0, 1] the min-max normalised utility
(``../shared/SEMANTICS.md``, ``specs/algorithm.md`` §3), so each step is at least
``1 - sigmoid(1) = 0.269`` of Adam's at the same learning rate. Over a short run the loss
decrease is required to be at least that fraction of Adam's.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

#: The smallest protection factor ``1 - sigmoid(1)``: the least fraction of Adam's loss decrease.
LEAST_FRACTION = 1.0 - 1.0 / (1.0 + math.exp(-1.0))


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (its ``train`` functions; nothing runs on import)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
