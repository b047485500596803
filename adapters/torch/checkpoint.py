"""State dicts: the production formats, and the core's, translated into each other.

The optimizer's production format is ``{"state": {index: {...}}, "param_groups": [...]}``
plus the :data:`CHECKPOINT_KEY` entry; the scaler's is the production VGS dict
(``vgs_version`` :data:`VGS_VERSION`). Older state dicts are migrated as the production
classes do: param groups without the adaptive-noise keys get their defaults, VGS statistics
from before version 3.1 are reset with a warning. The functions here read and write plain
values (dicts, arrays, tensors); the optimizer and scaler hand them their state records.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from copy import deepcopy
from itertools import chain
from typing import NamedTuple

import numpy as np
import torch

from upgd_ref.hyperparams import validate_vgs
from upgd_ref.layout import FlatLayout
from upgd_ref.optimizer import noise_version_field
from upgd_ref.precision import state_dtype
from upgd_ref.state import UPGD_FORMAT, UPGD_VERSION

from .gather import real_value, segment_shape
from .conversions import CORE_TENSOR_FIELDS, float_value, number_from_tensor, state_array, step_count, tensor_keys

#: Keys the production ``__setstate__`` fills in for state dicts written before adaptive noise.
ADAPTIVE_NOISE_DEFAULTS = {"adaptive_noise": False, "noise_beta": 0.999, "min_noise_std": 1e-6,
                           "instant_noise_scale": True}
#: Top-level key of an optimizer state dict holding what the production format has no place
#: for (noise seed and counter). A production consumer ignores it.
CHECKPOINT_KEY = "upgd_ref"
_CHECKPOINT_VERSION = 1
#: Version marker written by the scaler's ``state_dict`` (the production one).
VGS_VERSION = "3.2"
_VGS_STAT_VERSIONS = ("3.1", "3.2")
_VGS_LEGACY_KEYS = ("grad_mean_ema", "grad_var_ema", "grad_norm_ema", "grad_max_ema")
_VGS_HYPER_KEYS = ("enabled", "beta", "alpha", "eps", "warmup_steps", "min_scaling_factor", "variance_cap")


def fill_adaptive_noise_defaults(group: dict) -> None:
    """Give a param group written before adaptive noise the production defaults (in place)."""
    for key, default in ADAPTIVE_NOISE_DEFAULTS.items():
        group.setdefault(key, default)


# --- the core format ----------------------------------------------------------------------


def core_state_dict(layout: FlatLayout, *, step, noise_ema_init, segments) -> dict:
    """The core format of a state (what :meth:`upgd_ref.state.FlatUPGDState.from_state_dict`
    reads); ``segments[i]`` is None (fresh) or ``(t, arrays, n)`` with ``arrays`` a dict of
    core state buffers (``"utility"``, ...; a missing one is zero)."""
    dtype = state_dtype(layout.dtype)  # float32 for 16-bit parameters (specs/precision.md)
    t = np.zeros(layout.num_segments, dtype=np.int64)
    n = np.array([noise_ema_init] * layout.num_segments, dtype=np.float64)
    buffers = {name: [] for name in CORE_TENSOR_FIELDS}
    for i, entry in enumerate(segments):
        arrays = {}
        if entry is not None:
            t[i], arrays, n[i] = entry
        for name, parts in buffers.items():
            values = arrays.get(name)
            parts.append(np.zeros(layout.sizes[i], dtype=dtype) if values is None
                         else np.asarray(values, dtype=dtype).reshape(-1))
    state = {"step": int(step), "segment_step": t, "grad_norm_ema": n}
    for name, parts in buffers.items():
        state[name] = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return {"format": UPGD_FORMAT, "version": UPGD_VERSION, "layout": layout.to_dict(), "state": state}


# --- the optimizer's production format ------------------------------------------------------


def production_state_dict(param_groups, state_of, unmanaged, state_keys, *, seed, step, noise_norm,
                          noise_ema_init, variant, noise_version=1) -> dict:
    """The production format from the optimizer's param groups and per-parameter states
    (``state_of(p)``: the mapping of parameter ``p``); state tensors are copied.

    Parameters are numbered as ``torch.optim.Optimizer.state_dict`` numbers them: by
    position across the groups, a parameter listed again keeping its first number. Only reads.
    """
    index_of: dict[int, tuple] = {}
    packed_groups, start = [], 0
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        for i, p in enumerate(group["params"], start):
            index_of.setdefault(id(p), (i, p))
        packed["params"] = [index_of[id(p)][0] for p in group["params"]]
        start += len(group["params"])
        packed_groups.append(packed)
    tensors = tensor_keys(state_keys)
    packed_state = {}
    for i, p in index_of.values():
        entry = {key: value.clone() if isinstance(value, torch.Tensor) and key in tensors else value
                 for key, value in state_of(p).items()}
        if entry:
            packed_state[i] = entry
    for key, value in unmanaged.items():
        if not isinstance(key, torch.Tensor):
            packed_state[key] = value
    return {
        "state": packed_state,
        "param_groups": packed_groups,
        CHECKPOINT_KEY: {
            "version": _CHECKPOINT_VERSION, "seed": seed, "step": step, "noise_norm": noise_norm,
            "noise_ema_init": noise_ema_init, "variant": variant, **noise_version_field(noise_version),
        },
    }


class LoadedState(NamedTuple):
    """A production state dict read for one optimizer, checked, not yet applied."""

    param_groups: list
    seed: int
    noise_norm: str
    noise_ema_init: float
    variant: dict
    step: int
    segments: list  # per segment: None or (t, arrays, grad_norm_ema), as core_state_dict takes
    extras: dict  # id(param) -> (param, {key: value}) for keys besides the state keys
    unmanaged: dict  # entries of keys that are not the optimizer's parameters
    noise_version: int  # absent from a dict with the CHECKPOINT_KEY entry: 1; without it: the current


def read_state_dict(state_dict, param_groups, bucket, state_keys, *, current: Mapping) -> LoadedState:
    """Read a production (or this adapter's) optimizer state dict for the optimizer whose
    ``param_groups`` and partition (``bucket``: :class:`~.partition.Partition`) are given.
    State tensors are converted to the state dtype of their parameter's dtype (complex ones
    to their real pairs). ``current`` holds the ``seed``,
    ``noise_norm``, ``noise_ema_init``, ``variant`` and ``noise_version`` kept when the dict has no
    :data:`CHECKPOINT_KEY` entry (the counter then continues at the largest ``step``)."""
    saved_groups = deepcopy(state_dict["param_groups"])
    if not isinstance(saved_groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in saved_groups):
        raise ValueError("optimizer state dict 'param_groups' must be a list of dicts with 'params'")
    if len(param_groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(param_groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                      chain.from_iterable(g["params"] for g in param_groups)))
    new_groups = []
    for group, saved in zip(param_groups, saved_groups):
        new = dict(saved)
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in saved:
            new["param_names"] = group["param_names"]
        fill_adaptive_noise_defaults(new)
        new_groups.append(new)

    meta = state_dict.get(CHECKPOINT_KEY)
    if meta is not None and not isinstance(meta, Mapping):
        raise ValueError(f"optimizer state dict entry {CHECKPOINT_KEY!r} must be a dict")
    meta = dict(meta or {})
    noise_ema_init = meta.get("noise_ema_init", current["noise_ema_init"])

    segments: list = [None] * len(bucket.params)
    extras, unmanaged = {}, {}
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise ValueError("optimizer state dict 'state' must be a dict")
    tensors = tensor_keys(state_keys)
    for key, entry in saved_state.items():
        if key not in id_map:
            unmanaged[key] = deepcopy(entry)
            continue
        p = id_map[key]
        i = bucket.segment_by_id[id(p)]
        where = f"state dict state[{key!r}] ({bucket.names[i]})"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        entry = dict(entry)
        extra = {k: deepcopy(v) for k, v in entry.items() if k not in state_keys}
        if extra:
            extras[id(p)] = (p, extra)
        if not any(k in entry for k in state_keys):
            continue
        missing = [k for k in state_keys[:-1] if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        t = step_count(where, entry["step"])
        arrays = {field: state_array(f"{where}[{k!r}]", real_value(entry[k]), segment_shape(p), bucket.state_dtype(i))
                  for k, field in tensors.items()}
        ema = (float_value(f"{where}['grad_norm_ema']", entry["grad_norm_ema"]) if "grad_norm_ema" in entry
               else float(noise_ema_init))
        segments[i] = (t, arrays, ema)
    steps = [s[0] for s in segments if s is not None]
    return LoadedState(
        param_groups=new_groups, seed=meta.get("seed", current["seed"]),
        noise_norm=meta.get("noise_norm", current["noise_norm"]), noise_ema_init=noise_ema_init,
        variant=meta.get("variant", current["variant"]),  # absent: written before the family
        step=meta.get("step", max(steps, default=0)), segments=segments, extras=extras, unmanaged=unmanaged,
        noise_version=meta.get("noise_version", 1) if meta else current["noise_version"],
    )


# --- the scaler's production format --------------------------------------------------------


def vgs_state_dict(hyper: Mapping, step: int, stats, spatial: Mapping) -> dict:
    """The production VGS format; ``stats`` is None (no statistics yet) or ``(mean, square,
    sizes)``: the per-parameter averages (float64 arrays, copied) and element counts;
    ``spatial``: the four deprecated averages (floats or None) under their keys."""
    mean, square, sizes = stats if stats is not None else (None, None, None)
    state = {
        "enabled": hyper["enabled"], "beta": hyper["beta"], "alpha": hyper["alpha"], "eps": hyper["eps"],
        "warmup_steps": hyper["warmup_steps"], "step_count": step,
        "min_scaling_factor": hyper["min_scaling_factor"], "variance_cap": hyper["variance_cap"],
        "param_grad_mean_ema": torch.from_numpy(mean.copy()) if stats is not None else None,
        "param_grad_sq_ema": torch.from_numpy(square.copy()) if stats is not None else None,
        "param_numel": torch.tensor([float(s) for s in sizes], dtype=torch.float32) if stats is not None else None,
    }
    state.update({key: spatial[key] for key in _VGS_LEGACY_KEYS})
    state["vgs_version"] = VGS_VERSION
    return state


def read_vgs_state_dict(state_dict: Mapping, hyper: Mapping, tracked: int | None):
    """``(hyper-parameters, step count, statistics)`` of a production VGS state dict, checked.

    Keys it lacks keep the values of ``hyper`` (``min_scaling_factor`` and ``variance_cap``
    their production defaults). ``statistics`` is None or ``[mean, square]`` (float64
    vectors, one value per parameter: ``tracked`` of them when the scaler has parameters).
    Versions before 3.1 reset the statistics with a ``UserWarning``, as production.
    """
    values = {name: state_dict.get(name, hyper[name]) for name in _VGS_HYPER_KEYS}
    values["min_scaling_factor"] = state_dict.get("min_scaling_factor", 0.1)
    values["variance_cap"] = state_dict.get("variance_cap", 50.0)
    values = validate_vgs({k: number_from_tensor(k, v) for k, v in values.items()}, where="VGS state dict: ")
    step = step_count("VGS state dict 'step_count'", state_dict.get("step_count", 0))
    version = str(state_dict.get("vgs_version", "1.0"))
    stats = None
    if version in _VGS_STAT_VERSIONS:
        mean = state_dict.get("param_grad_mean_ema")
        square = state_dict.get("param_grad_sq_ema")
        if (mean is None) != (square is None):
            raise ValueError("VGS state dict: 'param_grad_mean_ema' and 'param_grad_sq_ema' must both be set or both be None")
        if mean is not None:
            stats = [_stat_vector(name, value) for name, value in
                     (("param_grad_mean_ema", mean), ("param_grad_sq_ema", square))]
            if stats[0].shape != stats[1].shape:
                raise ValueError("VGS state dict: 'param_grad_mean_ema' and 'param_grad_sq_ema' differ in length")
            if (stats[1] < 0).any():
                raise ValueError("VGS state dict: 'param_grad_sq_ema' must be >= 0")
            if tracked is not None and stats[0].shape[0] != tracked:
                raise ValueError(f"VGS state dict has statistics for {stats[0].shape[0]} parameters, "
                                 f"this scaler tracks {tracked}")
    else:
        warnings.warn(
            f"VGS Checkpoint Migration: loading a VGS checkpoint from version {version} into version "
            f"{VGS_VERSION}. VGS v3.1 CRITICAL FIX: the per-parameter statistics changed definition in 3.1, "
            "so the ones of this checkpoint are reset (as the production scaler does); training continues.",
            UserWarning, stacklevel=3,  # the caller of the scaler's load_state_dict
        )
    return values, step, stats


def _stat_vector(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"VGS state dict: {name!r} must be a real floating tensor, got {value.dtype}")
        value = value.detach().cpu().double().numpy()
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"VGS state dict: {name!r} must be a vector of floats ({exc})") from None
    if array.ndim != 1:
        raise ValueError(f"VGS state dict: {name!r} must be 1-D, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"VGS state dict: {name!r} holds non-finite values")
    return array
