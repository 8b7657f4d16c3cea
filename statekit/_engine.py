"""The state engine's public front: construction, declarations, hooks, sessions,
events, reaping and shutdown.

The work is done by the engine's parts, each in a module of its own and sharing one
:class:`~statekit._core.Core`: ``_sessions.py`` (opening, closing, checking sessions),
``_entry.py`` (taking and giving back a session), ``_commit.py`` (commits and listener
rounds), ``_globals.py`` (global values), ``_remote.py`` (other engines' notices).
States, registries and events reach the engine through an
:class:`~statekit._engine_host.EngineHost`, which implements the one internal interface
they know (:class:`~statekit._host.Host`).

Every method that may touch the store has an async twin (``open_session`` and
``aopen_session``, ...): the operation is written once, as steps (``_steps.py``), and
the twin drives them without blocking the event loop.

Locking: per-session locks serialize the events of one session; the store guards its
own data. No user code (listeners, callbacks, factories) runs under the store's lock;
listeners of an event run under that event's session lock, because they are part of
the event, and deletion callbacks run after every lock is released.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from typing_extensions import Self

from ._checks import check_callable, check_name, check_seconds, check_sid, user_record
from ._clock import Clock, monotonic, wall
from ._commit import Committer
from ._core import Core, Settings
from ._declarations import Declarations
from ._engine_host import EngineHost
from ._entry import Entry, LatchEntry
from ._events import BrowserIO, Event, RenewingEvent
from ._globals import Globals
from ._kept import KeptLeases, check_lease_keep
from ._lease_entry import LeaseEntry
from ._metrics import EngineStats
from ._remote import Remote
from ._sessions import Sessions
from ._states import GlobalState, State
from ._steps import drive
from ._users import RenewingUserEvent, UserEvent, Users
from ._values import policy_for
from ._watch import Watch, Watchers, global_names
from .exceptions import InvalidDeclaration, SessionNotFound, UsageError
from .stores.base import DeleteReason, EnteringNamespace, Store
from .stores.memory import MemoryStore

logger = logging.getLogger("statekit")

__all__ = ["StateEngine"]

T = TypeVar("T")


class StateEngine(Declarations):
    """Holds an application's states and the sessions that use them.

    Args:
        store: where values live; a new :class:`~statekit.stores.MemoryStore` if omitted.
        app: the application's name; engines with the same store and app name share
            state (that is how several processes share one app).
        idle_ttl: seconds a session may go unused before it expires (sliding: every
            event and read touches it).
        closed_ttl: seconds a closed session's values are kept before deletion.
        capacity: the most sessions (open or closed) kept at once; opening one more
            evicts the least recently used, closed ones first, with reason ``evicted``.
        clock: the lifetime clock; :func:`time.monotonic` for a store of this process
            only, :func:`time.time` for a shared store.
        lease_ttl: with a shared store, seconds an event may hold its session before
            another process may take it (the slow event's commit is then refused).
        lease_wait: seconds an event waits for its session while other events hold it
            (in this process, or with a shared store in another) before raising
            :class:`SessionBusy`.
        lease_keep: on a store that keeps leases (Redis), seconds an event's lease and
            values stay with this engine after it commits, so that the session's next
            event here skips its load: one round trip instead of two. Another process
            that wants the session asks and gets it within a notice's delay; one that
            dies holding kept leases leaves those sessions waiting this long at most.
            An event on a kept lease holds it for at least half of this before
            another process may take it. 0 (the default): every event loads its
            session and gives its lease back. At most ``lease_ttl``. See the stores
            page, "Kept leases".
        warn_hold: log a warning (logger ``statekit``, at most once a minute) when an
            event holds its session longer than this many seconds; None: never.
        warn_size: log a warning (likewise) when an event writes a value larger than
            this many bytes; None: never.
        user_idle_ttl: seconds a user's record (the values of :meth:`user_state`) is
            kept without an event of that user; 30 days by default.

    Thread-safe: any method may be called from any thread. Use one engine per app per
    process; several engines may live in one process.

    Async hosts use the async twins of the methods that touch the store
    (:meth:`aopen_session`, :meth:`aclose_session`, :meth:`aexists`,
    :meth:`asession_count`, :meth:`astats`, :meth:`areap`, :meth:`ashutdown`, and
    :meth:`aevent`): same results, same errors, and the event loop is never blocked.
    Hooks and callbacks stay plain functions; in async code they run on the loop's
    thread, as they run in the calling thread of a blocking call.

    Raises:
        InvalidDeclaration: an argument is out of range.

    Example:
        ```python
        engine = StateEngine(SQLiteStore("state.db"), app="shop", idle_ttl=1800)
        cart = engine.session_state("cart", [])
        sid = engine.open_session()  # on page load
        with engine.event(sid) as ev:  # one user action, all or nothing
            ev[cart].append("Milk")
        ```
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        app: str = "app",
        idle_ttl: float = 3600,
        closed_ttl: float = 3600,
        capacity: int = 10_000,
        clock: Clock | None = None,
        lease_ttl: float = 30,
        lease_wait: float = 30,
        lease_keep: float = 0,
        warn_hold: float | None = 5,
        warn_size: int | None = 1_000_000,
        user_idle_ttl: float = 30 * 86_400,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidDeclaration(f"capacity must be a positive int, got {capacity!r}")
        if warn_size is not None and (
            isinstance(warn_size, bool) or not isinstance(warn_size, int) or warn_size < 1
        ):
            raise InvalidDeclaration(
                f"warn_size must be a positive int (bytes) or None, got {warn_size!r}"
            )
        settings = Settings(
            app=check_name(app, "app"),
            idle_ttl=check_seconds(idle_ttl, "idle_ttl"),
            closed_ttl=check_seconds(closed_ttl, "closed_ttl"),
            capacity=capacity,
            lease_ttl=check_seconds(lease_ttl, "lease_ttl"),
            lease_wait=check_seconds(lease_wait, "lease_wait"),
            warn_hold=None if warn_hold is None else check_seconds(warn_hold, "warn_hold"),
            warn_size=warn_size,
            user_idle_ttl=check_seconds(user_idle_ttl, "user_idle_ttl"),
        )
        self.app = settings.app
        self.user_idle_ttl = settings.user_idle_ttl
        self.idle_ttl = settings.idle_ttl
        self.closed_ttl = settings.closed_ttl
        self.capacity = capacity
        self.lease_ttl = settings.lease_ttl
        self.lease_wait = settings.lease_wait
        self.store: Store = MemoryStore() if store is None else store
        self.lease_keep = settings.lease_keep = check_lease_keep(
            lease_keep, settings.lease_ttl, self.store
        )
        # A store that remembers the replies of its writes (to answer a request sent
        # twice with its first outcome) must remember them for as long as a lease.
        request_ttl = getattr(self.store, "request_ttl", None)
        if request_ttl is not None and request_ttl < self.lease_ttl:
            raise InvalidDeclaration(
                f"lease_ttl ({self.lease_ttl:g}s) is longer than the store's request_ttl "
                f"({request_ttl:g}s), for which it remembers each write's outcome: raise "
                "request_ttl or lower lease_ttl"
            )
        self.clock: Clock = (
            clock if clock is not None else wall if self.store.shared else monotonic
        )
        values = policy_for(
            self.store.codec,
            type(self.store).__name__,
            getattr(self.store, "check_values", None),
        )
        ns = self._ns = self.store.namespace(self.app)
        core = self._core = Core(settings, self.store, ns, self.clock, values)
        self._sessions = Sessions(core)
        committer = Committer(core)
        self._remote = Remote(core)
        # Chosen once: a store that keeps each session's lock with the session (the
        # memory store) is entered directly; any other takes locks here and a lease.
        self._entry: Entry
        self._kept: KeptLeases | None = None
        if isinstance(ns, EnteringNamespace):
            self._entry = LatchEntry(core, ns, committer)
        else:
            self._entry = leasing = LeaseEntry(core, committer, self._remote)
            self._kept = leasing.kept
        globals_ = Globals(core)
        users = Users(core, self._entry, logger)
        self._host = host = EngineHost(core, self._entry, self._remote, globals_, users)
        self._watchers = Watchers(core, host.watched, host.global_named)
        host.watchers = globals_.watchers = self._remote.watchers = self._watchers
        users.watchers = self._watchers
        self._remote.users = users

    def __repr__(self) -> str:
        return f"StateEngine(app={self.app!r}, store={type(self.store).__name__})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.ashutdown()

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` was called (later calls raise EngineClosed)."""
        return self._core.shut

    @property
    def states(self) -> Mapping[str, State[Any]]:
        """The states declared on this engine, by name (a read-only view)."""
        return MappingProxyType(self._core.states)

    def on_open(self, fn: Callable[[str], object]) -> Callable[[str], object]:
        """Call ``fn(sid)`` after :meth:`open_session` starts a session: the guide's page
        load event (``engine.on_open(registry.open)`` makes a registry's objects then).

        Runs in the thread that opened the session (the event loop's, for
        :meth:`aopen_session`), outside every lock, in this process only. An exception
        is logged (logger ``statekit``) and does not stop the other hooks nor the
        opening. Usable as a decorator.

        Raises:
            InvalidDeclaration: ``fn`` is not callable or is a coroutine function
                (async hosts await ``registry.aopen(sid)`` after ``open_session()``).
        """
        check_callable(fn, "on_open()", runs=_HOOKS_RUN)
        self._core.add_hook("open", fn)
        return fn

    def on_close(
        self, fn: Callable[[str, DeleteReason], object]
    ) -> Callable[[str, DeleteReason], object]:
        """Call ``fn(sid, reason)`` once when a session is closed (reason ``closed``, at
        :meth:`close_session` time) or ends without being closed (``idle``,
        ``evicted``, ``shutdown``): the guide's close event.

        Runs outside every lock, in the thread that closed or reaped the session (the
        event loop's, for the async twins). With a shared store it also runs in every
        other process whose engine has this app, from the store's notification thread,
        when the session ends elsewhere: use it for what each process holds. An
        exception is logged and never stops the other hooks or reaping. Usable as a
        decorator.

        Raises:
            InvalidDeclaration: ``fn`` is not callable or is a coroutine function.
        """
        check_callable(fn, "on_close()", runs=_HOOKS_RUN)
        self._core.add_hook("end", fn)
        self._remote.listen()
        return fn

    # -- sessions ----------------------------------------------------------------

    def open_session(self) -> str:
        """Start a session and return its id: 192 random bits, URL-safe.

        At capacity, the least recently used session is evicted first (its deletion
        callbacks run with reason ``evicted``).
        """
        return drive(self._sessions.open(), self._ns)

    async def aopen_session(self) -> str:
        """:meth:`open_session` without blocking the event loop. ``on_open`` hooks and
        the callbacks of evicted sessions run on the loop's thread."""
        return await self._core.adrive(self._sessions.open())

    def close_session(self, sid: str) -> bool:
        """Signal that the session's page was closed.

        Session-end hooks run now; values stay ``closed_ttl`` seconds (the session still
        accepts events meanwhile, without extending its life), then are deleted with
        reason ``closed``. Closing twice, or closing a session that already ended, does
        nothing. Returns whether this call closed it.

        Raises:
            SessionNotFound: the id was never issued by this engine.
        """
        return drive(self._sessions.close(sid), self._ns)

    async def aclose_session(self, sid: str) -> bool:
        """:meth:`close_session` without blocking the event loop. Session-end hooks run
        on the loop's thread (also when the task is cancelled once the store closed
        the session)."""
        return await self._core.adrive(self._sessions.close(sid))

    def session_count(self) -> int:
        """How many sessions (open or closed, not yet deleted) the store holds."""
        return drive(self._sessions.count(), self._ns)

    async def asession_count(self) -> int:
        """:meth:`session_count` without blocking the event loop."""
        return await self._core.adrive(self._sessions.count())

    def exists(self, sid: str) -> bool:
        """Whether ``sid`` is a live session (open, or closed within its grace).

        Does not touch the session. A session whose stored data is damaged does not
        exist for this purpose.
        """
        return drive(self._sessions.exists(sid), self._ns)

    async def aexists(self, sid: str) -> bool:
        """:meth:`exists` without blocking the event loop."""
        return await self._core.adrive(self._sessions.exists(sid))

    def stats(self) -> EngineStats:
        """What the engine can tell about itself now (see :class:`EngineStats`). Asks
        the store for its session count (one store call; the rest is this process's):
        async code awaits :meth:`astats`. It answers after :meth:`shutdown` too, with
        the figures the engine ended with (``ended["shutdown"]``: the sessions its
        shutdown ended)."""
        sessions = drive(self._sessions.count(after_shutdown=True), self._ns)
        return self._stats(sessions)

    async def astats(self) -> EngineStats:
        """:meth:`stats` without blocking the event loop."""
        sessions = await self._core.adrive(self._sessions.count(after_shutdown=True))
        return self._stats(sessions)

    def _stats(self, sessions: int) -> EngineStats:
        held, waiting = self._entry.occupancy()
        return EngineStats(
            sessions=sessions,
            held=held,
            waiting=waiting,
            kept=0 if self._kept is None else self._kept.count(),
            **self._core.meter.read(),
        )

    # -- events ------------------------------------------------------------------

    def event(
        self,
        sid: str,
        *,
        browser: Mapping[str, object] | None = None,
        bind: str = "",
        renew: bool = False,
        user: str | None = None,
    ) -> Event:
        """One user action on session ``sid``: ``with engine.event(sid) as ev: ...``.

        Entering the block waits for other events of the same session (in this process,
        and with a shared store in every process) and loads it.

        Args:
            browser: the browser-state tokens the page sent, by storage key (what
                ``statekit.js`` puts in its request header). Entries that are not
                strings are ignored: they read as missing.
            bind: the host's binding for browser tokens (a user id, say), if any.
            renew: on a shared store, have the engine renew the event's lease every
                ``lease_ttl / 3`` seconds while it runs, for handlers that may run
                longer than ``lease_ttl`` (see :meth:`Event.extend` to renew by hand).
                A hung handler then keeps its session until its event ends.
            user: the id of the user the host authenticated for this request, if any:
                the event may then read and write the :meth:`user_state` values of
                that user. It takes the user's record after its session (and makes
                it on first use); its writes to both commit together, all or
                nothing. Never take it from the request unchecked: whoever names a
                user reads and writes that user's values.

        Raises (on entering):
            SessionNotFound: the id was not issued by this engine.
            SessionExpired: the session has ended.
            SessionBusy: other events held the session longer than ``lease_wait``.
            UsageError: an event of this session is already open in this thread/task.
            StoreUnavailable: the store cannot be reached.
        """
        if sid.__class__ is not str:
            check_sid(sid)  # raises, saying what is wrong with it
        # The rest of the id is checked on entering: by the store's lookup (the memory
        # store finds only ids it issued; a miss then says what is wrong with the id)
        # or, on other stores, before anything is sent.
        if browser is not None and browser.__class__ is dict and not browser:
            browser = None  # no tokens: the same event as without them (made on first use)
        if user is not None:
            user_record(user)  # raises, saying what is wrong with it
        elif browser is None and not bind and not renew:
            return Event(self, self._host, sid)
        tokens: dict[str, str | None] = {}
        if browser is not None:
            if not isinstance(browser, Mapping):
                raise UsageError(
                    f"browser= takes a mapping of storage key to token, got "
                    f"{type(browser).__name__}"
                )
            tokens = {
                k: v for k, v in browser.items() if isinstance(k, str) and isinstance(v, str)
            }
        io = BrowserIO(tokens, bind) if browser is not None or bind else None
        if user is None:
            return (RenewingEvent if renew else Event)(self, self._host, sid, io)
        ev = (RenewingUserEvent if renew else UserEvent)(self, self._host, sid, io)
        ev.user = user
        return ev

    def aevent(
        self,
        sid: str,
        *,
        browser: Mapping[str, object] | None = None,
        bind: str = "",
        renew: bool = False,
        user: str | None = None,
    ) -> Event:
        """The async form of :meth:`event`: ``async with engine.aevent(sid) as ev: ...``.

        Neither waiting for the session nor store I/O blocks the event loop.
        """
        return self.event(sid, browser=browser, bind=bind, renew=renew, user=user)

    def watch(
        self,
        sid: str | None = None,
        *,
        user: str | None = None,
        globals: Iterable[GlobalState[Any]] = (),
        maxsize: int = 256,
    ) -> Watch:
        """A stream of the changes of session ``sid``'s states, of user ``user``'s
        user states and of ``globals``: an async iterator of :class:`StateChange`
        (``async for change in engine.watch(sid, user=user_id):``), which ``async
        with`` closes. Fed by this engine's events and global writes and by other
        processes' commits of the session and the user and writes of the globals. It
        keeps at most ``maxsize`` changes for a slow consumer, dropping the oldest (the
        next change read says how many: ``missed``); writers never wait. It ends when
        the session ends (also when it is closed), or it is unknown, or the engine
        shuts down. See the guide, "Change streams".

        Raises:
            UsageError: nothing to watch, a bad ``user`` or ``maxsize``.
            WrongEngine: a global of another engine.

        Example:
            ```python
            async with engine.watch(sid, globals=[visitors]) as changes:
                async for change in changes:  # until the session ends
                    await websocket.send_json({"state": change.state, "value": change.value})
            ```
        """
        self._core.check_usable()
        if sid is not None:
            check_sid(sid)
        record = None if user is None else user_record(user)
        names = global_names(self, globals)
        if sid is None and record is None and not names:
            raise UsageError("watch() needs a session id, user=, globals=, or some of them")
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise UsageError(f"watch() needs a positive int maxsize, got {maxsize!r}")
        watch = Watch(
            self._watchers,
            sid,
            names,
            maxsize,
            None if sid is None else self._open_now(sid),
            record=record,
        )
        self._watchers.add(watch)
        if (sid is not None or record is not None) and self._core.shared:
            self._remote.listen()  # other processes' commits of the session or user
        return watch

    def _open_now(self, sid: str) -> Callable[[], Coroutine[Any, Any, bool]]:
        """Whether ``sid`` is open (not unknown, ended or closed), asked by a watch at
        its first read: a closed session's end was told before the watch existed."""

        async def check() -> bool:
            try:
                async with self.aevent(sid) as ev:
                    return not ev.closed
            except SessionNotFound:
                return False

        return check

    # -- lifetimes ---------------------------------------------------------------

    def reap(self, limit: int | None = None) -> int:
        """Delete every expired session and value now (at most ``limit``) and run their
        callbacks. Returns how many entries were deleted.

        Reaping also happens a few entries at a time during ordinary operations, so a
        host needs this only to sweep on a timer of its own.

        Raises:
            TypeError, ValueError: ``limit`` is neither None nor an int of at least 0.
        """
        return drive(self._core.reap_steps(limit), self._ns)

    async def areap(self, limit: int | None = None) -> int:
        """:meth:`reap` without blocking the event loop; the callbacks run on the
        loop's thread."""
        return await self._core.adrive(self._core.reap_steps(limit))

    def shutdown(self) -> None:
        """Stop the engine: later calls raise :class:`EngineClosed` (but :meth:`stats`,
        which tells the figures it ended with).

        With a store that dies with the process (the memory store), when this is the
        last engine using the app's data, every session ends now and every deletion
        callback runs with reason ``shutdown`` (engines still using the data keep it).
        With any store, every registry object this engine holds is cleaned up (they are
        process-local), and leases kept between events (``lease_keep``) are given back.
        Call it after the host has stopped serving requests. Calling it twice does
        nothing.
        """
        core = self._core
        if core.shut:
            return
        core.shut = True
        self._remote.stop()
        if self._kept is not None:
            drive(self._kept.release_steps(), self._ns)
        drive(core.end_steps(), self._ns)

    async def ashutdown(self) -> None:
        """:meth:`shutdown` without blocking the event loop: a shared store's notice
        thread is stopped in a worker thread, and what the store hands back (a memory
        store's data, replies of lost requests a Redis store reads back) is read as the
        other async calls read. Callbacks and shutdown hooks run on the loop's thread.
        ``async with StateEngine() as engine:`` calls it."""
        core = self._core
        if core.shut:
            return
        core.shut = True
        if core.shared:  # it waits for the thread that receives notices
            await asyncio.to_thread(self._remote.stop)
        else:
            self._remote.stop()
        if self._kept is not None:
            await core.adrive(self._kept.release_steps())
        await core.adrive(core.end_steps())


_HOOKS_RUN = (
    "as a plain call, also from aopen_session() and aclose_session() (on the event "
    "loop's thread); async hosts await their async work (such as registry.aopen(sid)) "
    "after aopen_session() themselves"
)
