"""Hyper-parameter defaults, validation and parameter groups (``specs/algorithm.md``)."""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = [
    "UPGD_DEFAULTS",
    "VGS_DEFAULTS",
    "CheckedHyperParams",
    "NOISE_NORMS",
    "validate_upgd",
    "validate_vgs",
    "resolve_param_groups",
    "check_coefficients",
]

UPGD_DEFAULTS = {
    "lr": 1e-5,
    "weight_decay": 0.001,
    "beta_utility": 0.999,
    "sigma": 0.001,
    "beta1": 0.9,
    "beta2": 0.999,
    "eps": 1e-8,
    "adaptive_noise": False,
    "noise_beta": 0.999,
    "min_noise_std": 1e-6,
    "instant_noise_scale": True,
    "noise_ema_init": 1.0,
}

VGS_DEFAULTS = {
    "enabled": True,
    "beta": 0.99,
    "alpha": 0.1,
    "eps": 1e-8,
    "warmup_steps": 100,
    "min_scaling_factor": 0.1,
    "variance_cap": 50.0,
}

NOISE_NORMS = ("segment", "global")

_NON_NEGATIVE = ("lr", "weight_decay", "sigma", "min_noise_std", "noise_ema_init")
_UNIT_INTERVAL = ("beta_utility", "beta1", "beta2", "noise_beta")  # [0, 1)
_FLAGS = ("adaptive_noise", "instant_noise_scale")


def _real(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a real number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float64's range (e.g. 10**400)
        raise ValueError(f"{where}{name} must be finite, got a number too large for float64") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}{name} must be finite, got {number}")
    return number


def _flag(where: str, name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}{name} must be a bool, got {type(value).__name__}")
    return bool(value)


class CheckedHyperParams(dict):
    """A hyper-parameter dict that :func:`validate_upgd` produced: the step door
    (:func:`upgd_ref.step.upgd_step`) does not check it again."""


def validate_upgd(values: dict, where: str = "") -> CheckedHyperParams:
    """Checked copy of AdaptiveUPGD hyper-parameters; ``where`` prefixes error messages."""
    unknown = set(values) - set(UPGD_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}unknown hyper-parameter(s): {sorted(unknown)}")
    out = dict(UPGD_DEFAULTS)
    out.update(values)
    for name in _NON_NEGATIVE:
        out[name] = _real(where, name, out[name])
        if not out[name] >= 0.0:
            raise ValueError(f"{where}{name} must be >= 0, got {out[name]}")
    out["eps"] = _real(where, "eps", out["eps"])
    if not out["eps"] > 0.0:  # eps = 0 divides 0 by 0 wherever the gradients have all been 0
        raise ValueError(f"{where}eps must be > 0, got {out['eps']}")
    for name in _UNIT_INTERVAL:
        out[name] = _real(where, name, out[name])
        if not 0.0 <= out[name] < 1.0:
            raise ValueError(f"{where}{name} must be in [0, 1), got {out[name]}")
    for name in _FLAGS:
        out[name] = _flag(where, name, out[name])
    if not math.isfinite(out["lr"] * out["weight_decay"]):
        raise ValueError(f"{where}lr * weight_decay must be finite in float64, got {out['lr']} * {out['weight_decay']}")
    return CheckedHyperParams(out)


def check_coefficients(hyper: dict, dtype, variant, where: str = "") -> None:
    """The coefficients a step rounds to the parameters' ``dtype`` must be finite there
    (``specs/algorithm.md`` §8, the range table): ``update_factor * lr`` and ``1 - lr *
    weight_decay``, and ``eps`` must not round to 0 (members with moments). ``ValueError``
    naming the hyper-parameter; these depend on the settings only, so no policy skips them."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", under="ignore"):
        step = np.asarray(variant.update_factor * hyper["lr"], dtype=dtype)
        decay = np.asarray(1.0 - hyper["lr"] * hyper["weight_decay"], dtype=dtype)
        eps = np.asarray(hyper["eps"], dtype=dtype)
    if not np.isfinite(step):
        raise ValueError(f"{where}lr = {hyper['lr']} (times the update factor {variant.update_factor}) overflows "
                         f"{dtype.name}")
    if not np.isfinite(decay):
        raise ValueError(f"{where}1 - lr * weight_decay = {1.0 - hyper['lr'] * hyper['weight_decay']} overflows "
                         f"{dtype.name}; lower lr or weight_decay")
    if variant.moments == "adam" and eps == 0:
        raise ValueError(f"{where}eps = {hyper['eps']} rounds to 0 in {dtype.name}; eps must be > 0 there")


def validate_vgs(values: dict, where: str = "") -> dict:
    """Checked copy of VarianceGradientScaler hyper-parameters."""
    unknown = set(values) - set(VGS_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}unknown VGS hyper-parameter(s): {sorted(unknown)}")
    out = dict(VGS_DEFAULTS)
    out.update(values)
    out["enabled"] = _flag(where, "enabled", out["enabled"])
    for name in ("beta", "alpha", "eps", "min_scaling_factor"):
        out[name] = _real(where, name, out[name])
    if not 0.0 < out["beta"] < 1.0:
        raise ValueError(f"{where}beta must be in (0, 1), got {out['beta']}")
    if not out["alpha"] >= 0.0:
        raise ValueError(f"{where}alpha must be >= 0, got {out['alpha']}")
    if not out["eps"] > 0.0:
        raise ValueError(f"{where}eps must be > 0, got {out['eps']}")
    if not 0.0 < out["min_scaling_factor"] <= 1.0:
        raise ValueError(
            f"{where}min_scaling_factor must be in (0, 1], got {out['min_scaling_factor']}"
        )
    warmup = out["warmup_steps"]
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral):
        raise TypeError(f"{where}warmup_steps must be an int, got {type(warmup).__name__}")
    if warmup < 0:
        raise ValueError(f"{where}warmup_steps must be >= 0, got {warmup}")
    out["warmup_steps"] = int(warmup)
    if out["variance_cap"] is not None:
        out["variance_cap"] = _real(where, "variance_cap", out["variance_cap"])
        if not out["variance_cap"] > 0.0:
            raise ValueError(f"{where}variance_cap must be > 0 or None, got {out['variance_cap']}")
    return out


def resolve_param_groups(param_groups, defaults: dict, layout) -> list[dict]:
    """Complete parameter groups: every segment in exactly one group, every key present.

    A group is a dict of hyper-parameter overrides plus ``"segments"`` (segment indices;
    ``"params"`` is accepted as an alias, as in torch.optim). A group without either takes
    the segments whose ``layout.groups`` id equals the group's position. Segments left in no
    group form a trailing group with the defaults.
    """
    if param_groups is None:
        param_groups = []
    if isinstance(param_groups, dict) or not hasattr(param_groups, "__iter__"):
        raise TypeError("param_groups must be a list of dicts")
    owner: dict[int, int] = {}
    groups = []
    for position, group in enumerate(param_groups):
        if not isinstance(group, dict):
            raise TypeError(f"param_groups[{position}] must be a dict, got {type(group).__name__}")
        group = dict(group)
        if "segments" in group and "params" in group:
            raise ValueError(f"param_groups[{position}] has both 'segments' and 'params'")
        members = group.pop("segments", group.pop("params", None))
        if members is None:
            members = [i for i, g in enumerate(layout.groups) if g == position]
        members = _claim_segments(position, members, layout.num_segments, owner)
        hyper = validate_upgd({**defaults, **group}, where=f"param_groups[{position}]: ")
        groups.append({"segments": members, **hyper})
    rest = [i for i in range(layout.num_segments) if i not in owner]
    if rest:
        groups.append({"segments": rest, **validate_upgd(defaults)})
    return groups


def _claim_segments(position: int, members, num_segments: int, owner: dict) -> list[int]:
    """Checked segment indices of ``param_groups[position]``, recorded in ``owner``."""
    where = f"param_groups[{position}]"
    if isinstance(members, (str, bytes, dict, set, frozenset)) or not hasattr(members, "__iter__"):
        raise TypeError(f"{where}: 'segments' must be a list of segment indices, got {type(members).__name__}")
    checked = []
    for segment in members:
        if isinstance(segment, (bool, np.bool_)) or not isinstance(segment, numbers.Integral):
            raise TypeError(f"{where}: segment index {segment!r} must be an int, got {type(segment).__name__}")
        segment = int(segment)
        if not 0 <= segment < num_segments:
            raise ValueError(f"{where} names segment {segment}, which does not exist")
        if segment in owner:
            raise ValueError(f"segment {segment} is in param_groups[{owner[segment]}] and {where}")
        owner[segment] = position
        checked.append(segment)
    return checked


def segment_hyperparams(param_groups: list[dict], num_segments: int, defaults: dict | None = None) -> list[dict]:
    """Validated hyper-parameters of each segment, from (possibly user-edited) groups.

    Every group must be a dict with ``"segments"`` (``"params"`` is accepted as an alias)
    and valid hyper-parameters; every segment must be in exactly one group. A key missing
    from a group takes its value from ``defaults`` (the optimizer's constructor values;
    the library defaults when ``None``). Raises naming the group or segment; never
    modifies ``param_groups``.
    """
    base = {} if defaults is None else dict(defaults)
    if isinstance(param_groups, (dict, str, bytes)) or not hasattr(param_groups, "__iter__"):
        raise TypeError(f"param_groups must be a list of dicts, got {type(param_groups).__name__}")
    per_segment: list = [None] * num_segments
    owner: dict[int, int] = {}
    for position, group in enumerate(param_groups):
        if not isinstance(group, dict):
            raise TypeError(f"param_groups[{position}] must be a dict, got {type(group).__name__}")
        if "segments" in group and "params" in group:
            raise ValueError(f"param_groups[{position}] has both 'segments' and 'params'")
        key = "segments" if "segments" in group else "params"
        if key not in group:
            raise ValueError(f"param_groups[{position}] has no 'segments' entry")
        members = _claim_segments(position, group[key], num_segments, owner)
        hyper = validate_upgd(
            {**base, **{k: v for k, v in group.items() if k != key}}, where=f"param_groups[{position}]: "
        )
        for segment in members:
            per_segment[segment] = hyper
    missing = [i for i, h in enumerate(per_segment) if h is None]
    if missing:
        raise ValueError(f"segments {missing} belong to no parameter group")
    return per_segment
