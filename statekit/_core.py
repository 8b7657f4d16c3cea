"""The engine's shared context: its settings, store, declarations and hooks, and what
every part of it does the same way — checking it is usable, driving steps without
blocking the event loop, reading a load's answer, peeking at a value, running the
callbacks of what ended, reaping (a few entries on the way, or all that are due).

One :class:`Core` per engine. The engine's parts (entering and leaving sessions,
committing, notices) each hold it; none of them holds another's internals.

Locking: no user code runs under a lock here; callbacks run after every lock is
released. The hook tuples are replaced whole under ``hooks_lock`` and read without it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from . import _fork
from ._checks import USER_PREFIX, check_sid, qualname
from ._clock import Clock
from ._metrics import WARN_EVERY, Meter
from ._states import MISSING, SessionState
from ._steps import (
    CloseSession,
    CreateSession,
    LoadSession,
    Peek,
    Reap,
    Shutdown,
    Steps,
    StoreCall,
    acall,
    adrive,
    ask,
    drive,
)
from ._values import ValuePolicy, unreadable
from .exceptions import (
    CodecError,
    EngineClosed,
    SessionExpired,
    SessionNotFound,
    StoreUnavailable,
    UsageError,
)
from .stores.base import (
    AsyncStoreNamespace,
    Busy,
    DeleteReason,
    Ended,
    Gone,
    Loaded,
    Store,
    StoreNamespace,
)

if TYPE_CHECKING:
    from ._registry import SessionRegistry
    from ._states import SessionState, State

__all__ = ["LOCAL_REAP_QUIET", "REAP_BATCH", "SHARED_REAP_INTERVAL", "Core", "Settings"]

logger = logging.getLogger("statekit")

R = TypeVar("R")

#: How many expired entries one ordinary operation reaps at most.
REAP_BATCH = 8
#: On a shared store, an engine reaps during ordinary operations at most this often.
SHARED_REAP_INTERVAL = 1.0
#: On a store of this process, seconds during which a look that found nothing is not
#: repeated.
LOCAL_REAP_QUIET = 0.001


class Settings:
    """An engine's settings, checked by the engine before it makes them."""

    __slots__ = (
        "app",
        "capacity",
        "closed_ttl",
        "idle_ttl",
        "lease_keep",
        "lease_ttl",
        "lease_wait",
        "user_idle_ttl",
        "warn_hold",
        "warn_size",
    )

    def __init__(
        self,
        *,
        app: str,
        idle_ttl: float,
        closed_ttl: float,
        capacity: int,
        lease_ttl: float,
        lease_wait: float,
        warn_hold: float | None = None,
        warn_size: int | None = None,
        lease_keep: float = 0.0,
        user_idle_ttl: float = 30 * 86_400,
    ) -> None:
        self.app = app
        self.user_idle_ttl = user_idle_ttl
        self.idle_ttl = idle_ttl
        self.closed_ttl = closed_ttl
        self.capacity = capacity
        self.lease_ttl = lease_ttl
        self.lease_wait = lease_wait
        self.warn_hold = warn_hold
        self.warn_size = warn_size
        self.lease_keep = lease_keep


class Core:
    """What the parts of one engine share. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        ns: StoreNamespace,
        clock: Clock,
        values: ValuePolicy,
    ) -> None:
        self.settings = settings
        self.app = settings.app
        self.idle_ttl = settings.idle_ttl
        self.store = store
        self.ns = ns
        # The namespace's async methods, if it has them all (else a worker thread).
        self.async_ns = ns if isinstance(ns, AsyncStoreNamespace) else None
        self.shared = store.shared
        self.clock = clock
        self.values = values
        # What the engine counts and measures (engine.stats()), and its warnings.
        self.meter = Meter(clock, warn_hold=settings.warn_hold, warn_size=settings.warn_size)
        # Declarations by name; the session states with a ttl of their own.
        self.states: dict[str, State[Any]] = {}
        self.session_states: dict[str, SessionState[Any]] = {}
        self.user_states: dict[str, SessionState[Any]] = {}
        self.ttl_states: dict[str, float] = {}
        self.registries: dict[str, SessionRegistry[Any]] = {}
        #: Told the id of each user record that ended (set by the engine's users).
        self.user_ended: Callable[[str], None] | None = None
        # Hooks, each tuple replaced whole under hooks_lock.
        self.hooks_lock = threading.Lock()
        self.end_hooks: tuple[Callable[[str, DeleteReason], object], ...] = ()
        self.open_hooks: tuple[Callable[[str], object], ...] = ()
        self.shutdown_hooks: tuple[Callable[[], object], ...] = ()
        self.resync_hooks: tuple[Callable[[], object], ...] = ()
        self.shut = False
        self._last_reap = float("-inf")
        # On a store of this process, when the next reaping look is due.
        self.next_local_look = float("-inf")
        # When each state's unreadable value was last logged (at most once a minute).
        self._warned: dict[str, float] = {}
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        _fork.free_lock(self.hooks_lock)
        self.meter.after_fork()

    def add_hook(self, kind: str, hook: Callable[..., object]) -> None:
        """Add a hook of ``kind`` (``end``, ``open``, ``shutdown``, ``resync``)."""
        name = f"{kind}_hooks"
        with self.hooks_lock:
            setattr(self, name, (*getattr(self, name), hook))

    def check_usable(self) -> None:
        """Raise :class:`EngineClosed` once the engine was shut down."""
        if self.shut:
            raise EngineClosed(self.app)

    # -- steps -------------------------------------------------------------------------

    async def adrive(self, steps: Steps[R]) -> R:
        """Run steps without blocking the event loop (see :func:`~statekit._steps.adrive`):
        what they do between two store calls (callbacks, hooks) runs on the loop's
        thread."""
        return await adrive(
            steps, self.ns, async_ns=self.async_ns, shared=self.shared, salvage=self.salvage_call
        )

    async def acall(self, call: StoreCall[R]) -> R:
        """One store call without blocking the event loop, as :meth:`adrive` runs each
        (for the engine's direct calls, outside steps)."""
        return await acall(
            call, self.ns, async_ns=self.async_ns, shared=self.shared, salvage=self.salvage_call
        )

    # -- loads -------------------------------------------------------------------------

    def loaded_or_raise(
        self, sid: str, now: float, outcome: Loaded | Gone | Busy | None, pending: list[Ended]
    ) -> Loaded:
        """The session a load answered, or why not (raised); what the load removed goes
        to ``pending``."""
        if isinstance(outcome, Loaded):
            pending.extend(outcome.expired)
            return outcome
        if outcome is None:
            self.check_usable()  # a shutdown meanwhile emptied the store: say so
            raise SessionNotFound(sid)
        if isinstance(outcome, Busy):  # only answered to a lease request
            raise UsageError(
                f"{self.store!r} broke the store protocol: it answered Busy to a load "
                "without a lease"
            )
        if outcome.ended is not None:
            pending.append(outcome.ended)
        raise SessionExpired(sid, outcome.reason.value, max(0.0, now - outcome.at))

    def open_steps(self, sid: str, *, touch: bool) -> Steps[None]:
        """Load a session (no lease) and raise unless it is open, not closed."""
        check_sid(sid)
        pending: list[Ended] = []
        now = self.clock()
        try:
            outcome = yield from ask(
                LoadSession(sid=sid, now=now, touch_until=now + self.idle_ttl if touch else None)
            )
            loaded = self.loaded_or_raise(sid, now, outcome, pending)
        finally:
            if pending:
                self.run_ended(pending)
        if loaded.closed:
            raise SessionExpired(sid, DeleteReason.CLOSED.value)

    def peek_steps(self, sid: str, state: SessionState[Any]) -> Steps[Any]:
        """A session's value read from outside an event (one store call, touching the
        session), or a fresh initial value if it has none yet."""
        if self.shut:
            raise EngineClosed(self.app)
        if sid.__class__ is not str or self.shared or sid[:2] == USER_PREFIX:
            check_sid(sid)  # a store of this process finds only the ids it issued
        now = self.clock()
        outcome = yield from ask(Peek(sid, state.name, now, now + self.idle_ttl))
        if type(outcome) is Loaded and not outcome.expired:  # the common case, inline
            loaded = outcome
        else:
            if outcome is None:
                check_sid(sid)  # a malformed id: say what is wrong with it
            pending: list[Ended] = []
            try:
                loaded = self.loaded_or_raise(sid, now, outcome, pending)
            finally:
                if pending:
                    self.run_ended(pending)
        stored = loaded.values.get(state.name, MISSING)
        if stored is MISSING:
            return state.new_value()
        return self.open_value(state, stored)

    def peek_user_steps(self, record: str, state: SessionState[Any]) -> Steps[Any]:
        """A user's value read from outside an event (touching the user's record), or a
        fresh initial value if the user has none (or no record) yet."""
        self.check_usable()
        now = self.clock()
        outcome = yield from ask(Peek(record, state.name, now, now + self.settings.user_idle_ttl))
        self.salvage(outcome)
        if not isinstance(outcome, Loaded):  # no record yet, or it expired: no value
            return state.new_value()
        stored = outcome.values.get(state.name, MISSING)
        if stored is MISSING:
            return state.new_value()
        return self.open_value(state, stored)

    def salvage(self, outcome: object) -> None:
        """Run the callbacks of what a load removed (it is their only caller)."""
        if isinstance(outcome, Loaded):
            self.run_ended(outcome.expired)
        elif isinstance(outcome, Gone) and outcome.ended is not None:
            self.run_ended((outcome.ended,))

    def salvage_call(self, call: StoreCall[Any], answer: Any) -> None:
        """Run the callbacks of what a store call removed or ended, when its caller was
        cancelled before it could take the answer: a close's hooks, an open's evicted
        sessions, what a reap, a load or a peek removed."""
        if isinstance(call, (CreateSession, Reap, Shutdown)):
            self.run_ended(answer)
        elif isinstance(call, CloseSession):
            if answer is True:
                self.run_end_hooks(call.sid, DeleteReason.CLOSED)
            else:
                self.salvage(answer)
        else:
            self.salvage(answer)

    def open_value(self, state: State[Any], stored: Any) -> Any:
        """A private copy of ``state``'s stored value, migrated if an older version
        stored it; the default (the reason logged) if it cannot be read or migrated.

        Raises:
            CodecError: naming the state, when the stored value cannot be read or
                migrated and the state is strict, or was stored by a newer version.
        """
        return self.read_value(state, stored)[0]

    def read_value(self, state: State[Any], stored: Any) -> tuple[Any, Any, str | None]:
        """``state``'s stored value: ``(value, rewrite, problem)``. ``rewrite`` is the
        stored form to write back (the value was migrated, or is the default in place
        of one that could not be read), else None; ``problem`` says why the default
        was read, else None.

        Raises:
            CodecError: as :meth:`open_value`.
        """
        values = self.values
        try:
            version = values.version_of(stored)
            if version == state.version or version == 0:
                return values.open(stored), None, None
        except Exception as exc:
            return self._unreadable(state, exc, "cannot be read")
        if version > state.version:
            raise self._newer(state, version)
        try:
            assert state.migrate is not None  # a state above version 1 has one
            value = state.migrate(version, values.open_stored(stored))
            return value, values.store(state.name, value), None
        except Exception as exc:
            return self._unreadable(state, exc, f"cannot be migrated from version {version}")

    def check_writable(self, state: State[Any], stored: Any) -> None:
        """Raise if ``stored`` (about to be replaced without being read) was written by
        a newer version of the app: old code never overwrites what new code wrote.

        Raises:
            CodecError: as :meth:`open_value` for a newer version.
        """
        try:
            version = self.values.version_of(stored)
        except Exception:  # a damaged mark: replacing it is what helps
            return
        if version > state.version:
            raise self._newer(state, version)

    def _newer(self, state: State[Any], version: int) -> CodecError:
        return CodecError(
            f"the stored value of {state.kind} state {state.name!r} was written by "
            f"version {version} of the app, and this code declares version "
            f"{state.version}: it is left as it is; run the new code everywhere",
            state=state.name,
        )

    def _unreadable(self, state: State[Any], exc: Exception, why: str) -> tuple[Any, Any, str]:
        """The default in place of a stored value that ``why`` (or raise, if strict)."""
        error = unreadable(state.name, state.kind, exc)
        if state.strict:
            raise error from exc
        problem = f"the stored value {why} ({error.__cause__ or exc}); read as the default"
        now = time.monotonic()
        if now - self._warned.get(state.name, -math.inf) >= WARN_EVERY:
            self._warned[state.name] = now
            logger.warning("%s state %r: %s", state.kind, state.name, problem)
        value = state.new_value() if isinstance(state, SessionState) else state.default
        return value, self.values.store(state.name, value), problem

    def now_since(self, since: float) -> float:
        """The clock now, for an event that entered at ``since`` (never earlier than
        that; ``since`` if the clock raises)."""
        try:
            return max(since, self.clock())
        except Exception:
            return since

    def written_deadlines(self, since: float, writes: Mapping[str, Any]) -> dict[str, float]:
        """:meth:`ttl_deadlines` of values an event that entered at ``since`` writes
        now (a value's ttl runs from its write, the commit)."""
        return self.ttl_deadlines(self.now_since(since), writes) if self.ttl_states else {}

    def ttl_deadlines(self, now: float, writes: Mapping[str, Any]) -> dict[str, float]:
        """When the written values of states with a ttl of their own expire: ``now``
        is when they are written (the commit)."""
        ttls = self.ttl_states
        return {name: now + ttls[name] for name in writes if name in ttls} if ttls else {}

    # -- what ended --------------------------------------------------------------------

    def run_ended(self, ended: Iterable[Ended]) -> None:
        """Run the callbacks of removed sessions and values. Never raises."""
        for item in ended:
            user = item.sid.startswith(USER_PREFIX)  # a user's record
            if item.state is None and not user:
                self.meter.ended(item.reason)
            states = self.user_states if user else self.session_states
            for name, value in item.values.items():
                state = states.get(name)
                if state is None or not state.delete_callbacks:
                    continue
                try:
                    value, _, problem = self.read_value(state, value)
                except Exception:
                    logger.exception("stored value of state %r could not be read", name)
                    continue
                if problem is not None:  # unreadable (logged): no value to give
                    continue
                for callback in state.delete_callbacks:
                    try:
                        callback(value, item.reason)
                    except Exception:
                        logger.exception(
                            "on_delete callback %s of state %r raised (reason %s)",
                            qualname(callback),
                            name,
                            item.reason,
                        )
            if item.state is None and not item.was_closed:
                self.run_end_hooks(item.sid, item.reason)

    def run_end_hooks(self, sid: str, reason: DeleteReason) -> None:
        if sid.startswith(USER_PREFIX):  # a user's record: no session ended
            if self.user_ended is not None:
                self.user_ended(sid)
            return
        for hook in self.end_hooks:
            try:
                hook(sid, reason)
            except Exception:
                logger.exception("session-end hook %s raised", qualname(hook))

    def reap_steps(self, limit: int | None) -> Steps[int]:
        """Reap every due entry (at most ``limit``), running callbacks; how many.

        Raises:
            TypeError, ValueError: ``limit`` is neither None nor an int of at least 0.
        """
        self.check_usable()
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise TypeError(f"reap(limit=...) takes an int or None, got {limit!r}")
            if limit < 0:
                raise ValueError(f"reap(limit=...) cannot be negative, got {limit}")
        done = 0
        now = self.clock()
        while limit is None or done < limit:
            batch = 1000 if limit is None else min(1000, limit - done)
            ended = yield from ask(Reap(now=now, limit=batch))
            self.run_ended(ended)
            done += len(ended)
            if len(ended) < batch:
                break
        return done

    def look_due(self, now: float) -> bool:
        """Whether an ordinary operation at ``now`` should reap a few due entries on its
        way (:meth:`look`); a yes counts as the look on a shared store.

        On a shared store each look costs a round trip, so an engine looks at most once
        per ``SHARED_REAP_INTERVAL`` seconds there; a store of this process is looked at
        every time, except within a millisecond of a look that found nothing (an entry
        falling due meanwhile is reaped a little later, and a load refuses it anyway).
        """
        if self.shared:
            if now - self._last_reap < SHARED_REAP_INTERVAL:
                return False
            self._last_reap = now
            return True
        return now >= self.next_local_look

    def look(self, now: float) -> Steps[None]:
        """Reap a few due entries, as part of an ordinary operation (when
        :meth:`look_due`). A failing shared store is not this operation's concern:
        the next look retries."""
        try:
            ended = yield from ask(Reap(now=now, limit=REAP_BATCH))
        except StoreUnavailable:
            if not self.shared:
                raise
            return
        if ended:
            self.run_ended(ended)
        elif not self.shared:
            self.next_local_look = now + LOCAL_REAP_QUIET

    def reap_some(self, now: float) -> None:
        """:meth:`look`, if due, with the store's blocking methods."""
        if self.look_due(now):
            drive(self.look(now), self.ns)

    def end_steps(self) -> Steps[None]:
        """The end of this engine's use of its store (already marked shut): what the
        store ends with it (a memory store's data, with its last engine) runs its
        callbacks, then the shutdown hooks."""
        ended = yield from ask(Shutdown())
        self.run_ended(ended)
        run_hooks(self.shutdown_hooks, "shutdown")


def run_hooks(hooks: Iterable[Callable[..., object]], what: str, *args: Any) -> None:
    """Call each hook with ``args``; one that raises is logged and the rest go on."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            logger.exception("%s hook %s raised", what, qualname(hook))
