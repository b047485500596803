"""Configuration files: one YAML (or dict) describes a UPGD-family optimizer and its VGS.

Format (the templates are in ``specs/configs/``)::

    optimizer: AdaptiveUPGD          # AdaptiveUPGD (default), UPGD or UPGDW (specs/algorithm.md §7)
    optimizer_kwargs:                # the class's hyper-parameters (specs/algorithm.md),
      lr: 1.0e-5                     #   plus noise_norm, seed, param_groups, profile, noise_version;
      sigma: 0.001                   #   keys left out take that class's defaults
      adaptive_noise: false
      profile: production            # AdaptiveUPGD, UPGD: "production" (default) or "paper"
    vgs:                             # VarianceGradientScaler hyper-parameters,
      enabled: true                  #   or null / left out for no scaler at all
      warmup_steps: 100

Per member: ``UPGD`` has no Adam moments, so ``beta1``, ``beta2`` and ``eps`` are not
accepted; ``UPGDW`` takes ``betas: [beta1, beta2]`` (its ``beta_utility`` is ``beta2``, so
``beta_utility`` is not accepted) and ``amsgrad: false`` (``true`` is an error), and has no
``profile`` but ``production``.

Every problem is a :class:`ConfigError` (a ``ValueError``) whose message starts with the
source and names the key, e.g. ``cfg.yaml: optimizer_kwargs.lr must be >= 0, got -1.0``.
Numeric ranges come from :func:`upgd_ref.hyperparams.validate_upgd` /
:func:`~upgd_ref.hyperparams.validate_vgs`, the same checks the classes run.

Example::

    >>> import upgd_ref
    >>> layout = upgd_ref.FlatLayout([(3,)], dtype="float64")
    >>> built = upgd_ref.from_config({"optimizer": "AdaptiveUPGD",
    ...                               "optimizer_kwargs": {"sigma": 0.01, "adaptive_noise": True},
    ...                               "vgs": {"warmup_steps": 10}}, layout)
    >>> built.optimizer.defaults["sigma"], built.scaler.hyperparams["warmup_steps"]
    (0.01, 10)
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .hyperparams import NOISE_NORMS, UPGD_DEFAULTS, VGS_DEFAULTS, validate_upgd, validate_vgs
from .layout import FlatLayout
from .family import MEMBERS, PAPER_EPS, PROFILES
from .optimizer import UPGD, UPGDW, AdaptiveUPGD, noise_version_field
from .rng import DEFAULT_NOISE_VERSION, check_noise_version
from .scaler import VarianceGradientScaler

__all__ = [
    "ConfigError",
    "Config",
    "Built",
    "OPTIMIZERS",
    "TOP_LEVEL_KEYS",
    "OPTIMIZER_EXTRA_KEYS",
    "load_config",
    "from_config",
    "build",
    "dump_config",
    "migrate",
    "typical_norm_from_npz",
    "migrated_yaml",
]

OPTIMIZERS = tuple(MEMBERS)
OPTIMIZER_CLASSES = {"AdaptiveUPGD": AdaptiveUPGD, "UPGD": UPGD, "UPGDW": UPGDW}
TOP_LEVEL_KEYS = ("optimizer", "optimizer_kwargs", "vgs")
# Constructor arguments that are not per-group hyper-parameters.
OPTIMIZER_EXTRA_KEYS = ("noise_norm", "seed", "param_groups", "profile", "noise_version")
_MOMENT_KEYS = ("beta1", "beta2", "eps")


def _member_keys(row) -> tuple:
    """The optimizer_kwargs hyper-parameter keys of a family member (besides OPTIMIZER_EXTRA_KEYS):
    its constructor's, with pair arguments (UPGDW's ``betas``) and refused options (``amsgrad``)."""
    carried = {key for keys in row.pairs.values() for key in keys}
    return tuple(k for k in row.keys if k not in carried) + tuple(row.pairs) + tuple(row.refused)


MEMBER_KEYS = {name: _member_keys(row) for name, row in MEMBERS.items()}
# Member defaults that differ from UPGD_DEFAULTS (UPGDW's production signature, specs/algorithm.md §7.2).
_UPGDW_DEFAULTS = {k: MEMBERS["UPGDW"].defaults[k] for k in ("lr", "weight_decay", "sigma", "eps", "beta1", "beta2")}
_GROUP_MEMBER_KEYS = ("segments", "params")


class ConfigError(ValueError):
    """A configuration is unreadable or invalid; the message names the key."""


@dataclass(frozen=True)
class Config:
    """A validated configuration.

    ``optimizer``: ``"AdaptiveUPGD"``, ``"UPGD"`` or ``"UPGDW"``; ``profile``: ``"production"``
    or ``"paper"``. ``hyperparams``: every hyper-parameter the step reads, as the optimizer
    resolves them (the member's defaults filled in; for ``UPGD`` the unused ``beta1``,
    ``beta2``, ``eps`` keep the library defaults; for ``UPGDW`` ``beta_utility = beta2``);
    ``noise_norm``, ``seed``, ``param_groups``, ``noise_version`` as the classes take them;
    ``vgs``: every VGS hyper-parameter, or ``None`` for no scaler; ``raw``: the mapping as
    given (key order kept), which is what :func:`dump_config` writes back.
    """

    optimizer: str
    hyperparams: dict
    noise_norm: str
    seed: int
    param_groups: list | None
    vgs: dict | None
    raw: dict
    source: str
    profile: str = "production"
    noise_version: int = DEFAULT_NOISE_VERSION

    def _member_hyperparams(self) -> dict:
        """``hyperparams`` under the names the optimizer class's constructor takes."""
        h = dict(self.hyperparams)
        if self.optimizer == "UPGD":
            return {k: v for k, v in h.items() if k not in _MOMENT_KEYS}
        if self.optimizer == "UPGDW":
            out = {}
            for k, v in h.items():
                if k == "beta1":
                    out["betas"] = [h["beta1"], h["beta2"]]
                elif k not in ("beta2", "beta_utility"):
                    out[k] = v
            out["amsgrad"] = False
            return out
        return h

    def to_dict(self) -> dict:
        """The configuration in the template format with every value explicit."""
        kwargs = dict(self._member_hyperparams(), noise_norm=self.noise_norm, seed=self.seed,
                      **noise_version_field(self.noise_version))
        if self.optimizer != "UPGDW":
            kwargs["profile"] = self.profile
        if self.param_groups is not None:
            kwargs["param_groups"] = copy.deepcopy(self.param_groups)
        return {"optimizer": self.optimizer, "optimizer_kwargs": kwargs,
                "vgs": None if self.vgs is None else dict(self.vgs)}

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for the optimizer class (everything but the layout)."""
        kwargs = dict(self._member_hyperparams(), noise_norm=self.noise_norm, seed=self.seed,
                      param_groups=copy.deepcopy(self.param_groups), **noise_version_field(self.noise_version))
        if self.optimizer != "UPGDW":
            kwargs["profile"] = self.profile
        if isinstance(kwargs.get("betas"), list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return kwargs

    def optimizer_class(self) -> type:
        return OPTIMIZER_CLASSES[self.optimizer]


class Built(NamedTuple):
    """What :func:`from_config` returns; ``scaler`` is ``None`` when the config has no ``vgs``."""

    optimizer: AdaptiveUPGD  # or its subclass UPGD / UPGDW
    scaler: VarianceGradientScaler | None
    config: Config


@functools.lru_cache(maxsize=1)
def _loader():
    """SafeLoader that also reads ``1e-5`` as a float (PyYAML is imported on first use).

    YAML 1.1 (PyYAML) only treats exponent forms with a dot (``1.0e-5``) as floats, so the
    natural ``lr: 1e-5`` would arrive as the string ``"1e-5"``; the templates use the dotted
    form so that plain ``yaml.safe_load`` reads them the same way.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _read_yaml(path) -> dict:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from exc
    import yaml

    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return data


def _check_unknown(source: str, prefix: str, mapping: dict, allowed) -> None:
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        names = ", ".join(f"{prefix}{k}" for k in unknown)
        raise ConfigError(f"{source}: unknown key(s) {names}; allowed: {', '.join(map(str, allowed))}")


def _mapping(source: str, key: str, value) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
    for name in value:
        if not isinstance(name, str):
            raise ConfigError(f"{source}: {key} has a non-string key {name!r}")
    return value


def _validated(source: str, check, values: dict, where: str) -> dict:
    """Run a hyperparams validator, turning its errors into ConfigErrors."""
    try:
        return check(values, where=f"{source}: {where}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def _check_seed(source: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"{source}: optimizer_kwargs.seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"{source}: optimizer_kwargs.seed must be in [0, 2**64), got {seed}")
    return int(seed)


def _check_param_groups(source: str, groups, defaults: dict) -> list | None:
    """Each group: segment indices plus hyper-parameter overrides, checked without a layout."""
    if groups is None:
        return None
    if not isinstance(groups, list):
        raise ConfigError(f"{source}: optimizer_kwargs.param_groups must be a list, got {type(groups).__name__}")
    for position, group in enumerate(groups):
        key = f"optimizer_kwargs.param_groups[{position}]"
        group = _mapping(source, key, group)
        _check_unknown(source, f"{key}.", group, (*UPGD_DEFAULTS, *_GROUP_MEMBER_KEYS))
        for member_key in _GROUP_MEMBER_KEYS:
            members = group.get(member_key)
            if members is not None and not (
                isinstance(members, list)
                and all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in members)
            ):
                raise ConfigError(f"{source}: {key}.{member_key} must be a list of segment indices (ints >= 0)")
        overrides = {k: v for k, v in group.items() if k not in _GROUP_MEMBER_KEYS}
        _validated(source, validate_upgd, {**defaults, **overrides}, f"{key}.")
    return copy.deepcopy(groups)


def load_config(path_or_dict, *, source: str | None = None) -> Config:
    """Read and validate a configuration (a YAML path or an already-parsed mapping)."""
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, source or "config"
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = source or os.fspath(path_or_dict)
        data = _read_yaml(path_or_dict)
    else:
        raise ConfigError(f"a config must be a path or a dict, got {type(path_or_dict).__name__}")
    if data is None:
        raise ConfigError(f"{source}: the config is empty")
    data = _mapping(source, "the config", data)
    _check_unknown(source, "", data, TOP_LEVEL_KEYS)

    optimizer = data.get("optimizer", OPTIMIZERS[0])
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"{source}: optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")

    kwargs = data.get("optimizer_kwargs")
    kwargs = {} if kwargs is None else _mapping(source, "optimizer_kwargs", kwargs)
    _check_unknown(source, "optimizer_kwargs.", kwargs, (*MEMBER_KEYS[optimizer], *OPTIMIZER_EXTRA_KEYS))
    profile = kwargs.get("profile", "production")
    allowed_profiles = ("production",) if optimizer == "UPGDW" else PROFILES
    if profile not in allowed_profiles:
        raise ConfigError(f"{source}: optimizer_kwargs.profile must be one of {list(allowed_profiles)} "
                          f"for {optimizer}, got {profile!r}")
    hyper_given = {k: v for k, v in kwargs.items() if k in UPGD_DEFAULTS}
    member_defaults = {}
    if optimizer == "UPGDW":
        if "amsgrad" in kwargs and kwargs["amsgrad"] is not False:
            raise ConfigError(f"{source}: optimizer_kwargs.amsgrad must be false, got {kwargs['amsgrad']!r}: "
                              "UPGDW keeps no AMSGrad state (specs/algorithm.md §7.2)")
        if "betas" in kwargs:
            betas = kwargs["betas"]
            if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
                raise ConfigError(f"{source}: optimizer_kwargs.betas must be a list [beta1, beta2], got {betas!r}")
            hyper_given.update(beta1=betas[0], beta2=betas[1])
        member_defaults = dict(_UPGDW_DEFAULTS)
        member_defaults["beta_utility"] = hyper_given.get("beta2", member_defaults["beta2"])
    elif profile == "paper" and optimizer == "AdaptiveUPGD":
        member_defaults = {"eps": PAPER_EPS}
    hyper_given = {**member_defaults, **hyper_given}
    try:
        hyperparams = _validated(source, validate_upgd, hyper_given, "optimizer_kwargs.")
    except ConfigError as exc:  # UPGDW's betas arrive as beta1/beta2: name the key the file has
        if optimizer == "UPGDW" and "betas" in kwargs:
            raise ConfigError(str(exc).replace("optimizer_kwargs.beta1", "optimizer_kwargs.betas[0]")
                              .replace("optimizer_kwargs.beta2", "optimizer_kwargs.betas[1]")
                              .replace("optimizer_kwargs.beta_utility", "optimizer_kwargs.betas[1]")) from exc
        raise
    noise_norm = kwargs.get("noise_norm", "segment")
    if noise_norm not in NOISE_NORMS:
        raise ConfigError(f"{source}: optimizer_kwargs.noise_norm must be one of {list(NOISE_NORMS)}, got {noise_norm!r}")
    seed = _check_seed(source, kwargs.get("seed", 0))
    noise_version = _validated(source, check_noise_version, kwargs.get("noise_version", DEFAULT_NOISE_VERSION),
                               "optimizer_kwargs.")
    param_groups = _check_param_groups(source, kwargs.get("param_groups"), hyper_given)

    vgs = data.get("vgs")
    if vgs is not None:
        vgs = _mapping(source, "vgs", vgs)
        _check_unknown(source, "vgs.", vgs, VGS_DEFAULTS)
        vgs = _validated(source, validate_vgs, vgs, "vgs.")
    return Config(optimizer, hyperparams, noise_norm, seed, param_groups, vgs, copy.deepcopy(data), source, profile,
                  noise_version)


def build(config: Config, layout: FlatLayout, *, backend: str = "auto") -> Built:
    """The optimizer (and scaler) a validated :class:`Config` describes, for ``layout``."""
    try:
        optimizer = config.optimizer_class()(layout, backend=backend, **config.optimizer_kwargs())
    except (TypeError, ValueError) as exc:
        # Group/segment mismatches only show up against a layout.
        raise ConfigError(f"{config.source}: optimizer_kwargs: {exc}") from exc
    scaler = None if config.vgs is None else VarianceGradientScaler(layout, backend=backend, **config.vgs)
    return Built(optimizer, scaler, config)


def from_config(path_or_dict, layout: FlatLayout, *, backend: str = "auto") -> Built:
    """Build ``(optimizer, scaler, config)`` from a YAML file or a mapping in the template format."""
    return build(load_config(path_or_dict), layout, backend=backend)


def dump_config(data: dict, comment: str = "") -> str:
    """YAML text for a config mapping (key order kept), preceded by ``comment`` as ``#`` lines."""
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) if comment else ""
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# --- migration: absolute sigma -> relative sigma -------------------------------------------

SIGMA_DIGITS = 3  # the relative sigma is rounded to this many significant digits


def typical_norm_from_npz(path, noise_norm: str = "segment") -> float:
    """Median gradient norm in an ``.npz`` of recorded gradients.

    Each member is one segment's gradients with the step as axis 0 (shape ``(steps, ...)``);
    the norm of a step is the L2 norm over the remaining axes (``noise_norm="segment"``) or,
    for ``"global"``, over all members at that step (members must then share ``steps``).
    Zero norms (frozen or zero-size segments) are left out.
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            members = {name: np.array(data[name]) for name in data.files}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such gradient file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable .npz of gradients ({exc})") from exc
    if not members:
        raise ConfigError(f"{path}: holds no arrays")
    squares = {}
    for name, array in members.items():
        if not np.issubdtype(array.dtype, np.floating) or array.ndim < 1 or array.shape[0] < 1:
            raise ConfigError(f"{path}: member {name!r} must be a float array shaped (steps, ...), "
                              f"got {array.dtype} {array.shape}")
        if not np.isfinite(array).all():
            raise ConfigError(f"{path}: member {name!r} holds non-finite values")
        wide = array.astype(np.float64).reshape(array.shape[0], -1)
        squares[name] = np.sum(wide * wide, axis=1)
    if noise_norm == "global":
        lengths = {len(s) for s in squares.values()}
        if len(lengths) != 1:
            raise ConfigError(f"{path}: a global norm needs the same number of steps in every member, got {sorted(lengths)}")
        norms = np.sqrt(sum(squares.values()))
    else:
        norms = np.sqrt(np.concatenate(list(squares.values())))
    norms = norms[norms > 0]
    if not norms.size:
        raise ConfigError(f"{path}: every gradient is zero")
    return float(np.median(norms))


def _relative(sigma: float, grad_norm: float) -> float:
    return float(f"{sigma / grad_norm:.{SIGMA_DIGITS}g}")


def migrate(config: Config, grad_norm: float, source_of_norm: str) -> tuple[dict, list[str]]:
    """Turn a fixed-sigma config into adaptive noise; returns ``(new mapping, reasoning lines)``.

    ``sigma_rel = sigma_abs / N`` with ``N`` the typical gradient norm: at ``||g_i|| = N`` the
    noise std is unchanged, and when VGS scales gradients by ``f`` the std follows, so the
    noise-to-signal ratio stays ``sigma_rel`` instead of rising to ``sigma_abs / (f N)``.
    """
    if not (isinstance(grad_norm, float) and math.isfinite(grad_norm) and grad_norm > 0):
        raise ConfigError(f"the typical gradient norm must be a finite number > 0, got {grad_norm!r}")
    groups = config.param_groups or []
    if config.hyperparams["adaptive_noise"] and all(g.get("adaptive_noise", True) for g in groups):
        raise ConfigError(f"{config.source}: optimizer_kwargs.adaptive_noise is already true; nothing to migrate")
    raw = copy.deepcopy(config.raw)
    kwargs = raw.get("optimizer_kwargs") or {}
    raw["optimizer_kwargs"] = kwargs
    h = config.hyperparams
    lines = [f"typical gradient norm N = {grad_norm:.4g} ({source_of_norm})"]
    if not h["adaptive_noise"]:
        sigma_abs, sigma_rel = h["sigma"], _relative(h["sigma"], grad_norm)
        lines += [
            f"old noise: fixed, std = sigma = {sigma_abs:g} per element whatever the gradient",
            f"new noise: adaptive, std_i = max(sigma * ||g_i||, min_noise_std), "
            f"sigma = {sigma_abs:g} / {grad_norm:.4g} = {sigma_rel:g} ({SIGMA_DIGITS} significant digits)",
            f"  at ||g_i|| = N the std is {sigma_rel * grad_norm:.4g}, as before (old {sigma_abs:g});",
            "  when VGS scales the gradients by f the std follows them, so the noise-to-signal ratio",
            f"  stays {sigma_rel:g} (with fixed noise it would rise to {sigma_rel:g} / f).",
        ]
        kwargs.update(adaptive_noise=True, sigma=sigma_rel)
        floor = h["min_noise_std"]
        kwargs.setdefault("min_noise_std", floor)
        lines.append(f"  floor: min_noise_std = {floor:g}, reached when ||g_i|| < {floor / sigma_rel:.3g}.")
    for position, group in enumerate(groups):
        explicit = group.get("adaptive_noise")
        if explicit is True:
            continue
        if explicit is False or "sigma" in group:
            group_sigma = group.get("sigma", h["sigma"])
            group_rel = _relative(group_sigma, grad_norm)
            raw_group = raw["optimizer_kwargs"]["param_groups"][position]
            raw_group.update(adaptive_noise=True, sigma=group_rel)
            lines.append(f"param_groups[{position}]: sigma {group_sigma:g} (absolute) -> {group_rel:g} (relative)")
    if not h["instant_noise_scale"]:
        lines.append("instant_noise_scale: false -> true (the EMA form with noise_ema_init 1.0 over-scales the "
                     "noise early on; specs: known flaw 1)")
    kwargs["instant_noise_scale"] = True
    lines.append("vgs: unchanged" if raw.get("vgs") is not None else "vgs: none (unchanged)")
    load_config(raw, source="migrated config")  # the result must itself be valid
    return raw, lines


def _mergeable(old, value) -> bool:
    return (isinstance(old, dict) and isinstance(value, dict)
            or isinstance(old, list) and isinstance(value, list) and len(old) == len(value))


def _same(old, value) -> bool:
    """Equal values need no rewrite (ruamel reads ``1.0e-5`` as a float subclass); a bool
    never equals a number here."""
    return old == value and isinstance(old, bool) == isinstance(value, bool)


def _merge_round_trip(node, new) -> None:
    """Make the ruamel mapping/sequence ``node`` equal ``new`` in place: unchanged values keep
    their formatting and comments; changed or added keys take ``new``'s values."""
    if isinstance(new, dict):
        for key in [k for k in node if k not in new]:
            del node[key]
        items = new.items()
    else:
        items = enumerate(new)
    for key, value in items:
        present = key in node if isinstance(new, dict) else True
        if present and _mergeable(node[key], value):
            _merge_round_trip(node[key], value)
        elif not present or not _same(node[key], value):
            node[key] = value


def migrated_yaml(original_text: str, new: dict, comment: str = "") -> str:
    """The YAML text of ``new`` written over ``original_text`` (the config it was migrated
    from) by a round-trip parser (ruamel.yaml): the original's comments, key order and
    formatting stay, changed values are replaced, and ``comment`` goes on top as ``#`` lines."""
    import io

    from ruamel.yaml import YAML

    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    document = yaml.load(original_text)
    if not isinstance(document, dict):  # an empty file: nothing to keep
        return dump_config(new, comment)
    _merge_round_trip(document, new)
    out = io.StringIO()
    yaml.dump(document, out)
    header = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) if comment else ""
    return header + ("#\n" if header else "") + out.getvalue()
