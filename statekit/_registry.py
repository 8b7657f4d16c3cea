"""Per-session objects that cannot be copied: locks, connections, models.

A :class:`SessionRegistry` keeps one object per session *in this process*, made by a
factory when the session is opened and cleaned up exactly once when it ends: closed,
expired, evicted, closed or reaped by another process (through the store's notices),
the engine shut down, or :meth:`SessionRegistry.close`.

Locking: one lock per registry guards its table of objects and of opens in flight.
Factories and cleanups (user code) always run outside it. Exactly-once cleanup rests
on one rule: whoever removes an object from the table, under the lock, cleans it up,
after releasing the lock.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from . import _fork
from ._checks import check_name, check_sid, qualname
from ._host import Host
from .exceptions import (
    EngineClosed,
    InvalidDeclaration,
    SessionExpired,
    SessionNotInitialized,
    UsageError,
    redact,
)
from .stores.base import DeleteReason

if TYPE_CHECKING:
    from ._engine import StateEngine

__all__ = ["SessionRegistry"]

logger = logging.getLogger("statekit")

T = TypeVar("T")


class _None:
    """Marks "no object" (``None`` can be a factory's legitimate result)."""

    __slots__ = ()


_NONE: Any = _None()


class _Flight:
    """The opens of one session whose factory is running (outside the lock)."""

    __slots__ = ("count", "ended")

    def __init__(self) -> None:
        self.count = 0
        # Set when the session ends while a factory runs: its object must not be kept.
        self.ended: DeleteReason | None = None


class SessionRegistry(Generic[T]):
    """One object per session, for what cannot be deep-copied or serialized.

    Declare with :meth:`StateEngine.registry`. :meth:`open` makes the session's object
    with ``factory(sid)`` (normally on page load, for example through
    ``engine.on_open(registry.open)``); :meth:`get`, or ``ev[registry]`` inside an
    event, returns it; ``cleanup(obj)`` runs exactly once when the session is closed,
    expires, is evicted, is closed or reaped by another process, when the engine shuts
    down, or on :meth:`close`.

    Objects are process-local: they are never copied, serialized or stored. With a
    shared store each process builds its own object for a session when :meth:`open` is
    called there, and cleans it up when the session ends anywhere. The child of a fork
    starts with no objects: those made before the fork stay the parent's.

    Async hosts may use coroutine functions as factory and cleanup, with :meth:`aopen`
    and :meth:`aclose`. An async cleanup started by synchronous code (``close_session``,
    the reaper, a notice, ``shutdown``) is not waited for: it runs as a task of the event
    loop that opened the object (:meth:`aopen`) while that loop runs, else of the loop
    running in the calling thread, else to completion in the calling thread with
    :func:`asyncio.run`.

    Thread-safe: every method may be called from any thread. The factory and the cleanup
    run outside every lock; an object's own methods are its own business (the guide's
    counter guards itself with a lock).
    """

    __slots__ = (
        "__weakref__",
        "_async_factory",
        "_cleanup",
        "_factory",
        "_flights",
        "_host",
        "_lock",
        "_objects",
        "_resync_due",
        "_resync_failing",
        "_shut",
        "_tasks",
        "engine",
        "name",
    )

    def __init__(
        self,
        engine: StateEngine,
        host: Host,
        name: str,
        factory: Callable[[str], T] | Callable[[str], Coroutine[Any, Any, T]],
        cleanup: Callable[[T], object] | None = None,
    ) -> None:
        self.name = check_name(name, "registry")
        if not callable(factory):
            raise InvalidDeclaration(
                f"factory of registry {name!r} must be a callable taking the session id, "
                f"got {type(factory).__name__}"
            )
        if cleanup is not None and not callable(cleanup):
            raise InvalidDeclaration(
                f"cleanup of registry {name!r} must be a callable taking the object, "
                f"got {type(cleanup).__name__}"
            )
        self.engine = engine
        self._host = host
        self._factory: Callable[[str], Any] = factory
        self._cleanup = cleanup
        self._async_factory = inspect.iscoroutinefunction(factory)
        self._lock = threading.Lock()
        # sid -> (object, the event loop of the aopen that made it, or None)
        self._objects: dict[str, tuple[T, asyncio.AbstractEventLoop | None]] = {}
        self._flights: dict[str, _Flight] = {}
        self._shut = False
        # A resync could not reach the store: the next ended session runs it again.
        self._resync_due = False
        self._resync_failing = False  # (logged once per failing spell)
        self._tasks: set[asyncio.Task[None]] = set()
        host.declare_registry(
            self, ended=self._session_ended, shutdown=self._engine_shutdown, resync=self._resync
        )
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        """In the child of a fork: the objects belong to the parent (they may hold its
        connections), so the child forgets them without cleaning them up; it makes
        its own with :meth:`open`."""
        _fork.free_lock(self._lock)
        self._objects.clear()
        self._flights.clear()
        self._tasks.clear()

    def __repr__(self) -> str:
        return (
            f"SessionRegistry({self.name!r}, app={self._host.app!r}, objects={len(self._objects)})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # A registry's name and engine are read-only once it is declared.
        if name in ("name", "engine") and hasattr(self, name):
            raise AttributeError(f"{name!r} of {self!r} is read-only")
        object.__setattr__(self, name, value)

    def __len__(self) -> int:
        """How many objects this registry holds in this process."""
        return len(self._objects)

    def __contains__(self, sid: object) -> bool:
        """Whether this registry holds an object for session ``sid``."""
        return isinstance(sid, str) and sid in self._objects

    # -- opening -----------------------------------------------------------------

    def open(self, sid: str) -> T:
        """Make the session's object with ``factory(sid)`` and return it; if the
        session already has one, return that one.

        Call it on page load, after :meth:`StateEngine.open_session`. Counts as use of
        the session. The factory runs outside every lock; when two threads open one
        session at once, both factories may run: the first object stored is kept and
        returned to both, and the other is cleaned up at once.

        Raises:
            SessionNotFound: the id was not issued by the engine (no object is made).
            SessionExpired: the session has ended or was closed (no object is kept).
            UsageError: the factory is a coroutine function: use :meth:`aopen`.
            EngineClosed: the engine was shut down.
            Exception: whatever the factory raised (nothing is kept).
        """
        check_sid(sid)
        existing = self._existing(sid)
        if existing is not _NONE:
            return existing  # type: ignore[no-any-return]
        if self._async_factory:
            raise UsageError(
                f"the factory of registry {self.name!r} is a coroutine function; "
                f"open its objects with 'await registry.aopen(sid)'"
            )
        flight = self._take_off(sid)
        try:
            self._host.require_open(sid)
            obj = self._factory(sid)
        except BaseException:
            self._land(sid, flight)
            raise
        if inspect.iscoroutine(obj):
            self._land(sid, flight)
            obj.close()  # never awaited: close it so that it does not warn
            raise UsageError(
                f"the factory of registry {self.name!r} returned a coroutine; open its "
                "objects with 'await registry.aopen(sid)'"
            )
        kept, extra, error = self._land(sid, flight, obj, None)
        if extra is not _NONE:
            self._run_cleanup(sid, extra, None)
        if error is not None:
            raise error
        return kept  # type: ignore[no-any-return]

    async def aopen(self, sid: str) -> T:
        """The async form of :meth:`open`: awaits a coroutine factory, and checks the
        session without blocking the event loop.

        A synchronous factory is called in the event loop's thread. The object remembers
        the running loop: an async cleanup started by synchronous code runs there.

        Raises the same errors as :meth:`open` (except the UsageError).
        """
        check_sid(sid)
        existing = self._existing(sid)
        if existing is not _NONE:
            return existing  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        flight = self._take_off(sid)
        try:
            await self._host.arequire_open(sid)
            obj = self._factory(sid)
            # Only a coroutine is awaited: a task or future may be the object itself.
            if inspect.iscoroutine(obj):
                obj = await obj
        except BaseException:
            self._land(sid, flight)
            raise
        kept, extra, error = self._land(sid, flight, obj, loop)
        if extra is not _NONE:
            await self._acleanup(sid, extra)
        if error is not None:
            raise error
        return kept  # type: ignore[no-any-return]

    def _existing(self, sid: str) -> Any:
        with self._lock:
            entry = self._objects.get(sid)
        return _NONE if entry is None else entry[0]

    def _take_off(self, sid: str) -> _Flight:
        """Record an open in flight, before the session is checked: an end seen from
        then on marks the flight, so its object is never kept for an ended session."""
        with self._lock:
            if self._shut:
                raise EngineClosed(self._host.app)
            flight = self._flights.get(sid)
            if flight is None:
                flight = self._flights[sid] = _Flight()
            flight.count += 1
            return flight

    def _land(
        self,
        sid: str,
        flight: _Flight,
        obj: Any = _NONE,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[Any, Any, Exception | None]:
        """End an open in flight; with an object, decide its fate.

        Returns (object to return, object to clean up, error to raise).
        """
        with self._lock:
            flight.count -= 1
            if flight.count == 0:
                del self._flights[sid]
            if obj is _NONE:
                return _NONE, _NONE, None
            if self._shut:
                return _NONE, obj, EngineClosed(self._host.app)
            if flight.ended is not None:
                return _NONE, obj, SessionExpired(sid, flight.ended.value)
            current = self._objects.get(sid)
            if current is not None:
                return current[0], obj, None  # another open stored one first
            self._objects[sid] = (obj, loop)
            return obj, _NONE, None

    # -- using -------------------------------------------------------------------

    def get(self, sid: str) -> T:
        """The session's object, made by :meth:`open`. Inside an event, ``ev[registry]``
        is the same. Does not touch the session.

        Raises:
            SessionNotInitialized: no object: :meth:`open` was not called for this
                session in this process, or the session has ended.
            SessionNotFound: ``sid`` is not a session id at all (not a string).
            EngineClosed: the engine was shut down.
        """
        self._host.check_usable()
        check_sid(sid)
        obj = self._existing(sid)
        if obj is _NONE:
            raise SessionNotInitialized(self.name, sid)
        return obj  # type: ignore[no-any-return]

    # -- closing -----------------------------------------------------------------

    def close(self, sid: str) -> bool:
        """Remove the session's object and run its cleanup now. The session itself
        stays open; a later :meth:`open` makes a new object.

        Returns whether there was an object. A cleanup that raises is logged (logger
        ``statekit``), never raised. An async cleanup runs as described in the class
        docstring; use :meth:`aclose` to await it.
        """
        entry = self._pop(sid)
        if entry is None:
            return False
        self._run_cleanup(sid, *entry)
        return True

    async def aclose(self, sid: str) -> bool:
        """The async form of :meth:`close`: awaits an async cleanup."""
        entry = self._pop(sid)
        if entry is None:
            return False
        await self._acleanup(sid, entry[0])
        return True

    def _pop(self, sid: object) -> tuple[T, asyncio.AbstractEventLoop | None] | None:
        """Take the session's object out of the table (whoever does cleans it up)."""
        if not isinstance(sid, str):
            return None
        with self._lock:
            return self._objects.pop(sid, None)

    # -- hooks the engine calls ------------------------------------------------

    def _session_ended(self, sid: str, reason: DeleteReason) -> None:
        """The session closed or ended (here, or elsewhere through a notice)."""
        with self._lock:
            entry = self._objects.pop(sid, None)
            flight = self._flights.get(sid)
            if flight is not None:
                flight.ended = reason
            due, self._resync_due = self._resync_due, False
        if entry is not None:
            self._run_cleanup(sid, *entry)
        if due:  # the store answers again: check what was missed, in a thread of its own
            # (not this one: an event loop's, or a request's, would wait for the store)
            threading.Thread(
                target=self._resync, name=f"statekit-resync-{self.name}", daemon=True
            ).start()

    def _engine_shutdown(self) -> None:
        """The engine shut down: clean up every object left, refuse new ones."""
        with self._lock:
            self._shut = True
            entries = list(self._objects.items())
            self._objects.clear()
        for sid, (obj, loop) in entries:
            self._run_cleanup(sid, obj, loop)

    def _resync(self) -> None:
        """Notices may have been lost: clean up objects of sessions no longer open. A
        store that cannot be reached stops the check (each session would wait for it);
        it runs again at the next session that ends, here or in a notice."""
        with self._lock:
            self._resync_due = False
            sids = [] if self._shut else list(self._objects)
        for sid in sids:
            try:
                still_open = self._host.is_open(sid)
            except Exception:
                # Once per failing spell (each ended session tries again meanwhile).
                log = logger.debug if self._resync_failing else logger.exception
                log(
                    "registry %r could not check its sessions (checked again when a session ends)",
                    self.name,
                )
                with self._lock:
                    self._resync_due = self._resync_failing = True
                return
            if not still_open:
                with self._lock:
                    entry = self._objects.pop(sid, None)
                if entry is not None:
                    self._run_cleanup(sid, *entry)
        self._resync_failing = False

    # -- running cleanups ------------------------------------------------------

    def _log_cleanup_error(self, sid: str) -> None:
        logger.exception(
            "cleanup %s of registry %r raised (session %s)",
            qualname(self._cleanup),
            self.name,
            redact(sid),
        )

    async def _acleanup(self, sid: str, obj: Any) -> None:
        if self._cleanup is None:
            return
        try:
            result = self._cleanup(obj)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self._log_cleanup_error(sid)

    def _run_cleanup(self, sid: str, obj: Any, loop: asyncio.AbstractEventLoop | None) -> None:
        """Run the cleanup of one object from synchronous code. Never raises."""
        if self._cleanup is None:
            return
        try:
            result = self._cleanup(obj)
        except Exception:
            self._log_cleanup_error(sid)
            return
        if inspect.isawaitable(result):
            self._finish(self._guarded(sid, result), loop)

    async def _guarded(self, sid: str, result: Awaitable[object]) -> None:
        try:
            await result
        except Exception:
            self._log_cleanup_error(sid)

    def _finish(
        self, coro: Coroutine[Any, Any, None], loop: asyncio.AbstractEventLoop | None
    ) -> None:
        """Run an async cleanup started by synchronous code, without waiting for a
        loop that may itself be waiting for this thread."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is not None and loop.is_running() and not loop.is_closed():
            if loop is here:
                self._spawn(coro)
                return
            try:
                loop.call_soon_threadsafe(self._spawn, coro)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        if here is not None:
            self._spawn(coro)
        else:
            asyncio.run(coro)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Start ``coro`` as a task of the running loop, keeping it referenced."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
