"""Per-session locks that serialize the events of one session.

One :class:`SessionLocks` table per engine. A lock exists only while some event holds
or waits for it, so a million idle sessions cost nothing here. Waiters are served in
arrival order and may be threads (blocking) or asyncio tasks (awaiting, without
blocking their event loop).

Re-entering the lock from the thread or task that holds it would wait forever, so it
raises :class:`~statekit.exceptions.UsageError` instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

from .exceptions import UsageError, redact

__all__ = ["SessionLocks"]


def current_owner() -> object:
    """The running asyncio task, or else the current thread's id."""
    if asyncio._get_running_loop() is not None:
        task = asyncio.current_task()
        if task is not None:
            return task
    return threading.get_ident()


class _AsyncWaiter:
    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Lock:
    __slots__ = ("held", "owner", "refs", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.owner: object = None
        self.refs = 0
        self.waiters: deque[Any] = deque()


class SessionLocks:
    """A table of per-session locks. Thread-safe; one mutex guards the table."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, _Lock] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def _enter(self, sid: str, owner: object) -> tuple[_Lock, bool]:
        """Under the mutex: take the lock if free. Returns (lock, acquired)."""
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = _Lock()
        if not lock.held:
            lock.held = True
            lock.owner = owner
            lock.refs += 1
            return lock, True
        if lock.owner is owner or lock.owner == owner:
            raise UsageError(
                f"an event of session {redact(sid)} is already open in this thread or task; "
                "events of one session cannot nest: read and write through the outer "
                "event (listeners receive it as their first argument)"
            )
        lock.refs += 1
        return lock, False

    def acquire(self, sid: str) -> None:
        """Block until this thread holds the lock of ``sid``."""
        owner = current_owner()
        with self._mutex:
            lock, acquired = self._enter(sid, owner)
            if acquired:
                return
            if isinstance(lock.owner, asyncio.Task) and not isinstance(owner, int):
                lock.refs -= 1
                raise UsageError(
                    f"session {redact(sid)} is held by an asyncio task; waiting for it with "
                    "a blocking 'with engine.event()' inside async code would stop the "
                    "event loop: use 'async with engine.aevent()'"
                )
            waiter = threading.Lock()
            waiter.acquire()
            lock.waiters.append(waiter)
        waiter.acquire()  # released by the holder when it hands the lock over
        lock.owner = owner

    async def aacquire(self, sid: str) -> None:
        """Wait, without blocking the event loop, until this task holds the lock."""
        owner = current_owner()
        with self._mutex:
            lock, acquired = self._enter(sid, owner)
            if acquired:
                return
            waiter = _AsyncWaiter(asyncio.get_running_loop())
            lock.waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._mutex:
                granted = waiter.granted
                if not granted:
                    lock.waiters.remove(waiter)
                    lock.refs -= 1
                    self._drop_ref(sid, lock)
            if granted:
                self.release(sid)
            raise
        lock.owner = owner

    def release(self, sid: str) -> None:
        """Release the lock of ``sid``, handing it to the longest waiter if any."""
        with self._mutex:
            lock = self._locks[sid]
            lock.owner = None
            lock.refs -= 1
            while lock.waiters:
                waiter = lock.waiters.popleft()
                if isinstance(waiter, _AsyncWaiter):
                    waiter.granted = True
                    try:
                        waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                    except RuntimeError:  # its loop is closed: that waiter is gone
                        waiter.granted = False
                        lock.refs -= 1
                        continue
                else:
                    waiter.release()
                return
            lock.held = False
            self._drop_ref(sid, lock)

    def _drop_ref(self, sid: str, lock: _Lock) -> None:
        if lock.refs <= 0 and not lock.held:
            del self._locks[sid]

    def held(self, sid: str) -> bool:
        """Whether some event holds the lock of ``sid`` (for diagnostics and tests)."""
        lock = self._locks.get(sid)
        return lock is not None and lock.held
