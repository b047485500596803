"""What this installation has: package versions, the backends that can run here (and why
the others cannot), Numba's threads, threading layer and caches. ``upgd-ref info`` prints it.

Versions come from the installed distributions' metadata (:mod:`importlib.metadata`), so no
framework is imported to learn its version; only Numba is imported, for its thread settings.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from .backends import BACKENDS, absence_reason

__all__ = ["PACKAGES", "package_versions", "backend_report", "numba_report", "environment_report"]

#: Package -> the distributions that provide it (the first one installed gives the version).
PACKAGES = {
    "numpy": ("numpy",),
    "numba": ("numba",),
    "array-api-compat": ("array-api-compat", "array_api_compat"),
    "PyYAML": ("PyYAML",),
    "ruamel.yaml": ("ruamel.yaml",),
    "matplotlib": ("matplotlib",),
    "torch": ("torch",),
    "jax": ("jax",),
    "jaxlib": ("jaxlib",),
    "optax": ("optax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu"),
    "keras": ("keras",),
    "cupy": ("cupy-cuda12x", "cupy-cuda11x", "cupy-cuda13x", "cupy"),
    "nvidia-cuda-nvrtc": ("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-nvrtc"),
}

#: The Numba threading layers, in Numba's default order of preference, and their modules.
_LAYER_MODULES = {"tbb": "numba.np.ufunc.tbbpool", "omp": "numba.np.ufunc.omppool",
                  "workqueue": "numba.np.ufunc.workqueue"}


def package_versions() -> dict[str, str | None]:
    """Package -> installed version (``None`` when not installed)."""
    out = {}
    for package, distributions in PACKAGES.items():
        out[package] = None
        for distribution in distributions:
            try:
                out[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def backend_report() -> list[dict]:
    """One entry per registered backend: ``name``, ``available``, ``emulator`` (a test
    backend), ``arrays`` (the buffers it takes) and ``reason`` (why it cannot run, or None)."""
    out = []
    for name, registration in BACKENDS.registrations.items():
        reason = absence_reason(name)
        out.append({"name": name, "available": reason is None, "emulator": registration.emulator,
                    "arrays": registration.array_kind, "reason": reason})
    return out


def _layer_loads(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True


def _numba_cache_dir() -> str:
    """Where ``cache=True`` kernels go: ``$NUMBA_CACHE_DIR``, else next to the kernels' source
    when that is writable, else Numba's per-user cache."""
    import numba

    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    kernels = Path(__file__).resolve().parent / "kernels"
    pycache = kernels / "__pycache__"
    if os.access(pycache if pycache.exists() else kernels, os.W_OK):
        return str(pycache)
    return "Numba's per-user cache (the kernels' folder is read-only)"


def numba_report() -> dict | None:
    """Numba's threads, threading layer and cache directory (``None`` without Numba)."""
    if importlib.util.find_spec("numba") is None:
        return None
    import numba

    configured = numba.config.THREADING_LAYER
    priority = list(numba.config.THREADING_LAYER_PRIORITY)
    loadable = [layer for layer in priority if _layer_loads(_LAYER_MODULES[layer])]
    # "default" takes the first layer of the priority list that loads; a named layer (or
    # Numba's "safe"/"threadsafe"/"forksafe" selectors) is what Numba will try.
    chosen = (loadable[0] if loadable else None) if configured == "default" else configured
    return {
        "threads": numba.config.NUMBA_NUM_THREADS,
        "threads_in_use": numba.get_num_threads(),
        "threading_layer_configured": configured,
        "threading_layers_loadable": loadable,
        "threading_layer": chosen,
        "cache_dir": _numba_cache_dir(),
    }


def environment_report() -> dict:
    """Everything above, plus the CUDA kernels' compile cache."""
    from .kernels.cuda_source import cache_dir

    return {"versions": package_versions(), "backends": backend_report(), "numba": numba_report(),
            "cuda_kernel_cache_dir": str(cache_dir())}
