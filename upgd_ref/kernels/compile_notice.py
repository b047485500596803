"""The one-time notice that Numba is compiling this package's kernels (``specs/kernels.md`` §7).

On a fresh install (or a fresh ``NUMBA_CACHE_DIR``) the first step that needs a kernel
compiles it, which takes seconds; later processes load it from Numba's on-disk cache. So
that the pause is not silent, the first compilation of a kernel of this package in a
process logs one WARNING on the ``upgd_ref`` logger (shown on stderr by Python's default
logging set-up; ``logging.getLogger("upgd_ref").setLevel(logging.ERROR)`` silences it).
Kernels loaded from the cache compile nothing and log nothing. Nothing else is ever logged
by this module.

It listens to Numba's ``numba:compile`` event, which Numba fires only when it really
compiles (never on a cache hit).
"""

from __future__ import annotations

import logging
import threading

from numba.core import event

__all__ = ["MESSAGE", "install"]

LOGGER = logging.getLogger("upgd_ref")
MESSAGE = ("compiling the Numba kernels this step needs (can take a minute); this happens once: "
           "they are cached on disk for later processes. upgd_ref.warmup() compiles them all ahead of time")


class _FirstCompileNotice(event.Listener):
    """Logs :data:`MESSAGE` once per process, on the first compilation of a function of
    this package."""

    def __init__(self):
        self._lock = threading.Lock()
        self._told = False

    def on_start(self, ev: event.Event) -> None:
        dispatcher = (ev.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if not module.startswith("upgd_ref"):
            return
        with self._lock:
            if self._told:
                return
            self._told = True
        LOGGER.warning(MESSAGE)

    def on_end(self, ev: event.Event) -> None:
        pass


_LISTENER = _FirstCompileNotice()
_INSTALLED = threading.Lock()
_installed = False


def install() -> None:
    """Register the notice with Numba (idempotent)."""
    global _installed
    with _INSTALLED:
        if not _installed:
            event.register("numba:compile", _LISTENER)
            _installed = True
