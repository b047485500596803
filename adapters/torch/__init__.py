"""PyTorch front end: drop-in ``AdaptiveUPGD``, ``UPGD``, ``UPGDW`` and ``VarianceGradientScaler``.

Normative description: ``specs/adapters-torch.md``. Change one import::

    from upgd_ref.adapters.torch import AdaptiveUPGD, VarianceGradientScaler

    optimizer = AdaptiveUPGD(model.parameters(), lr=3e-4, adaptive_noise=True)
    vgs = VarianceGradientScaler(model.parameters())
    loss.backward()
    vgs.scale_gradients()
    optimizer.step()
    vgs.step()

This package contains no optimizer math. Every formula runs in the functional door
(:func:`upgd_ref.step.upgd_step`, :func:`~upgd_ref.step.vgs_factor`,
:func:`~upgd_ref.step.vgs_scale_step`, :func:`~upgd_ref.step.vgs_update_step`), called with
the adapter's own state records (:class:`upgd_ref.state.FlatUPGDState`,
:class:`~upgd_ref.state.FlatVGSState`) on flat, 64-byte aligned buffers: NumPy arrays for
CPU tensors, CuPy arrays sharing the memory of flat CUDA tensors (DLPack, no copy) for CUDA
tensors, whose steps run the CUDA kernels on the tensors' current stream (the production
scaler's deprecated logging statistics are the one exception, :mod:`.spatial`); the adapter only

* re-homes the parameters of an optimizer into one flat buffer per dtype (``p.data`` becomes
  a view of a segment of it, the approach of DDP's ``gradient_as_bucket_view``; views and
  aliasing parameters are gathered into it and written back instead), and points
  ``p.grad`` at views of a flat gradient buffer where it can; a gradient that is not such a
  view (``zero_grad(set_to_none=True)``, a user replacing it) is copied in before a step;
* maps the production classes' API (constructor, ``param_groups``, ``state``, state dicts,
  pickling, logging) onto the core's.

Tensors of one device (CPU, or one CUDA GPU with CuPy installed) per optimizer are
supported, of any mix of float32, float64, float16, bfloat16 (``specs/precision.md``),
complex64 and complex128 (their ``view_as_real`` pairs): several dtypes step as one model
through :class:`upgd_ref.multi.MultiLayout` (``specs/adapters-torch.md`` §2.1-2.4).

Modules, each with one reason to change:

* :mod:`.buffers`: parameters and gradients re-homed into flat buffers (views, DLPack, devices);
* :mod:`.gather`: complex parameters as real segments; the parameters that cannot be
  re-homed, gathered and written back;
* :mod:`.partition`: one flat buffer per dtype and the layout (and state record) of the step;
* :mod:`.conversions`: production values and state keys as the core takes them;
* :mod:`.state_views`: ``optimizer.state[p]`` as live views of the core's flat state;
* :mod:`.checkpoint`: the production state-dict formats and their migration;
* :mod:`.flat_optimizer`: the ``torch.optim.Optimizer`` the family members share;
* :mod:`.optimizer`: the members' constructors (production signatures and messages);
* :mod:`.scaler`: the ``VarianceGradientScaler``;
* :mod:`.scaler_parts`: the scaler over parameters of several dtypes (one door call per dtype);
* :mod:`.spatial`: the production scaler's deprecated spatial statistics (logging only).
"""

from .checkpoint import CHECKPOINT_KEY, VGS_VERSION
from .conversions import UnsupportedOption
from .optimizer import (HYPERPARAMETER_KEYS, STATE_KEYS, UPGD, UPGD_HYPERPARAMETER_KEYS, UPGDW,
                        UPGDW_HYPERPARAMETER_KEYS, AdaptiveUPGD)
from .scaler import VarianceGradientScaler

__all__ = [
    "AdaptiveUPGD",
    "UPGD",
    "UPGDW",
    "VarianceGradientScaler",
    "HYPERPARAMETER_KEYS",
    "STATE_KEYS",
    "VGS_VERSION",
    "CHECKPOINT_KEY",
    "UPGD_HYPERPARAMETER_KEYS",
    "UPGDW_HYPERPARAMETER_KEYS",
    "UnsupportedOption",
]

# Pickles (torch.save of an optimizer or scaler) and reprs name the public path, as before the
# split into modules, so files written now do not depend on where a class is defined.
for _public_class in (AdaptiveUPGD, UPGD, UPGDW, VarianceGradientScaler):
    _public_class.__module__ = __name__
del _public_class
