"""The family members as the test suite sees them: one table every front end iterates.

The pattern is PyTorch's ``OptimizerInfo`` (``torch/testing/_internal/common_optimizers.py``):
one :class:`MemberInfo` per member and profile holds what a test needs to build it, the
constructor inputs to try, the error inputs it must refuse and where it runs. Every front
end (the core classes, the torch, JAX and Keras adapters) spells the reference's keys its
own way; :class:`Spelling` translates, so the family and bad-input tests of every front end
iterate :data:`MEMBER_DB` and :func:`error_inputs` instead of keeping their own lists.

What a member *is* (defaults, keys, ties, refusals, profiles) is read from
:data:`upgd_ref.family.MEMBERS`, never restated here; this table adds only test inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from upgd_ref import UPGD, UPGDW, AdaptiveUPGD
from upgd_ref.family import MEMBERS, Member


@dataclass(frozen=True)
class ErrorInput:
    """Constructor keyword arguments (reference names) that must raise ``error`` naming ``key``."""

    kwargs: Mapping
    error: type
    key: str  # the reference key (or option) the message must name, in the front end's spelling

    @property
    def id(self) -> str:
        return ",".join(f"{k}={v!r:.12}" for k, v in self.kwargs.items())


@dataclass(frozen=True)
class MemberInfo:
    """One member under one profile."""

    id: str  # test id: "adaptive", "upgd", "upgdw", "adaptive_paper", "upgd_paper"
    name: str  # the row of upgd_ref.family.MEMBERS
    core_class: type
    profile: str = "production"
    inputs: tuple = ({},)  # constructor inputs (reference names) besides the defaults
    backends: tuple = ("reference", "numba", "cuda-emulator")  # NumPy backends it runs on

    @property
    def member(self) -> Member:
        return MEMBERS[self.name]

    @property
    def paper(self) -> bool:
        return self.profile == "paper"

    def core(self, layout, **kwargs):
        """The core class for ``layout`` with ``kwargs`` in reference names."""
        return self.core_class(layout, **with_profile(self, paired(self, kwargs)))


def paired(info: MemberInfo, kwargs: Mapping) -> dict:
    """``kwargs`` with the keys a pair argument carries put into it (UPGDW: ``betas``)."""
    out = dict(kwargs)
    for argument, names in info.member.pairs.items():
        if any(n in out for n in names):
            out[argument] = tuple(out.pop(n, info.member.defaults[n]) for n in names)
    return out


def with_profile(info: MemberInfo, kwargs: Mapping) -> dict:
    """``kwargs`` plus ``profile`` for a member that has several (UPGDW has only one, and no keyword)."""
    out = dict(kwargs)
    if len(info.member.profiles) > 1:
        out.setdefault("profile", info.profile)
    return out


MEMBER_DB: tuple[MemberInfo, ...] = (
    MemberInfo("adaptive", "AdaptiveUPGD", AdaptiveUPGD,
               inputs=({}, {"adaptive_noise": True, "sigma": 0.05}, {"beta1": 0.0, "eps": 1e-3})),
    MemberInfo("upgd", "UPGD", UPGD, inputs=({}, {"adaptive_noise": True, "sigma": 0.05})),
    MemberInfo("upgdw", "UPGDW", UPGDW, inputs=({}, {"beta1": 0.8, "beta2": 0.95, "eps": 1e-6})),
    MemberInfo("adaptive_paper", "AdaptiveUPGD", AdaptiveUPGD, profile="paper",
               inputs=({}, {"beta_utility": 0.9, "weight_decay": 0.01})),
    MemberInfo("upgd_paper", "UPGD", UPGD, profile="paper", inputs=({}, {"beta_utility": 0.9})),
)
MEMBER_IDS = tuple(info.id for info in MEMBER_DB)


def member_info(member_id: str) -> MemberInfo:
    return next(info for info in MEMBER_DB if info.id == member_id)


#: Invalid values of each reference key (the same for every member that takes the key).
BAD_VALUES: Mapping[str, tuple] = {
    "lr": ((-1e-3, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("0.1", TypeError),
           (True, TypeError), (10**400, ValueError)),
    "weight_decay": ((-1e-9, ValueError), (math.nan, ValueError)),
    "beta_utility": ((1.0, ValueError), (-0.1, ValueError)),
    "sigma": ((-0.1, ValueError), (math.inf, ValueError)),
    "beta1": ((1.0, ValueError), (math.nan, ValueError)),
    "beta2": ((1.5, ValueError), (-1e-12, ValueError)),
    "eps": ((-1e-8, ValueError), (math.nan, ValueError), (0.0, ValueError)),  # 0: 0/0 on a zero gradient
    "adaptive_noise": ((1, TypeError), ("yes", TypeError)),
    "noise_beta": ((1.0, ValueError), (-0.5, ValueError)),
    "min_noise_std": ((-1e-6, ValueError),),
    "instant_noise_scale": ((None, TypeError), (0, TypeError)),
    "noise_ema_init": ((-1.0, ValueError),),
}

#: Invalid options every member refuses.
BAD_OPTIONS: tuple = (
    ErrorInput({"seed": -1}, ValueError, "seed"),
    ErrorInput({"seed": 2**64}, ValueError, "seed"),
    ErrorInput({"seed": 1.5}, TypeError, "seed"),
    ErrorInput({"seed": True}, TypeError, "seed"),
    ErrorInput({"noise_norm": "layer"}, ValueError, "noise_norm"),
)


def error_inputs(info: MemberInfo) -> list[ErrorInput]:
    """Every error input of ``info``: bad values of the keys it takes, bad options, its refusals."""
    out = [ErrorInput({key: value}, error, key)
           for key in info.member.keys for value, error in BAD_VALUES[key]]
    out += BAD_OPTIONS
    out += [ErrorInput({option: not accepted if isinstance(accepted, bool) else None}, ValueError, option)
            for option, (accepted, _) in info.member.refused.items()]
    if len(info.member.profiles) > 1:
        out.append(ErrorInput({"profile": "papers"}, ValueError, "profile"))
    return out


@dataclass(frozen=True)
class Spelling:
    """How one front end spells the reference's keys and builds a member.

    ``names`` maps reference keys to the front end's (missing: the same name), per member
    name or for all (key ``"*"``); ``build(info, kwargs)`` constructs with front-end names.
    """

    build: Callable
    names: Mapping = field(default_factory=dict)
    message_names: Mapping = field(default_factory=dict)  # key -> how messages name it, if not by name

    def name(self, info: MemberInfo, key: str) -> str:
        return self.names.get(info.name, {}).get(key, self.names.get("*", {}).get(key, key))

    def names_key(self, info: MemberInfo, key: str) -> str:
        """A regex for a message that names ``key``: the front end's spelling or the reference's
        (the adapters validate through :mod:`upgd_ref.hyperparams`, one message everywhere)."""
        said = self.message_names.get(info.name, {}).get(key, self.message_names.get("*", {}).get(key))
        names = [self.name(info, key), key] + ([said] if said else [])
        return "(" + "|".join(re.escape(n) for n in names) + ")"

    def construct(self, info: MemberInfo, **kwargs):
        """Build ``info`` with ``kwargs`` given in reference names."""
        return self.build(info, {self.name(info, k): v for k, v in kwargs.items()})
