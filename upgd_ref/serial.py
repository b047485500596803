"""One call at a time per stateful object (``specs/step.md`` §5).

A step reads the state, runs two passes and commits the step counters; two threads inside
one object's step at once would lose a step or let a segment's count overtake the global
one (a state its own checkpoint refuses). :class:`Serialised` gives each object a
re-entrant lock and :func:`serialised` makes a method hold it, so calls on one object from
several threads run one after the other, in whichever order they arrive, each complete.
Different objects never wait for each other (except an optimizer stepping with a scaler,
which holds the optimizer's lock and then the scaler's; a scaler never takes an
optimizer's, so the order is fixed and cannot deadlock).
"""

from __future__ import annotations

import functools
import threading

__all__ = ["Serialised", "serialised"]


class Serialised:
    """Mixin: a per-object re-entrant lock, created with the object (also when it is copied
    or unpickled; the lock itself is never copied)."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._call_lock = threading.RLock()  # before __init__: no thread can see the object without it
        return self

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_call_lock", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._call_lock = threading.RLock()

    def exclusive(self):
        """The object's lock, as a context manager: ``with scaler.exclusive(): ...`` runs
        the block with no call of this object in another thread."""
        return self._call_lock


def serialised(method):
    """Make ``method`` of a :class:`Serialised` class hold the object's lock while it runs."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._call_lock:
            return method(self, *args, **kwargs)

    return locked
