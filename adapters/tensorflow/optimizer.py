"""The Keras 3 optimizer of the UPGD family (:class:`AdaptiveUPGD`, the base of
:class:`~upgd_ref.adapters.tensorflow.UPGD` and :class:`~upgd_ref.adapters.tensorflow.UPGDW`):
its configuration, learning rate, variables, and the graph side of a step, which hands all
present gradients to :class:`~.bridge.CoreBridge` in one ``tf.numpy_function``."""

from __future__ import annotations

import keras
import numpy as np

from upgd_ref import AdaptiveUPGD as CoreAdaptiveUPGD
from upgd_ref import FlatLayout
from upgd_ref.checks import check_nonfinite_policy
from upgd_ref.family import MEMBERS, PAPER_EPS
from upgd_ref.hyperparams import UPGD_DEFAULTS
from upgd_ref.step import check_noise_norm, check_seed

from .bridge import CoreBridge
from .steps import host_eager_step, host_graph_step, native_graph_step
from .settings import validated_vgs
from .native import SCALARS as SCALAR_NAMES
from .variables import add_state_variables, scalar_values, variable_name, variables_dtype

STEP_PATHS = ("auto", "host", "native")


# The hyper-parameters the core re-reads at every step (specs/algorithm.md §3.1), with the
# Keras names: Keras calls the learning rate ``learning_rate``.
UPGD_KEYS = tuple(k for k in UPGD_DEFAULTS if k != "lr")


@keras.saving.register_keras_serializable(package="upgd_ref")
class AdaptiveUPGD(keras.optimizers.Optimizer):
    """AdaptiveUPGD (optionally with the Variance Gradient Scaler) as a Keras 3 optimizer.

    Hyper-parameters and defaults are the core's (``specs/algorithm.md`` §3.1); Keras's
    ``learning_rate`` is the algorithm's ``lr`` (a float, a ``LearningRateSchedule`` or a
    callable). ``weight_decay`` is the algorithm's decoupled decay, applied inside the core
    step (Keras's own decay is not applied on top); ``exclude_from_weight_decay`` works and
    gives the excluded variables ``weight_decay = 0``. ``vgs``: ``None`` (no scaler),
    ``True`` (defaults), or a dict / :class:`VGSConfig` of VGS settings. ``seed`` keys the
    noise: the normals of step ``T`` are ``upgd_ref.noise(layout, seed, T)`` with the
    layout of the variables in the order the optimizer was built with.

    The remaining keyword arguments are Keras's (``clipnorm``, ``clipvalue``,
    ``global_clipnorm``, ``use_ema``, ``loss_scale_factor``, ``gradient_accumulation_steps``,
    ``name``...); they act on the gradients before the core sees them.

    Variables must all have one dtype: float32, float64, float16 or bfloat16 (16-bit ones
    step in float32 with float32 state, ``specs/precision.md``). Mixed precision
    (``mixed_float16``: float16 compute, float32 variables) works too.

    ``profile="paper"`` computes the original paper's Adam-style variant
    (``specs/algorithm.md`` §7; ``eps`` defaults to ``1e-5`` then). :class:`UPGD` and
    :class:`UPGDW` are the other members of the family.

    ``nonfinite`` (``specs/algorithm.md`` §8): ``"raise"`` (default) fails the step with the
    core's :class:`~upgd_ref.checks.NonFiniteStepError` (naming the variable), ``"skip"``
    leaves every variable as it was (as ``LossScaleOptimizer`` skips an overflowing step);
    ``last_step_info.skipped`` and ``.skipped_steps`` report it (the count is not a Keras
    variable: it restarts at 0 with the process).
    """

    _MEMBER = MEMBERS["AdaptiveUPGD"]  # the family member's row (specs/algorithm.md §7)
    _CORE = CoreAdaptiveUPGD
    # attribute name -> core hyper-parameter name; the attributes are the Keras config keys.
    _ATTRIBUTES = {key: key for key in UPGD_KEYS}

    def __init__(self, learning_rate=UPGD_DEFAULTS["lr"], weight_decay=UPGD_DEFAULTS["weight_decay"],
                 beta_utility=UPGD_DEFAULTS["beta_utility"], sigma=UPGD_DEFAULTS["sigma"],
                 beta1=UPGD_DEFAULTS["beta1"], beta2=UPGD_DEFAULTS["beta2"], eps=None,
                 adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                 min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                 instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"], vgs=None, seed=0,
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"],
                 profile="production", nonfinite="raise", name="adaptive_upgd", **kwargs):
        if eps is None:
            eps = PAPER_EPS if profile == "paper" else UPGD_DEFAULTS["eps"]
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
                                beta2=beta2, eps=eps, adaptive_noise=adaptive_noise, noise_beta=noise_beta,
                                min_noise_std=min_noise_std, instant_noise_scale=instant_noise_scale,
                                noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile=profile, nonfinite=nonfinite, name=name, kwargs=kwargs)

    def _init_family(self, learning_rate, values, *, vgs, seed, noise_norm, profile, nonfinite, name, kwargs):
        """Validate everything (before Keras creates any variable), then set up the optimizer.
        ``values``: the member's hyper-parameters by attribute name (``_ATTRIBUTES``)."""
        variant = self._MEMBER.variant(profile)
        core_values = {self._ATTRIBUTES[attr]: value for attr, value in values.items()}
        # A schedule, callable or tensor is Keras' to check; anything else is a number (or not).
        deferred = (callable(learning_rate) or keras.ops.is_tensor(learning_rate)
                    or isinstance(learning_rate, keras.Variable))
        hyper = self._MEMBER.hyperparams(dict(
            core_values, lr=UPGD_DEFAULTS["lr"] if deferred else learning_rate,
        ), profile)
        noise_norm = check_noise_norm(noise_norm)
        vgs_settings = validated_vgs(vgs)
        seed = check_seed(seed)
        nonfinite = check_nonfinite_policy(nonfinite)
        step_path = check_step_path(kwargs.pop("step_path", "auto"))
        if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)  # Keras accepts only floats
        # Keras's own decoupled decay stays off: the core applies ``weight_decay``.
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        self._remember_learning_rate(learning_rate)
        for attr, key in self._ATTRIBUTES.items():
            setattr(self, attr, hyper[key])
        self._profile = profile
        self._variant = variant
        self._noise_norm = noise_norm
        self._seed = seed
        self._vgs = vgs_settings
        self._nonfinite = nonfinite
        self._step_path = step_path
        self._bridge = None

    # --- learning rate --------------------------------------------------------------------
    # Keras keeps a float learning rate in a floatx (float32) variable, so 1e-2 would reach
    # the core as 0.009999999776... The float the user gave is remembered and used for as
    # long as the variable still holds exactly its rounded value; any other value (assigned
    # to the variable directly, restored from a checkpoint, a schedule) is used as it is.

    def _remember_learning_rate(self, learning_rate):
        exact = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
        self._exact_learning_rate = float(learning_rate) if exact else None

    def _exact_rate(self):
        """The float the learning rate variable was set from, while it may still hold it
        (the native path compares in the step), else ``None``."""
        return self._exact_learning_rate if isinstance(self._learning_rate, keras.Variable) else None

    def _exact_if_unchanged(self, value: float) -> float:
        """``value`` (the learning rate tensor's value) or the float it was rounded from."""
        exact = self._exact_learning_rate
        if exact is None or not isinstance(self._learning_rate, keras.Variable):
            return value
        rounded = float(np.asarray(exact, dtype=keras.backend.standardize_dtype(self._learning_rate.dtype)))
        return exact if rounded == value else value

    @property
    def learning_rate(self):
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        keras.optimizers.Optimizer.learning_rate.fset(self, learning_rate)
        self._remember_learning_rate(learning_rate)

    # --- configuration --------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The noise key (fixed for the optimizer's lifetime)."""
        return self._seed

    @property
    def noise_norm(self) -> str:
        """``"segment"`` or ``"global"`` (fixed for the optimizer's lifetime)."""
        return self._noise_norm

    @property
    def profile(self) -> str:
        """``"production"`` or ``"paper"`` (fixed for the optimizer's lifetime)."""
        return self._profile

    @property
    def variant(self):
        """The :class:`upgd_ref.reference.UPGDVariant` this optimizer computes."""
        return self._variant

    @property
    def vgs(self):
        """The VGS settings (a dict with every key) or ``None`` when no scaler is used."""
        return None if self._vgs is None else dict(self._vgs)

    @property
    def nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``: what a step with non-finite inputs or results does
        (``specs/algorithm.md`` §8; a skipped step leaves every variable unchanged)."""
        return self._nonfinite

    @property
    def step_path(self) -> str:
        """``"auto"``, ``"host"`` or ``"native"``: which path runs the step
        (``specs/adapters-tensorflow.md`` §3; fixed for the optimizer's lifetime)."""
        return self._step_path

    @property
    def layout(self) -> FlatLayout:
        """The core layout of the variables (built optimizers only)."""
        self._require_built("layout")
        return self._bridge.layout

    @property
    def last_step_info(self):
        """The core's :class:`upgd_ref.StepInfo` of the latest step (segments = variables;
        ``vgs_factor`` is the VGS factor ``f``, NaN without a scaler). Updated when the step
        runs, also inside ``model.fit``."""
        return None if self._bridge is None else self._bridge.last_step_info

    def get_config(self):
        config = super().get_config()
        if isinstance(config["learning_rate"], float):
            config["learning_rate"] = self._exact_if_unchanged(config["learning_rate"])
        config.update({attr: getattr(self, attr) for attr in self._ATTRIBUTES})
        config.update(vgs=self.vgs, seed=self.seed, noise_norm=self.noise_norm, nonfinite=self.nonfinite,
                      step_path=self.step_path,
                      **self._extra_config())
        return config

    def _extra_config(self) -> dict:
        return {"profile": self.profile}

    def _make_core(self, layout):
        """The core optimizer of this family member (its variant) over ``layout``."""
        return self._CORE(layout, seed=self.seed, noise_norm=self.noise_norm, noise_ema_init=self.noise_ema_init,
                          backend="auto", profile=self.profile, nonfinite=self.nonfinite)

    def _core_hyperparams(self) -> dict:
        """The core hyper-parameters from the current attributes."""
        return {key: getattr(self, attr) for attr, key in self._ATTRIBUTES.items()}

    def _param_groups(self):
        """Core parameter groups from the current attributes (re-validated by the core)."""
        hyper = self._core_hyperparams()
        decayed = [i for i, v in enumerate(self._trainable_variables) if self._use_weight_decay(v)]
        excluded = [i for i, v in enumerate(self._trainable_variables) if not self._use_weight_decay(v)]
        groups = [dict(hyper, segments=decayed)]
        if excluded:
            groups.append(dict(hyper, segments=excluded, weight_decay=0.0))
        return groups

    # --- variables ------------------------------------------------------------------------

    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        dtype = variables_dtype(type(self).__name__, var_list)
        super().build(var_list)
        moments = self._MEMBER.moments == "adam"  # UPGD keeps no moment variables
        (self._utility, self._first_moment, self._second_moment, self._segment_step, self._grad_norm_ema,
         self._upgd_step, self._vgs_step, self._vgs_grad_mean_avg, self._vgs_grad_sq_avg) = add_state_variables(
            self, var_list, moments=moments, noise_ema_init=self.noise_ema_init,
            words=keras.backend.backend() == "jax")
        self._bridge = CoreBridge(
            [tuple(int(d) for d in v.shape) for v in var_list], dtype, [variable_name(v) for v in var_list],
            self._make_core, moments=moments,
        )

    def state_values(self) -> dict:
        """The state by role as NumPy arrays (:meth:`state_variables`' roles; on the JAX
        backend the uint32 words joined into int64 / float64 values)."""
        roles = self.state_variables()
        out = {name: [np.array(keras.ops.convert_to_numpy(v.value)) for v in roles.pop(name)]
               for name in ("utility", "first_moment", "second_moment") if name in roles}
        out.update(zip(SCALAR_NAMES, scalar_values(self.scalar_variables(), keras.backend.backend() == "jax")))
        return out

    def scalar_variables(self) -> tuple:
        """The six per-segment and global state variables, in their order
        (``segment_step, grad_norm_ema, upgd_step, vgs_step, vgs_grad_mean_avg, vgs_grad_sq_avg``)."""
        return (self._segment_step, self._grad_norm_ema, self._upgd_step, self._vgs_step, self._vgs_grad_mean_avg,
                self._vgs_grad_sq_avg)

    def _require_built(self, what):
        if self._bridge is None:
            raise ValueError(f"{type(self).__name__}.{what} needs a built optimizer (call build(var_list) or apply once)")

    def state_variables(self) -> dict:
        """The optimizer's Keras variables by role (for inspection and tests); :class:`UPGD`
        has no ``first_moment`` and ``second_moment``."""
        self._require_built("state_variables()")
        out = {"utility": list(self._utility)}
        if self._bridge.moments:
            out.update(first_moment=list(self._first_moment), second_moment=list(self._second_moment))
        out.update({
            "segment_step": self._segment_step, "grad_norm_ema": self._grad_norm_ema, "upgd_step": self._upgd_step,
            "vgs_step": self._vgs_step, "vgs_grad_mean_avg": self._vgs_grad_mean_avg,
            "vgs_grad_sq_avg": self._vgs_grad_sq_avg,
        })
        return out

    # --- the step -------------------------------------------------------------------------

    def _apply_weight_decay(self, variables):
        """No-op: ``weight_decay`` is part of the AdaptiveUPGD update in the core."""

    def update_step(self, gradient, variable, learning_rate):
        raise RuntimeError(
            f"{type(self).__name__} updates all variables at once (its utility range is global); "
            "the per-variable update_step path must not be used"
        )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """All present gradients at once -> one step (host or native path) -> assign the results."""
        if keras.backend.backend() == "tensorflow":
            # Under a tf.distribute strategy each replica sums the replicas' gradients (Keras's
            # own all-reduce) and runs the same deterministic step on its copy of the variables.
            grads = [g for g, _ in self._all_reduce_sum_gradients(zip(grads, trainable_variables))]
        indices = [self._get_variable_index(v) for v in trainable_variables]
        if len(set(indices)) != len(indices):
            raise ValueError("apply_gradients got the same variable twice")
        order = sorted(range(len(indices)), key=indices.__getitem__)
        indices = [indices[k] for k in order]
        dense = [self._dense_gradient(grads[k], indices[j]) for j, k in enumerate(order)]
        if self._path_now() == "native":
            native_graph_step(self, indices, dense, learning_rate)
        elif keras.backend.backend() == "tensorflow":
            host_graph_step(self, indices, dense, learning_rate)
        else:
            host_eager_step(self, indices, dense, learning_rate)

    def _path_now(self) -> str:
        """The path of this step (``specs/adapters-tensorflow.md`` §3): ``step_path``, or for
        ``"auto"`` the host path unless the backend or the context needs the native one (JAX;
        TensorFlow under XLA or a ``tf.distribute`` strategy)."""
        backend = keras.backend.backend()
        if self._step_path != "auto":
            return self._step_path
        if backend == "jax":
            return "native"
        if backend == "tensorflow":
            import tensorflow as tf
            # TensorFlow-internal, stable since TF 1.x: is the graph being built compiled by XLA?
            from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext

            in_xla = not tf.executing_eagerly() and GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
            return "native" if in_xla or tf.distribute.has_strategy() else "host"
        return "host"

    def _dense_gradient(self, grad, index):
        """The gradient as a dense tensor of the variable's dtype (IndexedSlices are summed
        into a dense tensor, duplicates added, as TensorFlow's own conversion does)."""
        variable = self._trainable_variables[index]
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if isinstance(grad, tf.IndexedSlices):
                grad = tf.convert_to_tensor(grad)
            elif isinstance(grad, tf.SparseTensor):
                grad = tf.sparse.to_dense(grad)
        grad = keras.ops.convert_to_tensor(grad)
        if tuple(grad.shape) != tuple(variable.shape) and None not in tuple(grad.shape):
            raise ValueError(
                f"gradient for variable {variable_name(variable)!r} has shape {tuple(grad.shape)}, "
                f"the variable has {tuple(variable.shape)}"
            )
        dtype = keras.backend.standardize_dtype(grad.dtype)
        if not keras.backend.is_float_dtype(dtype):
            raise TypeError(f"gradient for variable {variable_name(variable)!r} has dtype {dtype}")
        return keras.ops.cast(grad, variable.dtype)


def check_step_path(step_path) -> str:
    """``step_path`` checked against the backend: the native path needs JAX (TensorFlow or JAX
    backends), the host path a host array (TensorFlow or torch)."""
    if step_path not in STEP_PATHS:
        raise ValueError(f"step_path must be one of {STEP_PATHS}, got {step_path!r}")
    backend = keras.backend.backend()
    if (step_path, backend) in (("native", "torch"), ("host", "jax")):
        raise ValueError(f"step_path={step_path!r} is not available on the Keras {backend} backend")
    return step_path
