r"""AdaptiveUPGD on flat buffers: a thin stateful class over the reference math.

For each segment i that has a gradient (``specs/algorithm.md`` §3):

.. math::

    t_i &\leftarrow t_i + 1, \quad
    u_i \leftarrow \beta_u u_i + (1-\beta_u)(-g_i \odot p_i), \quad
    m_i \leftarrow \beta_1 m_i + (1-\beta_1) g_i, \quad
    v_i \leftarrow \beta_2 v_i + (1-\beta_2) g_i^2 \\
    U_{lo}, U_{hi} &= \min, \max \text{ of every updated } u \text{ element} \\
    x &= \mathrm{clip}\!\left(\frac{u_i/(1-\beta_u^{t_i}) - U_{lo}}{U_{hi}-U_{lo}+10^{-8}}, 0, 1\right),
    \quad s = \sigma(2(x - \tfrac12)) \\
    p_i &\leftarrow p_i (1 - \eta\lambda)
      - \eta \left(\frac{\hat m_i}{\sqrt{\hat v_i}+\epsilon} + \mathrm{std}_i\,\xi\right)(1 - s)

Example::

    >>> import numpy as np, upgd_ref
    >>> layout = upgd_ref.FlatLayout([(4, 3), (3,)], dtype="float64")
    >>> params = layout.pack([np.ones((4, 3)), np.zeros(3)])
    >>> grads = layout.pack([np.full((4, 3), 0.1), np.full(3, -0.2)])
    >>> opt = upgd_ref.AdaptiveUPGD(layout, lr=1e-2, adaptive_noise=True, sigma=0.05, seed=7)
    >>> info = opt.step(params, grads)
    >>> info.step, bool(np.allclose(info.noise_to_signal, 0.05))
    (1, True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from . import step as door
from .backends import check_backend_name
from .checkpoint import FileCheckpoints
from .checks import check_nonfinite_policy, check_present
from .family import MEMBERS, PAPER_EPS, PROFILES
from .hyperparams import resolve_param_groups, segment_hyperparams
from .reference import PRODUCTION, check_variant
from .layout import FlatLayout
from .scaler import VarianceGradientScaler
from .serial import Serialised, serialised
from .state import UPGD_FORMAT, UPGD_VERSION, FlatUPGDState
from .rng import DEFAULT_NOISE_VERSION, check_noise_version
from .step import StepRequest, VGSRequest, check_noise_norm, check_seed

__all__ = ["AdaptiveUPGD", "UPGD", "UPGDW", "StepInfo", "PROFILES", "PAPER_EPS"]

_A = MEMBERS["AdaptiveUPGD"].defaults
_U = MEMBERS["UPGD"].defaults
_W = MEMBERS["UPGDW"].defaults


@dataclass(frozen=True)
class StepInfo:
    """What one step did; per-segment arrays hold NaN where a segment had no gradient.

    ``noise_to_signal[i] = noise_std[i] / grad_norm[i]`` (inf for a zero gradient).
    ``vgs_factor`` (``f``) and ``vgs_normalized_variance`` (``G``) are the VGS values this
    step used when a scaler was passed to :meth:`AdaptiveUPGD.step`, NaN otherwise (NaN, not
    1.0, so a log cannot mistake "no scaler" for "a scaler that did not scale"). ``skipped``:
    this step was refused and skipped (``nonfinite="skip"``, ``specs/algorithm.md`` §8; then
    ``step`` is the unchanged count); ``skipped_steps``: how many steps were skipped so far.
    """

    step: int
    present: np.ndarray
    grad_norm: np.ndarray
    noise_std: np.ndarray
    noise_to_signal: np.ndarray
    utility_min: float
    utility_max: float
    vgs_factor: float = math.nan
    vgs_normalized_variance: float = math.nan
    skipped: bool = False
    skipped_steps: int = 0

    @classmethod
    def from_stats(cls, stats, step: int, present, vgs_factor=None, vgs_variance=None, skipped_steps=0) -> StepInfo:
        """The record of a step from the door's :class:`~upgd_ref.reference.StepStats`."""
        grad_norm = np.asarray(stats.grad_norm, dtype=np.float64)
        noise_std = np.asarray(stats.noise_std, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            nsr = noise_std / grad_norm
        return cls(step=step, present=np.asarray(present), grad_norm=grad_norm, noise_std=noise_std,
                   noise_to_signal=nsr, utility_min=float(stats.utility_min), utility_max=float(stats.utility_max),
                   vgs_factor=math.nan if vgs_factor is None else vgs_factor,
                   vgs_normalized_variance=math.nan if vgs_variance is None else vgs_variance,
                   skipped=bool(stats.skipped), skipped_steps=int(skipped_steps))

    def to_dict(self) -> dict:
        """Plain Python values (lists, floats) for logging."""
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}


def noise_version_field(noise_version: int) -> dict:
    """The state dict's ``"noise_version"`` entry: absent for the default format 1, so that
    format-1 state dicts and checkpoints are exactly what they were (``specs/layout.md`` §4)."""
    return {} if noise_version == DEFAULT_NOISE_VERSION else {"noise_version": noise_version}


def saved_noise_version(state_dict: dict) -> int:
    """The noise format a state dict records (absent: 1), checked."""
    return check_noise_version(state_dict.get("noise_version", DEFAULT_NOISE_VERSION), "state dict field ")


class AdaptiveUPGD(FileCheckpoints, Serialised):
    """Utility-based perturbed gradient descent with Adam moments, on a :class:`FlatLayout`.

    Hyper-parameters (defaults as the production optimizer): ``lr, weight_decay,
    beta_utility, sigma, beta1, beta2, eps, adaptive_noise, noise_beta, min_noise_std,
    instant_noise_scale``; ``noise_ema_init`` is the start value of the gradient-norm
    average (1.0 reproduces the production flaw, 0.0 is unbiased); ``noise_norm`` is
    ``"segment"`` (default) or ``"global"``. ``noise_version``: the noise format, 1 (default,
    ``specs/noise.md``) or 2 (binary32 transform, ``specs/noise-v2.md``), kept in the state
    dict. ``param_groups`` is a list of dicts of
    overrides, each with ``"segments"`` (segment indices) or matched to ``layout.groups``.
    ``param_groups`` can be edited between steps, as in torch.optim.

    ``profile="paper"`` computes the original paper's Adam-style variant instead
    (``sigmoid((u/cu)/U_hi)`` protection, twice the step, ``eps = 1e-5`` unless given;
    ``specs/algorithm.md`` §7).

    ``nonfinite``: what a step does when its inputs are not finite or its result would not be
    (``specs/algorithm.md`` §8): ``"raise"`` (default) a
    :class:`~upgd_ref.checks.NonFiniteStepError` naming the segment and field, or ``"skip"``
    the step (nothing changes but ``state.skipped_steps``), as ``torch.amp.GradScaler`` does.

    Thread-safe: calls on one optimizer from several threads run one at a time, each
    complete (:mod:`upgd_ref.serial`); optimizers in different threads run concurrently.
    """

    MEMBER = MEMBERS["AdaptiveUPGD"]

    def __init__(self, layout: FlatLayout, *, lr=_A["lr"], weight_decay=_A["weight_decay"],
                 beta_utility=_A["beta_utility"], sigma=_A["sigma"], beta1=_A["beta1"], beta2=_A["beta2"], eps=None,
                 adaptive_noise=_A["adaptive_noise"], noise_beta=_A["noise_beta"], min_noise_std=_A["min_noise_std"],
                 instant_noise_scale=_A["instant_noise_scale"], noise_norm="segment",
                 noise_ema_init=_A["noise_ema_init"], seed=0, noise_version=1, param_groups=None, backend="auto",
                 profile="production", nonfinite="raise"):
        values = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma, beta1=beta1,
                      beta2=beta2, adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                      instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
        if eps is not None:  # None: the profile's eps
            values["eps"] = eps
        self._setup(layout, values, noise_norm=noise_norm, seed=seed, noise_version=noise_version,
                    param_groups=param_groups, backend=backend,
                    profile=profile, nonfinite=nonfinite)

    def _setup(self, layout, values: dict, *, noise_norm, seed, noise_version, param_groups, backend, profile,
               nonfinite) -> None:
        """The one constructor body of every member: its table row checks ``values``."""
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        self.variant = self.MEMBER.variant(profile)
        self.profile = profile
        self.layout = layout
        self.defaults = self.MEMBER.hyperparams(values, profile)
        self.noise_norm = check_noise_norm(noise_norm)
        self.seed = check_seed(seed)
        self.noise_version = check_noise_version(noise_version)
        self.backend = check_backend_name(backend)
        self.nonfinite = check_nonfinite_policy(nonfinite)
        self.param_groups = resolve_param_groups(param_groups, self.defaults, layout)
        hyper = self.step_hyperparams()
        self.state = FlatUPGDState.zeros(layout, [h["noise_ema_init"] for h in hyper])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layout!r}, step={self.state.step}, backend={self.backend!r})"

    def step_hyperparams(self) -> list[dict]:
        """Validated hyper-parameters per segment, re-read from ``param_groups`` (tied keys
        copied from their sources, as the member's row says)."""
        return [self.MEMBER.tie(h) for h in segment_hyperparams(self.param_groups, self.layout.num_segments,
                                                                 self.defaults)]

    @property
    def step_count(self) -> int:
        """Completed calls to :meth:`step`; the next step uses noise counter ``step_count + 1``."""
        return self.state.step

    @serialised
    def step(self, params, grads, present=None, *, vgs: VarianceGradientScaler | None = None) -> StepInfo:
        """One step: updates ``params`` and the state in place, returns :class:`StepInfo`.

        ``present[i] = False`` marks segment i as having no gradient this step: its
        parameters, step count and state stay bit-identical and it takes no part in the
        global reductions. Invalid input raises before anything is modified.

        ``vgs``: a :class:`VarianceGradientScaler` over the same segments. Then this call is
        ``f = vgs.scale(grads, present); step(params, grads, present); vgs.update(grads,
        present)`` in one: ``grads`` are left multiplied by ``f`` (in place, so they must be
        writable), the scaler's statistics advance, and the kernel backends read the
        gradient once for all three. A skipped step (``nonfinite="skip"``) leaves ``grads`` and
        the scaler's statistics unchanged too.
        """
        request = StepRequest(hyper=self.step_hyperparams(), present=present, seed=self.seed,
                              noise_norm=self.noise_norm, noise_version=self.noise_version, variant=self.variant,
                              nonfinite=check_nonfinite_policy(self.nonfinite))
        vgs_factor = vgs_variance = None
        if vgs is None:
            stats = door.upgd_step(self.layout, params, grads, self.state, request, backend=self.backend)
        else:
            self._check_scaler(vgs)
            with vgs.exclusive():  # the scaler's statistics advance in this step: no call of it in between
                vgs_factor, vgs_variance = vgs.factor_and_variance()
                vgs_request = VGSRequest(vgs.state, vgs_factor, vgs.hyperparams["beta"])
                stats = door.upgd_step(self.layout, params, grads, self.state, request, vgs=vgs_request,
                                       backend=self.backend)
        return StepInfo.from_stats(stats, self.state.step, check_present(present, self.layout.num_segments),
                                   vgs_factor, vgs_variance, self.state.skipped_steps)

    def _check_scaler(self, vgs) -> None:
        if not isinstance(vgs, VarianceGradientScaler):
            raise TypeError(f"vgs must be a VarianceGradientScaler, got {type(vgs).__name__}")
        if vgs.layout.shapes != self.layout.shapes or vgs.layout.dtype != self.layout.dtype:
            raise ValueError(
                f"vgs must be over this optimizer's layout (segment shapes {list(self.layout.shapes)}, "
                f"{self.layout.dtype.name}); it is over segment shapes {list(vgs.layout.shapes)}, "
                f"{vgs.layout.dtype.name}"
            )

    @serialised
    def noise(self, step: int | None = None, dtype=None) -> np.ndarray:
        """The standard normals of step ``step`` (default: the next one) for this optimizer."""
        step = self.state.step + 1 if step is None else step
        return door.noise(self.layout, self.seed, step, dtype, backend=self.backend, noise_version=self.noise_version)

    # --- state ------------------------------------------------------------------------

    @serialised
    def state_dict(self) -> dict:
        """Versioned, self-describing copy of the state (``specs/layout.md`` §4)."""
        return {
            "format": UPGD_FORMAT,
            "version": UPGD_VERSION,
            "member": self.MEMBER.name,
            "profile": self.profile,
            "layout": self.layout.to_dict(),
            "seed": self.seed,
            "noise_norm": self.noise_norm,
            "variant": dict(self.variant._asdict()),
            "param_groups": resolve_param_groups(self.param_groups, self.defaults, self.layout),
            "state": self.state.to_state(self.layout),
        } | noise_version_field(self.noise_version)

    @serialised
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore state, seed and parameter groups; nothing changes if anything is invalid."""
        state = FlatUPGDState.from_state_dict(state_dict, self.layout)
        saved_layout = state_dict.get("layout")
        if saved_layout is not None and FlatLayout.from_dict(saved_layout).shapes != self.layout.shapes:
            raise ValueError(
                f"state dict is for segment shapes {saved_layout.get('shapes')}, this optimizer has {list(self.layout.shapes)}"
            )
        self._check_member(state_dict)
        if "seed" not in state_dict:
            raise ValueError("state dict field 'seed' is missing")
        seed = check_seed(state_dict["seed"], "state dict field ")  # TypeError for a non-int (§4.5)
        noise_norm = check_noise_norm(state_dict.get("noise_norm"))
        noise_version = saved_noise_version(state_dict)
        variant = check_variant(state_dict.get("variant", PRODUCTION._asdict()))  # absent before v0.2: production
        if variant != self.variant:
            raise ValueError(f"state dict is for UPGD variant {dict(variant._asdict())}, "
                             f"this optimizer computes {dict(self.variant._asdict())}")
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list):
            raise ValueError("state dict field 'param_groups' must be a list")
        groups = resolve_param_groups(groups, self.defaults, self.layout)
        self.state.assign(state)
        self.seed, self.noise_norm, self.param_groups = seed, noise_norm, groups
        self.noise_version = noise_version

    def _check_member(self, state_dict: dict) -> None:
        """A checkpoint names its member and profile (since version 2): they must be this
        optimizer's. A file without them (version 1) is checked by its variant alone."""
        if "member" not in state_dict and "profile" not in state_dict:
            return
        saved = {}
        for key in ("member", "profile"):
            saved[key] = state_dict.get(key)
            if not isinstance(saved[key], str):
                raise TypeError(f"state dict field {key!r} must be a str, got {type(saved[key]).__name__}")
        if (saved["member"], saved["profile"]) != (self.MEMBER.name, self.profile):
            raise ValueError(f"state dict is a checkpoint of {saved['member']} (profile {saved['profile']!r}); "
                             f"this optimizer is {self.MEMBER.name} (profile {self.profile!r})")


class UPGD(AdaptiveUPGD):
    """Plain UPGD: no moments, ``p <- p (1 - lr wd) - lr (g + noise)(1 - su)`` (§7).

    The production defaults; ``profile="paper"`` gives the paper's plain UPGD. Adaptive
    noise, VGS, parameter groups and frozen segments work as for :class:`AdaptiveUPGD`.
    """

    MEMBER = MEMBERS["UPGD"]

    def __init__(self, layout: FlatLayout, *, lr=_U["lr"], weight_decay=_U["weight_decay"],
                 beta_utility=_U["beta_utility"], sigma=_U["sigma"], adaptive_noise=_U["adaptive_noise"],
                 noise_beta=_U["noise_beta"], min_noise_std=_U["min_noise_std"],
                 instant_noise_scale=_U["instant_noise_scale"], noise_norm="segment",
                 noise_ema_init=_U["noise_ema_init"], seed=0, noise_version=1, param_groups=None, backend="auto",
                 profile="production", nonfinite="raise"):
        values = dict(lr=lr, weight_decay=weight_decay, beta_utility=beta_utility, sigma=sigma,
                      adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                      instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
        self._setup(layout, values, noise_norm=noise_norm, seed=seed, noise_version=noise_version,
                    param_groups=param_groups, backend=backend,
                    profile=profile, nonfinite=nonfinite)


class UPGDW(AdaptiveUPGD):
    """UPGDW: AdaptiveUPGD whose utility decay is ``beta2`` (in every group, at every step).

    Production signature: ``lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
    sigma=0.001, amsgrad=False``. ``amsgrad=True`` raises: the algorithm has no AMSGrad
    state, and ignoring the flag silently would mislead (``specs/algorithm.md`` §7.2).
    """

    MEMBER = MEMBERS["UPGDW"]

    def __init__(self, layout: FlatLayout, *, lr=_W["lr"], betas=(_W["beta1"], _W["beta2"]), eps=_W["eps"],
                 weight_decay=_W["weight_decay"], sigma=_W["sigma"], amsgrad=False,
                 adaptive_noise=_W["adaptive_noise"], noise_beta=_W["noise_beta"], min_noise_std=_W["min_noise_std"],
                 instant_noise_scale=_W["instant_noise_scale"], noise_norm="segment",
                 noise_ema_init=_W["noise_ema_init"], seed=0, noise_version=1, param_groups=None, backend="auto",
                 nonfinite="raise"):
        values = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sigma=sigma, amsgrad=amsgrad,
                      adaptive_noise=adaptive_noise, noise_beta=noise_beta, min_noise_std=min_noise_std,
                      instant_noise_scale=instant_noise_scale, noise_ema_init=noise_ema_init)
        self._setup(layout, values, noise_norm=noise_norm, seed=seed, noise_version=noise_version,
                    param_groups=param_groups, backend=backend,
                    profile="production", nonfinite=nonfinite)
