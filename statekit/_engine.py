"""The state engine: sessions, lifetimes, reaping, events and listeners.

Locking: per-session locks (``_locks.py``) serialize the events of one session; the
store guards its own data. No user code (listeners, callbacks, factories) runs under
the store's lock; listeners of an event run under that event's session lock, because
they are part of the event, and deletion callbacks run after every lock is released.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from ._changes import Change, judge
from ._clock import Clock, monotonic, wall
from ._copying import Sealed, open_value
from ._events import Event, EventResult, ListenerFailure
from ._locks import SessionLocks
from ._states import (
    MISSING,
    GlobalState,
    SessionState,
    State,
    check_name,
    check_seconds,
    to_stored,
)
from .exceptions import (
    ChangeLoopError,
    EngineClosed,
    InvalidDeclaration,
    SessionExpired,
    SessionNotFound,
    StateError,
)
from .stores.base import DeleteReason, Ended, Gone, Loaded, Store
from .stores.memory import MemoryStore

__all__ = ["StateEngine"]

logger = logging.getLogger("statekit")

T = TypeVar("T")

#: How many rounds of change listeners may follow one event.
MAX_CASCADE = 16
#: How many expired entries one ordinary operation reaps at most.
REAP_BATCH = 8
#: Session ids are this many random bytes (192 bits), URL-safe base64 encoded.
SID_BYTES = 24
_MAX_SID_LENGTH = 256


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
    ) -> None:
        self.app = check_name(app, "app")
        self.idle_ttl = check_seconds(idle_ttl, "idle_ttl")
        self.closed_ttl = check_seconds(closed_ttl, "closed_ttl")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InvalidDeclaration(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.store: Store = MemoryStore() if store is None else store
        self.clock: Clock = (
            clock if clock is not None else wall if self.store.shared else monotonic
        )
        self._ns = self.store.namespace(self.app)
        self._locks = SessionLocks()
        self._states: dict[str, State[Any]] = {}
        self._session_states: dict[str, SessionState[Any]] = {}
        self._end_hooks: tuple[Callable[[str, DeleteReason], object], ...] = ()
        self._shut = False

    def __repr__(self) -> str:
        return f"StateEngine(app={self.app!r}, store={type(self.store).__name__})"

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

    def _declare(self, state: State[Any]) -> None:
        if state.name in self._states:
            raise InvalidDeclaration(
                f"a state named {state.name!r} is already declared on this engine "
                f"(app {self.app!r}); state names must be unique"
            )
        self._states[state.name] = state
        if isinstance(state, SessionState):
            self._session_states[state.name] = state

    def _on_session_end(self, hook: Callable[[str, DeleteReason], object]) -> None:
        """Run ``hook(sid, reason)`` once when a session closes or ends without closing."""
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
        sid = secrets.token_urlsafe(SID_BYTES)
        evicted = self._ns.create_session(
            sid, now=now, deadline=now + self.idle_ttl, capacity=self.capacity
        )
        self._run_ended(evicted)
        self._reap_some(now)
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
        outcome = self._ns.load_session(sid, now=self.clock(), touch_until=None)
        if isinstance(outcome, Loaded):
            self._run_ended(outcome.expired)
            return True
        if outcome is not None and outcome.ended is not None:
            self._run_ended((outcome.ended,))
        return False

    @staticmethod
    def _check_sid(sid: object) -> str:
        if not isinstance(sid, str):
            raise SessionNotFound(sid, f"a session id is a str, got {type(sid).__name__}")
        if not sid or len(sid) > _MAX_SID_LENGTH:
            raise SessionNotFound(sid, f"a session id has 1 to {_MAX_SID_LENGTH} characters")
        return sid

    def _load(self, sid: str, now: float, pending: list[Ended]) -> Loaded:
        """Load a session or raise why not; callbacks due are appended to ``pending``."""
        outcome = self._ns.load_session(sid, now=now, touch_until=now + self.idle_ttl)
        if isinstance(outcome, Loaded):
            pending.extend(outcome.expired)
            return outcome
        if outcome is None:
            raise SessionNotFound(sid)
        if outcome.ended is not None:
            pending.append(outcome.ended)
        raise SessionExpired(sid, outcome.reason.value, max(0.0, now - outcome.at))

    # -- events ------------------------------------------------------------------

    def event(self, sid: str) -> Event:
        """One user action on session ``sid``: ``with engine.event(sid) as ev: ...``.

        Entering the block waits for other events of the same session and loads it.

        Raises (on entering):
            SessionNotFound: the id was not issued by this engine.
            SessionExpired: the session has ended.
            UsageError: an event of this session is already open in this thread/task.
        """
        self._check_sid(sid)
        return Event(self, sid)

    def aevent(self, sid: str) -> Event:
        """The async form of :meth:`event`: ``async with engine.aevent(sid) as ev: ...``.

        Waiting for the session's other events does not block the event loop.
        """
        return self.event(sid)

    def _begin(self, ev: Event) -> None:
        self._check_usable()
        if ev._started:
            raise StateError("an Event can be entered only once; open a new one")
        ev._started = True
        self._locks.acquire(ev.sid)
        self._load_into(ev)

    async def _abegin(self, ev: Event) -> None:
        self._check_usable()
        if ev._started:
            raise StateError("an Event can be entered only once; open a new one")
        ev._started = True
        await self._locks.aacquire(ev.sid)
        self._load_into(ev)

    def _load_into(self, ev: Event) -> None:
        """Load the session into an event whose lock is held; release it on failure."""
        ev.now = self.clock()
        try:
            ev._loaded = self._load(ev.sid, ev.now, ev._pending)
        except BaseException:
            self._locks.release(ev.sid)
            self._run_ended(ev._pending)
            raise
        ev._active = True

    def _end(self, ev: Event, *, failed: bool) -> None:
        """Commit (unless the block failed), run listeners, release, run callbacks."""
        ev._active = False
        loop_error: ChangeLoopError | None = None
        try:
            if not failed:
                loop_error = self._commit_with_listeners(ev)
        finally:
            self._locks.release(ev.sid)
            self._run_ended(ev._pending)
            self._reap_some(ev.now)
        if loop_error is not None:
            raise loop_error

    def _commit(self, ev: Event) -> list[SessionState[Any]]:
        """Write an event's changes in one store commit; return the states that changed."""
        writes, changed = ev._collect()
        if writes:
            assert ev._loaded is not None
            ttl_deadlines = {
                name: ev.now + ttl
                for name in writes
                if (ttl := self._session_states[name].ttl) is not None
            }
            self._ns.commit(
                ev.sid,
                version=ev._loaded.version,
                writes=writes,
                ttl_deadlines=ttl_deadlines,
                now=ev.now,
            )
        return changed

    def _commit_with_listeners(self, ev: Event) -> ChangeLoopError | None:
        """Commit the event, then run rounds of listeners, each in its own event."""
        changed = self._commit(ev)
        all_changed = {state.name for state in changed}
        outputs = dict(ev._outputs)
        errors: list[ListenerFailure] = []
        loop_error: ChangeLoopError | None = None
        pending = [state for state in changed if state._listeners]
        rounds = 0
        while pending:
            rounds += 1
            if rounds > MAX_CASCADE:
                loop_error = ChangeLoopError(MAX_CASCADE, tuple(s.name for s in pending))
                break
            next_round: dict[SessionState[Any], None] = {}
            for state in pending:
                for listener in state._listeners:
                    sub = Event(self, ev.sid)
                    sub._started = True
                    sub.now = ev.now
                    sub._loaded = self._load(ev.sid, ev.now, ev._pending)
                    sub._active = True
                    try:
                        listener(sub, sub[state])
                        sub._active = False
                        sub_changed = self._commit(sub)
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
                    outputs.update(sub._outputs)
                    for changed_state in sub_changed:
                        all_changed.add(changed_state.name)
                        if changed_state._listeners:
                            next_round[changed_state] = None
            pending = list(next_round)
        ev.result = EventResult(
            sid=ev.sid,
            changed=frozenset(all_changed),
            outputs=outputs,
            errors=tuple(errors),
        )
        return loop_error

    def _peek(self, sid: str, state: SessionState[T]) -> T:
        self._check_usable()
        self._check_sid(sid)
        pending: list[Ended] = []
        now = self.clock()
        try:
            loaded = self._load(sid, now, pending)
        finally:
            self._run_ended(pending)
        stored = loaded.values.get(state.name, MISSING)
        if stored is MISSING:
            return state.new_value()
        value: T = open_value(stored)
        return value

    # -- globals -----------------------------------------------------------------

    def _global_get(self, state: GlobalState[T]) -> T:
        self._check_usable()
        found = self._ns.global_get(state.name)
        value: T = open_value(state._default if found is None else found[0])
        return value

    def _global_update(self, state: GlobalState[T], fn: Callable[[T], T]) -> T:
        self._check_usable()
        while True:
            found = self._ns.global_get(state.name)
            old, version = (state._default, None) if found is None else found
            new = fn(open_value(old))
            verdict, image = judge(old, new)
            stored = to_stored(state.name, new, image)
            if self._ns.global_cas(state.name, version=version, value=stored) is not None:
                break
        if verdict is Change.CHANGED:
            self._fire_global(state, stored)
        return new

    def _global_increment(self, state: GlobalState[T], n: int | float) -> T:
        self._check_usable()
        default = state._default
        for what, number in (("default", default), ("increment", n)):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(
                    f"increment() of global state {state.name!r} needs numbers, but its "
                    f"{what} is a {type(number).__name__}; use update(fn) instead"
                )
        value: T = self._ns.global_add(state.name, n, default=default)
        if n:
            self._fire_global(state, value)
        return value

    def _fire_global(self, state: GlobalState[Any], value: Any) -> None:
        for listener in state._listeners:
            try:
                listener(open_value(value))
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
        ended = self._ns.reap(now=now, limit=REAP_BATCH)
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
                if type(value) is Sealed:
                    value = value.open()
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

    def _run_end_hooks(self, sid: str, reason: DeleteReason) -> None:
        for hook in self._end_hooks:
            try:
                hook(sid, reason)
            except Exception:
                logger.exception("session-end hook %s raised", _qualname(hook))

    def shutdown(self) -> None:
        """Stop the engine: later calls raise :class:`EngineClosed`.

        With a store that dies with the process (the memory store), every session ends
        now and every deletion callback runs with reason ``shutdown``. Call it after the
        host has stopped serving requests. Calling it twice does nothing.
        """
        if self._shut:
            return
        self._shut = True
        self._run_ended(self._ns.shutdown())
