"""Which kind of array a flat buffer is (NumPy on the host, CuPy on a GPU) and moving between them.

CuPy is never imported here unless a CuPy array is already in hand, so ``import upgd_ref``
stays fast and works without it.
"""

from __future__ import annotations

import sys

import numpy as np

__all__ = [
    "is_cupy_array", "array_kind", "describe_device", "to_numpy", "like_buffer", "as_kind", "assign", "may_share_memory",
]


def is_cupy_array(x) -> bool:
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_kind(x) -> str:
    """``"numpy"``, ``"cupy"`` or the type's name."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy_array(x):
        return "cupy"
    return type(x).__name__


def describe_device(x) -> str:
    """``"host"`` or ``"GPU n"``."""
    return f"GPU {x.device.id}" if is_cupy_array(x) else "host"


def to_numpy(x) -> np.ndarray:
    """A NumPy copy of a CuPy array (a device-to-host transfer); NumPy arrays as they are."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


def like_buffer(values: np.ndarray, example):
    """``values`` (NumPy) as an array of the same kind and device as ``example`` (a copy)."""
    if is_cupy_array(example):
        import cupy

        with cupy.cuda.Device(example.device.id):
            return cupy.asarray(values)
    return to_numpy(values).copy()


def as_kind(values: np.ndarray, kind: str):
    """A copy of ``values`` as a ``kind`` array (``"numpy"``, or ``"cupy"`` on the current GPU)."""
    if kind == "cupy":
        import cupy

        return cupy.asarray(values)
    return np.array(values)


def assign(target, values) -> None:
    """``target[...] = values`` across kinds (NumPy into CuPy is a host-to-device copy)."""
    if is_cupy_array(target):
        import cupy

        target[...] = cupy.asarray(values)
    else:
        target[...] = to_numpy(values)


def may_share_memory(x, y) -> bool:
    """Whether two buffers of one kind may overlap (``np.may_share_memory``, CuPy's for CuPy)."""
    if is_cupy_array(x):
        import cupy

        return bool(cupy.may_share_memory(x, y))
    return bool(np.may_share_memory(x, y))
