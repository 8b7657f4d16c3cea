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
    once). A fork waits until none is in flight in other threads (at most until a
    deadline, then forks all the same and logs it), and holds new work of other
    threads back meanwhile; in the child, the gate is empty and open.

    The forking thread is never held back (fork hooks registered before statekit was
    imported run while the gate is closed), nor is a thread already inside; a fork
    from inside the gate does not wait for it (another thread may be waiting there
    for what the forking one holds), only for the other gates."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._reset()
        _gates.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._inside: collections.Counter[int] = collections.Counter()  # by thread
        self._forking = 0  # forks under way (two threads may fork at once)
        self._forkers: collections.Counter[int] = collections.Counter()

    def __enter__(self) -> None:
        if self._pid != os.getpid():  # a child whose own reset has not run yet
            self._reset()
        me = threading.get_ident()
        with self._cond:
            while self._forking and not self._forkers[me] and not self._inside[me]:
                self._cond.wait()
            self._inside[me] += 1

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        me = threading.get_ident()
        with self._cond:
            self._inside[me] -= 1
            if not self._inside[me]:
                del self._inside[me]
            if self._forking:
                self._cond.notify_all()

    def before_fork(self, deadline: float) -> None:
        """In the forking thread: hold other threads' new work back, and wait for
        their work in flight until ``deadline`` (``time.monotonic()``)."""
        me = threading.get_ident()
        with self._cond:
            self._forking += 1
            self._forkers[me] += 1
            if self._inside[me]:
                return
            while any(thread != me for thread in self._inside):
                if deadline <= time.monotonic():
                    logger.warning(
                        "statekit: forking while %s is in flight in another thread: it may "
                        "not work in the child",
                        self._name,
                    )
                    return
                self._cond.wait(deadline - time.monotonic())

    def after_fork_in_parent(self) -> None:
        """Let the work held back go on, once no other fork is under way."""
        me = threading.get_ident()
        with self._cond:
            self._forking -= 1
            self._forkers[me] -= 1
            if not self._forkers[me]:
                del self._forkers[me]
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        """Open and empty: the other threads' work is the parent's (the forking
        thread's own, if it forked inside, goes on in the child)."""
        own = self._inside[threading.get_ident()]
        self._reset()
        if own:
            self._inside[threading.get_ident()] = own


_gates: weakref.WeakSet[ForkGate] = weakref.WeakSet()
#: The longest a fork waits for the work of other threads, over all gates.
FORK_PATIENCE = 10.0


def _each_gate() -> list[ForkGate]:
    while True:
        try:
            return list(_gates)
        except RuntimeError:  # a gate made meanwhile in another thread
            continue


def _before() -> None:
    deadline = time.monotonic() + FORK_PATIENCE
    for gate in _each_gate():
        gate.before_fork(deadline)


def _after_in_parent() -> None:
    for gate in _each_gate():
        gate.after_fork_in_parent()


def _in_child() -> None:
    for gate in _each_gate():
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
