"""Drop-in replacements for the production ``AdaptiveUPGD``, ``UPGD`` and ``UPGDW``.

Each class is a :class:`~.flat_optimizer.FlatBufferOptimizer`: its constructor has the
production signature and messages (the defaults are the family table's), and it names its
row of the family table (:data:`upgd_ref.family.MEMBERS`), the core class its ``core``
snapshot is, its param-group keys and its per-parameter state keys.
"""

from __future__ import annotations

import numbers

import upgd_ref
from upgd_ref.family import MEMBERS

from .conversions import number_from_tensor, one_element, pair_value, split_pair, unsupported_options
from .flat_optimizer import FlatBufferOptimizer

_A, _U, _W = (MEMBERS[name].defaults for name in ("AdaptiveUPGD", "UPGD", "UPGDW"))

#: The production optimizer's param-group keys (besides ``params``), in its order.
HYPERPARAMETER_KEYS = (
    "lr", "weight_decay", "beta_utility", "sigma", "beta1", "beta2", "eps",
    "adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale",
)
#: The production optimizer's per-parameter state keys (``grad_norm_ema`` only with adaptive noise).
STATE_KEYS = ("step", "avg_utility", "first_moment", "sec_moment", "grad_norm_ema")
#: Param-group keys of :class:`UPGD` (the production plain UPGD's, then the adaptive-noise options).
UPGD_HYPERPARAMETER_KEYS = ("lr", "weight_decay", "beta_utility", "sigma", *HYPERPARAMETER_KEYS[7:])
#: Param-group keys of :class:`UPGDW` (the production UPGDW's, then the adaptive-noise options).
UPGDW_HYPERPARAMETER_KEYS = ("lr", "betas", "eps", "weight_decay", "sigma", "amsgrad", *HYPERPARAMETER_KEYS[7:])

#: The production classes' constructor checks: argument -> (message, exclusive upper bound
#: or None); every value must also be >= 0.
_PRODUCTION_CHECKS = {
    "lr": ("Invalid learning rate", None),
    "weight_decay": ("Invalid weight_decay value", None),
    "beta_utility": ("Invalid beta_utility parameter", 1.0),
    "sigma": ("Invalid sigma value", None),
    "beta1": ("Invalid beta1 parameter", 1.0),
    "beta2": ("Invalid beta2 parameter", 1.0),
    "eps": ("Invalid eps value", None),
    "noise_beta": ("Invalid noise_beta parameter", 1.0),
    "min_noise_std": ("Invalid min_noise_std value", None),
}
#: The production UPGDW's own messages (those of ``torch.optim.AdamW``).
_UPGDW_CHECKS = _PRODUCTION_CHECKS | {
    "eps": ("Invalid epsilon value", None),
    "beta1": ("Invalid beta parameter at index 0", 1.0),
    "beta2": ("Invalid beta parameter at index 1", 1.0),
}


def _check_production(values: dict, checks=_PRODUCTION_CHECKS) -> None:
    """The production class's range checks and messages (``ValueError``), in the order of
    ``values``; a tensor value must have one element (torch's message). A value that is no
    real number is left to the core's check, which raises a ``TypeError`` naming the key."""
    for key, value in values.items():
        value = one_element(key, value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        message, upper = checks[key]
        if not (0.0 <= value if upper is None else 0.0 <= value < upper):
            raise ValueError(f"{message}: {value}")


class AdaptiveUPGD(FlatBufferOptimizer):
    """Drop-in replacement for the production ``AdaptiveUPGD`` (a ``torch.optim.Optimizer``).

    Same constructor, defaults, validation errors, param-group keys, ``state[p]`` keys and
    state-dict format as the production class; the step runs in :class:`upgd_ref.AdaptiveUPGD`
    on a flat buffer that the parameters are re-homed into. Keyword-only extras:

    * ``seed``: noise seed (int in ``[0, 2**64)``); ``None`` draws one from torch's global
      generator. Step ``k``'s normals are ``upgd_ref.noise(optimizer.layout, seed, k)``.
    * ``backend``: core backend name (``"auto"``: the fastest for NumPy buffers).
    * ``noise_ema_init``: start value of the gradient-norm average (1.0 as production; 0.0
      is the unbiased form); ``noise_norm``: ``"segment"`` (production) or ``"global"``.
    * ``profile``: ``"production"`` or ``"paper"`` (the paper's Adam-style UPGD,
      ``specs/algorithm.md`` §7; ``eps`` then defaults to ``1e-5``).
    * ``nonfinite``: ``"raise"`` (a step whose gradients, parameters or results are not
      finite raises and changes nothing) or ``"skip"`` (it is skipped: nothing changes but
      ``last_step_info.skipped_steps``), ``specs/algorithm.md`` §8. The same for every member.
    * ``noise_version``: the noise format, 1 (default) or 2 (``specs/noise-v2.md``); kept in
      the state dict (``"upgd_ref"`` entry) and in pickles. The same for every member.
    """

    _MEMBER = MEMBERS["AdaptiveUPGD"]
    _CORE = upgd_ref.AdaptiveUPGD
    _HYPER_KEYS = HYPERPARAMETER_KEYS
    _STATE_KEYS = STATE_KEYS
    _DEFAULT_PROFILE = "production"
    _PAIR_ALIASES = {"betas": ("beta1", "beta2")}

    def __init__(self, params, lr=_A["lr"], weight_decay=_A["weight_decay"], beta_utility=_A["beta_utility"],
                 sigma=_A["sigma"], beta1=_A["beta1"], beta2=_A["beta2"], eps=None, adaptive_noise=_A["adaptive_noise"],
                 noise_beta=_A["noise_beta"], min_noise_std=_A["min_noise_std"],
                 instant_noise_scale=_A["instant_noise_scale"], *, seed=None, backend="auto",
                 noise_ema_init=_A["noise_ema_init"], noise_norm="segment", profile="production", betas=None,
                 maximize=False, foreach=None, fused=None, capturable=False, differentiable=False,
                 nonfinite="raise", process_group=None, shard_mode="zero1", noise_version=1):
        self._MEMBER.variant(profile)  # an unknown profile is refused before anything else
        if betas is not None:  # torch's pair instead of beta1, beta2 (momentum-cycling schedulers)
            if (beta1, beta2) != (_A["beta1"], _A["beta2"]):
                raise ValueError("give betas=(beta1, beta2) or beta1 and beta2, not both")
            beta1, beta2 = split_pair("", "betas", betas, self._PAIR_ALIASES["betas"])
        if eps is None:  # the profile's: 1e-8 (production), 1e-5 (the paper's code)
            eps = self._MEMBER.profile_defaults(profile)["eps"]
        # The production class's checks and messages, then the core's (types, finiteness).
        _check_production(dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
                               beta2=beta2, eps=eps, noise_beta=noise_beta, min_noise_std=min_noise_std))
        defaults = dict(
            lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
            beta2=beta2, eps=eps, adaptive_noise=adaptive_noise, noise_beta=noise_beta,
            min_noise_std=min_noise_std, instant_noise_scale=instant_noise_scale,
        )
        if betas is not None:  # the pair takes the place of beta1, beta2 in the defaults and groups
            defaults = {("betas" if k == "beta1" else k): (betas if k == "beta1" else v)
                        for k, v in defaults.items() if k != "beta2"}
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=profile, noise_version=noise_version,
                    torch_options=dict(maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                                       differentiable=differentiable), nonfinite=nonfinite,
                    process_group=process_group, shard_mode=shard_mode)


class UPGD(FlatBufferOptimizer):
    """Drop-in replacement for the production plain ``UPGD``: no moments (§7 of the algorithm).

    ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)``; ``state[p]`` holds ``step`` and
    ``avg_utility`` (and ``grad_norm_ema`` with adaptive noise). The step runs in
    :class:`upgd_ref.UPGD`. Keyword-only: the adaptive-noise options of :class:`AdaptiveUPGD`
    (also param-group keys), ``seed``, ``backend``, ``noise_ema_init``, ``noise_norm`` and
    ``profile`` (``"paper"``: the paper's plain UPGD).
    """

    _MEMBER = MEMBERS["UPGD"]
    _CORE = upgd_ref.UPGD
    _HYPER_KEYS = UPGD_HYPERPARAMETER_KEYS
    _STATE_KEYS = ("step", "avg_utility", "grad_norm_ema")
    _DEFAULT_PROFILE = "production"

    def __init__(self, params, lr=_U["lr"], weight_decay=_U["weight_decay"], beta_utility=_U["beta_utility"],
                 sigma=_U["sigma"], *, adaptive_noise=_U["adaptive_noise"], noise_beta=_U["noise_beta"],
                 min_noise_std=_U["min_noise_std"], instant_noise_scale=_U["instant_noise_scale"], seed=None,
                 backend="auto", noise_ema_init=_U["noise_ema_init"], noise_norm="segment", profile="production",
                 maximize=False, foreach=None, fused=None, capturable=False, differentiable=False,
                 nonfinite="raise", process_group=None, shard_mode="zero1", noise_version=1):
        self._MEMBER.variant(profile)  # an unknown profile is refused before anything else
        _check_production(dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                               noise_beta=noise_beta, min_noise_std=min_noise_std))
        defaults = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                        adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                        instant_noise_scale=instant_noise_scale)
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=profile, noise_version=noise_version,
                    torch_options=dict(maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                                       differentiable=differentiable), nonfinite=nonfinite,
                    process_group=process_group, shard_mode=shard_mode)


class UPGDW(FlatBufferOptimizer):
    """Drop-in replacement for the production ``UPGDW``: AdaptiveUPGD with ``beta_utility = beta2``.

    Param groups carry ``betas`` (torch convention), mapped to the core's ``beta1``/``beta2``
    and ``beta_utility = betas[1]`` at every step. ``amsgrad=True`` (constructor or param
    group) raises :class:`~.conversions.UnsupportedOption` (a ``ValueError`` and a
    ``NotImplementedError``, as production): the algorithm keeps no AMSGrad state. ``state[p]`` holds the
    :class:`AdaptiveUPGD` keys. The step runs in :class:`upgd_ref.UPGDW`. Keyword-only: the
    adaptive-noise options (also param-group keys), ``seed``, ``backend``,
    ``noise_ema_init``, ``noise_norm``.
    """

    _MEMBER = MEMBERS["UPGDW"]
    _CORE = upgd_ref.UPGDW
    _HYPER_KEYS = UPGDW_HYPERPARAMETER_KEYS
    _STATE_KEYS = STATE_KEYS
    _DEFAULT_PROFILE = None

    def __init__(self, params, lr=_W["lr"], betas=(_W["beta1"], _W["beta2"]), eps=_W["eps"],
                 weight_decay=_W["weight_decay"], sigma=_W["sigma"], amsgrad=False, *,
                 adaptive_noise=_W["adaptive_noise"], noise_beta=_W["noise_beta"], min_noise_std=_W["min_noise_std"],
                 instant_noise_scale=_W["instant_noise_scale"], seed=None, backend="auto",
                 noise_ema_init=_W["noise_ema_init"], noise_norm="segment", maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, nonfinite="raise", process_group=None, shard_mode="zero1",
                 noise_version=1):
        with unsupported_options():
            self._MEMBER.check_refused({"amsgrad": number_from_tensor("amsgrad", amsgrad)})
        beta1, beta2 = self._MEMBER.split_pairs({"betas": pair_value("betas", betas)}).values()
        _check_production(dict(lr=lr, eps=eps, beta1=beta1, beta2=beta2, weight_decay=weight_decay, sigma=sigma,
                               noise_beta=noise_beta, min_noise_std=min_noise_std), _UPGDW_CHECKS)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sigma=sigma, amsgrad=amsgrad,
                        adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                        instant_noise_scale=instant_noise_scale)
        self._setup(params, defaults, seed=seed, backend=backend, noise_ema_init=noise_ema_init,
                    noise_norm=noise_norm, profile=None, noise_version=noise_version,
                    torch_options=dict(maximize=maximize, foreach=foreach, fused=fused, capturable=capturable,
                                       differentiable=differentiable), nonfinite=nonfinite,
                    process_group=process_group, shard_mode=shard_mode)
