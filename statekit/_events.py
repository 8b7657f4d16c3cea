"""Events: one user action on one session.

An :class:`Event` is what the host's code holds: ``ev[state]`` reads, assignments,
outputs. Its working state — the session as loaded, the values read (each a private
copy, so a failed event cannot have mutated anything stored) and written, the lease,
what ended meanwhile — is declared once, as the record :class:`EventState` that Event
extends: the engine's entry and commit code fill it in and read it, and touch nothing
else of an event. (One object rather than a record beside a facade: an event is made
for every request, and a second object cost a tenth of the fastest event.) This module
keeps the working set and decides, with the change detector, what to write
(:meth:`EventState.collect`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import attrs
from typing_extensions import Self

from ._browser import TokenProblem
from ._changes import CHANGED, SAME, walk
from ._codec import JSONCodec
from ._host import Host
from ._registry import SessionRegistry
from ._states import MISSING, BrowserState, GlobalState, SessionState, State, UserState
from .exceptions import SessionNotInitialized, UsageError, WrongEngine, redact
from .stores.base import Ended, SessionData

_JSON = JSONCodec()

if TYPE_CHECKING:
    from ._engine import StateEngine

__all__ = [
    "BrowserIO",
    "Changeable",
    "Collected",
    "Event",
    "EventResult",
    "EventState",
    "ListenerFailure",
    "RenewingEvent",
]

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class ListenerFailure:
    """A change listener that raised. Its writes were discarded; the event stands.

    Attributes:
        state: the name of the state whose listener raised.
        listener: the listener's qualified name.
        error: the exception it raised.
    """

    state: str
    listener: str
    error: Exception


@attrs.frozen(kw_only=True)
class EventResult:
    """What an event did: ``ev.result`` once the ``with`` block ended without an
    exception.

    Attributes:
        sid: the session.
        changed: names of the states whose value changed (by the event or its
            listeners).
        outputs: the outputs emitted with :meth:`Event.emit`, by name (last wins).
        errors: listeners that raised.
        browser: new browser-state tokens by storage key, for the host to send back
            (``statekit.js`` stores them).
        browser_problems: for each browser state whose token was refused, why (the
            state then read as its default).
        value_problems: for each session state whose stored value could not be read
            or migrated, why (the state then read as its default, which the event's
            commit wrote in its place).
    """

    sid: str = attrs.field(repr=redact)
    changed: frozenset[str]
    outputs: Mapping[str, Any]
    errors: tuple[ListenerFailure, ...] = ()
    browser: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    browser_problems: Mapping[str, TokenProblem] = attrs.field(factory=dict)
    value_problems: Mapping[str, str] = attrs.field(factory=dict)


class _NotLoaded:
    """An event's session before it is entered: no values."""

    sid = ""
    version = 0
    closed = False
    values: Mapping[str, Any] = MappingProxyType({})


NOT_LOADED: SessionData = _NotLoaded()

Changeable: TypeAlias = "SessionState[Any] | BrowserState[Any]"
Collected: TypeAlias = "tuple[dict[str, Any], dict[str, str] | None, list[Changeable]]"
"""What :meth:`EventState.collect` found: writes, browser tokens, changed states."""


class BrowserIO:
    """An event's browser tokens: those the page sent (``tokens``, shared with the
    event's listener events, so that they see the tokens their event made), the host's
    binding, the tokens made (``out``) and the refused ones (``problems``)."""

    __slots__ = ("bind", "out", "problems", "tokens")

    def __init__(self, tokens: dict[str, str | None], bind: str) -> None:
        self.tokens = tokens
        self.bind = bind
        self.out: dict[str, str] = {}
        self.problems: dict[str, TokenProblem] = {}


class EventState:
    """The working state of one event: what the engine's entry and commit code fill in
    and read, and what :class:`Event` reads and writes for the host's code. Not for
    the host's code itself: it uses Event's methods.

    Attributes:
        engine: the engine the event belongs to (states of another are refused).
        host: that engine's :class:`~statekit._host.Host`.
        sid: the session.
        now: the engine's clock when the event entered its session.
        started: the event was entered (it can be entered once).
        active: inside the ``with`` block: states may be read and written.
        loaded: the session as loaded (values, version), until the event ends.
        closed: whether the session was closed when the event entered it.
        work: the working value of each session and browser state touched.
        before: each of those states' stored form at the start (the snapshot the
            change detector compares with; a browser state's JSON encoding).
        fresh: states to write even if unchanged (a value made on first read; a
            browser token of a retired key), or None.
        global_reads: globals read (a snapshot per event), or None.
        emitted: outputs emitted, or None.
        pending: what ended meanwhile (removed sessions and values), whose callbacks
            run once the session is given back.
        problems: for each session state whose stored value read as the default (it
            could not be read or migrated), why; or None.
        lease: on a shared store, the lease held (its token), if any.
        lease_until: when that lease lapses (engine clock), as last written.
        on_kept: whether the event runs on a lease this engine kept (no load): the
            store marks the lease kept, so that other processes ask for it.
        deadline: the session's deadline as the event's load (or the commit before,
            for an event on a kept lease) slid it.
        renew: whether the engine renews the lease while the event runs (a class
            attribute: True for a :class:`RenewingEvent`, so that an event costs no
            more for it).
        user: the id of the user the event was opened for (``user=``), or None.
        user_part: the event's hold on that user's record (an event of its own on the
            record, entered after the session), once entered.
        user_writes: what the user part's ``collect()`` found, set as the event leaves
            when it writes to the user: committed with the session's writes.
        browser: the browser tokens in and out, or None.
        changed: set when the event ends well: the states it changed.
        done: the event's result, made when first asked for (or by listener rounds).
    """

    renew = False
    #: None but for an event's hold on a user's record: the record's idle ttl.
    idle_ttl: float | None = None

    __slots__ = (
        "active",
        "before",
        "browser",
        "changed",
        "closed",
        "deadline",
        "done",
        "emitted",
        "engine",
        "fresh",
        "global_reads",
        "host",
        "lease",
        "lease_until",
        "loaded",
        "lost",
        "now",
        "on_kept",
        "pending",
        "problems",
        "sid",
        "started",
        "user",
        "user_part",
        "user_writes",
        "waited",
        "work",
    )

    def __init__(
        self, engine: StateEngine, host: Host, sid: str, browser: BrowserIO | None = None
    ) -> None:
        self.engine = engine
        self.host = host
        self.sid = sid
        self.browser = browser
        self.active = False
        self.started = False
        self.lost = False  # its lost lease or conflict was counted (once per event)
        self.waited = 0.0  # a user's event: how long it waited (one sample, see waits)
        self.loaded: SessionData = NOT_LOADED
        self.closed = False
        self.work: dict[Changeable, Any] = {}
        self.before: dict[Changeable, Any] = {}
        self.fresh: set[Changeable] | None = None
        self.global_reads: dict[GlobalState[Any], Any] | None = None
        self.emitted: dict[str, Any] | None = None
        self.pending: list[Ended] = []
        self.problems: dict[str, str] | None = None
        self.lease: str | None = None
        self.lease_until = 0.0
        self.on_kept = False
        self.deadline = 0.0
        self.changed: list[Changeable] | None = None
        self.done: EventResult | None = None
        self.now = 0.0
        self.user: str | None = None
        self.user_part: EventState | None = None
        self.user_writes: Collected | None = None

    def browser_io(self) -> BrowserIO:
        """The event's browser tokens, made empty on first use."""
        if self.browser is None:
            self.browser = BrowserIO({}, "")
        return self.browser

    def hand_out(self, tokens: dict[str, str] | None) -> None:
        """Hand the browser tokens made by a commit that succeeded to the event (and to
        the listener events after it)."""
        if tokens:
            browser = self.browser_io()
            browser.tokens.update(tokens)
            browser.out.update(tokens)

    def mark_fresh(self, state: Changeable) -> None:
        if self.fresh is None:
            self.fresh = set()
        self.fresh.add(state)

    def collect(self) -> Collected:
        """What to write, which browser tokens to send (None: none), and which states
        changed, per the change detector.

        A value read for the first time is written even when unchanged, so that a
        factory's result stays the session's value; a browser value read from a token of
        a retired key gets a new token.
        """
        writes: dict[str, Any] = {}
        tokens: dict[str, str] | None = None
        changed: list[Changeable] = []
        fresh = self.fresh
        host = self.host
        values = host.values
        for state, work in self.work.items():
            old = self.before[state]
            if state.__class__ is SessionState or not isinstance(state, BrowserState):
                # A value still identical to its stored form (an atom read and not
                # reassigned) is the same; an exact atom (an int, say) is judged here.
                if work is not old:
                    if type(work) in values.exact_atoms:
                        if type(old) is not type(work) or old != work:
                            writes[state.name] = work
                            changed.append(state)
                            if work.__class__ is str or work.__class__ is bytes:
                                host.meter.sized(self.sid, state.name, work)  # may be large
                            continue
                    else:
                        verdict, stored = values.judge(state.name, old, work)
                        if verdict is not SAME:
                            writes[state.name] = stored
                            host.meter.sized(self.sid, state.name, stored)
                            if verdict is CHANGED:
                                changed.append(state)
                            continue
                if fresh is not None and state in fresh:
                    writes[state.name] = old
                continue
            encoded = state.canonical(work)
            verdict = SAME if encoded == old else walk(_JSON.decode(old), work)
            if verdict is CHANGED:
                changed.append(state)
            if verdict is not SAME or (fresh is not None and state in fresh):
                if tokens is None:
                    tokens = {}
                tokens[state.storage_key] = state.encode(work, bind=self.browser_io().bind)
        return writes, tokens, changed


def _materialize(s: EventState, state: Changeable, *, read: bool = True) -> Any:
    """Take a state into the event's working set; return its working value."""
    if isinstance(state, BrowserState):
        browser = s.browser_io()
        decoded = state.decode(browser.tokens.get(state.storage_key), bind=browser.bind)
        if decoded.problem is not None:
            browser.problems[state.name] = decoded.problem
        work = decoded.value
        s.before[state] = state.canonical(work)
        if decoded.reencode:
            s.mark_fresh(state)
    else:
        stored = s.loaded.values.get(state.name, MISSING)
        if stored is not MISSING:
            if not read:
                s.host.check_writable(state, stored)
                s.before[state] = stored
                return MISSING
            work, rewrite, problem = s.host.read_value(state, stored)
            if rewrite is None:
                s.before[state] = stored
            else:  # migrated, or the default in place of what could not be read
                s.before[state] = rewrite
                s.mark_fresh(state)
                if problem is not None:
                    if s.problems is None:
                        s.problems = {}
                    s.problems[state.name] = problem
        else:
            work = state.new_value()
            s.before[state] = s.host.values.store(state.name, work)
            s.mark_fresh(state)
    s.work[state] = work
    return work


def _check(s: EventState, state: object) -> None:
    if not s.active:
        raise UsageError(
            "this event is not open: use its states inside the "
            "'with engine.event(sid) as ev:' block"
        )
    # A registry is not a State: it holds objects, not values.
    if not isinstance(state, (State, SessionRegistry)):
        raise UsageError(
            "ev[...] takes a state or a registry declared on the engine, "
            f"got {type(state).__name__}"
        )
    if state.engine is not s.engine:
        raise WrongEngine(state.name, state.engine.app, s.engine.app)


def _user_part(s: EventState, state: State[Any]) -> EventState:
    """The event's hold on its user's record, for reading or writing ``state``."""
    part = s.user_part
    if part is None:
        raise UsageError(
            f"user state {state.name!r} needs an event opened for a user: "
            "engine.event(sid, user=user_id), with the id of the user the host "
            "authenticated"
            + (" (a change listener's event has no user)" if s.user is not None else "")
        )
    return part


def _no_result(ev: EventState) -> str:
    """Why an event has no result (yet)."""
    if not ev.started:
        return (
            "this event has no result yet: its 'with' block was not entered; read "
            "ev.result after the block ends"
        )
    if ev.active:
        return (
            "this event has no result yet: its 'with' block is still running; read "
            "ev.result after the block ends"
        )
    return (
        "this event failed (its block, its entering or its commit raised), so nothing "
        "of it was committed and it has no result"
    )


class Event(EventState):
    """One user action on one session; use as ``with engine.event(sid) as ev:``.

    Inside the block, ``ev[state]`` reads a value and ``ev[state] = value`` writes one;
    ``ev[registry]`` is the session's object in a :class:`~statekit.SessionRegistry`
    (the object itself, not a copy); :meth:`emit` records outputs for the host. When the
    block ends without an exception, what changed is committed all-or-nothing and change
    listeners fire; when it raises, nothing is written. Events of one session run one at
    a time; events of different sessions run in parallel.

    Attributes:
        sid: the session.
        now: the engine's clock when the event entered its session.
        closed: whether the session was closed when the event entered it (a closed
            session accepts events until its grace ends).

    Its other attributes are its working state (:class:`EventState`), the engine's.

    An event belongs to the thread or task that opened it and is not thread-safe.
    Values read through it are private copies: mutate them freely inside the block,
    and do not keep them for later (write them back through another event).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        shown = "open" if self.active else "done" if self.started else "new"
        return f"<Event session={redact(self.sid)} {shown}>"

    # -- context manager protocol (the engine does the work) ----------------------

    def __enter__(self) -> Self:
        self.host.enter(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.host.leave(self, exc_type is not None)

    async def __aenter__(self) -> Self:
        await self.host.aenter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.host.aleave(self, exc_type is not None)

    # -- what the host's code reads ------------------------------------------------

    @property
    def result(self) -> EventResult:
        """What the event did, once its block ended without an exception (and its
        commit succeeded).

        Raises:
            UsageError: the block has not ended yet (or was never entered), or the
                event failed — its block, its entering or its commit raised — so that
                nothing of it was committed and there is no result to read.
        """
        if self.done is None:
            if self.changed is None:
                raise UsageError(_no_result(self))
            browser = self.browser
            self.done = EventResult(
                sid=self.sid,
                changed=frozenset(state.name for state in self.changed),
                outputs=dict(self.emitted) if self.emitted else {},
                browser=dict(browser.out) if browser else {},
                browser_problems=dict(browser.problems) if browser else {},
                value_problems=dict(self.problems) if self.problems else {},
            )
        return self.done

    @property
    def outputs(self) -> Mapping[str, Any]:
        """The outputs emitted so far, and later ones, by name (a read-only view)."""
        if self.emitted is None:
            self.emitted = {}
        return MappingProxyType(self.emitted)

    # -- reading and writing -----------------------------------------------------

    def __getitem__(self, state: State[T] | SessionRegistry[T]) -> T:
        # The common case first: a session state of this engine, in an open event.
        if self.active and state.__class__ is SessionState and state.engine is self.engine:
            value: T = self.work.get(state, MISSING)
            if value is MISSING:
                value = _materialize(self, state)
            return value
        _check(self, state)
        if state.__class__ is UserState:
            part = _user_part(self, state)
            value = part.work.get(state, MISSING)
            if value is MISSING:
                value = _materialize(part, state)
            return value
        if isinstance(state, SessionRegistry):
            try:
                return state.get(self.sid)
            except SessionNotInitialized as exc:
                if self.closed:
                    raise SessionNotInitialized(state.name, self.sid, closed=True) from exc
                raise
        if isinstance(state, (SessionState, BrowserState)):
            value = self.work.get(state, MISSING)
            if value is MISSING:
                value = _materialize(self, state)
            return value
        assert isinstance(state, GlobalState)
        if self.global_reads is None:
            self.global_reads = {}
        if state not in self.global_reads:
            self.global_reads[state] = state.get()
        snapshot: T = self.global_reads[state]
        return snapshot

    def get(self, state: State[T] | SessionRegistry[T]) -> T:
        """Same as ``ev[state]``.

        Raises:
            SessionNotInitialized: for a registry without an object for this session.
        """
        return self[state]

    def __setitem__(self, state: SessionState[T] | BrowserState[T], value: T) -> None:
        if self.active and state.__class__ is SessionState and state.engine is self.engine:
            if state not in self.before:
                # Assigning needs no copy of the old value, and must work even when the
                # old value no longer decodes.
                stored = self.loaded.values.get(state.name, MISSING)
                if stored is MISSING:
                    _materialize(self, state)  # the initial value, written if unchanged
                else:
                    if stored.__class__ is bytes and stored[:1] == b"\x00":  # a version
                        self.host.check_writable(state, stored)
                    self.before[state] = stored
            self.work[state] = value
            return
        _check(self, state)
        if state.__class__ is UserState:
            part = _user_part(self, state)
            if state not in part.before:
                _materialize(part, state, read=False)
            part.work[state] = value
            return
        if isinstance(state, SessionRegistry):
            raise UsageError(
                f"registry {state.name!r} cannot be assigned in an event: its objects "
                "are made by registry.open(sid) and removed by registry.close(sid)"
            )
        if not isinstance(state, (SessionState, BrowserState)):
            raise UsageError(
                f"global state {state.name!r} cannot be assigned in an event: global "
                "writes are immediate and atomic, so call its set(), update() or "
                "increment()"
            )
        if state not in self.before:
            _materialize(self, state, read=False)
        self.work[state] = value

    def update(
        self,
        values: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (),
    ) -> None:
        """Assign several session states at once, like :meth:`dict.update`: from a
        mapping of state to value, or from (state, value) pairs."""
        items = values.items() if isinstance(values, Mapping) else values
        for state, value in items:
            self[state] = value

    def extend(self) -> None:
        """Renew the event's hold on its session for another ``lease_ttl`` seconds from
        now, for work that runs longer than the engine's ``lease_ttl``: call it
        between steps of long work (or open the event with ``renew=True``).

        On a shared store this renews the event's lease, fenced by its token as the
        commit is: once another event took the session (the lease lapsed before this
        call), it cannot be renewed. On the memory store, whose sessions are held by
        a lock of this process and never lapse, there is no lease to renew. On every
        store it also slides the session's idle deadline, as a read does: a session
        an event renews is in use, not idle.

        Raises:
            LeaseLost: the lease lapsed and another event took the session; nothing
                of this event was written and its commit would be refused.
            UsageError: the event is not open.
            StoreUnavailable: the store cannot be reached (the lease still runs until
                its end: try again).
        """
        if not self.active:
            raise UsageError("extend() needs an open event: call it inside its 'with' block")
        self.host.extend(self)

    async def aextend(self) -> None:
        """:meth:`extend` without blocking the event loop."""
        if not self.active:
            raise UsageError("aextend() needs an open event: call it inside its 'with' block")
        await self.host.aextend(self)

    def emit(self, name: str, value: Any) -> None:
        """Record an output for the host to render (for example a component's new value)."""
        if not self.active:
            raise UsageError("emit() needs an open event")
        if not isinstance(name, str):
            raise UsageError(f"output names are strings, got {type(name).__name__}")
        if self.emitted is None:
            self.emitted = {}
        self.emitted[name] = value


class RenewingEvent(Event):
    """An :class:`Event` whose lease the engine renews while it runs
    (``engine.event(sid, renew=True)``)."""

    __slots__ = ()

    renew = True
