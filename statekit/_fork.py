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
  which would close what the parent still uses).

Objects register with :func:`after_fork_in_child` and implement ``_after_fork()``;
:func:`restart_after_fork` registers what must run once every object is reset
(``_restart_after_fork()``), such as starting threads again. Registrations are weak.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Protocol

__all__ = ["after_fork_in_child", "free_lock", "restart_after_fork"]

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


def _in_child() -> None:
    phases = ((list(_resets), "_after_fork"), (list(_restarts), "_restart_after_fork"))
    for objects, method in phases:
        for obj in objects:
            try:
                getattr(obj, method)()
            except Exception:  # the child goes on; what failed is logged
                logger.exception("statekit: %s of %r failed after a fork", method, obj)


if hasattr(os, "register_at_fork"):  # every POSIX system
    os.register_at_fork(after_in_child=_in_child)
