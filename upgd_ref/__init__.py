"""upgd_ref: the reference for AdaptiveUPGD and the Variance Gradient Scaler.

One exact definition of the math (``specs/``), a float64 Array-API reference
(:mod:`upgd_ref.reference`), reproducible counter-based noise (:func:`noise`), and stateful
optimizers on flat parameter buffers (:class:`AdaptiveUPGD`, :class:`VarianceGradientScaler`).
"""

from .checks import NonFiniteStepError
from .config import from_config
from .diagnostics import StepLog, StepRecord
from .layout import FlatLayout
from .optimizer import UPGD, UPGDW, AdaptiveUPGD, StepInfo
from .rng import standard_normals
from .scaler import VarianceGradientScaler
from .step import noise, warmup

__version__ = "0.1.0"

__all__ = [
    "AdaptiveUPGD",
    "FlatLayout",
    "NonFiniteStepError",
    "StepInfo",
    "UPGD",
    "UPGDW",
    "StepLog",
    "StepRecord",
    "VarianceGradientScaler",
    "from_config",
    "noise",
    "standard_normals",
    "warmup",
    "__version__",
]
