"""The two paths of a step (``backend="native"`` or ``"kernels"``) and the kernel path's
plumbing: it runs eagerly only, and moves leaves into the core's 64-byte aligned flat buffers
and back through DLPack (NumPy for CPU arrays, CuPy for CUDA GPU arrays)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from upgd_ref.backends import BACKENDS as _CORE_BACKENDS
from upgd_ref.layout import FlatLayout
from upgd_ref.precision import bfloat16

from .leaves import is_eager

BACKENDS = ("native", "kernels")


def check_backend(backend) -> str:
    """``backend``, checked to be one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_eager(backend_name: str, *trees) -> None:
    """The kernel path runs on host buffers: refuse a traced call (see :func:`.leaves.is_eager`)."""
    if not is_eager(*trees):
        raise TypeError(
            f"backend={backend_name!r} runs eagerly on host kernels and cannot be traced "
            "(jax.jit, jax.lax.cond, optax.apply_if_finite, jax.vmap); use the default backend='native'"
        )


def host_view(x) -> np.ndarray:
    """A read-only NumPy view of a CPU JAX array (DLPack, no copy); bfloat16, which DLPack
    does not carry to NumPy, as a copy (``ml_dtypes.bfloat16``)."""
    return np.asarray(x) if np.dtype(x.dtype) == bfloat16 else np.from_dlpack(x)


def jax_view(view: np.ndarray):
    """A JAX array sharing ``view``'s memory (64-byte aligned segments are not copied);
    bfloat16 as a copy (see :func:`host_view`)."""
    return jnp.asarray(view) if view.dtype == bfloat16 else jnp.from_dlpack(view)


def kernel_layout(leaves) -> FlatLayout:
    """The core layout of ``leaves`` for the kernel path: one device (CPU, or a CUDA GPU with
    CuPy) and one dtype, since the core steps one flat buffer."""
    devices = {}
    for i, leaf in enumerate(leaves):
        device = next(iter(leaf.devices()))
        if device.platform not in ("cpu", "gpu", "cuda"):
            raise NotImplementedError(f"backend='kernels' takes CPU or CUDA GPU arrays (leaf {i} is on "
                                      f"{device.platform}); use backend='native' on other accelerators")
        if device.platform != "cpu" and "cupy" not in _CORE_BACKENDS:
            raise NotImplementedError(f"backend='kernels' on a GPU (leaf {i} is on {device}) needs CuPy "
                                      "(pip install cupy-cuda12x); or use backend='native'")
        devices.setdefault(device, i)
    if len(devices) > 1:
        raise ValueError(f"backend='kernels' needs every leaf on one device, got {sorted(map(str, devices))}")
    dtypes = {np.dtype(leaf.dtype).name for leaf in leaves}
    if len(dtypes) != 1:
        raise TypeError(f"backend='kernels' needs one dtype for all leaves (one flat buffer), got {sorted(dtypes)}")
    return FlatLayout([tuple(leaf.shape) for leaf in leaves], dtypes.pop())


def pack_leaves(layout: FlatLayout, leaves):
    """The leaves copied into a new flat buffer of the layout: NumPy for CPU arrays; for GPU
    arrays a CuPy buffer filled device to device from DLPack views (no host copy)."""
    if not leaves or next(iter(leaves[0].devices())).platform == "cpu":
        return layout.pack([host_view(leaf) for leaf in leaves])
    import cupy

    with cupy.cuda.Device(next(iter(leaves[0].devices())).id):
        flat = cupy.zeros(layout.size, dtype=layout.dtype)
        for i, leaf in enumerate(leaves):
            flat[layout.segment_slice(i)] = cupy.from_dlpack(leaf).reshape(-1)
    return flat
