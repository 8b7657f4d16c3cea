"""Every error statekit raises.

All errors derive from :class:`StateError`. Each subclass also inherits the builtin
exception it stands for, so ``except KeyError`` keeps working in code that does not
know statekit, carries its data as attributes, and says in its message what to do.

They come in the families a host handles differently:

==========================  =========================================================
catch                       for
==========================  =========================================================
:class:`SessionNotFound`    the page's session is gone (expired, damaged, never
                            issued): open a new one (``SessionExpired``,
                            ``SessionCorrupt`` are kinds of it)
:class:`SessionBusy`        other events held the session too long: retry later
:class:`StoreUnavailable`   the store cannot be reached or written: retry later
:class:`ValueNotStorable`   a value cannot be kept (``StateNotCopyable``,
                            ``TokenTooLarge`` are kinds of it): a bad request
:class:`CodecError`         a stored value no longer reads: replace it
:class:`SessionNotInitialized`  a registry has no object for the session yet
:class:`ChangeLoopError`    listeners kept changing each other (the event committed)
:class:`StoreConflict`      a commit lost its session to another process: run again
                            (``LeaseLost``, an event's lease lapsed, is a kind of it)
:class:`UsageError`         the API was used in a way that cannot work: a bug to fix
                            (``WrongEngine``, ``EngineClosed`` are kinds of it;
                            ``InvalidDeclaration`` for declarations)
==========================  =========================================================

Messages never contain a whole session id (ids are bearer secrets) nor a stored value.
"""

from __future__ import annotations

__all__ = [
    "ChangeLoopError",
    "CodecError",
    "EngineClosed",
    "InvalidDeclaration",
    "LeaseLost",
    "SessionBusy",
    "SessionCorrupt",
    "SessionExpired",
    "SessionNotFound",
    "SessionNotInitialized",
    "StateError",
    "StateNotCopyable",
    "StoreConflict",
    "StoreUnavailable",
    "TokenTooLarge",
    "UsageError",
    "ValueNotStorable",
    "WrongEngine",
]


def redact(sid: object) -> str:
    """Return a short, non-secret label for a session id, for messages and logs."""
    if not isinstance(sid, str):
        return f"<{type(sid).__name__}>"
    return repr(sid[:6] + "…") if len(sid) > 6 else repr(sid)


class StateError(Exception):
    """The root of every statekit error."""


class SessionNotFound(StateError, KeyError):
    """The session id was not issued by this engine, or is no longer known.

    Attributes:
        sid: the id that was used (never shown whole in the message).
    """

    def __init__(self, sid: object, detail: str = "") -> None:
        self.sid = sid
        if sid is None or sid == "":
            message = (
                f"no session was named{': ' + detail if detail else ''}; "
                "open one with open_session()"
            )
        else:
            message = (
                f"session {redact(sid)} is not a session of this engine"
                f"{': ' + detail if detail else ''}; "
                "ids are only issued by open_session(): open a new session"
            )
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError quotes its argument; show the sentence as written.
        return str(self.args[0])


class SessionExpired(SessionNotFound):
    """The session existed but has ended (idle expiry, closed grace over, eviction).

    A subclass of :class:`SessionNotFound`, so a host that opens a new session on
    ``SessionNotFound`` handles both.

    Attributes:
        sid: the id that was used.
        reason: why it ended, a :class:`statekit.DeleteReason` value.
        age: seconds since it ended, or ``None`` when unknown.
    """

    def __init__(self, sid: object, reason: str, age: float | None = None) -> None:
        self.sid = sid
        self.reason = reason
        self.age = age
        when = f" {age:.0f}s ago" if age is not None else ""
        message = (
            f"session {redact(sid)} ended{when} (reason: {reason}); "
            "open a new one with open_session()"
        )
        StateError.__init__(self, message)


class SessionCorrupt(SessionNotFound):
    """The store holds a session whose stored data is damaged (a field that should
    hold a number does not, say): it cannot be used, and was left in place for an
    operator to inspect.

    A subclass of :class:`SessionNotFound`, so a host that opens a new session on
    ``SessionNotFound`` recovers by itself.

    Attributes:
        sid: the id that was used (never shown whole in the message).
        detail: what is damaged.
    """

    def __init__(self, sid: object, detail: str) -> None:
        self.sid = sid
        self.detail = detail
        StateError.__init__(
            self,
            f"session {redact(sid)} cannot be used: its stored data is damaged ({detail}); "
            "it was left in place for inspection and ends at its deadline — open a new "
            "session with open_session()",
        )


class SessionNotInitialized(StateError, KeyError):
    """A per-session registry holds no object for the session.

    The object is made by ``registry.open(sid)``, normally on page load, and is gone
    once the session was closed or ended (its cleanup ran then).

    Attributes:
        registry: the name of the registry.
        sid: the session id (never shown whole in the message).
        closed: whether the session is known to be closed (its objects were cleaned
            up at close).
    """

    def __init__(self, registry: str, sid: object, *, closed: bool = False) -> None:
        self.registry = registry
        self.sid = sid
        self.closed = closed
        if closed:
            message = (
                f"registry {registry!r} has no object for session {redact(sid)}: the "
                "session was closed and its objects were cleaned up; a new page load "
                "opens a new session with open_session() and calls open() for it"
            )
        else:
            message = (
                f"registry {registry!r} has no object for session {redact(sid)}; call "
                "registry.open(sid) on page load (for example with "
                "engine.on_open(registry.open)) before using it"
            )
        super().__init__(message)

    def __str__(self) -> str:
        # KeyError quotes its argument; show the sentence as written.
        return str(self.args[0])


class ChangeLoopError(StateError, RuntimeError):
    """Change listeners kept changing states past the cascade bound.

    The event itself and the listener rounds before the bound are committed.

    Attributes:
        depth: the bound that was exceeded.
        states: names of the states still changing when the cascade stopped.
    """

    def __init__(self, depth: int, states: tuple[str, ...]) -> None:
        self.depth = depth
        self.states = states
        super().__init__(
            f"change listeners kept changing {', '.join(map(repr, states))} after "
            f"{depth} rounds; a listener probably writes a state that triggers "
            "itself again: make it write only when the value really differs"
        )


class StoreConflict(StateError, RuntimeError):
    """A commit found the session changed by someone else since it was loaded."""

    def __init__(self, sid: object, expected: int, found: int | None) -> None:
        self.sid = sid
        self.expected = expected
        self.found = found
        super().__init__(
            f"session {redact(sid)} was changed concurrently (expected version "
            f"{expected}, found {found}); run the event again"
        )


class LeaseLost(StoreConflict):
    """An event held its session longer than the engine's ``lease_ttl`` without
    renewing its lease, and another event (in another process) took the session:
    nothing of this event was written, and it can no longer be (a kind of
    :class:`StoreConflict`).

    Raised by :meth:`~statekit.Event.extend` and by the commit of such an event.
    """

    def __init__(self, sid: object, held: float) -> None:
        StateError.__init__(
            self,
            f"session {redact(sid)}: this event held it {held:.3g}s, its lease lapsed and "
            "another event took the session, so nothing of this event was written; run "
            "it again, and renew the lease of long work (ev.extend(), or "
            "engine.event(sid, renew=True))",
        )
        self.sid = sid
        self.held = held
        self.expected = self.found = None  # type: ignore[assignment]


class UsageError(StateError, RuntimeError):
    """An API was used in a way that cannot work (the message says which way does)."""


class InvalidDeclaration(UsageError, ValueError):
    """A state or engine was declared with arguments that cannot work (a kind of
    :class:`UsageError`)."""


class WrongEngine(UsageError, ValueError):
    """A state declared on one engine was used with another engine (a kind of
    :class:`UsageError`)."""

    def __init__(self, state: str, owner_app: str, used_app: str) -> None:
        self.state = state
        super().__init__(
            f"state {state!r} was declared on another StateEngine (app {owner_app!r}) "
            f"and cannot be used with the engine of app {used_app!r}; declare it on "
            "the engine whose events use it"
        )


class EngineClosed(UsageError):
    """The engine was shut down and can no longer be used (a kind of
    :class:`UsageError`)."""

    def __init__(self, app: str) -> None:
        self.app = app
        super().__init__(f"the StateEngine of app {app!r} has been shut down; create a new engine")


class ValueNotStorable(StateError, TypeError):
    """A value cannot be encoded by the store's codec. Nothing was written.

    Attributes:
        state: the name of the state.
        type_name: the type that could not be encoded, when known.
        where: where inside the value the offending part sits, as a Python expression
            relative to the value (``"[3]['name']"``; ``""`` for the value itself), when
            known.
    """

    def __init__(
        self,
        state: str,
        type_name: str | None,
        store: str,
        detail: str,
        *,
        where: str | None = None,
    ) -> None:
        self.state = state
        self.type_name = type_name
        self.where = where
        super().__init__(f"state {state!r} cannot be written to {store}: {detail}")


class StateNotCopyable(ValueNotStorable):
    """A session value cannot be deep-copied, so it cannot be kept per session (a kind
    of :class:`ValueNotStorable`).

    Attributes:
        state: the name of the state.
        type_name: the type of the value that failed.
    """

    def __init__(self, state: str, type_name: str, cause: BaseException) -> None:
        self.state = state
        self.type_name = type_name
        self.where = None
        StateError.__init__(
            self,
            f"the value of state {state!r} (type {type_name}) cannot be deep-copied "
            f"({type(cause).__name__}: {cause}); session values are copied per session, "
            "so keep objects such as locks, connections or models in a per-session "
            "registry instead (engine.registry(name, factory, cleanup))",
        )


class TokenTooLarge(ValueNotStorable, ValueError):
    """A value's browser token would exceed its state's size budget (a kind of
    :class:`ValueNotStorable`).

    Attributes:
        state: the state's name.
        size: the token's size in bytes.
        budget: the budget.
    """

    def __init__(self, state: str, size: int, budget: int) -> None:
        self.state = state
        self.type_name = None
        self.where = None
        self.size = size
        self.budget = budget
        StateError.__init__(
            self,
            f"the browser token of state {state!r} would be {size} bytes, over its budget "
            f"of {budget}; store less in the browser (keep large data in a session "
            "state) or raise max_bytes",
        )


class CodecError(StateError, TypeError):
    """A value cannot be encoded, or stored bytes cannot be decoded.

    Attributes:
        type_name: the type that could not be encoded, when that was the problem.
        where: where inside the value the part that could not be encoded sits, as a
            Python expression relative to the value (``"[3]['name']"``; ``""`` for the
            value itself), when known.
        state: the state whose stored value could not be read, when known.
        detail: what is wrong with the part at ``where``, without the path.
    """

    def __init__(
        self,
        message: str,
        type_name: str | None = None,
        *,
        where: str | None = None,
        state: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.type_name = type_name
        self.where = where
        self.state = state
        self.detail = message if detail is None else detail
        super().__init__(message)


class StoreUnavailable(StateError, ConnectionError):
    """The store cannot be reached or written (server down, file not writable).

    Unless ``outcome_unknown``, nothing was written by the operation that raised it:
    retry once the store is back. With ``outcome_unknown`` (a timeout after the request
    was sent), the operation may have been applied.

    Attributes:
        store: a description of the store (never its password).
        outcome_unknown: whether the request may have been applied.
    """

    def __init__(self, store: str, detail: str, *, outcome_unknown: bool = False) -> None:
        self.store = store
        self.outcome_unknown = outcome_unknown
        if outcome_unknown:
            tail = (
                "the request was sent but no answer came, so it may or may not have been "
                "applied — check the state before retrying"
            )
        else:
            tail = "nothing was written — retry when it is back"
        super().__init__(f"{store} is unavailable ({detail}); {tail}")


class SessionBusy(StateError, TimeoutError):
    """Other events (in this process or another) held the session for longer than
    the engine's ``lease_wait``."""

    def __init__(self, sid: object, waited: float) -> None:
        self.sid = sid
        self.waited = waited
        super().__init__(
            f"session {redact(sid)} stayed busy with other events for {waited:.3g}s; "
            "retry the request, or raise lease_wait if handlers are that slow"
        )
