"""Parallel kernel launches that are safe from several threads on every Numba threading layer.

Numba's ``tbb`` and ``omp`` layers accept parallel launches from several Python threads at
once; its ``workqueue`` layer does not: a second concurrent launch aborts the process
("Concurrent access has been detected"). So while the active layer is ``workqueue`` (or no
parallel kernel has run yet, when Numba has not chosen its layer) every parallel launch of
the process holds one lock: optimizers stepping in several threads then take turns in the
parallel kernels, and their results are unchanged (they never depend on the thread count
or on other steps, ``specs/kernels.md`` §2). Serial kernels never touch the threading
layer and run without the lock. ``specs/kernels.md`` §2.1.
"""

from __future__ import annotations

import threading

import numba

__all__ = ["parallel_launch", "layer_is_threadsafe"]

_LAUNCH_LOCK = threading.Lock()  # one per process: the workqueue pool is one per process


def layer_is_threadsafe() -> bool:
    """Whether the active threading layer takes concurrent launches (``False`` for
    ``workqueue``, and before the first parallel launch, while Numba has chosen none)."""
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # not initialised: the first launch will choose the layer
        return False


def parallel_launch(kernel):
    """``kernel`` (a ``parallel=True`` dispatcher), or a function calling it under the
    process-wide launch lock when the threading layer needs it."""
    if layer_is_threadsafe():
        return kernel

    def launch(*args):
        with _LAUNCH_LOCK:
            return kernel(*args)

    return launch
