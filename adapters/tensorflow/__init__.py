"""Keras 3 / TensorFlow front end: the UPGD family as ``keras.optimizers.Optimizer`` classes:
:class:`AdaptiveUPGD` (``profile="production"`` or ``"paper"``), :class:`UPGD` (no moments)
and :class:`UPGDW` (``specs/algorithm.md`` §7).

Normative description: ``specs/adapters-tensorflow.md``. In short:

- Every formula runs in the core (:class:`upgd_ref.AdaptiveUPGD`, :class:`upgd_ref.UPGD`,
  :class:`upgd_ref.UPGDW` and
  :class:`upgd_ref.VarianceGradientScaler` on a :class:`upgd_ref.FlatLayout` over the
  optimizer's variables, in their order). This package moves arrays and nothing else.
- The bridge is a ``tf.numpy_function``: one host call per step receives the present
  variables' values and gradients plus the optimizer state (all of it held in Keras
  variables, so ``model.save``, ``keras.saving.load_model`` and ``tf.train.Checkpoint``
  carry it), runs scale -> two-pass step -> statistics update, and returns the new values,
  which are assigned to the variables. It works eagerly and inside ``model.fit`` (graph
  mode); XLA (``jit_compile=True``) cannot compile it and is rejected with a clear error.
- The noise is ``upgd_ref.noise(layout, seed, step)``: the core draws it.

Example::

    import keras, upgd_ref.adapters.tensorflow as upgd_tf
    model.compile(optimizer=upgd_tf.AdaptiveUPGD(learning_rate=1e-3, adaptive_noise=True,
                                                 sigma=0.05, vgs={"warmup_steps": 10}),
                  loss="mse")
    model.fit(x, y, epochs=3)

Modules, each with one reason to change:

* :mod:`.settings`: :class:`VGSConfig` and the other settings that are not step hyper-parameters;
* :mod:`.variables`: the variables the optimizer takes and the state variables it creates;
* :mod:`.bridge`: the host side of the ``tf.numpy_function``, one core step;
* :mod:`.optimizer`: :class:`AdaptiveUPGD`, the Keras optimizer the family members share;
* :mod:`.members`: the constructors of :class:`UPGD` and :class:`UPGDW`.
"""

from __future__ import annotations

import keras

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover - depends on the install
    raise ImportError(
        f"upgd_ref.adapters.tensorflow needs Keras 3 (TensorFlow >= 2.16); found keras {keras.__version__}"
    )
if keras.backend.backend() not in ("tensorflow", "jax", "torch"):  # pragma: no cover - KERAS_BACKEND
    raise ImportError(
        "upgd_ref.adapters.tensorflow needs the TensorFlow, JAX or torch Keras backend; "
        f"the active backend is {keras.backend.backend()!r}"
    )

# After the checks: the modules below define Keras 3 classes on the TensorFlow backend.
from .members import UPGD, UPGDW  # noqa: E402
from .optimizer import AdaptiveUPGD  # noqa: E402
from .settings import VGSConfig  # noqa: E402
from .variables import SUPPORTED_VARIABLE_DTYPES  # noqa: E402

__all__ = ["AdaptiveUPGD", "UPGD", "UPGDW", "VGSConfig", "SUPPORTED_VARIABLE_DTYPES"]

# Saved Keras configs (``"module"``), pickles and reprs name the public path, as before the
# split into modules, so files written now do not depend on where a class is defined.
for _public_class in (AdaptiveUPGD, UPGD, UPGDW, VGSConfig):
    _public_class.__module__ = __name__
del _public_class
