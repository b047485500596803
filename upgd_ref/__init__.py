"""upgd_ref: the reference for AdaptiveUPGD and the Variance Gradient Scaler.

One exact definition of the math (``specs/``), a float64 Array-API reference
(:mod:`upgd_ref.reference`), reproducible counter-based noise (:func:`noise`), and stateful
optimizers on flat parameter buffers (:class:`AdaptiveUPGD`, :class:`VarianceGradientScaler`).
"""

from .layout import FlatLayout
from .optimizer import AdaptiveUPGD, StepInfo
from .rng import noise, standard_normals
from .scaler import VarianceGradientScaler

__version__ = "0.1.0"

__all__ = [
    "AdaptiveUPGD",
    "FlatLayout",
    "StepInfo",
    "VarianceGradientScaler",
    "noise",
    "standard_normals",
    "__version__",
]
