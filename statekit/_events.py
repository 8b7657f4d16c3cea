"""Events: one user action on one session.

An :class:`Event` is the working set of one action: the values it read (each a private
copy, so a failed event cannot have mutated anything stored), the values it wrote, and
the outputs it emitted for the host to render. The engine opens it, commits it and
fires listeners; this module only keeps the working set and decides, with the change
detector, what to write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from ._browser import TokenProblem
from ._changes import CHANGED, SAME, _walk
from ._codec import JSONCodec
from ._registry import SessionRegistry
from ._states import MISSING, BrowserState, GlobalState, SessionState, State
from .exceptions import SessionNotInitialized, UsageError, WrongEngine, redact

_JSON = JSONCodec()

if TYPE_CHECKING:
    from ._engine import StateEngine
    from .stores.base import Ended, SessionData

__all__ = ["Event", "EventResult", "ListenerFailure"]

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
    """What an event did, available as ``ev.result`` once the ``with`` block ends.

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
    """

    sid: str = attrs.field(repr=redact)
    changed: frozenset[str]
    outputs: Mapping[str, Any]
    errors: tuple[ListenerFailure, ...] = ()
    browser: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    browser_problems: Mapping[str, TokenProblem] = attrs.field(factory=dict)


class _NotLoaded:
    """An event's session before it is entered: no values."""

    sid = ""
    version = 0
    closed = False
    values: Mapping[str, Any] = MappingProxyType({})


_NOT_LOADED = _NotLoaded()


class _BrowserIO:
    """An event's browser tokens: those the page sent (``tokens``, shared with the
    event's listener events, so that they see the tokens their event made), the host's
    binding, the tokens made (``out``) and the refused ones (``problems``)."""

    __slots__ = ("bind", "out", "problems", "tokens")

    def __init__(self, tokens: dict[str, str | None], bind: str) -> None:
        self.tokens = tokens
        self.bind = bind
        self.out: dict[str, str] = {}
        self.problems: dict[str, TokenProblem] = {}


class Event:
    """One user action on one session; use as ``with engine.event(sid) as ev:``.

    Inside the block, ``ev[state]`` reads a value and ``ev[state] = value`` writes one;
    ``ev[registry]`` is the session's object in a :class:`~statekit.SessionRegistry`
    (the object itself, not a copy); :meth:`emit` records outputs for the host. When the
    block ends without an exception, what changed is committed all-or-nothing and change
    listeners fire; when it raises, nothing is written. Events of one session run one at
    a time; events of different sessions run in parallel.

    An event belongs to the thread or task that opened it and is not thread-safe.
    Values read through it are private copies: mutate them freely inside the block,
    and do not keep them for later (write them back through another event).
    """

    # Only what every event uses is set up front; the rest is made when first needed.
    __slots__ = (
        "_active",
        "_before",
        "_browser",
        "_changed",
        "_closed",
        "_engine",
        "_fresh",
        "_globals",
        "_lease",
        "_loaded",
        "_outputs",
        "_pending",
        "_result",
        "_started",
        "_work",
        "now",
        "sid",
    )

    def __init__(self, engine: StateEngine, sid: str, browser: _BrowserIO | None = None) -> None:
        self._engine = engine
        self.sid = sid
        self._browser = browser
        self._active = False
        self._started = False
        self._loaded: SessionData = _NOT_LOADED
        self._closed = False  # whether the session was closed when the event entered it
        # The session and browser states touched: their working values, and their
        # stored forms at the start (the snapshots the change detector compares
        # against; for a browser state, its JSON encoding). ``_fresh``: those to write
        # even if unchanged (a first read, which made the value; for a browser state, a
        # token of a retired key).
        self._work: dict[SessionState[Any] | BrowserState[Any], Any] = {}
        self._before: dict[SessionState[Any] | BrowserState[Any], Any] = {}
        self._fresh: set[SessionState[Any] | BrowserState[Any]] | None = None
        self._globals: dict[GlobalState[Any], Any] | None = None
        self._outputs: dict[str, Any] | None = None
        self._pending: list[Ended] = []
        self._lease: str | None = None
        # Set when the event ends well: the states it changed, then (when asked for)
        # its result.
        self._changed: list[SessionState[Any] | BrowserState[Any]] | None = None
        self._result: EventResult | None = None
        self.now = 0.0

    def __repr__(self) -> str:
        state = "open" if self._active else "done" if self._started else "new"
        return f"<Event session={redact(self.sid)} {state}>"

    # -- context manager protocol (the engine does the work) ----------------------

    def __enter__(self) -> Event:
        self._engine._begin(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._engine._end(self, exc_type is not None)

    async def __aenter__(self) -> Event:
        await self._engine._abegin(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._engine._aend(self, exc_type is not None)

    # -- reading and writing -----------------------------------------------------

    @property
    def result(self) -> EventResult | None:
        """What the event did, once its block ended without an exception; else None."""
        if self._result is None and self._changed is not None:
            browser = self._browser
            self._result = EventResult(
                sid=self.sid,
                changed=frozenset(state.name for state in self._changed),
                outputs=dict(self._outputs) if self._outputs else {},
                browser=dict(browser.out) if browser else {},
                browser_problems=dict(browser.problems) if browser else {},
            )
        return self._result

    @property
    def closed(self) -> bool:
        """Whether the session was closed when the event began (a closed session
        accepts events until its grace ends)."""
        return self._closed

    @property
    def outputs(self) -> Mapping[str, Any]:
        """The outputs emitted so far, and later ones, by name (a read-only view)."""
        if self._outputs is None:
            self._outputs = {}
        return MappingProxyType(self._outputs)

    def _browser_io(self) -> _BrowserIO:
        if self._browser is None:
            self._browser = _BrowserIO({}, "")
        return self._browser

    def _check(self, state: object) -> None:
        if not self._active:
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
        if state._engine is not self._engine:
            raise WrongEngine(state.name, state._engine.app, self._engine.app)

    def __getitem__(self, state: State[T] | SessionRegistry[T]) -> T:
        # The common case first: a session state of this engine, in an open event.
        if self._active and state.__class__ is SessionState and state._engine is self._engine:
            value: T = self._work.get(state, MISSING)
            if value is MISSING:
                value = self._materialize(state)
            return value
        self._check(state)
        if isinstance(state, SessionRegistry):
            try:
                return state.get(self.sid)
            except SessionNotInitialized as exc:
                if self.closed:
                    raise SessionNotInitialized(state.name, self.sid, closed=True) from exc
                raise
        if isinstance(state, (SessionState, BrowserState)):
            value = self._work.get(state, MISSING)
            if value is MISSING:
                value = self._materialize(state)
            return value
        assert isinstance(state, GlobalState)
        if self._globals is None:
            self._globals = {}
        if state not in self._globals:
            self._globals[state] = state.get()
        snapshot: T = self._globals[state]
        return snapshot

    def get(self, state: State[T] | SessionRegistry[T]) -> T:
        """Same as ``ev[state]``.

        Raises:
            SessionNotInitialized: for a registry without an object for this session.
        """
        return self[state]

    def __setitem__(self, state: SessionState[T] | BrowserState[T], value: T) -> None:
        if self._active and state.__class__ is SessionState and state._engine is self._engine:
            if state not in self._before:
                # Assigning needs no copy of the old value, and must work even when the
                # old value no longer decodes.
                stored = self._loaded.values.get(state.name, MISSING)
                if stored is MISSING:
                    self._materialize(state)  # the initial value, written if unchanged
                else:
                    self._before[state] = stored
            self._work[state] = value
            return
        self._check(state)
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
        if state not in self._before:
            self._materialize(state, read=False)
        self._work[state] = value

    def update(
        self,
        values: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (),
    ) -> None:
        """Assign several session states at once, like :meth:`dict.update`: from a
        mapping of state to value, or from (state, value) pairs."""
        items = values.items() if isinstance(values, Mapping) else values
        for state, value in items:
            self[state] = value

    def emit(self, name: str, value: Any) -> None:
        """Record an output for the host to render (for example a component's new value)."""
        if not self._active:
            raise UsageError("emit() needs an open event")
        if not isinstance(name, str):
            raise UsageError(f"output names are strings, got {type(name).__name__}")
        if self._outputs is None:
            self._outputs = {}
        self._outputs[name] = value

    def _materialize(
        self, state: SessionState[Any] | BrowserState[Any], *, read: bool = True
    ) -> Any:
        """Take a state into the working set; return its working value."""
        if isinstance(state, BrowserState):
            browser = self._browser_io()
            decoded = state.decode(browser.tokens.get(state.storage_key), bind=browser.bind)
            if decoded.problem is not None:
                browser.problems[state.name] = decoded.problem
            work = decoded.value
            self._before[state] = state.canonical(work)
            if decoded.reencode:
                self._mark_fresh(state)
        else:
            stored = self._loaded.values.get(state.name, MISSING)
            if stored is not MISSING:
                self._before[state] = stored
                if not read:
                    return MISSING
                work = self._engine._open(state, stored)
            else:
                work = state.new_value()
                self._before[state] = self._engine._values.store(state.name, work)
                self._mark_fresh(state)
        self._work[state] = work
        return work

    def _mark_fresh(self, state: SessionState[Any] | BrowserState[Any]) -> None:
        if self._fresh is None:
            self._fresh = set()
        self._fresh.add(state)

    # -- commit support ---------------------------------------------------------

    def _collect(
        self,
    ) -> tuple[dict[str, Any], dict[str, str] | None, list[SessionState[Any] | BrowserState[Any]]]:
        """What to write, which browser tokens to send (None: none), and which states
        changed, per the change detector.

        A value read for the first time is written even when unchanged, so that a
        factory's result stays the session's value; a browser value read from a token of
        a retired key gets a new token.
        """
        writes: dict[str, Any] = {}
        tokens: dict[str, str] | None = None
        changed: list[SessionState[Any] | BrowserState[Any]] = []
        fresh = self._fresh
        for state, work in self._work.items():
            old = self._before[state]
            if state.__class__ is SessionState or not isinstance(state, BrowserState):
                # A value still identical to its stored form (an atom read and not
                # reassigned) is the same; an exact atom (an int, say) is judged here.
                if work is not old:
                    values = self._engine._values
                    if type(work) in values.exact_atoms:
                        if type(old) is not type(work) or old != work:
                            writes[state.name] = work
                            changed.append(state)
                            continue
                    else:
                        verdict, stored = values.judge(state.name, old, work)
                        if verdict is not SAME:
                            writes[state.name] = stored
                            if verdict is CHANGED:
                                changed.append(state)
                            continue
                if fresh is not None and state in fresh:
                    writes[state.name] = old
                continue
            encoded = state.canonical(work)
            verdict = SAME if encoded == old else _walk(_JSON.decode(old), work)
            if verdict is CHANGED:
                changed.append(state)
            if verdict is not SAME or (fresh is not None and state in fresh):
                if tokens is None:
                    tokens = {}
                tokens[state.storage_key] = state.encode(work, bind=self._browser_io().bind)
        return writes, tokens, changed
