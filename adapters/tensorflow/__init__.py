"""Keras 3 / TensorFlow front end: the UPGD family as ``keras.optimizers.Optimizer`` classes:
:class:`AdaptiveUPGD` (``profile="production"`` or ``"paper"``), :class:`UPGD` (no moments)
and :class:`UPGDW` (``specs/algorithm.md`` §7).

Normative description: ``specs/adapters-tensorflow.md``. In short:

- Every formula runs in the core (:class:`upgd_ref.AdaptiveUPGD`, :class:`upgd_ref.UPGD`,
  :class:`upgd_ref.UPGDW` and
  :class:`upgd_ref.VarianceGradientScaler` on a :class:`upgd_ref.FlatLayout` over the
  optimizer's variables, in their order). This package moves arrays and nothing else.
- Two paths run a step (``specs/adapters-tensorflow.md`` §3.3). The *host* path (TensorFlow
  without XLA, torch): the present variables' arrays go to the core classes (on TensorFlow
  through one ``tf.numpy_function``), bit-identical to the core API. The *native* path
  (TensorFlow under XLA or a ``tf.distribute`` strategy, JAX): the reference on
  ``jax.numpy`` (TensorFlow ops through ``jax2tf``), compiled with the model. All state is
  held in Keras variables, so ``model.save`` / ``keras.saving.load_model`` carry it.
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
* :mod:`.bridge`: the host side of a step: NumPy in, one core step, NumPy out;
* :mod:`.native`: the native step, one pure JAX function of the arrays;
* :mod:`.steps`: each backend's way into the bridge or the native step;
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
