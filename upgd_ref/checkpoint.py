"""State dicts on disk: one ``.npz`` per object, metadata as JSON (``specs/layout.md`` §4).

A state dict is ``{"format", "version", ..., "state": {name: array or int}}``. On disk the
arrays of ``"state"`` are ``.npz`` members named ``state.<name>``; everything else is one
JSON document in the member ``meta``. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

__all__ = ["write_state_dict", "read_state_dict", "check_header", "take_array", "take_int"]

_META = "meta"
_ARRAY_PREFIX = "state."


def write_state_dict(path, state_dict: dict) -> None:
    """Write ``state_dict`` atomically (a temporary file renamed into place)."""
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    arrays, scalars = {}, {}
    for name, value in state_dict["state"].items():
        if isinstance(value, np.ndarray):
            arrays[_ARRAY_PREFIX + name] = value
        else:
            scalars[name] = value
    meta["state_scalars"] = scalars
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **{_META: np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}, **arrays)
    os.replace(tmp, path)


def read_state_dict(path) -> dict:
    """Read a file written by :func:`write_state_dict`; any corruption is a ``ValueError``."""
    try:
        with np.load(os.fspath(path), allow_pickle=False) as data:
            members = {name: np.array(data[name]) for name in data.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable upgd_ref checkpoint ({exc})") from exc
    if _META not in members:
        raise ValueError(f"{path}: not an upgd_ref checkpoint (no '{_META}' member)")
    try:
        meta = json.loads(members.pop(_META).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt checkpoint metadata ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("state_scalars"), dict):
        raise ValueError(f"{path}: corrupt checkpoint metadata")
    state = dict(meta.pop("state_scalars"))
    for name, value in members.items():
        if not name.startswith(_ARRAY_PREFIX):
            raise ValueError(f"{path}: unexpected member {name!r}")
        state[name[len(_ARRAY_PREFIX) :]] = value
    meta["state"] = state
    return meta


def check_header(state_dict, expected_format: str, version: int) -> dict:
    """The ``state`` mapping of a state dict whose format and version we can read."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state dict must be a dict, got {type(state_dict).__name__}")
    found = state_dict.get("format")
    if found != expected_format:
        raise ValueError(f"state dict format is {found!r}, expected {expected_format!r}")
    found_version = state_dict.get("version")
    if isinstance(found_version, bool) or not isinstance(found_version, int):
        raise ValueError(f"state dict field 'version' must be an int, got {found_version!r}")
    if found_version > version:
        raise ValueError(
            f"state dict version {found_version} was written by a newer upgd_ref (this one reads <= {version})"
        )
    if found_version < 1:
        raise ValueError(f"state dict field 'version' must be >= 1, got {found_version}")
    state = state_dict.get("state")
    if not isinstance(state, dict):
        raise ValueError("state dict field 'state' is missing or not a dict")
    return state


def take_array(state: dict, name: str, shape: tuple, dtype, *, finite=True) -> np.ndarray:
    """A checked copy of ``state[name]``."""
    if name not in state:
        raise ValueError(f"state dict field 'state.{name}' is missing")
    value = state[name]
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(f"state dict field 'state.{name}' must be an array, got {type(value).__name__}")
    value = np.asarray(value)
    if value.shape != tuple(shape):
        raise ValueError(f"state dict field 'state.{name}' has shape {value.shape}, expected {tuple(shape)}")
    if value.dtype != np.dtype(dtype):
        raise TypeError(f"state dict field 'state.{name}' has dtype {value.dtype}, expected {np.dtype(dtype)}")
    if finite and not np.isfinite(value).all():
        raise ValueError(f"state dict field 'state.{name}' holds non-finite values")
    return value.copy()


def take_int(state: dict, name: str, *, minimum: int = 0) -> int:
    if name not in state:
        raise ValueError(f"state dict field 'state.{name}' is missing")
    value = state[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"state dict field 'state.{name}' must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"state dict field 'state.{name}' must be >= {minimum}, got {value}")
    return int(value)
