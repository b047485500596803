r"""JAX front end: optax transformations for the VGS and the UPGD family
(:func:`adaptive_upgd`, :func:`upgd`, :func:`upgdw`).

Normative description: ``specs/adapters-jax.md``. Usage::

    import optax
    from upgd_ref.adapters.jax import adaptive_upgd, variance_gradient_scaler

    tx = optax.chain(
        variance_gradient_scaler(warmup_steps=100),
        adaptive_upgd(3e-4, adaptive_noise=True, sigma=0.01, seed=0),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, batch):
        grads = jax.grad(loss)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

Two paths compute the same step:

* ``backend="native"`` (default): the core's Array-API reference functions
  (:mod:`upgd_ref.reference`, :mod:`upgd_ref.rng`) run with ``jax.numpy``. Works under
  ``jax.jit`` on any device with float64 support, compiles once. The leaves of the params
  pytree, in ``jax.tree_util`` flatten order, are the segments.
* ``backend="kernels"`` (eager only): the leaves are copied into the core's 64-byte aligned
  flat buffers (NumPy for CPU arrays; CuPy for CUDA GPU arrays, filled device to device), the
  core's stateful classes run the step with their fastest registered backend (the Numba
  kernels on the CPU, the CUDA kernels on a GPU), and the results come back as JAX arrays
  that share those buffers through DLPack. It is the cross-check of the native path.

This package contains no optimizer or noise math: every formula (the two-pass step, the VGS,
Philox, the Box-Muller transform) is a call into :mod:`upgd_ref`. What it adds is JAX
plumbing: pytrees, dtype promotion, the optax update convention (``updates = new_params -
params``), the float64 scope of the scalar state, the noise counter's block/lane indexing
(``specs/noise.md`` §4; the core's ``standard_normals`` takes the step as a Python int, so a
traced step needs it here), and an evaluator that keeps XLA from contracting the noise
transform's products into fused multiply-adds (which would change its float64 bits).

Modules, each with one reason to change:

* :mod:`.leaves`: the float64 scope, eager or traced, the checks of leaves;
* :mod:`.normals`: the core's noise generator on ``jax.numpy``, bit for bit;
* :mod:`.precision`: 16-bit leaves (float32 compute, one rounding, the state dtype);
* :mod:`.hyper`: hyper-parameters as Python numbers or (traced) arrays, the seed as key words;
* :mod:`.words`: 64-bit values as uint32 word pairs (states without ``jax_enable_x64``);
* :mod:`.state`: the optax state records, :func:`state_values` and :func:`restore_state`;
* :mod:`.per_device`: the step inside ``jax.shard_map`` (global noise indices, combined sums);
* :mod:`.kernel_buffers`: the kernel path's DLPack moves to and from the core's flat buffers;
* :mod:`.scaler`: :func:`variance_gradient_scaler`;
* :mod:`.family`: :func:`adaptive_upgd`, :func:`upgd`, :func:`upgdw`.
"""

from .family import adaptive_upgd, upgd, upgdw
from .kernel_buffers import BACKENDS
from .leaves import LEAF_DTYPES, SUPPORTED_DTYPES, x64_scope
from .normals import noise, standard_normals
from .per_device import PerDevice, state_specs
from .scaler import variance_gradient_scaler
from .state import AdaptiveUPGDState, VarianceGradientScalerState, restore_state, state_values

__all__ = [
    "AdaptiveUPGDState",
    "VarianceGradientScalerState",
    "adaptive_upgd",
    "upgd",
    "upgdw",
    "variance_gradient_scaler",
    "standard_normals",
    "noise",
    "PerDevice",
    "state_specs",
    "restore_state",
    "state_values",
    "x64_scope",
    "BACKENDS",
    "SUPPORTED_DTYPES",
    "LEAF_DTYPES",
]

# Pickles and reprs of the states name the public path, as before the split into modules.
for _public_class in (AdaptiveUPGDState, VarianceGradientScalerState):
    _public_class.__module__ = __name__
del _public_class
