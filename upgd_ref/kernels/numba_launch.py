"""Kernel launches over the chunk table: on the calling thread, or split over a thread pool.

Every kernel of :mod:`.numba_step` is one function over a range ``[first, last)`` of chunks,
compiled without the GIL (``nogil=True``). A parallel launch splits the table into one
contiguous range per thread: the caller runs the first, the pool's threads the others, and
the launch returns when all are done. A chunk's results depend only on the chunk
(``specs/kernels.md`` §2), so the split never changes a bit.

The pool is Python's, one per process, shared by every launch: Numba's threading layer is
never started by a launch (no ``prange``), so there is nothing to lock on ``workqueue`` and no
OpenMP library is loaded into the process. Several Python threads may launch at once: each
runs its own first range, so every launch progresses while they share the pool
(``specs/kernels.md`` §2.1).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
from numba.np.ufunc import parallel as numba_parallel

__all__ = ["thread_count", "run_chunks"]

_POOL_LOCK = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None


def thread_count() -> int:
    """Threads of a parallel launch: ``numba.get_num_threads()`` of the calling thread (what
    ``numba.set_num_threads`` sets) once Numba's threading layer runs, else
    ``NUMBA_NUM_THREADS``; never starts the layer itself (``get_num_threads`` would)."""
    if numba_parallel._is_initialized:  # Numba's own (private) flag: no public way to ask without starting it
        return numba.get_num_threads()
    return numba.config.NUMBA_NUM_THREADS


def _executor() -> ThreadPoolExecutor:
    """The process's pool (a new one in a forked child, which has none of its parent's threads)."""
    global _pool, _pool_pid
    with _POOL_LOCK:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                       thread_name_prefix="upgd_ref-kernels")
            _pool_pid = os.getpid()
        return _pool


def run_chunks(kernel, num_chunks: int, threads: int, *args) -> None:
    """``kernel(first, last, *args)`` over chunks ``[0, num_chunks)``, split into ``threads``
    contiguous ranges of nearly equal counts (one range on the calling thread when
    ``threads == 1``)."""
    bounds = [num_chunks * i // threads for i in range(threads + 1)]
    futures = [_executor().submit(kernel, bounds[i], bounds[i + 1], *args)
               for i in range(1, threads) if bounds[i] < bounds[i + 1]]
    try:
        kernel(0, bounds[1], *args)
    finally:
        for future in futures:
            future.result()
