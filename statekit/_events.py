"""Events: one user action on one session.

An :class:`Event` is the working set of one action: the values it read (each a private
copy, so a failed event cannot have mutated anything stored), the values it wrote, and
the outputs it emitted for the host to render. The engine opens it, commits it and
fires listeners; this module only keeps the working set and decides, with the change
detector, what to write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from ._browser import TokenProblem
from ._changes import Change, _walk
from ._codec import JSONCodec
from ._registry import SessionRegistry
from ._states import MISSING, BrowserState, GlobalState, SessionState, State
from .exceptions import SessionNotInitialized, UsageError, WrongEngine, redact

_JSON = JSONCodec()

if TYPE_CHECKING:
    from ._engine import StateEngine
    from .stores.base import Ended, Loaded

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


class _Slot:
    """One session or browser state touched by an event: its stored form at the start
    (the snapshot the change detector compares against; for a browser state, its JSON
    encoding) and its working value now. ``fresh``: write even if unchanged (a first
    read; for a browser state, a token made with a retired key)."""

    __slots__ = ("before", "fresh", "work")

    def __init__(self, before: Any, work: Any, fresh: bool) -> None:
        self.before = before
        self.work = work
        self.fresh = fresh


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

    __slots__ = (
        "_active",
        "_bind",
        "_browser_out",
        "_browser_problems",
        "_browser_tokens",
        "_collected",
        "_engine",
        "_globals",
        "_lease",
        "_lease_released",
        "_loaded",
        "_outputs",
        "_pending",
        "_slots",
        "_started",
        "now",
        "result",
        "sid",
    )

    def __init__(
        self,
        engine: StateEngine,
        sid: str,
        browser: dict[str, str | None] | None = None,
        bind: str = "",
    ) -> None:
        self._engine = engine
        self.sid = sid
        # Tokens by storage key; listener events share the dict, so they see the tokens
        # their event made.
        self._browser_tokens: dict[str, str | None] = {} if browser is None else browser
        self._browser_out: dict[str, str] = {}
        # What _collect() found, when the engine already asked before a commit step.
        self._collected: Any = None
        self._browser_problems: dict[str, TokenProblem] = {}
        self._bind = bind
        self._active = False
        self._started = False
        self._loaded: Loaded | None = None
        self._slots: dict[SessionState[Any] | BrowserState[Any], _Slot] = {}
        self._globals: dict[GlobalState[Any], Any] = {}
        self._outputs: dict[str, Any] = {}
        self._pending: list[Ended] = []
        self._lease: str | None = None
        self._lease_released = False
        self.now = 0.0
        self.result: EventResult | None = None

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
        self._engine._end(self, failed=exc_type is not None)

    async def __aenter__(self) -> Event:
        await self._engine._abegin(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._engine._aend(self, failed=exc_type is not None)

    # -- reading and writing -----------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the session was closed (it accepts events until its grace ends)."""
        return self._loaded is not None and self._loaded.closed

    @property
    def outputs(self) -> Mapping[str, Any]:
        """The outputs emitted so far, by name."""
        return self._outputs

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
        self._check(state)
        if isinstance(state, SessionRegistry):
            try:
                return state.get(self.sid)
            except SessionNotInitialized as exc:
                if self.closed:
                    raise SessionNotInitialized(state.name, self.sid, closed=True) from exc
                raise
        if isinstance(state, (SessionState, BrowserState)):
            slot = self._slots.get(state)
            if slot is None:
                slot = self._slots[state] = self._materialize(state)
            value: T = slot.work
            return value
        assert isinstance(state, GlobalState)
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
        self._check(state)
        if isinstance(state, SessionRegistry):
            raise UsageError(
                f"registry {state.name!r} cannot be assigned in an event: its objects are "
                "made by registry.open(sid) and removed by registry.close(sid)"
            )
        if not isinstance(state, (SessionState, BrowserState)):
            raise UsageError(
                f"global state {state.name!r} cannot be assigned in an event: global writes "
                "are immediate and atomic, so call its set(), update() or increment()"
            )
        slot = self._slots.get(state)
        if slot is None:
            # Assigning needs no copy of the old value, and must work even when the old
            # value no longer decodes.
            slot = self._slots[state] = self._materialize(state, read=False)
        slot.work = value

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
        self._outputs[name] = value

    def _materialize(
        self, state: SessionState[Any] | BrowserState[Any], *, read: bool = True
    ) -> _Slot:
        if isinstance(state, BrowserState):
            decoded = state.decode(self._browser_tokens.get(state.storage_key), bind=self._bind)
            if decoded.problem is not None:
                self._browser_problems[state.name] = decoded.problem
            value = decoded.value
            return _Slot(state.canonical(value), value, fresh=decoded.reencode)
        assert self._loaded is not None
        values = self._engine._values
        stored = self._loaded.values.get(state.name, MISSING)
        if stored is not MISSING:
            return _Slot(stored, values.open(stored) if read else MISSING, fresh=False)
        work = state.new_value()
        return _Slot(values.store(state.name, work), work, fresh=True)

    # -- commit support ---------------------------------------------------------

    def _collect(
        self,
    ) -> tuple[dict[str, Any], dict[str, str], list[SessionState[Any] | BrowserState[Any]]]:
        """What to write, which browser tokens to send, and which states changed, per
        the change detector.

        A value read for the first time is written even when unchanged, so that a
        factory's result stays the session's value; a browser value read from a token of
        a retired key gets a new token.
        """
        writes: dict[str, Any] = {}
        tokens: dict[str, str] = {}
        changed: list[SessionState[Any] | BrowserState[Any]] = []
        values = self._engine._values
        for state, slot in self._slots.items():
            if isinstance(state, BrowserState):
                encoded = state.canonical(slot.work)
                verdict = (
                    Change.SAME
                    if encoded == slot.before
                    else _walk(_JSON.decode(slot.before), slot.work)
                )
                if verdict is Change.CHANGED:
                    changed.append(state)
                if verdict is not Change.SAME or slot.fresh:
                    tokens[state.storage_key] = state.encode(slot.work, bind=self._bind)
                continue
            verdict, stored = values.judge(state.name, slot.before, slot.work)
            if verdict is Change.CHANGED:
                changed.append(state)
            if stored is not None:
                writes[state.name] = stored
            elif slot.fresh:
                writes[state.name] = slot.before
        return writes, tokens, changed
