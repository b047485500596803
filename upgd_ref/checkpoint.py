"""State dicts on disk: one ``.npz`` per object, metadata as JSON (``specs/layout.md`` §4).

A state dict is ``{"format", "version", ..., "state": {name: array or int}}``. On disk the
arrays of ``"state"`` are ``.npz`` members named ``state.<name>``; everything else is one
JSON document in the member ``meta``. The container (atomic writes, reads that never
unpickle and bound every declared size) is :mod:`upgd_ref.archive`.
"""

from __future__ import annotations

import json

import numpy as np

from .archive import CorruptArchive, read_npz, write_npz
from .serial import serialised

__all__ = ["FileCheckpoints", "write_state_dict", "read_state_dict", "check_header", "take_array", "take_int"]

_META = "meta"
_ARRAY_PREFIX = "state."


def _json_default(value):
    """NumPy scalars (e.g. a hyper-parameter edited to ``np.float32``) as plain Python values."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"state dict value of type {type(value).__name__} cannot be written to a checkpoint")


def write_state_dict(path, state_dict: dict) -> None:
    """Write ``state_dict`` atomically and durably (:func:`upgd_ref.archive.write_npz`).

    Everything is encoded before the file is opened; on any error no file is left behind
    and an existing file at ``path`` is untouched; a concurrent reader sees the old or the
    new complete file, whatever other processes save to the same path at the same time.
    """
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
        raise TypeError("state dict must be a dict with a 'state' dict")
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    arrays, scalars = {}, {}
    for name, value in state_dict["state"].items():
        if isinstance(value, np.ndarray):
            arrays[_ARRAY_PREFIX + name] = value
        else:
            scalars[name] = value
    meta["state_scalars"] = scalars
    try:
        encoded = json.dumps(meta, default=_json_default, allow_nan=False).encode()
    except ValueError as exc:  # NaN or infinity: a state that could not be loaded back
        raise ValueError(f"state dict cannot be written: {exc} (a non-finite hyper-parameter?)") from None
    write_npz(path, {_META: np.frombuffer(encoded, dtype=np.uint8), **arrays})


def read_state_dict(path) -> dict:
    """Read a file written by :func:`write_state_dict`; any corruption is a ``ValueError``.

    A missing file raises ``FileNotFoundError``; a file that cannot be opened for other
    reasons (permissions, a directory) raises its ``OSError``. Nothing else: damaged
    archives, hostile headers and bad metadata are ``ValueError`` (:mod:`upgd_ref.archive`).
    """
    try:
        members = read_npz(path)
    except CorruptArchive as exc:
        raise ValueError(f"{path}: not a readable upgd_ref checkpoint ({exc})") from exc
    if _META not in members:
        raise ValueError(f"{path}: not an upgd_ref checkpoint (no '{_META}' member)")
    try:
        meta = json.loads(members.pop(_META).tobytes().decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("state_scalars"), dict):
        raise ValueError(f"{path}: corrupt checkpoint metadata (no 'state_scalars' mapping)")
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


# The largest step count a state may hold: the next step's noise counter (step + 1) must fit
# the int64 step counters of every backend.
MAX_STEP = 2**63 - 2


def take_int(state: dict, name: str, *, minimum: int = 0, maximum: int = MAX_STEP) -> int:
    if name not in state:
        raise ValueError(f"state dict field 'state.{name}' is missing")
    value = state[name]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"state dict field 'state.{name}' must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValueError(f"state dict field 'state.{name}' must lie in [{minimum}, {maximum}], got {value}")
    return int(value)


class FileCheckpoints:
    """Mixin for a :class:`~upgd_ref.serial.Serialised` class with ``state_dict`` and
    ``load_state_dict``: the same state dict on disk, one definition for every class."""

    @serialised
    def save(self, path) -> None:
        """Write :meth:`state_dict` to ``path`` (``.npz``)."""
        write_state_dict(path, self.state_dict())

    @serialised
    def load(self, path) -> None:
        """Load a file written by :meth:`save`; corrupt or foreign files raise ``ValueError``."""
        self.load_state_dict(read_state_dict(path))
