"""Per-session locks that serialize the events of one session.

A :class:`Latch` is the lock of one session: free, held by an owner (a thread or an
asyncio task), or being handed to the longest waiter. Its holder guards it with a mutex
of its own, so that taking the latch can share a critical section with other work: the
memory store keeps a latch in each session's record and takes it in the same critical
section as it loads the session; :class:`SessionLocks` keeps a table of latches for the
engines of shared stores, where a latch exists only while some event holds or waits for
it (a million idle sessions cost nothing).

Waiters are served in arrival order and may be threads (blocking) or asyncio tasks
(awaiting, without blocking their event loop). Re-entering a latch from the thread or
task that holds it would wait forever, so it raises
:class:`~statekit.exceptions.UsageError` instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .exceptions import SessionBusy, UsageError, redact

__all__ = ["AsyncWaiter", "Latch", "SessionLocks", "await_turn", "current_owner", "wait_turn"]

_get_running_loop = asyncio._get_running_loop
_current_task = asyncio.current_task
_get_ident = threading.get_ident


def current_owner() -> object:
    """The running asyncio task, or else the current thread's id."""
    loop = _get_running_loop()
    if loop is not None:
        task = _current_task(loop)
        if task is not None:
            return task
    return _get_ident()


class _Handing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "HANDING"


#: A latch's owner while it passes to a waiter that has not woken up yet.
HANDING: Any = _Handing()


class AsyncWaiter:
    """An asyncio task waiting for a latch."""

    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Latch:
    """The lock of one session. Every method is called under its keeper's mutex.

    ``owner`` is None when free; taking a free latch is ``latch.owner = owner`` under
    the mutex. While the latch passes to a waiter, ``owner`` is that waiter's
    :class:`AsyncWaiter`, or :data:`HANDING` for a thread; the waiter sets ``owner`` to
    itself when it wakes (no one else writes it meanwhile).
    """

    __slots__ = ("owner", "waiters")

    def __init__(self) -> None:
        self.owner: object = None
        self.waiters: deque[threading.Lock | AsyncWaiter] | None = None

    def queue(self, sid: str, owner: object, *, blocking: bool) -> threading.Lock | AsyncWaiter:
        """Join the waiters of a held latch. A thread then blocks on the returned lock
        (``acquire()``), a task awaits :func:`await_turn`; either way it holds the
        latch when it wakes and sets ``owner``.

        Raises:
            UsageError: the owner already holds the latch (nested events), or a
                blocking wait inside a running event loop for a latch that a task of
                that loop holds, is being handed, or waits for (it would wait for
                itself).
        """
        if self.owner == owner:
            raise UsageError(
                f"an event of session {redact(sid)} is already open in this thread or "
                "task; events of one session cannot nest: read and write through the "
                "outer event (listeners receive it as their first argument)"
            )
        waiter: threading.Lock | AsyncWaiter
        if not blocking:
            waiter = AsyncWaiter(asyncio.get_running_loop())
        elif self._needs_this_loop():
            raise UsageError(
                f"session {redact(sid)} is held by an asyncio task, or one waits for it; "
                "waiting for it with a blocking 'with engine.event()' inside async code "
                "would stop the event loop that task needs: use "
                "'async with engine.aevent()'"
            )
        else:
            waiter = threading.Lock()
            waiter.acquire()
        if self.waiters is None:
            self.waiters = deque()
        self.waiters.append(waiter)
        return waiter

    def _needs_this_loop(self) -> bool:
        """Whether the latch will pass through a task of the event loop running in this
        thread before a new waiter: a blocking wait here would stop that loop, so the
        task could never run."""
        loop = _get_running_loop()
        if loop is None:
            return False
        owner = self.owner
        if isinstance(owner, asyncio.Task) and owner.get_loop() is loop:
            return True
        if isinstance(owner, AsyncWaiter) and owner.loop is loop:
            return True
        return any(
            isinstance(waiter, AsyncWaiter) and waiter.loop is loop
            for waiter in self.waiters or ()
        )

    def hand_over(self) -> bool:
        """Release the latch to the longest waiter; False if nobody waits (it is free)."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            # The owner is set before the waiter is woken: it sets its own at once.
            if isinstance(waiter, AsyncWaiter):
                waiter.granted = True
                self.owner = waiter
                try:
                    waiter.loop.call_soon_threadsafe(_wake, waiter.future)
                except RuntimeError:  # its loop is closed: that waiter is gone
                    waiter.granted = False
                    continue
            else:
                self.owner = HANDING
                waiter.release()
            return True
        self.owner = None
        return False

    @property
    def idle(self) -> bool:
        """Free, and nobody waits."""
        return self.owner is None and not self.waiters


def _leave_queue(
    waiter: threading.Lock | AsyncWaiter,
    latch: Latch,
    mutex: threading.Lock,
    forget: Callable[[], None] | None,
) -> bool:
    """After a wait that ended without the turn (timeout, exception, cancellation):
    leave the queue unless the latch was handed over meanwhile. Returns whether it was
    (the caller then holds it)."""
    with mutex:
        # A queued thread's lock stays locked until the latch is handed to it.
        granted = waiter.granted if isinstance(waiter, AsyncWaiter) else not waiter.locked()
        if not granted:
            assert latch.waiters is not None
            latch.waiters.remove(waiter)
            if forget is not None:
                forget()
    return granted


def _leave_interrupted(
    waiter: threading.Lock | AsyncWaiter,
    latch: Latch,
    mutex: threading.Lock,
    forget: Callable[[], None] | None,
    release: Callable[[], None],
) -> None:
    """After a wait was interrupted: leave the queue, or pass on a latch granted
    meanwhile."""
    if _leave_queue(waiter, latch, mutex, forget):
        release()


def wait_turn(
    waiter: threading.Lock,
    latch: Latch,
    mutex: threading.Lock,
    *,
    timeout: float,
    release: Callable[[], None],
    forget: Callable[[], None] | None = None,
) -> bool:
    """Block this thread until ``latch`` is handed to ``waiter``, at most ``timeout``
    seconds; returns whether it was (False: the waiter left the queue).

    If the wait is interrupted (an exception from a signal handler, say), the waiter
    leaves the queue; if the latch was handed to it meanwhile, ``release()`` passes it
    on. ``forget()`` (under ``mutex``) lets a table drop a latch nobody uses any more.
    """
    try:
        if waiter.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
            return True
    except BaseException:
        _leave_interrupted(waiter, latch, mutex, forget, release)
        raise
    return _leave_queue(waiter, latch, mutex, forget)


async def await_turn(
    waiter: AsyncWaiter,
    latch: Latch,
    mutex: threading.Lock,
    *,
    timeout: float,
    release: Callable[[], None],
    forget: Callable[[], None] | None = None,
) -> bool:
    """Wait for ``latch`` as ``waiter``, without blocking the event loop, at most
    ``timeout`` seconds; returns whether it was handed over (False: the waiter left the
    queue).

    If the wait is cancelled, the waiter leaves the queue; if the latch was granted
    meanwhile, ``release()`` passes it on. ``forget()`` (under ``mutex``) lets a table
    drop a latch that nobody holds or waits for any more.
    """
    # asyncio.wait, not wait_for: wait_for may swallow a cancellation that arrives
    # just as the future completes, and the task would then run its event.
    try:
        done, _ = await asyncio.wait((waiter.future,), timeout=timeout)
    except BaseException:
        _leave_interrupted(waiter, latch, mutex, forget, release)
        raise
    return bool(done) or _leave_queue(waiter, latch, mutex, forget)


class SessionLocks:
    """A table of session latches, for the engines of shared stores. Thread-safe; one
    mutex guards the table."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._latches: dict[str, Latch] = {}

    def __len__(self) -> int:
        return len(self._latches)

    def occupancy(self) -> tuple[int, int]:
        """How many sessions are held or waited for, and how many events wait."""
        with self._mutex:
            latches = list(self._latches.values())
        return len(latches), sum(len(latch.waiters or ()) for latch in latches)

    def acquire(self, sid: str, timeout: float) -> None:
        """Block until this thread holds the lock of ``sid``.

        Raises:
            SessionBusy: other events held it for ``timeout`` seconds.
        """
        owner = current_owner()
        latches = self._latches
        with self._mutex:  # a session no event holds: take it at once
            if sid not in latches:
                latches[sid] = latch = Latch()
                latch.owner = owner
                return
        latch, waiter = self._take_or_queue(sid, owner, blocking=True)
        if waiter is None:
            return
        assert not isinstance(waiter, AsyncWaiter)
        if not wait_turn(waiter, latch, self._mutex, timeout=timeout, **self._hooks(sid, latch)):
            raise SessionBusy(sid, timeout)
        latch.owner = owner

    async def aacquire(self, sid: str, timeout: float) -> None:
        """Wait, without blocking the event loop, until this task holds the lock.

        Raises:
            SessionBusy: other events held it for ``timeout`` seconds.
        """
        owner = current_owner()
        latch, waiter = self._take_or_queue(sid, owner, blocking=False)
        if waiter is None:
            return
        assert isinstance(waiter, AsyncWaiter)
        hooks = self._hooks(sid, latch)
        if not await await_turn(waiter, latch, self._mutex, timeout=timeout, **hooks):
            raise SessionBusy(sid, timeout)
        latch.owner = owner

    def _hooks(self, sid: str, latch: Latch) -> dict[str, Callable[[], None]]:
        """What a wait that ends without its turn does: pass on a latch handed over
        meanwhile, drop a latch nobody uses any more."""
        return {"release": lambda: self.release(sid), "forget": lambda: self._forget(sid, latch)}

    def _take_or_queue(
        self, sid: str, owner: object, *, blocking: bool
    ) -> tuple[Latch, threading.Lock | AsyncWaiter | None]:
        """Take the latch of ``sid`` if free (no waiter returned), else queue for it."""
        with self._mutex:
            latch = self._latches.get(sid)
            if latch is None:
                latch = self._latches[sid] = Latch()
            if latch.owner is None:
                latch.owner = owner
                return latch, None
            return latch, latch.queue(sid, owner, blocking=blocking)

    def _forget(self, sid: str, latch: Latch) -> None:
        """Under the mutex: drop a latch nobody holds or waits for."""
        if latch.idle and self._latches.get(sid) is latch:
            del self._latches[sid]

    def keep_only_this_thread(self) -> None:
        """In the child of a fork: keep the locks this thread holds (an event open
        across the fork goes on in the child), drop every other, whose owner or
        waiters belong to the parent."""
        self._mutex = threading.Lock()
        me = threading.get_ident()
        self._latches = {sid: x for sid, x in self._latches.items() if x.owner == me}
        for latch in self._latches.values():
            latch.waiters = None

    def release(self, sid: str) -> None:
        """Release the lock of ``sid``, handing it to the longest waiter if any. A lock
        no longer in the table (a fork dropped it: its owner was a task of the parent's
        loop) is already free."""
        latches = self._latches
        with self._mutex:
            latch = latches.get(sid)
            if latch is not None and not latch.hand_over():
                del latches[sid]

    def held(self, sid: str) -> bool:
        """Whether some event holds the lock of ``sid`` (for diagnostics and tests)."""
        latch = self._latches.get(sid)
        return latch is not None and latch.owner is not None
