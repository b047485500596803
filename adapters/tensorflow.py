"""Keras 3 / TensorFlow front end: the UPGD family as ``keras.optimizers.Optimizer`` classes:
:class:`AdaptiveUPGD` (``profile="production"`` or ``"paper"``), :class:`UPGD` (no moments)
and :class:`UPGDW` (``specs/algorithm.md`` §7).

Normative description: ``specs/adapters-tensorflow.md``. In short:

- Every formula runs in the core (:class:`upgd_ref.AdaptiveUPGD`, :class:`upgd_ref.UPGD`,
  :class:`upgd_ref.UPGDW` and
  :class:`upgd_ref.VarianceGradientScaler` on a :class:`upgd_ref.FlatLayout` over the
  optimizer's variables, in their order). This module moves arrays and nothing else.
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
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping

import numpy as np

# Absolute imports: this module is ``upgd_ref.adapters.tensorflow``; these are the real
# TensorFlow and Keras packages.
import tensorflow as tf
import keras

from upgd_ref import AdaptiveUPGD as CoreAdaptiveUPGD
from upgd_ref import UPGD as CoreUPGD
from upgd_ref import UPGDW as CoreUPGDW
from upgd_ref import FlatLayout
from upgd_ref.hyperparams import NOISE_NORMS, UPGD_DEFAULTS, segment_hyperparams, validate_upgd, validate_vgs
from upgd_ref.layout import SUPPORTED_DTYPES
from upgd_ref.family import MEMBERS, PAPER_EPS
from upgd_ref.optimizer import StepInfo
from upgd_ref.state import FlatUPGDState, FlatVGSState
from upgd_ref.step import StepRequest, VGSRequest, upgd_step, vgs_factor

__all__ = ["AdaptiveUPGD", "UPGD", "UPGDW", "VGSConfig", "SUPPORTED_VARIABLE_DTYPES"]

if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover - depends on the install
    raise ImportError(
        f"upgd_ref.adapters.tensorflow needs Keras 3 (TensorFlow >= 2.16); found keras {keras.__version__}"
    )
if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on KERAS_BACKEND
    raise ImportError(
        "upgd_ref.adapters.tensorflow needs the TensorFlow Keras backend "
        f"(KERAS_BACKEND=tensorflow); the active backend is {keras.backend.backend()!r}"
    )

try:  # TensorFlow-internal, stable since TF 1.x; used only to give XLA a clear error.
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _in_xla_context
except ImportError:  # pragma: no cover
    _in_xla_context = None

SUPPORTED_VARIABLE_DTYPES = SUPPORTED_DTYPES  # float32, float64: what the core computes in

# The hyper-parameters the core re-reads at every step (specs/algorithm.md §3.1), with the
# Keras names: Keras calls the learning rate ``learning_rate``.
_UPGD_KEYS = tuple(k for k in UPGD_DEFAULTS if k != "lr")
_MOMENT_KEYS = ("beta1", "beta2", "eps")
_NOISE_KEYS = ("adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale", "noise_ema_init")
_STATE_NAMES = ("utility", "first_moment", "second_moment")
_SEGMENT_RE = re.compile(r"\bsegment (\d+)")
# One core step at a time in this process: TensorFlow may run numpy_functions on several
# threads at once, and the Numba kernels' thread pool must not be entered concurrently.
_CORE_LOCK = threading.Lock()


class VGSConfig(Mapping):
    """Settings of the Variance Gradient Scaler, validated by the core.

    Keras has no separate gradient-scaler hook, so the scaler is configured on the
    optimizer: ``AdaptiveUPGD(vgs=VGSConfig(warmup_steps=10))`` or ``vgs={"warmup_steps":
    10}``. Keys and defaults: ``upgd_ref.hyperparams.VGS_DEFAULTS`` (``enabled, beta,
    alpha, eps, warmup_steps, min_scaling_factor, variance_cap``).
    """

    def __init__(self, **settings):
        self._settings = validate_vgs(settings, where="vgs: ")

    def __getitem__(self, key):
        return self._settings[key]

    def __iter__(self):
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return "VGSConfig(" + ", ".join(f"{k}={v!r}" for k, v in self._settings.items()) + ")"


def _vgs_settings(vgs):
    """``None`` (no scaler) or a validated dict of every VGS hyper-parameter."""
    if vgs is None or vgs is False:
        return None
    if vgs is True:
        return validate_vgs({}, where="vgs: ")
    if isinstance(vgs, Mapping):
        return validate_vgs(dict(vgs), where="vgs: ")
    raise TypeError(
        f"vgs must be None, True, a dict or a VGSConfig of VGS settings, got {type(vgs).__name__}"
    )


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def _variable_name(variable) -> str:
    return str(getattr(variable, "path", None) or getattr(variable, "name", "?"))


class _CoreBridge:
    """The host side of a step: NumPy in, the core classes, NumPy out.

    Holds no optimizer state between calls (the Keras variables do). Every call builds fresh
    flat buffers for what it returns: in a graph, TensorFlow aliases 64-byte-aligned
    ``numpy_function`` outputs instead of copying them, so a returned buffer must never be
    written again.
    """

    def __init__(self, shapes, dtype, names, make_core, *, moments=True):
        self.layout = FlatLayout(shapes, dtype=dtype)
        self.names = tuple(names)
        self.core = make_core(self.layout)  # a core class of the family, with its variant
        self.moments = moments  # False: no moment variables cross the bridge (UPGD)
        self.last_step_info = None
        # The only buffer reused between calls: gradients are never handed back to TF.
        self.grad_buffer = self.layout.zeros()

    def _flat(self, indices, arrays):
        """A fresh aligned flat buffer holding ``arrays`` at segments ``indices`` (0 elsewhere)."""
        layout = self.layout
        flat = layout.zeros()
        for i, array in zip(indices, arrays):
            flat[layout.segment_slice(i)] = np.reshape(array, (-1,))
        return flat

    def _segments(self, flat, indices):
        layout = self.layout
        return [np.reshape(flat[layout.segment_slice(i)], layout.shapes[i]) for i in indices]

    def _explain(self, exc: Exception) -> Exception:
        """The core's error with its segment numbers translated to variable names."""
        message = str(exc)
        named = sorted({int(m) for m in _SEGMENT_RE.findall(message) if int(m) < len(self.names)})
        if named:
            message += " [" + ", ".join(f"segment {i} is variable {self.names[i]!r}" for i in named) + "]"
        return type(exc)(message)

    def step(self, indices, param_groups, vgs_settings, lr, *arrays):
        """One core step with learning rate ``lr`` (a float).

        ``arrays``: per present variable (in ``indices`` order) the values, then likewise the
        gradients, utilities, first and second moments (these two only with ``moments``); then
        segment_step, grad_norm_ema, step, vgs_step, vgs_grad_mean_avg, vgs_grad_sq_avg.
        Returns the same without the gradients. Raises (so nothing is returned and nothing
        assigned) on bad input.
        """
        lr = float(lr)
        n = len(indices)
        blocks = 5 if self.moments else 3
        values, grads, utility, *moments = (arrays[k * n : (k + 1) * n] for k in range(blocks))
        first, second = moments if self.moments else ((), ())  # no moments: zero buffers, never read
        segment_step, grad_norm_ema, step, vgs_step, vgs_mean, vgs_square = arrays[blocks * n :]
        present = [False] * self.layout.num_segments
        for i in indices:
            present[i] = True
        groups = [dict(g, lr=lr) for g in param_groups]
        with _CORE_LOCK:
            core = self.core
            params = self._flat(indices, values)
            grad_buffer = self.grad_buffer
            if n < self.layout.num_segments:
                grad_buffer[...] = 0.0  # absent segments: not read, kept zero anyway
            for i, g in zip(indices, grads):
                grad_buffer[self.layout.segment_slice(i)] = np.reshape(g, (-1,))
            # Copies: TensorFlow hands numpy_function writable views of its own tensors.
            state = FlatUPGDState(
                step=int(step),
                segment_step=np.array(segment_step, dtype=np.int64),
                utility=self._flat(indices, utility),
                first_moment=self._flat(indices, first),
                second_moment=self._flat(indices, second),
                grad_norm_ema=np.array(grad_norm_ema, dtype=np.float64),
            )
            vgs_state = FlatVGSState(
                int(vgs_step), np.array(vgs_mean, dtype=np.float64), np.array(vgs_square, dtype=np.float64)
            )
            try:
                _check_state(state, vgs_state)
                hyper = [core.MEMBER.tie(h) for h in segment_hyperparams(groups, self.layout.num_segments)]
                request = StepRequest(hyper=hyper, present=present, seed=core.seed, noise_norm=core.noise_norm,
                                      variant=core.variant)
                vgs = factor = variance = None
                if vgs_settings is not None:  # scale -> two-pass step -> statistics update, in one call
                    factor, variance = vgs_factor(vgs_state, vgs_settings)
                    vgs = VGSRequest(vgs_state, factor, validate_vgs(vgs_settings)["beta"])
                stats = upgd_step(self.layout, params, grad_buffer, state, request, vgs=vgs, backend=core.backend)
            except (ValueError, TypeError, OverflowError) as exc:
                raise self._explain(exc) from None
            self.last_step_info = StepInfo.from_stats(stats, state.step, request.present, factor, variance)
        moment_outputs = (
            (*self._segments(state.first_moment, indices), *self._segments(state.second_moment, indices))
            if self.moments else ()
        )
        return (
            *self._segments(params, indices),
            *self._segments(state.utility, indices),
            *moment_outputs,
            np.array(state.segment_step, dtype=np.int64),
            np.array(state.grad_norm_ema, dtype=np.float64),
            np.array(state.step, dtype=np.int64),
            np.array(vgs_state.step, dtype=np.int64),
            np.array(vgs_state.grad_mean_avg, dtype=np.float64),
            np.array(vgs_state.grad_sq_avg, dtype=np.float64),
        )


def _check_state(state: FlatUPGDState, vgs_state: FlatVGSState) -> None:
    """The invariants of the state-dict format (``specs/layout.md`` §4) on the Keras state.

    It comes from our own variables, so this only catches a corrupted or hand-edited
    checkpoint; it names the Keras variables. Only the per-segment and global counters are
    checked (O(S) per step), not every element.
    """
    if state.step < 0 or (state.segment_step < 0).any() or (state.segment_step > state.step).any():
        raise ValueError(
            f"optimizer variables 'upgd_step' ({state.step}) and 'segment_step' "
            f"({state.segment_step.tolist()}) are inconsistent: need 0 <= segment_step <= upgd_step"
        )
    if not (state.grad_norm_ema >= 0).all():
        raise ValueError(f"optimizer variable 'grad_norm_ema' must be >= 0, got {state.grad_norm_ema.tolist()}")
    if vgs_state.step < 0 or not (vgs_state.grad_sq_avg >= 0).all() or not np.isfinite(vgs_state.grad_mean_avg).all():
        raise ValueError("optimizer variables 'vgs_step', 'vgs_grad_mean_avg', 'vgs_grad_sq_avg' are corrupt")


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

    Variables must all be float32 or all float64. Mixed precision (``mixed_float16``:
    float16 compute, float32 variables) works; float16/bfloat16 *variables* are rejected.

    ``profile="paper"`` computes the original paper's Adam-style variant
    (``specs/algorithm.md`` §7; ``eps`` defaults to ``1e-5`` then). :class:`UPGD` and
    :class:`UPGDW` are the other members of the family.
    """

    _MEMBER = MEMBERS["AdaptiveUPGD"]  # the family member's row (specs/algorithm.md §7)
    _CORE = CoreAdaptiveUPGD
    # attribute name -> core hyper-parameter name; the attributes are the Keras config keys.
    _ATTRIBUTES = {key: key for key in _UPGD_KEYS}

    def __init__(self, learning_rate=UPGD_DEFAULTS["lr"], weight_decay=UPGD_DEFAULTS["weight_decay"],
                 beta_utility=UPGD_DEFAULTS["beta_utility"], sigma=UPGD_DEFAULTS["sigma"],
                 beta1=UPGD_DEFAULTS["beta1"], beta2=UPGD_DEFAULTS["beta2"], eps=None,
                 adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                 min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                 instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"], vgs=None, seed=0,
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"],
                 profile="production", name="adaptive_upgd", **kwargs):
        if eps is None:
            eps = PAPER_EPS if profile == "paper" else UPGD_DEFAULTS["eps"]
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
                                beta2=beta2, eps=eps, adaptive_noise=adaptive_noise, noise_beta=noise_beta,
                                min_noise_std=min_noise_std, instant_noise_scale=instant_noise_scale,
                                noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile=profile, name=name, kwargs=kwargs)

    def _init_family(self, learning_rate, values, *, vgs, seed, noise_norm, profile, name, kwargs):
        """Validate everything (before Keras creates any variable), then set up the optimizer.
        ``values``: the member's hyper-parameters by attribute name (``_ATTRIBUTES``)."""
        variant = self._MEMBER.variant(profile)
        core_values = {self._ATTRIBUTES[attr]: value for attr, value in values.items()}
        hyper = validate_upgd(dict(
            core_values, lr=learning_rate if isinstance(learning_rate, (int, float)) else UPGD_DEFAULTS["lr"],
        ))
        if noise_norm not in NOISE_NORMS:
            raise ValueError(f"noise_norm must be one of {NOISE_NORMS}, got {noise_norm!r}")
        vgs_settings = _vgs_settings(vgs)
        seed = _check_seed(seed)
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
        self._bridge = None

    # --- learning rate --------------------------------------------------------------------
    # Keras keeps a float learning rate in a floatx (float32) variable, so 1e-2 would reach
    # the core as 0.009999999776... The float the user gave is remembered and used for as
    # long as the variable still holds exactly its rounded value; any other value (assigned
    # to the variable directly, restored from a checkpoint, a schedule) is used as it is.

    def _remember_learning_rate(self, learning_rate):
        exact = isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool)
        self._exact_learning_rate = float(learning_rate) if exact else None

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
        config.update(vgs=self.vgs, seed=self.seed, noise_norm=self.noise_norm, **self._extra_config())
        return config

    def _extra_config(self) -> dict:
        return {"profile": self.profile}

    def _make_core(self, layout):
        """The core optimizer of this family member (its variant) over ``layout``."""
        return self._CORE(layout, seed=self.seed, noise_norm=self.noise_norm, noise_ema_init=self.noise_ema_init,
                          backend="auto", profile=self.profile)

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
        if not var_list:
            raise ValueError(f"{type(self).__name__} needs at least one variable to optimize")
        dtype_of = {id(v): keras.backend.standardize_dtype(v.dtype) for v in var_list}
        dtypes = sorted(set(dtype_of.values()))
        bad = [v for v in var_list if dtype_of[id(v)] not in SUPPORTED_VARIABLE_DTYPES]
        if bad:
            raise TypeError(
                f"{type(self).__name__} supports float32 and float64 variables; variable {_variable_name(bad[0])!r} is "
                f"{dtype_of[id(bad[0])]}. For float16 compute use the 'mixed_float16' dtype policy, which keeps "
                "variables in float32."
            )
        if len(dtypes) > 1:
            raise TypeError(
                f"{type(self).__name__} needs all variables in one dtype (the core runs one flat layout); got {dtypes}"
            )
        if any(None in tuple(v.shape) for v in var_list):
            raise ValueError(f"{type(self).__name__} needs variables with fully defined shapes")
        super().build(var_list)
        moments = self._MEMBER.moments == "adam"  # UPGD keeps no moment variables
        self._utility, self._first_moment, self._second_moment = (
            [self.add_variable_from_reference(v, name=state_name) for v in var_list]
            if state_name == "utility" or moments else []
            for state_name in _STATE_NAMES
        )
        s = len(var_list)
        self._segment_step = self.add_variable((s,), initializer="zeros", dtype="int64", name="segment_step")
        self._grad_norm_ema = self.add_variable(
            (s,), initializer=keras.initializers.Constant(self.noise_ema_init), dtype="float64", name="grad_norm_ema"
        )
        self._upgd_step = self.add_variable((), initializer="zeros", dtype="int64", name="upgd_step")
        self._vgs_step = self.add_variable((), initializer="zeros", dtype="int64", name="vgs_step")
        self._vgs_grad_mean_avg = self.add_variable((s,), initializer="zeros", dtype="float64",
                                                    name="vgs_grad_mean_avg")
        self._vgs_grad_sq_avg = self.add_variable((s,), initializer="zeros", dtype="float64", name="vgs_grad_sq_avg")
        self._bridge = _CoreBridge(
            [tuple(int(d) for d in v.shape) for v in var_list], dtypes[0], [_variable_name(v) for v in var_list],
            self._make_core, moments=moments,
        )

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
        """All present gradients at once -> one core step -> assign the results."""
        if tf.distribute.has_strategy():
            raise NotImplementedError(
                "AdaptiveUPGD (TensorFlow adapter) does not support tf.distribute strategies; "
                "train on one device without a strategy scope"
            )
        in_graph = not tf.executing_eagerly()
        if in_graph and _in_xla_context is not None and _in_xla_context(tf.compat.v1.get_default_graph()):
            raise ValueError(
                "AdaptiveUPGD runs the upgd_ref core through tf.numpy_function, which XLA cannot compile; "
                "use model.compile(..., jit_compile=False) (jit_compile='auto' turns XLA on when a GPU is visible)"
            )
        bridge = self._bridge
        indices = [self._get_variable_index(v) for v in trainable_variables]
        if len(set(indices)) != len(indices):
            raise ValueError("apply_gradients got the same variable twice")
        order = sorted(range(len(indices)), key=indices.__getitem__)
        indices = [indices[k] for k in order]
        dense = [self._dense_gradient(grads[k], indices[j]) for j, k in enumerate(order)]
        variables = [self._trainable_variables[i] for i in indices]
        utility = [self._utility[i] for i in indices]
        first = [self._first_moment[i] for i in indices] if bridge.moments else []
        second = [self._second_moment[i] for i in indices] if bridge.moments else []
        scalars = [self._segment_step, self._grad_norm_ema, self._upgd_step, self._vgs_step,
                   self._vgs_grad_mean_avg, self._vgs_grad_sq_avg]
        inputs = [tf.cast(tf.convert_to_tensor(learning_rate), tf.float64)]
        inputs += [tf.convert_to_tensor(v) for v in (*variables, *dense, *utility, *first, *second, *scalars)]
        dtype = bridge.layout.dtype.name
        out_types = [dtype] * ((4 if bridge.moments else 2) * len(indices)) + ["int64", "float64", "int64", "int64", "float64", "float64"]

        def run(lr, *arrays):
            # Runs at step time (also in graph mode): attribute edits and schedules apply.
            lr = self._exact_if_unchanged(float(lr))
            return bridge.step(indices, self._param_groups(), self.vgs, lr, *arrays)

        outputs = tf.numpy_function(run, inputs, [tf.as_dtype(t) for t in out_types], stateful=True,
                                    name="upgd_ref_core_step")
        targets = [*variables, *utility, *first, *second, *scalars]
        for target, value in zip(targets, outputs):
            value.set_shape(target.shape)
            target.assign(value)
        if in_graph:
            # In a graph, Keras's ``iterations.assign_add(1)`` (after this method) shares no
            # data with the step and could run even when the core raised. An op on the same
            # variable that waits for the step orders it after the step (tf.function keeps
            # program order per resource), so a failed step leaves ``iterations`` unchanged.
            with tf.control_dependencies(outputs):
                self._iterations.assign_add(tf.zeros((), dtype=self._iterations.dtype))

    def _dense_gradient(self, grad, index):
        """The gradient as a dense tensor of the variable's dtype (IndexedSlices are summed
        into a dense tensor, duplicates added, as TensorFlow's own conversion does)."""
        variable = self._trainable_variables[index]
        if isinstance(grad, tf.IndexedSlices):
            grad = tf.convert_to_tensor(grad)
        elif isinstance(grad, tf.SparseTensor):
            grad = tf.sparse.to_dense(grad)
        grad = tf.convert_to_tensor(grad)
        if tuple(grad.shape) != tuple(variable.shape) and grad.shape.is_fully_defined():
            raise ValueError(
                f"gradient for variable {_variable_name(variable)!r} has shape {tuple(grad.shape)}, "
                f"the variable has {tuple(variable.shape)}"
            )
        if not grad.dtype.is_floating:
            raise TypeError(f"gradient for variable {_variable_name(variable)!r} has dtype {grad.dtype.name}")
        return tf.cast(grad, variable.dtype)


@keras.saving.register_keras_serializable(package="upgd_ref")
class UPGD(AdaptiveUPGD):
    """Plain UPGD (no moments; ``specs/algorithm.md`` §7) as a Keras 3 optimizer: the step of
    :class:`upgd_ref.UPGD`, ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``.

    Production defaults ``learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999,
    sigma=0.001``; ``profile="paper"`` gives the paper's plain UPGD. No moment variables are
    created. Everything else (noise options, ``vgs``, ``seed``, Keras arguments) as
    :class:`AdaptiveUPGD`.
    """

    _MEMBER = MEMBERS["UPGD"]
    _CORE = CoreUPGD
    _ATTRIBUTES = {key: key for key in _UPGD_KEYS if key not in _MOMENT_KEYS}

    def __init__(self, learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
                 adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                 min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                 instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"], vgs=None, seed=0,
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"],
                 profile="production", name="upgd", **kwargs):
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                                adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                                instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile=profile, name=name, kwargs=kwargs)


@keras.saving.register_keras_serializable(package="upgd_ref")
class UPGDW(AdaptiveUPGD):
    """UPGDW (``specs/algorithm.md`` §7) as a Keras 3 optimizer: the step of
    :class:`upgd_ref.UPGDW`, AdaptiveUPGD whose utility decay is ``beta_2``.

    Keras names: ``beta_1``, ``beta_2``, ``epsilon`` are the core's ``beta1``, ``beta2``,
    ``eps``; there is no ``beta_utility`` (it is ``beta_2``, also after an edit of
    ``beta_2``). Production defaults ``learning_rate=1e-4, beta_1=0.9, beta_2=0.999,
    epsilon=1e-8, weight_decay=0.01, sigma=0.001``. ``amsgrad=True`` raises ``ValueError``:
    the algorithm keeps no AMSGrad state.
    """

    _MEMBER = MEMBERS["UPGDW"]
    _CORE = CoreUPGDW
    _ATTRIBUTES = {"weight_decay": "weight_decay", "sigma": "sigma", "beta_1": "beta1", "beta_2": "beta2",
                   "epsilon": "eps", **{key: key for key in _NOISE_KEYS}}

    def __init__(self, learning_rate=1e-4, beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=0.01, sigma=0.001,
                 amsgrad=False, adaptive_noise=UPGD_DEFAULTS["adaptive_noise"],
                 noise_beta=UPGD_DEFAULTS["noise_beta"], min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                 instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"], vgs=None, seed=0,
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], name="upgdw", **kwargs):
        if amsgrad is not False:
            raise ValueError("amsgrad=True is not supported: UPGDW keeps no AMSGrad state (specs/algorithm.md §7.2)")
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, sigma=sigma, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                                instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile="production", name=name, kwargs=kwargs)

    def _extra_config(self) -> dict:
        return {"amsgrad": False}

    def _make_core(self, layout):
        return CoreUPGDW(layout, seed=self.seed, noise_norm=self.noise_norm, noise_ema_init=self.noise_ema_init,
                         backend="auto")

    def _core_hyperparams(self) -> dict:
        hyper = super()._core_hyperparams()
        hyper["beta_utility"] = hyper["beta2"]  # tied, at every step
        return hyper
