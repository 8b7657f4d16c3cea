"""Change streams: ``engine.watch(sid, globals=...)``, an async iterator of the changes
of one session's states and of some globals, for a web handler to forward (a
websocket, Server-Sent Events).

Fed by this engine's commits and global writes, and by other processes' (or other
engines') notices: of commits to a watched session (loaded once per notice, for all
its watchers) and of global writes (the global read once per notice). Each stream is
bounded: a consumer that falls behind loses the oldest changes, and the next change it
reads says how many (``missed``); writers never wait for a consumer. A session's
streams end when the session ends (closed, expired, evicted), and every stream when
the engine shuts down.

Nothing here costs an event anything until a stream is open: the engine host routes
events through its watches only while one is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

from typing_extensions import Self

from ._checks import USER_PREFIX
from ._copying import open_value, stored_form
from ._core import Core
from ._states import GlobalState
from .exceptions import UsageError, WrongEngine
from .stores.base import DeleteReason, Notice

__all__ = ["StateChange", "Watch", "Watchers", "global_names"]

logger = logging.getLogger("statekit")


class StateChange(NamedTuple):
    """One change a watch saw (a named tuple: one is made per change per watch).

    Attributes:
        sid: the session whose state changed, or None for a global or a user state.
        state: the state's name.
        value: its new value (a copy of the consumer's own).
        missed: how many changes this watch dropped just before this one, because
            its consumer read too slowly (0 when none).
        scope: ``"session"``, ``"user"`` or ``"global"``: the kind of the state.
    """

    sid: str | None
    state: str
    value: Any
    missed: int = 0
    scope: str = "session"

    def __repr__(self) -> str:  # the id is a secret: never in logs
        sid = "None" if self.sid is None else "'…'"
        return (
            f"StateChange(sid={sid}, state={self.state!r}, value={self.value!r}, "
            f"missed={self.missed}, scope={self.scope!r})"
        )


class Watch:
    """An async iterator of :class:`StateChange`, made by
    :meth:`~statekit.StateEngine.watch`; ``async with`` closes it. Iterate it in one
    task; changes arrive from any thread. Ends (``StopAsyncIteration``) once closed,
    once its session ended, or once the engine shut down, after the changes already
    queued."""

    def __init__(
        self,
        hub: Watchers,
        sid: str | None,
        globals_: frozenset[str],
        maxsize: int,
        check: Callable[[], Awaitable[bool]] | None,
        *,
        record: str | None = None,
    ) -> None:
        self.sid = sid
        #: The record of the user whose user states are watched, or None.
        self.record = record
        self.globals = globals_
        self._hub = hub
        self._check = check
        # Each change as pushed: (its number, sid, state, value, scope). A deque with a
        # maxlen drops the oldest by itself, and append and popleft are atomic: a
        # writer takes no lock. The numbers tell the reader how many were dropped.
        self._items: deque[tuple[int, str | None, str, Any, str]] = deque(maxlen=maxsize)
        self._number = itertools.count().__next__
        self._last = -1  # the number of the last change read
        self._closed = False
        #: Why the watch ended, once it did because its session did: the reason's value
        #: (``"closed"``, ``"idle"``, ``"evicted"``, ``"shutdown"`` on a memory store),
        #: or ``"unknown"`` for a session that was not live when the watch began; None
        #: while it runs, and when it ended otherwise (closed by its consumer, or the
        #: engine shut down over a shared store, where the session lives on).
        self.ended: str | None = None
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        what = "closed" if self._closed else "open"
        return f"<Watch {what}, {len(self._items)} queued, globals {sorted(self.globals)}>"

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether the watch ended (its queued changes may still be read)."""
        return self._closed

    def push(self, sid: str | None, state: str, value: Any, scope: str) -> None:
        """Queue a change (any thread): never waits, takes no lock; the oldest change
        goes when the watch is full. ``value`` is the value's snapshot
        (:func:`~statekit._copying.stored_form`, which nothing changes: the host may go
        on changing the object it committed), opened into a copy of its own when the
        change is read."""
        if self._closed:
            return
        self._items.append((self._number(), sid, state, value, scope))
        if self._waiter is not None:  # (set before the reader looks again: never missed)
            waiter, self._waiter = self._waiter, None
            if waiter is not None:
                self._wake(waiter)

    def close(self, ended: str | None = None) -> None:
        """End the watch (any thread): iteration stops once the queue is read.
        ``ended``: why, when its session ended (see :attr:`ended`)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.ended = ended
            waiter, self._waiter = self._waiter, None
        self._hub.remove(self)
        if waiter is not None:
            self._wake(waiter)

    def _wake(self, waiter: asyncio.Future[None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            if not waiter.done():
                waiter.set_result(None)
        else:
            loop.call_soon_threadsafe(_settle, waiter)

    async def __anext__(self) -> StateChange:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        check, self._check = self._check, None
        if check is not None:
            try:
                live = await check()
            except BaseException:
                self._check = check  # cancelled (say): checked on the next read
                raise
            if not live:  # an unknown, ended or closed session: nothing will come
                self.close("unknown")
        while True:
            if self._items:
                return self._take()
            if self._closed:
                raise StopAsyncIteration
            waiter = self._waiter = self._loop.create_future()
            if self._items or self._closed:  # pushed before the waiter was seen
                self._waiter = None
                continue
            await waiter

    def _take(self) -> StateChange:
        """The oldest queued change, copied; how many were dropped before it."""
        number, sid, state, value, scope = self._items.popleft()
        missed, self._last = number - self._last - 1, number
        return StateChange(sid, state, open_value(value), missed, scope)


#: What :func:`_snapshot` gives for a value it cannot copy.
_UNCOPYABLE: Any = object()


def _snapshot(value: Any) -> Any:
    """The snapshot a watch queues of a committed value, taken now, or ``_UNCOPYABLE``
    (logged) for a value that cannot be copied, which no store commits."""
    try:
        return stored_form(value)
    except Exception:
        logger.exception("a watched value could not be copied: its change is not streamed")
        return _UNCOPYABLE


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def global_names(engine: object, states: Iterable[object]) -> frozenset[str]:
    """The names of ``states``, each a global state of ``engine``.

    Raises:
        UsageError: one is not a global state.
        WrongEngine: one was declared on another engine.
    """
    names = set()
    for state in states:
        if not isinstance(state, GlobalState):
            raise UsageError(f"watch(globals=...) takes global states, got {type(state).__name__}")
        if state.engine is not engine:
            raise WrongEngine(state.name, state.engine.app, getattr(engine, "app", "?"))
        names.add(state.name)
    return frozenset(names)


class Watchers:
    """The open watches of one engine, by session and by global. Thread-safe.

    ``on_active(bool)`` is called when the first watch opens and the last closes (the
    engine host then routes events through its watches, or stops); ``read_global(name)``
    reads a global's value now (for other processes' writes, which notices name)."""

    def __init__(
        self,
        core: Core,
        on_active: Callable[[bool], object],
        read_global: Callable[[str], Any],
    ) -> None:
        self._core = core
        self._on_active = on_active
        self._read_global = read_global
        self._hearing_globals = False
        self._sessions: dict[str, set[Watch]] = {}
        self._globals: dict[str, set[Watch]] = {}
        self._count = 0
        self._lock = threading.Lock()
        core.add_hook("end", self._ended)
        core.add_hook("shutdown", self.close_all)

    def add(self, watch: Watch) -> None:
        with self._lock:
            for key in (watch.sid, watch.record):
                if key is not None:
                    self._sessions.setdefault(key, set()).add(watch)
            for name in watch.globals:
                self._globals.setdefault(name, set()).add(watch)
            self._count += 1
            first = self._count == 1
            hear = bool(watch.globals) and not self._hearing_globals
            self._hearing_globals = self._hearing_globals or hear
        if first:
            self._on_active(True)
        if hear:  # other processes' (and engines') global writes, from now on
            ns: Any = self._core.ns
            getattr(ns, "subscribe_globals", ns.subscribe)(self._on_notice)

    def remove(self, watch: Watch) -> None:
        with self._lock:
            found = False
            for key in (watch.sid, watch.record):
                if key is not None and watch in self._sessions.get(key, ()):
                    found = True
                    self._drop(self._sessions, key, watch)
            for name in watch.globals:
                if watch in self._globals.get(name, ()):
                    found = True
                    self._drop(self._globals, name, watch)
            if not found:
                return
            self._count -= 1
            last = self._count == 0
        if last:
            self._on_active(False)

    @staticmethod
    def _drop(table: dict[str, set[Watch]], key: str, watch: Watch) -> None:
        watches = table[key]
        watches.discard(watch)
        if not watches:
            del table[key]

    def watching(self, sid: str) -> bool:
        """Whether a watch of session ``sid`` is open (a dict lookup, no lock)."""
        return sid in self._sessions

    def session_changed(self, sid: str, changes: Iterable[tuple[str, Any]]) -> None:
        """Give each watch of ``sid`` (a session, or a user's record) the new values
        (name, value) of its states."""
        watches = self._sessions.get(sid)
        if not watches:
            return
        user = sid.startswith(USER_PREFIX)
        shown, scope = (None, "user") if user else (sid, "session")
        frozen = [(name, _snapshot(value)) for name, value in changes]
        frozen = [(name, value) for name, value in frozen if value is not _UNCOPYABLE]
        for watch in tuple(watches):
            for name, value in frozen:
                watch.push(shown, name, value, scope)

    def global_changed(self, name: str, value: Any) -> None:
        """Give each watch of global ``name`` its new value."""
        watches = list(self._globals.get(name, ()))
        snapshot = _snapshot(value) if watches else _UNCOPYABLE
        if snapshot is not _UNCOPYABLE:
            for watch in watches:
                watch.push(None, name, snapshot, "global")

    def _on_notice(self, notice: Notice) -> None:
        """A global written elsewhere (in the store's notification thread): its watches
        get the value it has now."""
        if notice.kind != "global" or self._core.shut:
            return
        for name in notice.names:
            if name in self._globals:
                try:
                    value = self._read_global(name)
                except Exception:
                    logger.exception("a watched global changed elsewhere could not be read")
                    continue
                self.global_changed(name, value)

    def _ended(self, sid: str, reason: DeleteReason) -> None:
        """A session ended (closed too: its page is gone): its watches end."""
        for watch in list(self._sessions.get(sid, ())):
            watch.close(reason.value)

    def close_all(self) -> None:
        """End every watch (at shutdown): over a store of this process its sessions end
        (``ended`` is ``"shutdown"``); over a shared one they live on."""
        ended = None if self._core.shared else DeleteReason.SHUTDOWN.value
        with self._lock:
            watches = {
                watch
                for table in (self._sessions, self._globals)
                for each in table.values()
                for watch in each
            }
        for watch in watches:
            watch.close(ended)
