"""The store protocol: what the engine asks of any place that keeps state.

A :class:`Store` hands out one :class:`StoreNamespace` per application name. The
namespace protocol is shaped for stores that live outside the process:

- one call loads a whole session (its values, version and status) and slides its idle
  deadline;
- one call commits an event, all-or-nothing, checked against the version loaded;
- global values have an atomic compare-and-set and an atomic add;
- every lifetime is a deadline kept in an index; :meth:`StoreNamespace.reap` removes
  due entries in deadline order and hands each to exactly one caller (claim-once),
  so each deletion callback runs once even with many processes;
- the store enforces the session capacity, evicting the least recently used session;
- a shared store grants a per-session *lease* with the load, so that events of one
  session in different processes run one at a time; commits (and a long event's
  renewals) are fenced by it;
- a shared store publishes a :class:`Notice` for every commit and every ended session,
  which other processes receive through :meth:`StoreNamespace.subscribe`.

Values are opaque to the store: Python objects for a store without a codec, bytes made
by the store's :attr:`Store.codec` otherwise. Times are plain floats from the engine's
clock; the store never reads a clock itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import attrs

from statekit._codec import Codec
from statekit.exceptions import StateError

__all__ = [
    "AsyncStoreNamespace",
    "Busy",
    "CommitPart",
    "DeleteReason",
    "Ended",
    "EnteringNamespace",
    "GivenBack",
    "Gone",
    "Keep",
    "Lease",
    "Loaded",
    "Notice",
    "SessionData",
    "SessionIdTaken",
    "Store",
    "StoreNamespace",
    "Turn",
    "refuse_keep",
]


class SessionIdTaken(StateError, KeyError):
    """Raised by :meth:`StoreNamespace.create_session` for an id the store already
    holds. Ids are 192 random bits, so this never happens by chance; the engine draws
    another id and tries again."""

    def __init__(self) -> None:
        StateError.__init__(self, "a session with this id is already stored")

    def __str__(self) -> str:
        return str(self.args[0])


class DeleteReason(str, enum.Enum):
    """Why a session or a value was deleted; passed to deletion callbacks."""

    IDLE = "idle"
    """The session was not used for ``idle_ttl`` seconds."""
    CLOSED = "closed"
    """The session was closed and its ``closed_ttl`` grace is over."""
    EVICTED = "evicted"
    """The engine was at capacity and this was the least recently used session."""
    TTL = "ttl"
    """The value's own ``ttl`` passed since it was last written."""
    SHUTDOWN = "shutdown"
    """The engine was shut down and its store does not outlive the process."""

    def __str__(self) -> str:
        return self.value


@attrs.frozen(kw_only=True)
class Ended:
    """A session, or one value of it, that the store removed.

    Each ``Ended`` is handed to exactly one caller, who runs its callbacks.

    Attributes:
        sid: the session id.
        reason: why it was removed.
        values: the removed values by state name.
        state: ``None`` when the whole session ended, else the one state removed.
        was_closed: whether the session had been closed before (its close hooks ran
            then, not now).
        at: when it ended, on the engine's clock.
    """

    sid: str
    reason: DeleteReason
    values: Mapping[str, Any]
    state: str | None = None
    was_closed: bool = False
    at: float = 0.0


@attrs.frozen(kw_only=True)
class Gone:
    """The answer for a session that existed but has ended.

    Attributes:
        reason: why it ended.
        at: when it ended, on the engine's clock.
        ended: set when this very call found the session past its deadline and removed
            it; the caller then runs its callbacks.
    """

    reason: DeleteReason
    at: float
    ended: Ended | None = None


class SessionData(Protocol):
    """What an event reads of the session it entered: a :class:`Loaded`, or the record
    an :class:`EnteringNamespace` keeps of the session."""

    @property
    def sid(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    @property
    def values(self) -> Mapping[str, Any]: ...


@attrs.define(kw_only=True)
class Loaded:
    """A session as loaded at the start of an event, or by a peek.

    A plain record rather than a frozen one: one is made for every load and peek, and
    a frozen record costs twice as much to make (a fifth of a peek on the memory
    store). Treat it as read-only all the same.

    Attributes:
        sid: the session id.
        version: increases with every commit; passed back to :meth:`StoreNamespace.commit`.
        closed: whether the session was closed (it still accepts events during its grace).
        values: stored values by state name. Treat as read-only.
        expired: values this load found past their own ``ttl`` and removed; the caller
            runs their callbacks.
    """

    sid: str
    version: int
    closed: bool
    values: Mapping[str, Any]
    expired: tuple[Ended, ...] = ()


@attrs.frozen(kw_only=True)
class Lease:
    """A request to hold a session for one event, across processes.

    Attributes:
        token: unique to the event; the commit is refused unless it still holds.
        until: when the lease lapses if never released (engine clock).
    """

    token: str
    until: float


@attrs.frozen(kw_only=True)
class Keep:
    """A lease kept past its event's commit, so that the session's next event in this
    process may skip its load (``StateEngine(lease_keep=...)``).

    Attributes:
        until: the lease's new end (engine clock).
        touch_until: the session's new deadline, slid as a load's touch slides it.
    """

    until: float
    touch_until: float


def refuse_keep(keep: object, store: object) -> None:
    """For a store whose commits cannot keep their lease: raise on ``keep=``.

    Raises:
        ValueError: ``keep`` was given.
    """
    if keep is not None:
        raise ValueError(
            f"{type(store).__name__} does not keep leases between events (keep=); only a "
            "store whose keeps_leases is true does"
        )


class GivenBack(int):
    """The new version a commit asked to keep its lease (``keep=``) returns when it
    gave the lease back instead: the session was closed meanwhile."""

    __slots__ = ()


@attrs.frozen(kw_only=True)
class CommitPart:
    """One session's part of a joint commit (:meth:`commit_joint`, on a store whose
    ``joint_commits`` is true): an event's own session and its user's record are
    written together, all-or-nothing.

    Attributes:
        sid: the session (or user record).
        version: the version loaded; the commit is refused if it moved on.
        writes: the values to write, by state name.
        ttl_deadlines: the new deadline of each written value that has a ttl.
        lease: the lease the commit is fenced by, if any.
        release: whether the lease is given back in the same step.
    """

    sid: str
    version: int
    writes: Mapping[str, Any]
    ttl_deadlines: Mapping[str, float]
    lease: str | None = None
    release: bool = True


@attrs.frozen(kw_only=True)
class Busy:
    """The answer for a session whose lease another event holds until ``until``."""

    until: float


@attrs.frozen(kw_only=True)
class Notice:
    """What another process did to a session, as published by a shared store.

    Attributes:
        kind: ``"changed"`` (a commit), ``"ended"`` (closed, expired, evicted),
            ``"wanted"`` (a load found the session's lease kept by another handle: its
            holder gives it up), ``"global"`` (a global was written: ``names`` holds
            its name; ``sid`` is empty) or ``"resync"`` (notices may have been lost, for
            example while reconnecting: re-check what you care about; ``sid`` is
            empty).
        sid: the session.
        names: for ``"changed"``, the states written.
        reason: for ``"ended"``, why.
        origin: the namespace handle that caused it; a handle does not receive its own.
    """

    kind: Literal["changed", "ended", "wanted", "global", "resync"]
    sid: str
    names: tuple[str, ...] = ()
    reason: DeleteReason | None = None
    origin: str = ""


@runtime_checkable
class StoreNamespace(Protocol):
    """The state of one application in a store. Every method is thread-safe."""

    def create_session(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> tuple[Ended, ...]:
        """Add a new open session expiring at ``deadline``.

        When ``capacity`` sessions (open or closed) are already stored, removes the
        least recently used ones first (closed sessions before open ones) and returns
        them with reason ``EVICTED`` (or ``IDLE``/``CLOSED`` if already past due).

        Raises:
            SessionIdTaken: a session with this id is stored already (nothing changed).
        """
        ...

    def load_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        """Load a session for an event; ``None`` when the store never knew ``sid``.

        An open session's deadline slides to ``touch_until`` (``None``: a look that
        does not count as use); a store may skip a slide of less than one second. A
        session already past its deadline is removed and returned as :class:`Gone` with
        ``ended`` set. Values past their own ttl are
        removed and listed in :attr:`Loaded.expired`. With ``lease`` (shared stores),
        the session is also leased to the caller, or :class:`Busy` is returned when
        another unexpired lease holds it (and nothing else is done).
        """
        ...

    def peek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Loaded | Gone | None:
        """Like :meth:`load_session` without a lease, for reading one state: the
        returned values hold ``name`` if it is stored (and may hold others)."""
        ...

    def commit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
        keep: Keep | None = None,
    ) -> int:
        """Write ``writes`` all-or-nothing if the session is still at ``version`` (and,
        with ``lease``, still leased with that token), and publish a ``changed`` notice.

        ``ttl_deadlines`` gives the new deadline of each written value that has a ttl.
        With ``release``, the lease is released in the same step. With ``keep`` (and
        ``lease``; only on a store whose ``keeps_leases`` is true), the lease stays
        instead, as :class:`Keep` says, marked as kept: a load by another handle that
        finds it busy publishes a ``"wanted"`` notice; unless the session was closed
        meanwhile: then the lease is given back and the version returned is a
        :class:`GivenBack`. Returns the new version.

        Raises:
            StoreConflict: the session was committed by someone else meanwhile, or the
                lease lapsed and another event took it.
            SessionExpired: the session ended meanwhile.
            SessionNotFound: the session is unknown.
        """
        ...

    def release(self, sid: str, *, lease: str) -> None:
        """Drop the lease ``lease`` of ``sid`` if it still holds; write nothing."""
        ...

    def renew(self, sid: str, *, lease: str, until: float) -> bool:
        """Make the lease ``lease`` of ``sid`` last until ``until``, if the session is
        still leased with that token (even past its end: no other event took it);
        whether it was. A store without leases (of this process) answers True."""
        ...

    def close_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        """Mark an open session closed, to be removed at ``deadline``.

        Returns True when this call closed it, False when it was already closed,
        :class:`Gone` or ``None`` as :meth:`load_session` does.
        """
        ...

    def reap(self, *, now: float, limit: int) -> tuple[Ended, ...]:
        """Remove at most ``limit`` entries whose deadline is at or before ``now``,
        earliest first, and return them. Each entry is returned to one caller only.

        The engine gives the deadlines of one kind (idle, closed grace, one state's
        ttl) as ``now`` plus a fixed span, so within a kind they arrive in order; a
        store may rely on that.
        """
        ...

    def session_count(self) -> int:
        """How many sessions (open or closed) are stored."""
        ...

    def global_get(self, name: str) -> tuple[Any, int] | None:
        """The value of a global and its version, or ``None`` if never written."""
        ...

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        """Set a global if its version is still ``version`` (``None``: never written).

        Returns the new version, or ``None`` if the version had moved on.
        """
        ...

    def global_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        """Atomically add ``amount`` to a numeric global (``default`` if never written)
        and return the new value."""
        ...

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Call ``callback(notice)`` for every notice published by *other* handles of
        this namespace (other engines, other processes), from a thread of the store's.
        Returns a function that unsubscribes. Delivery is best effort: after a gap the
        store sends a ``resync`` notice."""
        ...

    def shutdown(self) -> tuple[Ended, ...]:
        """Release resources. A store whose data dies with the process returns every
        session it held (reason ``SHUTDOWN``); a durable store returns ``()``."""
        ...


@runtime_checkable
class AsyncStoreNamespace(Protocol):
    """A namespace that can also make every store call without blocking an event loop
    (the Redis store: on its asyncio client, or else in a worker thread of its own).
    The engine's async methods use these when the namespace has them all; on another
    shared store they run the blocking methods in a worker thread, and on a store of
    this process (which does no I/O) they call them directly. Each method is as its
    blocking namesake without the ``a``."""

    async def acreate_session(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> tuple[Ended, ...]:
        """As :meth:`StoreNamespace.create_session`."""
        ...

    async def aload_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        """As :meth:`StoreNamespace.load_session`."""
        ...

    async def apeek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Loaded | Gone | None:
        """As :meth:`StoreNamespace.peek`."""
        ...

    async def acommit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
        keep: Keep | None = None,
    ) -> int:
        """As :meth:`StoreNamespace.commit`."""
        ...

    async def arelease(self, sid: str, *, lease: str) -> None:
        """As :meth:`StoreNamespace.release`."""
        ...

    async def arenew(self, sid: str, *, lease: str, until: float) -> bool:
        """As :meth:`StoreNamespace.renew`."""
        ...

    async def aclose_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        """As :meth:`StoreNamespace.close_session`."""
        ...

    async def areap(self, *, now: float, limit: int) -> tuple[Ended, ...]:
        """As :meth:`StoreNamespace.reap`."""
        ...

    async def asession_count(self) -> int:
        """As :meth:`StoreNamespace.session_count`."""
        ...

    async def aglobal_get(self, name: str) -> tuple[Any, int] | None:
        """As :meth:`StoreNamespace.global_get`."""
        ...

    async def aglobal_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        """As :meth:`StoreNamespace.global_cas`."""
        ...

    async def aglobal_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        """As :meth:`StoreNamespace.global_add`."""
        ...

    async def ashutdown(self) -> tuple[Ended, ...]:
        """As :meth:`StoreNamespace.shutdown` (stopping a receiving thread included)."""
        ...


class Turn:
    """A place in the queue of a session that another event holds, as answered by
    :meth:`EnteringNamespace.enter`: wait for it, then enter the session with
    :meth:`EnteringNamespace.enter_after_wait`."""

    __slots__ = ()


@runtime_checkable
class EnteringNamespace(StoreNamespace, Protocol):
    """A namespace that keeps each session's lock itself, in this process, beside the
    session: an event *enters* a session (takes its lock, loads and touches it) in one
    call and *leaves* it (commits and gives the lock back) in another, with no lease.

    The memory store offers it; an engine on such a store takes this path, any other
    store's events take a per-engine lock and a lease. A store of your own may offer
    either. Every engine of the application must share the locks (they live with the
    sessions), so that events of one session take turns across engines.

    Attributes:
        entered_type: the class of what :meth:`enter` answers for a session entered at
            once; the engine compares with it on its fastest path.
    """

    entered_type: type

    def enter(
        self,
        sid: str,
        owner: object,
        expired: list[Ended],
        blocking: bool,
        now: float,
        touch_until: float,
    ) -> SessionData | Gone | Turn | None:
        """Take the lock of ``sid`` for ``owner`` and load the session, touching it: the
        session's data (read while the lock is held), :class:`Gone` or ``None`` if it
        cannot be entered, or, when another event holds it, a :class:`Turn` to wait for
        (a thread's when ``blocking``, else an asyncio task's). Values past their own
        ttl are removed and appended to ``expired``.

        Raises:
            UsageError: ``owner`` already holds the session (nested events).
        """
        ...

    def wait_turn(self, turn: Turn, owner: object, timeout: float) -> bool:
        """Block this thread until the lock is handed to ``owner``, at most ``timeout``
        seconds; whether it was. A wait that ends otherwise leaves the queue."""
        ...

    async def await_turn(self, turn: Turn, owner: object, timeout: float) -> bool:
        """:meth:`wait_turn` for an asyncio task, without blocking its event loop."""
        ...

    def enter_after_wait(
        self, turn: Turn, expired: list[Ended], *, now: float, touch_until: float
    ) -> SessionData | Gone | None:
        """Load the session whose lock the caller was handed after waiting."""
        ...

    def give_back(self, turn: Turn, owner: object) -> None:
        """After a failure around a wait: give the lock back if ``owner`` holds it."""
        ...

    def leave(
        self,
        entered: SessionData,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float] | None,
        now: float,
    ) -> None:
        """Commit ``writes`` (if any) and give the lock back (even when the commit is
        refused).

        Raises:
            SessionExpired, SessionNotFound: the session left the store meanwhile.
        """
        ...

    def release_entered(self, entered: SessionData) -> None:
        """Give the lock of an entered session back without committing."""
        ...

    def occupancy(self) -> tuple[int, int]:
        """How many sessions events hold or wait for, and how many events wait (a
        diagnostic)."""
        ...


@runtime_checkable
class Store(Protocol):
    """A place that keeps the state of one or more applications.

    Attributes:
        shared: whether other processes can see this store's data. Engines on a shared
            store default to the wall clock, the only clock processes share, and lease
            sessions for the length of each event.
        codec: how values are turned into bytes, or ``None`` for a store that keeps
            Python objects.
        joint_commits: (optional; false if absent) whether namespaces have
            ``commit_joint(parts, *, now)``, which commits several
            :class:`CommitPart` all-or-nothing: each is checked as
            :meth:`StoreNamespace.commit` checks it, then all are written (each with its
            ``changed`` notice) and their new versions returned in order; when one is
            refused it raises as ``commit`` would and nothing is written. A part with
            no writes is checked and its lease given back (if asked), its version left
            as it is. User state (``engine.user_state``) needs it.
        joint_round_trips: (optional; 1 if absent) how many round trips a joint
            commit takes: where it is one, an event that writes only to its user
            gives its session's lease back in the same commit.
        keeps_leases: (optional; false if absent) whether commits take ``keep=``,
            loads ask a kept lease's holder for it, and namespaces have
            ``subscribe_wanted(callback)``, which delivers those requests as
            ``"wanted"`` notices (``StateEngine(lease_keep=)``).
    """

    shared: bool

    @property
    def codec(self) -> Codec | None:
        """How values become bytes; None for a store that keeps Python objects."""
        ...

    def namespace(self, app: str) -> StoreNamespace:
        """A handle on the state of application ``app``: the same name gives the same
        state; each handle has its own identity as the origin of notices."""
        ...
