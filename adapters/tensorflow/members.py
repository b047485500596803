"""The other members of the family (``specs/algorithm.md`` §7) as Keras 3 optimizers:
:class:`UPGD` (no moments) and :class:`UPGDW` (Keras's AdamW names, utility decay tied to
``beta_2``). Each is :class:`~.optimizer.AdaptiveUPGD` with its own constructor, attributes
and core class."""

from __future__ import annotations

import keras

from upgd_ref import UPGD as CoreUPGD
from upgd_ref import UPGDW as CoreUPGDW
from upgd_ref.family import MEMBERS
from upgd_ref.hyperparams import UPGD_DEFAULTS

from .optimizer import UPGD_KEYS, AdaptiveUPGD

_MOMENT_KEYS = ("beta1", "beta2", "eps")
_NOISE_KEYS = ("adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale", "noise_ema_init")


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
    _ATTRIBUTES = {key: key for key in UPGD_KEYS if key not in _MOMENT_KEYS}

    def __init__(self, learning_rate=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001,
                 adaptive_noise=UPGD_DEFAULTS["adaptive_noise"], noise_beta=UPGD_DEFAULTS["noise_beta"],
                 min_noise_std=UPGD_DEFAULTS["min_noise_std"],
                 instant_noise_scale=UPGD_DEFAULTS["instant_noise_scale"], vgs=None, seed=0,
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"],
                 profile="production", nonfinite="raise", name="upgd", **kwargs):
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                                adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                                instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile=profile, nonfinite=nonfinite, name=name, kwargs=kwargs)


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
                 noise_norm="segment", noise_ema_init=UPGD_DEFAULTS["noise_ema_init"], nonfinite="raise",
                 name="upgdw", **kwargs):
        self._MEMBER.check_refused({"amsgrad": amsgrad})
        self._init_family(
            learning_rate, dict(weight_decay=weight_decay, sigma=sigma, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                                adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                                instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init),
            vgs=vgs, seed=seed, noise_norm=noise_norm, profile="production", nonfinite=nonfinite, name=name,
            kwargs=kwargs)

    def _extra_config(self) -> dict:
        return {"amsgrad": False}

    def _make_core(self, layout):
        return CoreUPGDW(layout, seed=self.seed, noise_norm=self.noise_norm, noise_ema_init=self.noise_ema_init,
                         backend="auto", nonfinite=self.nonfinite)

    def _core_hyperparams(self) -> dict:
        hyper = super()._core_hyperparams()
        hyper["beta_utility"] = hyper["beta2"]  # tied, at every step
        return hyper
