"""What statekit's objects do in the child of ``os.fork()``.

An engine made before a fork (gunicorn ``--preload``, ``multiprocessing`` with the
``fork`` start method) is copied into every child, with its stores, registries and
locks. A copy must work in the child, and share nothing by accident with its parent:

- locks held at the fork by threads of the parent would stay held forever in the
  child, whose only thread is the one that forked: they are made free again;
- the thread that receives a shared store's notices does not exist in the child: it
  is started again there (and subscribers are told to resync: notices may have been
  published before it listened);
- a store handle names itself in the notices it publishes, so that it skips its own:
  the child draws a new name, or it would skip its parent's and siblings' notices;
- per-session objects of a registry, and leases the parent failed to give back,
  belong to the parent: the child forgets them (without cleaning the objects up,
  which would close what the parent still uses);
- work that a fork must not split (an SQLite write transaction: the child would
  inherit the library's record of its locks, and never write) runs inside a
  :class:`ForkGate`, which a fork waits for.

Objects register with :func:`after_fork_in_child` and implement ``_after_fork()``;
:func:`restart_after_fork` registers what must run once every object is reset
(``_restart_after_fork()``), such as starting threads again. Registrations are weak.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Protocol

__all__ = ["ForkGate", "after_fork_in_child", "free_lock", "restart_after_fork"]

logger = logging.getLogger("statekit")


class _Resettable(Protocol):
    def _after_fork(self) -> None: ...


class _Restartable(Protocol):
    def _restart_after_fork(self) -> None: ...


_resets: weakref.WeakSet[Any] = weakref.WeakSet()
_restarts: weakref.WeakSet[Any] = weakref.WeakSet()


def after_fork_in_child(obj: _Resettable) -> None:
    """Call ``obj._after_fork()`` in the child of every fork, while ``obj`` lives."""
    _resets.add(obj)


def restart_after_fork(obj: _Restartable) -> None:
    """Call ``obj._restart_after_fork()`` in the child of every fork, after every
    ``_after_fork()``, while ``obj`` lives."""
    _restarts.add(obj)


def free_lock(lock: Any) -> None:
    """Make a lock copied into a child free again, in place (objects that share it keep
    sharing it). A lock held by a thread of the parent would otherwise never be
    released: that thread does not exist in the child."""
    reinit = getattr(lock, "_at_fork_reinit", None)
    if reinit is not None:
        reinit()
    elif lock.locked():  # pragma: no cover - every supported Python has the method
        lock.release()


class ForkGate:
    """Work a fork must not split: run it as ``with gate:`` (from any threads at
    once). A fork waits until none is in flight in other threads (at most
    ``patience`` seconds, then forks all the same and logs it), and holds new work
    back meanwhile; in the child, the gate is empty and open."""

    def __init__(self, name: str, patience: float) -> None:
        self._name = name
        self._patience = patience
        self._cond = threading.Condition()
        self._inside: collections.Counter[int] = collections.Counter()  # by thread
        self._forking = False
        _gates.add(self)

    def __enter__(self) -> None:
        with self._cond:
            while self._forking:
                self._cond.wait()
            self._inside[threading.get_ident()] += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            me = threading.get_ident()
            self._inside[me] -= 1
            if not self._inside[me]:
                del self._inside[me]
            self._cond.notify_all()

    def before_fork(self) -> None:
        """In the forking thread: hold new work back, and wait for other threads'."""
        me = threading.get_ident()
        deadline = time.monotonic() + self._patience
        with self._cond:
            self._forking = True
            while any(thread != me for thread in self._inside):
                left = deadline - time.monotonic()
                if left <= 0:
                    logger.warning(
                        "statekit: forking while %s is in flight in another thread after "
                        "waiting %.1f s: it may not work in the child",
                        self._name,
                        self._patience,
                    )
                    return
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        """Let the work held back go on."""
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """Open and empty: the other threads' work is the parent's."""
        self._cond = threading.Condition()
        me = threading.get_ident()
        self._inside = collections.Counter({me: self._inside[me]} if self._inside[me] else {})
        self._forking = False


_gates: weakref.WeakSet[ForkGate] = weakref.WeakSet()


def _before() -> None:
    for gate in list(_gates):
        gate.before_fork()


def _after_in_parent() -> None:
    for gate in list(_gates):
        gate.after_fork_in_parent()


def _in_child() -> None:
    for gate in list(_gates):
        gate.after_fork_in_child()
    phases = ((list(_resets), "_after_fork"), (list(_restarts), "_restart_after_fork"))
    for objects, method in phases:
        for obj in objects:
            try:
                getattr(obj, method)()
            except Exception:  # the child goes on; what failed is logged
                logger.exception("statekit: %s of %r failed after a fork", method, obj)


if hasattr(os, "register_at_fork"):  # every POSIX system
    os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_in_child)
