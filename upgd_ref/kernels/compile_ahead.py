"""Compiling a kernel ahead of need in a forked child process (``specs/kernels.md`` §7).

Numba compiles under one process-wide lock, so a second thread of this process cannot
compile while the first does; a second process can. On a cold cache, a step compiles pass 1,
the reduction of its partials and pass 2, in this order. While this process compiles pass 1,
two children forked from it compile the reduction and pass 2 for the signatures the step will
call into Numba's on-disk cache, and exit; their launches wait for their child and load the
kernel from the cache (the machine code this process would have compiled, as any later
process loads it).

* The child is forked only when this process really compiles (Numba's ``numba:compile``
  event, never fired on a cache hit), so a warm process never forks.
* A fork starts at once: the child has the parent's imports and its initialised LLVM. It
  runs nothing but the compilation and the cache write, with stdout and stderr on
  ``/dev/null`` (no second notice, no duplicate warnings), then ``os._exit``.
* Linux only (``os.fork``; elsewhere fork is unsafe or absent), and not with
  ``UPGD_REF_COMPILE_AHEAD=0`` in the environment: there the step compiles everything
  itself, as it does when a child fails, whatever the reason (a stuck child is killed after
  :data:`STALL_S` seconds without CPU).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
import warnings

from numba.core import event

__all__ = ["ENVIRONMENT_SWITCH", "STALL_S", "forking_on_compile", "wait_for"]

#: A child that has used no CPU for this many seconds is taken to be stuck: killed, and the
#: kernel compiled in the process.
STALL_S = 10.0

#: Set to ``"0"`` in the environment before the import, it turns the children off: every
#: kernel compiles in the process (for programs that must not fork).
ENVIRONMENT_SWITCH = "UPGD_REF_COMPILE_AHEAD"
_FORK = sys.platform.startswith("linux") and hasattr(os, "fork") and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"
_LOCK = threading.Lock()
_requests: list = []  # the calls of each open forking_on_compile block: forked for on the next real compilation
_children: dict = {}  # (kernel, signature) -> pid of the child compiling it


def _signature(kernel, args) -> tuple:
    """The Numba types ``kernel`` dispatches ``args`` on (as a call with them would)."""
    return tuple(kernel.typeof_pyval(a) for a in args)


def _child(kernel, signature) -> None:
    """The forked child: compile (or load) ``kernel`` for ``signature``, which writes Numba's
    cache, and exit without running anything of the parent's."""
    status = 1
    try:
        # no collections: each would walk the heap inherited from the parent, copying its
        # pages (copy-on-write) for nothing; the child's garbage goes at its exit, seconds later
        gc.disable()
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        kernel.compile(signature)
        status = 0
    finally:
        os._exit(status)


def _fork(kernel, signature) -> None:
    with warnings.catch_warnings():  # Python >= 3.12 warns on forking a threaded process: the child only compiles
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:
        _child(kernel, signature)
    with _LOCK:
        _children[(kernel, signature)] = pid


class _ForkOnCompile(event.Listener):
    """Forks a child per pending request when this process starts a real compilation (the
    signatures are worked out only then: a step that compiles nothing pays no ``typeof``)."""

    def on_start(self, ev: event.Event) -> None:
        with _LOCK:
            pending = [call for calls in _requests for call in calls]
            _requests.clear()
        for kernel, args in pending:
            key = (kernel, _signature(kernel, args))
            with _LOCK:
                wanted = key[1] not in kernel.overloads and key not in _children
            if wanted:
                _fork(*key)

    def on_end(self, ev: event.Event) -> None:
        pass


if _FORK:
    event.register("numba:compile", _ForkOnCompile())


@contextlib.contextmanager
def forking_on_compile(*calls):
    """While the block runs, the first real compilation in this process forks one child per
    ``(kernel, args)`` of ``calls`` (``args``: the kernel's full argument list), which
    compiles ``kernel`` for the types of ``args`` into the on-disk cache; none for a kernel
    that already has that signature here, or a child on it."""
    if not _FORK:
        yield
        return
    with _LOCK:
        _requests.append(calls)
    try:
        yield
    finally:
        with _LOCK:
            for i, pending in enumerate(_requests):
                if pending is calls:  # identity: the arguments are arrays
                    del _requests[i]
                    break


def _cpu_ticks(pid: int) -> int:
    """Clock ticks of CPU (user + system) the process ``pid`` has used so far (Linux ``/proc``),
    -1 when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, ValueError, IndexError):
        return -1


def wait_for(kernel, args) -> None:
    """Wait until the child compiling ``kernel`` for ``args`` (if any) has exited; killed when
    it has used no CPU for :data:`STALL_S` seconds (stuck: a fork of a threaded process can
    inherit a lock that no thread of the child will release). The call that follows loads the
    kernel from the cache, or compiles it if the child did not write it."""
    if not _FORK or not _children:
        return
    with _LOCK:
        pid = _children.pop((kernel, _signature(kernel, args)), None)
    if pid is None:
        return
    ticks, since = _cpu_ticks(pid), time.monotonic()
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() - since > STALL_S:
            now = _cpu_ticks(pid)
            if now == ticks:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            ticks, since = now, time.monotonic()
        time.sleep(0.002)
