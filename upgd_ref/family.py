"""The UPGD family in one table (``specs/algorithm.md`` §7): what each member *is*.

Every front end (the core classes, :mod:`upgd_ref.config`, the torch, JAX and Keras
adapters) reads a member's moments, defaults, accepted keys, tied keys, refused options
and profiles from :data:`MEMBERS`; adding a member is a row here plus its math.

A member's hyper-parameters are the reference's keys (:data:`~upgd_ref.hyperparams.UPGD_DEFAULTS`);
``keys`` are the ones its constructor takes (a member without moments takes no ``beta1``,
``beta2``, ``eps``: they keep the library defaults and are not read), ``pairs`` are
constructor arguments that carry two keys (UPGDW's ``betas``), ``tied`` keys are copied
from another key in every group at every step (UPGDW's ``beta_utility = beta2``), and
``refused`` options are accepted only at one value (UPGDW's ``amsgrad=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .hyperparams import UPGD_DEFAULTS, validate_upgd
from .reference import UPGDVariant

__all__ = ["Member", "MEMBERS", "PROFILES", "PAPER_EPS", "member", "RefusedOption"]

PROFILES = ("production", "paper")
PAPER_EPS = 1e-5  # the paper code's default Adam epsilon
_MOMENT_KEYS = ("beta1", "beta2", "eps")


class RefusedOption(ValueError):
    """An option the member accepts only at one value (e.g. ``UPGDW(amsgrad=True)``)."""


@dataclass(frozen=True)
class Member:
    """One member of the UPGD family."""

    name: str
    moments: str  # "adam" (direction m_hat / (sqrt(v_hat) + eps)) or "none" (the gradient)
    defaults: Mapping  # every reference key with this member's default
    keys: tuple  # reference keys its constructor takes
    profiles: tuple = ("production",)
    pairs: Mapping = field(default_factory=dict)  # constructor argument -> the keys it carries
    tied: Mapping = field(default_factory=dict)  # key -> the key it is copied from
    refused: Mapping = field(default_factory=dict)  # option -> (the one accepted value, why)

    def variant(self, profile: str = "production") -> UPGDVariant:
        """The :class:`~upgd_ref.reference.UPGDVariant` this member computes under ``profile``."""
        if profile not in self.profiles:
            raise ValueError(f"profile must be one of {self.profiles} for {self.name}, got {profile!r}")
        if profile == "production":
            return UPGDVariant(moments=self.moments)
        return UPGDVariant(moments=self.moments, protection="max", update_factor=2.0,
                           noise_placement="terms" if self.moments == "adam" else "sum")

    def profile_defaults(self, profile: str = "production") -> dict:
        """The defaults under ``profile`` (the paper's Adam ``eps`` for ``"paper"``)."""
        self.variant(profile)
        defaults = dict(self.defaults)
        if profile == "paper" and self.moments == "adam":
            defaults["eps"] = PAPER_EPS
        return defaults

    def check_refused(self, options: Mapping, where: str = "") -> None:
        """Raise :class:`RefusedOption` for an option set to anything but its one accepted value."""
        for option, (accepted, why) in self.refused.items():
            if option in options and options[option] is not accepted and options[option] != accepted:
                raise RefusedOption(f"{where}{option}={options[option]!r} is not supported: {why}")

    def split_pairs(self, values: Mapping, where: str = "") -> dict:
        """``values`` with each pair argument (``betas``) replaced by the keys it carries."""
        out = {k: v for k, v in values.items() if k not in self.pairs}
        for argument, names in self.pairs.items():
            if argument in values:
                pair = values[argument]
                try:
                    first, second = pair
                except (TypeError, ValueError):
                    raise ValueError(f"{where}{argument} must be a pair ({', '.join(names)}), got {pair!r}") from None
                out.update(zip(names, (first, second)))
        return out

    def tie(self, hyper: Mapping) -> dict:
        """``hyper`` with the tied keys copied from their sources (still checked when
        ``hyper`` was: a tie copies a key into one of the same range)."""
        if not self.tied:
            return hyper
        return type(hyper)({**hyper, **{key: hyper[source] for key, source in self.tied.items()}})

    def hyperparams(self, values: Mapping, profile: str = "production", where: str = "") -> dict:
        """Checked hyper-parameters from constructor-style ``values`` (pairs, refused options,
        defaults of ``profile``, ties), validated once."""
        self.check_refused(values, where)
        given = self.split_pairs({k: v for k, v in values.items() if k not in self.refused}, where)
        unknown = sorted(set(given) - set(self.keys))
        if unknown:
            raise ValueError(f"{where}{self.name} takes no hyper-parameter(s) {unknown}")
        return self.tie(validate_upgd({**self.profile_defaults(profile), **given}, where=where))


_NOISE = {k: UPGD_DEFAULTS[k] for k in ("adaptive_noise", "noise_beta", "min_noise_std", "instant_noise_scale",
                                        "noise_ema_init")}

MEMBERS: Mapping[str, Member] = MappingProxyType({
    "AdaptiveUPGD": Member(
        name="AdaptiveUPGD", moments="adam", defaults=MappingProxyType(dict(UPGD_DEFAULTS)),
        keys=tuple(UPGD_DEFAULTS), profiles=PROFILES,
    ),
    "UPGD": Member(
        name="UPGD", moments="none",
        defaults=MappingProxyType(dict(UPGD_DEFAULTS, lr=1e-5, weight_decay=0.001, beta_utility=0.999, sigma=0.001)),
        keys=tuple(k for k in UPGD_DEFAULTS if k not in _MOMENT_KEYS), profiles=PROFILES,
    ),
    "UPGDW": Member(
        name="UPGDW", moments="adam",
        defaults=MappingProxyType(dict(UPGD_DEFAULTS, lr=1e-4, weight_decay=0.01, sigma=0.001, eps=1e-8, beta1=0.9,
                                       beta2=0.999, beta_utility=0.999, **_NOISE)),
        keys=tuple(k for k in UPGD_DEFAULTS if k != "beta_utility"),
        pairs=MappingProxyType({"betas": ("beta1", "beta2")}),
        tied=MappingProxyType({"beta_utility": "beta2"}),
        refused=MappingProxyType({"amsgrad": (False, "UPGDW keeps no AMSGrad state (specs/algorithm.md §7.2)")}),
    ),
})


def member(name: str) -> Member:
    """The row of ``name`` (``"AdaptiveUPGD"``, ``"UPGD"``, ``"UPGDW"``)."""
    try:
        return MEMBERS[name]
    except KeyError:
        raise ValueError(f"unknown UPGD family member {name!r}; members: {list(MEMBERS)}") from None
