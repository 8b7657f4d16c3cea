"""The state engine: sessions, lifetimes, reaping, events and listeners.

Locking: per-session locks (``_locks.py``) serialize the events of one session; the
store guards its own data. No user code (listeners, callbacks, factories) runs under
the store's lock; listeners of an event run under that event's session lock, because
they are part of the event, and deletion callbacks run after every lock is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping
from typing import Any, TypeAlias, TypeVar, overload

import cachetools

from . import _fork
from ._browser import DEFAULT_MAX_BYTES, BrowserKeys
from ._changes import CHANGED, SAME, compare
from ._clock import Clock, monotonic, wall
from ._copying import copy_value, open_value
from ._events import Event, EventResult, ListenerFailure, _BrowserIO
from ._locks import SessionLocks, current_owner
from ._registry import SessionRegistry
from ._states import (
    MISSING,
    BrowserState,
    GlobalState,
    SessionState,
    State,
    check_name,
    check_seconds,
)
from ._values import CheckedObjectValues, not_storable, policy_for, unreadable
from .exceptions import (
    ChangeLoopError,
    CodecError,
    EngineClosed,
    InvalidDeclaration,
    SessionBusy,
    SessionCorrupt,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    UsageError,
)
from .stores.base import (
    Busy,
    DeleteReason,
    Ended,
    Gone,
    Lease,
    Loaded,
    Notice,
    SessionIdTaken,
    Store,
)
from .stores.memory import MemoryStore, Queued, _MemoryNamespace, _Record

__all__ = ["StateEngine"]

logger = logging.getLogger("statekit")

_get_running_loop = asyncio._get_running_loop
_get_ident = threading.get_ident

T = TypeVar("T")

Call: TypeAlias = tuple[str, dict[str, Any]]
"""A store call an event step asks for: the namespace method's name, its arguments."""
Steps: TypeAlias = Generator[Call, Any, Any]
Changeable: TypeAlias = "SessionState[Any] | BrowserState[Any]"
Collected: TypeAlias = "tuple[dict[str, Any], dict[str, str] | None, list[Changeable]]"
"""What :meth:`Event._collect` found: writes, browser tokens and changed states."""

#: How many rounds of change listeners may follow one event.
MAX_CASCADE = 16
#: How many expired entries one ordinary operation reaps at most.
REAP_BATCH = 8
#: On a shared store, an engine reaps during ordinary operations at most this often.
SHARED_REAP_INTERVAL = 1.0
#: On the memory store, seconds during which a look that found nothing is not repeated.
LOCAL_REAP_QUIET = 0.001
#: Session ids are this many random bytes (192 bits), URL-safe base64 encoded.
SID_BYTES = 24
_MAX_SID_LENGTH = 256


async def _to_the_end(call: Coroutine[Any, Any, Any], salvage: Callable[[Any], object]) -> Any:
    """Await a store call that, once sent, finishes even if the awaiting task is
    cancelled: the task waits for it (keeping the session's lock meanwhile), then takes
    the cancellation. Otherwise a cancelled commit could land after the lock was given
    to the next event. What the finished call answered goes to ``salvage`` (a load may
    have removed expired entries, whose callbacks are due)."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            salvage(await task)
        raise


def _qualname(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class StateEngine:
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

    Thread-safe: any method may be called from any thread. Use one engine per app per
    process; several engines may live in one process.

    Raises:
        InvalidDeclaration: an argument is out of range.
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
    ) -> None:
        self.app = check_name(app, "app")
        self.idle_ttl = check_seconds(idle_ttl, "idle_ttl")
        self.closed_ttl = check_seconds(closed_ttl, "closed_ttl")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidDeclaration(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.lease_ttl = check_seconds(lease_ttl, "lease_ttl")
        self.lease_wait = check_seconds(lease_wait, "lease_wait")
        self.store: Store = MemoryStore() if store is None else store
        # A store that remembers the replies of its writes (to answer a request sent
        # twice with its first outcome) must remember them for as long as a lease.
        request_ttl = getattr(self.store, "request_ttl", None)
        if request_ttl is not None and request_ttl < self.lease_ttl:
            raise InvalidDeclaration(
                f"lease_ttl ({self.lease_ttl:g}s) is longer than the store's request_ttl "
                f"({request_ttl:g}s), for which it remembers each write's outcome: raise "
                "request_ttl or lower lease_ttl"
            )
        self._values = policy_for(
            self.store.codec,
            type(self.store).__name__,
            getattr(self.store, "check_values", None),
        )
        self.clock: Clock = (
            clock if clock is not None else wall if self.store.shared else monotonic
        )
        self._ns = self.store.namespace(self.app)
        # The memory store keeps each session's lock in its record (so the engines of
        # one app share them) and an event enters and leaves it in one call each; with
        # any other store, events take this engine's session locks, then a lease.
        self._local = self._ns if isinstance(self._ns, _MemoryNamespace) else None
        self._locks = SessionLocks()
        # Names of the session states with a ttl of their own.
        self._ttl_states: dict[str, float] = {}
        self._states: dict[str, State[Any]] = {}
        self._session_states: dict[str, SessionState[Any]] = {}
        self._end_hooks: tuple[Callable[[str, DeleteReason], object], ...] = ()
        self._open_hooks: tuple[Callable[[str], object], ...] = ()
        self._shutdown_hooks: tuple[Callable[[], object], ...] = ()
        self._resync_hooks: tuple[Callable[[], object], ...] = ()
        self._registries: dict[str, SessionRegistry[Any]] = {}
        self._hooks_lock = threading.Lock()
        self._unsubscribe: Callable[[], None] | None = None
        self._subscribe_lock = threading.Lock()
        # Versions of sessions this engine used lately, to re-check after lost notices.
        # Both caches are touched by request threads and the notice thread: one lock.
        self._caches_lock = threading.Lock()
        self._seen_versions: cachetools.LRUCache[str, int] = cachetools.LRUCache(10_000)
        self._orphan_leases: cachetools.LRUCache[str, str] = cachetools.LRUCache(10_000)
        self._last_reap = float("-inf")
        # On the memory store, when the next reaping look is due (see _reap_some).
        self._next_local_look = float("-inf")
        self._shut = False
        _fork.after_fork_in_child(self)

    def __repr__(self) -> str:
        return f"StateEngine(app={self.app!r}, store={type(self.store).__name__})"

    def _after_fork(self) -> None:
        """In the child of a fork: free the locks the parent's threads may have held,
        and forget the parent's events (their session locks) and the leases it failed
        to give back: taking those back here would let two processes hold one lease."""
        for lock in (self._hooks_lock, self._subscribe_lock, self._caches_lock):
            _fork.free_lock(lock)
        self._locks.keep_only_this_thread()
        self._orphan_leases.clear()
        # Sessions the parent used: a resync in the child must not look each one up.
        self._seen_versions.clear()

    def __enter__(self) -> StateEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- declarations ------------------------------------------------------------

    def global_state(self, name: str, default: T) -> GlobalState[T]:
        """Declare a value shared by every session.

        Raises:
            InvalidDeclaration: the name is invalid or already declared.
            StateNotCopyable: the default cannot be deep-copied.
        """
        return GlobalState(self, name, default)

    @overload
    def session_state(
        self,
        name: str,
        default: T,
        *,
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
    ) -> SessionState[T]: ...

    @overload
    def session_state(
        self,
        name: str,
        *,
        factory: Callable[[], T],
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
    ) -> SessionState[T]: ...

    def session_state(
        self,
        name: str,
        default: Any = MISSING,
        *,
        factory: Callable[[], Any] | None = None,
        ttl: float | None = None,
        on_delete: Callable[[Any, DeleteReason], object] | None = None,
    ) -> SessionState[Any]:
        """Declare a value of which each session has its own copy.

        Args:
            name: unique in this engine; the key under which stores keep the value.
            default: the initial value; each session gets a deep copy of it.
            factory: instead of ``default``, a zero-argument callable making the
                initial value (called once per session, on first read).
            ttl: seconds after its last write after which the value is deleted; the
                next read starts again from the default.
            on_delete: called as ``on_delete(value, reason)`` once per deleted value.

        Raises:
            InvalidDeclaration: invalid name, duplicate name, both default and factory,
                or a ttl that is not a positive number.
            StateNotCopyable: the default cannot be deep-copied; objects such as locks
                belong in a per-session registry.
        """
        return SessionState(self, name, default, factory=factory, ttl=ttl, on_delete=on_delete)

    def browser_state(
        self,
        name: str,
        default: T,
        *,
        keys: BrowserKeys,
        storage_key: str | None = None,
        ttl: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Clock = wall,
    ) -> BrowserState[T]:
        """Declare a value kept in the browser (``localStorage``), as an opaque token.

        Args:
            name: unique in this engine.
            default: the value when the browser has none (or sends a bad token).
            keys: the secrets that make and read tokens, newest first; they never reach
                the browser.
            storage_key: the ``localStorage`` key (``name`` if omitted); tokens are bound
                to it.
            ttl: seconds a token stays valid after it is made; ``None``: no expiry.
            max_bytes: the largest token allowed.
            clock: the wall clock tokens are dated with (tokens cross processes).

        Raises:
            InvalidDeclaration: bad name, storage key, ttl or max_bytes, or no keys.
            ValueNotStorable: the default is not JSON-typed.
        """
        return BrowserState(
            self,
            name,
            default,
            keys=keys,
            storage_key=storage_key,
            ttl=ttl,
            max_bytes=max_bytes,
            clock=clock,
        )

    def _declare(self, state: State[Any]) -> None:
        if isinstance(state, BrowserState):
            for other in self._states.values():
                if isinstance(other, BrowserState) and other.storage_key == state.storage_key:
                    raise InvalidDeclaration(
                        f"browser states {other.name!r} and {state.name!r} would share the "
                        f"localStorage key {state.storage_key!r}; give each its own"
                    )
        if state.name in self._states:
            raise InvalidDeclaration(
                f"a state named {state.name!r} is already declared on this engine "
                f"(app {self.app!r}); state names must be unique"
            )
        if self.store.codec is not None or isinstance(self._values, CheckedObjectValues):
            # A store that encodes values (or checks them) must be able to encode the
            # default: refused now, not at its first use.
            self._values.store(state.name, open_value(state._default))
        self._states[state.name] = state
        if isinstance(state, SessionState):
            self._session_states[state.name] = state
            if state.ttl is not None:
                self._ttl_states[state.name] = state.ttl

    @overload
    def registry(
        self,
        name: str,
        factory: Callable[[str], Coroutine[Any, Any, T]],
        cleanup: Callable[[T], object] | None = None,
    ) -> SessionRegistry[T]: ...

    @overload
    def registry(
        self,
        name: str,
        factory: Callable[[str], T],
        cleanup: Callable[[T], object] | None = None,
    ) -> SessionRegistry[T]: ...

    def registry(
        self,
        name: str,
        factory: Callable[[str], Any],
        cleanup: Callable[[Any], object] | None = None,
    ) -> SessionRegistry[Any]:
        """Declare a per-session registry, for objects that cannot be deep-copied or
        serialized (locks, connections, models). See :class:`SessionRegistry`.

        Args:
            name: unique among this engine's registries (1 to 128 of
                ``A-Z a-z 0-9 _ . : / -``).
            factory: ``factory(sid)`` makes a session's object; may be a coroutine
                function (open with ``await registry.aopen(sid)``).
            cleanup: ``cleanup(obj)`` runs exactly once per object when its session
                ends or the registry closes it; may be a coroutine function.

        With a shared store the engine starts receiving the store's notices, so that
        objects here are cleaned up when their session ends in another process.

        Raises:
            InvalidDeclaration: invalid or duplicate name, or a factory or cleanup that
                is not callable.
            EngineClosed: the engine was shut down.
        """
        return SessionRegistry(self, name, factory, cleanup)

    def _declare_registry(self, registry: SessionRegistry[Any]) -> None:
        self._check_usable()
        with self._hooks_lock:
            if registry.name in self._registries:
                raise InvalidDeclaration(
                    f"a registry named {registry.name!r} is already declared on this engine "
                    f"(app {self.app!r}); registry names must be unique"
                )
            self._registries[registry.name] = registry
            self._end_hooks = (*self._end_hooks, registry._session_ended)
            self._shutdown_hooks = (*self._shutdown_hooks, registry._engine_shutdown)
            self._resync_hooks = (*self._resync_hooks, registry._resync)
        self._subscribe()

    def on_open(self, fn: Callable[[str], object]) -> Callable[[str], object]:
        """Call ``fn(sid)`` after :meth:`open_session` starts a session: the guide's page
        load event (``engine.on_open(registry.open)`` makes a registry's objects then).

        Runs in the thread that opened the session, outside every lock, in this process
        only. An exception is logged (logger ``statekit``) and does not stop the other
        hooks nor the opening. Usable as a decorator.

        Raises:
            InvalidDeclaration: ``fn`` is not callable or is a coroutine function
                (async hosts await ``registry.aopen(sid)`` after ``open_session()``).
        """
        self._check_hook(fn, "on_open")
        with self._hooks_lock:
            self._open_hooks = (*self._open_hooks, fn)
        return fn

    def on_close(
        self, fn: Callable[[str, DeleteReason], object]
    ) -> Callable[[str, DeleteReason], object]:
        """Call ``fn(sid, reason)`` once when a session is closed (reason ``closed``, at
        :meth:`close_session` time) or ends without being closed (``idle``,
        ``evicted``, ``shutdown``): the guide's close event.

        Runs outside every lock, in the thread that closed or reaped the session. With a
        shared store it also runs in every other process whose engine has this app,
        from the store's notification thread, when the session ends elsewhere: use it
        for what each process holds. An exception is logged and never stops the other
        hooks or reaping. Usable as a decorator.

        Raises:
            InvalidDeclaration: ``fn`` is not callable or is a coroutine function.
        """
        self._check_hook(fn, "on_close")
        self._on_session_end(fn)
        self._subscribe()
        return fn

    @staticmethod
    def _check_hook(fn: object, what: str) -> None:
        if not callable(fn):
            raise InvalidDeclaration(f"{what}() needs a callable, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            raise InvalidDeclaration(
                f"{what}() needs a plain function, got the coroutine function "
                f"{_qualname(fn)}: hooks run in synchronous code; async hosts await their "
                "async work (such as registry.aopen(sid)) after open_session() themselves"
            )

    def _on_session_end(self, hook: Callable[[str, DeleteReason], object]) -> None:
        """Run ``hook(sid, reason)`` once when a session closes or ends without closing."""
        with self._hooks_lock:
            self._end_hooks = (*self._end_hooks, hook)

    # -- sessions ----------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._shut:
            raise EngineClosed(self.app)

    def open_session(self) -> str:
        """Start a session and return its id: 192 random bits, URL-safe.

        At capacity, the least recently used session is evicted first (its deletion
        callbacks run with reason ``evicted``).
        """
        self._check_usable()
        now = self.clock()
        for attempt in range(3):
            sid = secrets.token_urlsafe(SID_BYTES)
            try:
                evicted = self._ns.create_session(
                    sid, now=now, deadline=now + self.idle_ttl, capacity=self.capacity
                )
                break
            except SessionIdTaken:  # 192 random bits: a broken random source, or a store
                if attempt == 2:
                    raise
        self._run_ended(evicted)
        self._reap_some(now)
        for hook in self._open_hooks:
            try:
                hook(sid)
            except Exception:
                logger.exception("session-open hook %s raised", _qualname(hook))
        return sid

    def close_session(self, sid: str) -> bool:
        """Signal that the session's page was closed.

        Session-end hooks run now; values stay ``closed_ttl`` seconds (the session still
        accepts events meanwhile, without extending its life), then are deleted with
        reason ``closed``. Closing twice, or closing a session that already ended, does
        nothing. Returns whether this call closed it.

        Raises:
            SessionNotFound: the id was never issued by this engine.
        """
        self._check_usable()
        self._check_sid(sid)
        now = self.clock()
        outcome = self._ns.close_session(sid, now=now, deadline=now + self.closed_ttl)
        if outcome is None:
            self._check_usable()  # a shutdown meanwhile emptied the store: say so
            raise SessionNotFound(sid)
        if isinstance(outcome, Gone):
            if outcome.ended is not None:
                self._run_ended((outcome.ended,))
            return False
        if outcome:
            self._run_end_hooks(sid, DeleteReason.CLOSED)
        self._reap_some(now)
        return outcome

    def session_count(self) -> int:
        """How many sessions (open or closed, not yet deleted) the store holds."""
        return self._ns.session_count()

    def exists(self, sid: str) -> bool:
        """Whether ``sid`` is a live session (open, or closed within its grace).

        Does not touch the session.
        """
        try:
            self._check_sid(sid)
        except SessionNotFound:
            return False
        try:
            outcome = self._ns.load_session(sid, now=self.clock(), touch_until=None)
        except SessionCorrupt:  # damaged: not a session anyone can use
            return False
        if isinstance(outcome, Loaded):
            self._run_ended(outcome.expired)
            return True
        if isinstance(outcome, Gone) and outcome.ended is not None:
            self._run_ended((outcome.ended,))
        return False

    @staticmethod
    def _check_sid(sid: object) -> str:
        if not isinstance(sid, str):
            raise SessionNotFound(sid, f"a session id is a str, got {type(sid).__name__}")
        if not sid or len(sid) > _MAX_SID_LENGTH:
            raise SessionNotFound(sid, f"a session id has 1 to {_MAX_SID_LENGTH} characters")
        if not (sid.isascii() and sid.isprintable()):
            raise SessionNotFound(sid, "a session id has printable ASCII characters only")
        return sid

    def _open_steps(self, sid: str, touch: bool) -> Steps:
        """Load a session (no lease) and raise unless it is open, not closed."""
        pending: list[Ended] = []
        now = self.clock()
        try:
            outcome = yield (
                "load_session",
                {"sid": sid, "now": now, "touch_until": now + self.idle_ttl if touch else None},
            )
            loaded = self._loaded_or_raise(sid, now, outcome, pending)
        finally:
            if pending:
                self._run_ended(pending)
        if loaded.closed:
            raise SessionExpired(sid, DeleteReason.CLOSED.value)

    def _require_open(self, sid: str) -> None:
        """Touch ``sid``; raise SessionNotFound/SessionExpired unless it is open."""
        self._check_usable()
        self._check_sid(sid)
        self._drive(self._open_steps(sid, touch=True))

    async def _arequire_open(self, sid: str) -> None:
        """:meth:`_require_open` without blocking the event loop."""
        self._check_usable()
        self._check_sid(sid)
        await self._adrive(self._open_steps(sid, touch=True))

    def _is_open(self, sid: str) -> bool:
        """Whether ``sid`` is open (not closed, not ended), without touching it."""
        try:
            self._drive(self._open_steps(sid, touch=False))
        except SessionNotFound:
            return False
        return True

    def _load(self, sid: str, now: float, pending: list[Ended]) -> Loaded:
        """Load a session (no lease) or raise why not; due callbacks go to ``pending``."""
        return self._loaded_or_raise(
            sid, now, self._ns.load_session(sid, now=now, touch_until=now + self.idle_ttl), pending
        )

    def _loaded_or_raise(
        self, sid: str, now: float, outcome: Loaded | Gone | Busy | None, pending: list[Ended]
    ) -> Loaded:
        if isinstance(outcome, Loaded):
            pending.extend(outcome.expired)
            return outcome
        if outcome is None:
            self._check_usable()  # a shutdown meanwhile emptied the store: say so
            raise SessionNotFound(sid)
        if isinstance(outcome, Busy):  # only answered to a lease request
            raise UsageError(
                f"{self.store!r} broke the store protocol: it answered Busy to a load "
                "without a lease"
            )
        if outcome.ended is not None:
            pending.append(outcome.ended)
        raise SessionExpired(sid, outcome.reason.value, max(0.0, now - outcome.at))

    # -- events ------------------------------------------------------------------
    #
    # An event's store work is written once, as generators that yield store calls
    # (method name and keyword arguments) and receive their results; ``_drive`` runs
    # them with the store's blocking methods, ``_adrive`` with its async methods (or in
    # a worker thread), so that sync and async events share every rule.

    def event(
        self, sid: str, *, browser: Mapping[str, object] | None = None, bind: str = ""
    ) -> Event:
        """One user action on session ``sid``: ``with engine.event(sid) as ev: ...``.

        Entering the block waits for other events of the same session (in this process,
        and with a shared store in every process) and loads it.

        Args:
            browser: the browser-state tokens the page sent, by storage key (what
                ``statekit.js`` puts in its request header). Entries that are not
                strings are ignored: they read as missing.
            bind: the host's binding for browser tokens (a user id, say), if any.

        Raises (on entering):
            SessionNotFound: the id was not issued by this engine.
            SessionExpired: the session has ended.
            SessionBusy: other events held the session longer than ``lease_wait``.
            UsageError: an event of this session is already open in this thread/task.
            StoreUnavailable: the store cannot be reached.
        """
        if sid.__class__ is not str:
            self._check_sid(sid)  # raises, saying what is wrong with it
        # The rest of the id is checked on entering: by the memory store's lookup
        # (which only finds ids it issued; a miss then says what is wrong with the id)
        # or, on other stores, before anything is sent.
        if browser is None and not bind:
            return Event(self, sid)
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
        return Event(self, sid, _BrowserIO(tokens, bind))

    def aevent(
        self, sid: str, *, browser: Mapping[str, object] | None = None, bind: str = ""
    ) -> Event:
        """The async form of :meth:`event`: ``async with engine.aevent(sid) as ev: ...``.

        Neither waiting for the session nor store I/O blocks the event loop.
        """
        return self.event(sid, browser=browser, bind=bind)

    def _start(self, ev: Event) -> None:
        if self._shut:
            raise EngineClosed(self.app)
        if ev._started:
            raise UsageError("an Event can be entered only once; open a new one")
        ev._started = True

    def _begin(self, ev: Event) -> None:
        if self._shut or ev._started:
            self._start(ev)  # raises
        ev._started = True
        local = self._local
        if local is None:
            self._check_sid(ev.sid)
            started = time.monotonic()  # lease_wait bounds the whole wait
            held = False
            try:
                self._locks.acquire(ev.sid, self.lease_wait)
                held = True
                self._drive(self._begin_steps(ev, started))
            except BaseException:
                self._not_entered(ev, held)
                raise
            ev._active = True
            return
        owner = _get_ident() if _get_running_loop() is None else current_owner()
        ev.now = now = self.clock()
        # positional arguments: sid, owner, expired, blocking, now, touch_until
        entered = local.enter(ev.sid, owner, ev._pending, True, now, now + self.idle_ttl)
        if type(entered) is _Record and not entered.closed:
            ev._loaded = entered
            ev._active = True
            return
        if type(entered) is Queued:
            queued = entered
            try:  # from the wait on: anything raised gives the lock back if it is ours
                if not local.wait_turn(queued, owner, self.lease_wait):
                    raise SessionBusy(ev.sid, self.lease_wait)
                entered = self._enter_after_wait(ev, local, queued)
            except BaseException:
                local.give_back(queued.record, owner)
                raise
        self._entered_locally(ev, entered)

    async def _abegin(self, ev: Event) -> None:
        self._start(ev)
        local = self._local
        if local is None:
            self._check_sid(ev.sid)
            started = time.monotonic()
            held = False
            try:
                await self._locks.aacquire(ev.sid, self.lease_wait)
                held = True
                await self._adrive(self._begin_steps(ev, started))
            except BaseException:
                self._not_entered(ev, held, in_task=True)
                raise
            ev._active = True
            return
        owner = current_owner()
        ev.now = now = self.clock()
        entered = local.enter(ev.sid, owner, ev._pending, False, now, now + self.idle_ttl)
        if type(entered) is Queued:
            queued = entered
            try:
                if not await local.await_turn(queued, owner, self.lease_wait):
                    raise SessionBusy(ev.sid, self.lease_wait)
                entered = self._enter_after_wait(ev, local, queued)
            except BaseException:
                local.give_back(queued.record, owner)
                raise
        self._entered_locally(ev, entered)

    def _enter_after_wait(
        self, ev: Event, local: _MemoryNamespace, queued: Queued
    ) -> _Record | Gone | None:
        """Load the session whose lock was just handed to this event."""
        ev.now = now = self.clock()
        return local.enter_after_wait(
            queued, ev._pending, now=now, touch_until=now + self.idle_ttl
        )

    def _held_sessions(self) -> int:
        """How many sessions events hold or wait for (for diagnostics and tests)."""
        return len(self._locks) + (self._local.entered_count() if self._local else 0)

    def _entered_locally(self, ev: Event, entered: object) -> None:
        """Open an event on what the memory store's ``enter`` or ``enter_after_wait``
        answered, or raise (after running the callbacks of what ended) if it could not
        be entered."""
        if type(entered) is not _Record:
            assert entered is None or isinstance(entered, Gone)
            if entered is None:
                self._check_sid(ev.sid)  # a malformed id: say what is wrong with it
            try:
                self._loaded_or_raise(ev.sid, ev.now, entered, ev._pending)
            finally:
                self._run_ended(ev._pending)
        assert isinstance(entered, _Record)
        ev._loaded = entered
        ev._closed = entered.closed  # as entered: the record may be closed meanwhile
        ev._active = True

    def _not_entered(self, ev: Event, held: bool, *, in_task: bool = False) -> None:
        """After a shared-store event failed to start: give back its session lock (if
        ``held``) and any lease it may have been granted, run due callbacks."""
        if held:
            self._locks.release(ev.sid)
        release = self._abandon_lease(ev)
        if release is not None:
            if in_task:  # do not wait: this task may be being cancelled
                asyncio.get_running_loop().run_in_executor(None, release)
            else:
                release()
        self._run_ended(ev._pending)

    def _begin_steps(self, ev: Event, started: float) -> Steps:
        """Lease and load the session from a shared store, waiting while it is busy
        until ``lease_wait`` after ``started`` (when the event began to wait)."""
        # A lease this engine failed to release (the store was down) is taken back
        # rather than waited out.
        with self._caches_lock:
            token = self._orphan_leases.get(ev.sid) or secrets.token_hex(12)
        # Known before the load is sent: if the caller is cancelled while the store
        # grants the lease, the failure path still knows what to give back.
        ev._lease = token
        delay = 0.0005
        while True:
            ev.now = self.clock()
            outcome = yield (
                "load_session",
                {
                    "sid": ev.sid,
                    "now": ev.now,
                    "touch_until": ev.now + self.idle_ttl,
                    "lease": Lease(token=token, until=ev.now + self.lease_ttl),
                },
            )
            if not isinstance(outcome, Busy):
                break
            waited = time.monotonic() - started
            if waited > self.lease_wait:
                raise SessionBusy(ev.sid, waited)
            yield "sleep", {"seconds": delay * (0.5 + secrets.randbelow(1000) / 1000)}
            delay = min(delay * 2, 0.02)
        with self._caches_lock:
            self._orphan_leases.pop(ev.sid, None)
        ev._loaded = self._loaded_or_raise(ev.sid, ev.now, outcome, ev._pending)
        ev._closed = ev._loaded.closed
        with self._caches_lock:
            self._seen_versions[ev.sid] = ev._loaded.version
        return None

    def _end(self, ev: Event, failed: bool) -> None:
        local = self._local
        if local is None:
            self._finish(ev, self._drive, self._end_steps(ev, failed))
            return
        # The memory store: commit and release the session in one call, unless a
        # listener is due (listener events then run first, under the session's lock).
        ev._active = False
        rec: Any = ev._loaded
        try:
            if failed or not ev._work:
                local.release_entered(rec)
                if not failed:
                    ev._changed = []
                return
            try:
                writes, tokens, changed = collected = ev._collect()
            except BaseException:
                local.release_entered(rec)
                raise
            for state in changed:
                if state._listeners:
                    self._end_with_listeners(ev, local, collected)
                    return
            try:
                local.leave(
                    rec, writes, self._ttl_states and self._ttl_deadlines(ev.now, writes), ev.now
                )
            except SessionNotFound:
                self._check_usable()  # a shutdown emptied the store: say so
                raise
            if tokens:
                browser = ev._browser_io()
                browser.tokens.update(tokens)
                browser.out.update(tokens)
            ev._changed = changed  # the result is made when asked for
        finally:
            if ev._pending:
                self._run_ended(ev._pending)
            if ev.now >= self._next_local_look:
                self._reap_some(ev.now)

    def _end_with_listeners(
        self, ev: Event, local: _MemoryNamespace, collected: Collected
    ) -> None:
        """On the memory store: commit, run the listener rounds, release the session."""
        rec: Any = ev._loaded
        try:
            loop_error = self._drive(self._end_steps(ev, False, collected))
        except SessionNotFound:
            self._check_usable()  # a shutdown emptied the store: say so
            raise
        finally:
            local.release_entered(rec)
        if loop_error is not None:
            raise loop_error

    async def _aend(self, ev: Event, failed: bool) -> None:
        if self._local is not None:  # direct calls: nothing to wait for
            self._end(ev, failed)
            return
        ev._active = False
        loop_error: ChangeLoopError | None = None
        try:
            loop_error = await self._adrive(self._end_steps(ev, failed))
        finally:
            self._locks.release(ev.sid)
            self._run_ended(ev._pending)
        if self.store.shared:  # a round trip: not on the event loop
            await asyncio.to_thread(self._reap_some, ev.now)
        else:
            self._reap_some(ev.now)
        if loop_error is not None:
            raise loop_error

    def _finish(self, ev: Event, drive: Callable[[Steps], Any], steps: Steps) -> None:
        ev._active = False
        loop_error: ChangeLoopError | None = None
        try:
            loop_error = drive(steps)
        finally:
            self._locks.release(ev.sid)
            self._run_ended(ev._pending)
            self._reap_some(ev.now)
        if loop_error is not None:
            raise loop_error

    def _orphan_lease(self, sid: str, token: str) -> None:
        with self._caches_lock:
            self._orphan_leases[sid] = token

    def _abandon_lease(self, ev: Event) -> Callable[[], None] | None:
        """After an event failed to start: the lease it asked for may have been granted
        (its caller was cancelled mid-load, say). Return a release to run; if that fails
        too, the lease is remembered so that this engine's next event takes it back."""
        token, ev._lease = ev._lease, None
        if token is None:
            return None
        sid = ev.sid

        def release() -> None:
            try:
                self._ns.release(sid, lease=token)
            except Exception:
                # It lapses by itself; meanwhile this engine's next event takes it back.
                self._orphan_lease(sid, token)

        return release

    def _end_steps(self, ev: Event, failed: bool, collected: Collected | None = None) -> Steps:
        """Commit (unless the block failed), run listener rounds, release the lease.
        ``collected``: what ``ev._collect()`` found, if the caller already asked."""
        try:
            if failed:
                return None
            return (yield from self._commit_with_listeners(ev, collected))
        finally:
            if ev._lease is not None:
                try:
                    yield "release", {"sid": ev.sid, "lease": ev._lease}
                except BaseException as exc:
                    # Other processes wait until the lease lapses; this engine's next
                    # event of the session takes it back at once.
                    self._orphan_lease(ev.sid, ev._lease)
                    if not isinstance(exc, Exception):
                        raise
                    logger.warning("could not release the lease of an event: %s", exc)

    def _commit_steps(
        self,
        ev: Event,
        lease: str | None,
        release: Callable[[list[Changeable]], bool],
        collected: Collected | None = None,
    ) -> Generator[Call, Any, list[Changeable]]:
        """Write an event's changes in one store commit; return the states that changed.

        Browser tokens are handed out only once the commit succeeded."""
        writes, tokens, changed = collected if collected is not None else ev._collect()
        if writes:
            releasing = lease is not None and release(changed)
            yield "commit", self._commit_args(ev, writes, lease, releasing)
            if releasing:
                ev._lease = None  # released with the commit
        if tokens:
            browser = ev._browser_io()
            browser.tokens.update(tokens)
            browser.out.update(tokens)
        return changed

    def _commit_args(
        self, ev: Event, writes: dict[str, Any], lease: str | None, release: bool
    ) -> dict[str, Any]:
        """The arguments of the store commit of an event's ``writes``."""
        return {
            "sid": ev.sid,
            "version": ev._loaded.version,
            "writes": writes,
            "ttl_deadlines": self._ttl_deadlines(ev.now, writes),
            "now": ev.now,
            "lease": lease,
            "release": release,
        }

    def _ttl_deadlines(self, now: float, writes: Mapping[str, Any]) -> dict[str, float]:
        """When the written values of states with a ttl of their own expire."""
        ttls = self._ttl_states
        return {name: now + ttls[name] for name in writes if name in ttls} if ttls else {}

    def _commit_with_listeners(self, ev: Event, collected: Collected | None) -> Steps:
        """Commit the event, then run rounds of listeners, each in its own event."""
        changed = yield from self._commit_steps(
            ev, ev._lease, lambda states: not any(s._listeners for s in states), collected
        )
        all_changed = {state.name for state in changed}
        outputs = dict(ev._outputs) if ev._outputs else {}
        browser = ev._browser_io()
        errors: list[ListenerFailure] = []
        loop_error: ChangeLoopError | None = None
        pending = [state for state in changed if state._listeners]
        rounds = 0
        while pending:
            rounds += 1
            if rounds > MAX_CASCADE:
                loop_error = ChangeLoopError(MAX_CASCADE, tuple(s.name for s in pending))
                break
            next_round: dict[Changeable, None] = {}
            for state in pending:
                for listener in state._listeners:
                    sub = Event(self, ev.sid, _BrowserIO(browser.tokens, browser.bind))
                    sub._started = True
                    sub.now = ev.now
                    outcome = yield (
                        "load_session",
                        {
                            "sid": ev.sid,
                            "now": ev.now,
                            "touch_until": ev.now + self.idle_ttl,
                        },
                    )
                    sub._loaded = self._loaded_or_raise(ev.sid, ev.now, outcome, ev._pending)
                    sub._closed = sub._loaded.closed
                    sub._active = True
                    try:
                        listener(sub, sub[state])
                        sub._active = False
                        sub_changed = yield from self._commit_steps(
                            sub, ev._lease, lambda states: False
                        )
                    except Exception as exc:
                        sub._active = False
                        logger.exception(
                            "change listener %s of state %r raised; its writes were "
                            "discarded and the event stands",
                            _qualname(listener),
                            state.name,
                        )
                        errors.append(
                            ListenerFailure(
                                state=state.name, listener=_qualname(listener), error=exc
                            )
                        )
                        continue
                    if sub._outputs:
                        outputs.update(sub._outputs)
                    sub_browser = sub._browser_io()
                    browser.out.update(sub_browser.out)
                    for name, problem in sub_browser.problems.items():
                        browser.problems.setdefault(name, problem)
                    for changed_state in sub_changed:
                        all_changed.add(changed_state.name)
                        if changed_state._listeners:
                            next_round[changed_state] = None
            pending = list(next_round)
        ev._result = EventResult(
            sid=ev.sid,
            changed=frozenset(all_changed),
            outputs=outputs,
            errors=tuple(errors),
            browser=dict(browser.out),
            browser_problems=dict(browser.problems),
        )
        return loop_error

    def _drive(self, steps: Steps) -> Any:
        """Run store-call steps with the store's blocking methods."""
        ns = self._ns
        try:
            call = next(steps)
            while True:
                name, kwargs = call
                try:
                    if name == "sleep":
                        time.sleep(kwargs["seconds"])
                        result = None
                    else:
                        result = getattr(ns, name)(**kwargs)
                except BaseException as exc:
                    call = steps.throw(exc)
                    continue
                call = steps.send(result)
        except StopIteration as stop:
            return stop.value

    async def _adrive(self, steps: Steps) -> Any:
        """Run store-call steps without blocking the event loop: the store's async
        methods (``a`` + name) when it has them, a worker thread for another shared
        store, a direct call for the memory store."""
        ns = self._ns
        try:
            call = next(steps)
            while True:
                name, kwargs = call
                try:
                    if name == "sleep":
                        await asyncio.sleep(kwargs["seconds"])
                        result = None
                    elif (async_method := getattr(ns, "a" + name, None)) is not None:
                        result = await _to_the_end(async_method(**kwargs), self._salvage)
                    elif self.store.shared:
                        result = await _to_the_end(
                            asyncio.to_thread(getattr(ns, name), **kwargs), self._salvage
                        )
                    else:
                        result = getattr(ns, name)(**kwargs)
                except BaseException as exc:
                    call = steps.throw(exc)
                    continue
                call = steps.send(result)
        except StopIteration as stop:
            return stop.value

    def _salvage(self, outcome: object) -> None:
        """Run the callbacks of what a store call removed, when its caller was
        cancelled before it could take the answer."""
        if isinstance(outcome, Loaded):
            self._run_ended(outcome.expired)
        elif isinstance(outcome, Gone) and outcome.ended is not None:
            self._run_ended((outcome.ended,))

    def _peek(self, sid: str, state: SessionState[T]) -> T:
        self._check_usable()
        self._check_sid(sid)
        pending: list[Ended] = []
        now = self.clock()
        try:
            outcome = self._ns.peek(sid, state.name, now=now, touch_until=now + self.idle_ttl)
            loaded = self._loaded_or_raise(sid, now, outcome, pending)
        finally:
            if pending:
                self._run_ended(pending)
        stored = loaded.values.get(state.name, MISSING)
        if stored is MISSING:
            return state.new_value()
        return self._open(state, stored)

    def _open(self, state: State[T], stored: Any) -> T:
        """A private copy of ``state``'s stored value.

        Raises:
            CodecError: naming the state, when the stored value no longer opens (its
                class was moved by a deploy, say).
        """
        try:
            value: T = self._values.open(stored)
        except Exception as exc:
            raise unreadable(state.name, state.kind, exc) from exc
        return value

    # -- globals -----------------------------------------------------------------

    def _global_get(self, state: GlobalState[T]) -> T:
        self._check_usable()
        found = self._ns.global_get(state.name)
        if found is None:
            value: T = open_value(state._default)
            return value
        return self._open(state, found[0])

    def _global_update(
        self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any = None
    ) -> T:
        """Replace a global's value with ``fn(current)``, or with ``new`` when ``fn`` is
        None (a ``set()``, which never reads the current value: it works even when that
        no longer opens)."""
        self._check_usable()
        name = state.name
        while True:
            found = self._ns.global_get(name)
            if found is None:
                version = None
                if fn is not None:
                    new = fn(open_value(state._default))
                verdict = compare(open_value(state._default), new)
                stored = self._values.store(name, new)
            else:
                old, version = found
                if fn is not None:
                    new = fn(self._open(state, old))
                verdict, stored = self._values.judge(name, old, new)
                if verdict is SAME:
                    break  # nothing to write
            if self._ns.global_cas(name, version=version, value=stored) is not None:
                break
        if verdict is CHANGED:
            self._fire_global(state, self._values.open(stored))
        result: T = new
        return result

    def _global_increment(self, state: GlobalState[T], n: int | float) -> T:
        self._check_usable()
        default = state._default
        for what, number in (("default", default), ("increment", n)):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(
                    f"increment() of global state {state.name!r} needs numbers, but its "
                    f"{what} is a {type(number).__name__}; use update(fn) instead"
                )
        if isinstance(self._values, CheckedObjectValues):
            # The store adds without looking: check the sum before it is written.

            def add(value: Any) -> Any:
                return value + n

            return self._global_update(state, add)
        try:
            value: T = self._ns.global_add(state.name, n, default=default)
        except CodecError as exc:
            if exc.where is None:  # the stored value did not decode: say which state
                raise unreadable(state.name, state.kind, exc) from exc
            raise not_storable(state.name, type(self.store).__name__, exc) from exc
        if n:
            self._fire_global(state, value)
        return value

    def _fire_global(self, state: GlobalState[Any], value: Any) -> None:
        for listener in state._listeners:
            try:
                listener(copy_value(value))
            except Exception:
                logger.exception(
                    "change listener %s of global state %r raised",
                    _qualname(listener),
                    state.name,
                )

    # -- lifetimes ---------------------------------------------------------------

    def reap(self, limit: int | None = None) -> int:
        """Delete every expired session and value now (at most ``limit``) and run their
        callbacks. Returns how many entries were deleted.

        Reaping also happens a few entries at a time during ordinary operations, so a
        host needs this only to sweep on a timer of its own.
        """
        self._check_usable()
        done = 0
        now = self.clock()
        while limit is None or done < limit:
            batch = 1000 if limit is None else min(1000, limit - done)
            ended = self._ns.reap(now=now, limit=batch)
            self._run_ended(ended)
            done += len(ended)
            if len(ended) < batch:
                break
        return done

    def _reap_some(self, now: float) -> None:
        """Reap a few due entries, as part of an ordinary operation.

        On a shared store each look costs a round trip, so an engine looks at most once
        per ``SHARED_REAP_INTERVAL`` seconds there; the memory store looks every time.
        A failing store is not this operation's concern: the next look retries.
        """
        if self.store.shared:
            if now - self._last_reap < SHARED_REAP_INTERVAL:
                return
            self._last_reap = now
            try:
                ended = self._ns.reap(now=now, limit=REAP_BATCH)
            except StoreUnavailable:
                return
        else:
            # After a look that found nothing, the next within a millisecond is skipped:
            # an entry falling due meanwhile is reaped a little later, and a load
            # refuses it anyway.
            if now < self._next_local_look:
                return
            ended = self._ns.reap(now=now, limit=REAP_BATCH)
            if not ended:
                self._next_local_look = now + LOCAL_REAP_QUIET
        if ended:
            self._run_ended(ended)

    def _run_ended(self, ended: Iterable[Ended]) -> None:
        """Run the callbacks of removed sessions and values. Never raises."""
        for item in ended:
            for name, value in item.values.items():
                state = self._session_states.get(name)
                if state is None:
                    continue
                if not state._on_delete:
                    continue
                try:
                    value = self._values.open(value)
                except Exception:
                    logger.exception("stored value of state %r could not be read", name)
                    continue
                for callback in state._on_delete:
                    try:
                        callback(value, item.reason)
                    except Exception:
                        logger.exception(
                            "on_delete callback %s of state %r raised (reason %s)",
                            _qualname(callback),
                            name,
                            item.reason,
                        )
            if item.state is None and not item.was_closed:
                self._run_end_hooks(item.sid, item.reason)

    # -- notices from other engines ---------------------------------------------

    def _subscribe(self) -> None:
        """Receive the store's notices (once), for remote listeners and end hooks."""
        with self._subscribe_lock:
            if self._unsubscribe is None and not self._shut:
                self._unsubscribe = self._ns.subscribe(self._on_notice)

    def _on_notice(self, notice: Notice) -> None:
        """Handle what another engine did. Runs in the store's notification thread."""
        if self._shut:
            return
        if notice.kind == "ended":
            assert notice.reason is not None
            self._run_end_hooks(notice.sid, notice.reason)
        elif notice.kind == "changed":
            states = [
                state
                for name in notice.names
                if (state := self._session_states.get(name)) is not None
                and state._remote_listeners
            ]
            if states:
                self._fire_remote(notice.sid, states)
        else:  # resync: notices may have been lost
            for hook in self._resync_hooks:
                try:
                    hook()
                except Exception:
                    logger.exception("resync hook %s raised", _qualname(hook))
            with self._caches_lock:
                seen = list(self._seen_versions.items())
            for sid, version in seen:
                outcome = self._look(sid)
                if isinstance(outcome, Loaded) and outcome.version != version:
                    self._fire_remote(
                        sid, [s for s in self._session_states.values() if s._remote_listeners]
                    )

    def _look(self, sid: str) -> Loaded | Gone | Busy | None:
        """Load a session without touching it, for notices; run the callbacks of what
        the load claimed (it is their only caller). None if the store failed."""
        try:
            outcome = self._ns.load_session(sid, now=self.clock(), touch_until=None)
        except Exception:
            logger.exception("could not load a session changed by another process")
            return None
        if isinstance(outcome, Loaded):
            self._run_ended(outcome.expired)
        elif isinstance(outcome, Gone) and outcome.ended is not None:
            self._run_ended((outcome.ended,))
        return outcome

    def _fire_remote(self, sid: str, states: list[SessionState[Any]]) -> None:
        outcome = self._look(sid)
        if not isinstance(outcome, Loaded):
            return
        with self._caches_lock:
            self._seen_versions[sid] = outcome.version
        for state in states:
            stored = outcome.values.get(state.name, MISSING)
            for listener in state._remote_listeners:
                try:
                    value = state.new_value() if stored is MISSING else self._open(state, stored)
                    listener(sid, value)
                except Exception:
                    logger.exception(
                        "remote change listener %s of state %r raised",
                        _qualname(listener),
                        state.name,
                    )

    def _run_end_hooks(self, sid: str, reason: DeleteReason) -> None:
        for hook in self._end_hooks:
            try:
                hook(sid, reason)
            except Exception:
                logger.exception("session-end hook %s raised", _qualname(hook))

    def shutdown(self) -> None:
        """Stop the engine: later calls raise :class:`EngineClosed`.

        With a store that dies with the process (the memory store), when this is the
        last engine using the app's data, every session ends now and every deletion
        callback runs with reason ``shutdown`` (engines still using the data keep it).
        With any store, every registry object this engine holds is cleaned up (they are
        process-local).
        Call it after the host has stopped serving requests. Calling it twice does
        nothing.
        """
        if self._shut:
            return
        self._shut = True
        with self._subscribe_lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
        self._run_ended(self._ns.shutdown())
        for hook in self._shutdown_hooks:
            try:
                hook()
            except Exception:
                logger.exception("shutdown hook %s raised", _qualname(hook))
