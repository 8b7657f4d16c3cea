"""User state: values shared by all of one user's sessions (``engine.user_state``).

A user's values live in a *record* of the store, kept as a session is (its own id,
``u:`` and a digest of the user id; its version, lease, idle deadline and place in the
capacity order), so that every store's guarantees hold for it unchanged. An event
opened with ``user=`` is a :class:`UserEvent`: it enters its session, then the user's
record (a :class:`UserPart`, an event of its own on the record: the lock order is
always a session, then its user, so two events never wait for each other in a
cycle); the record is made on first use. Its writes to both commit together, in one
joint commit of the store (:class:`~statekit.stores.base.CommitPart`), or in one
commit of the record when the session has none. Then the record is given back.

A record expires after ``user_idle_ttl`` without an event of its user, and its values'
``on_delete`` callbacks run once, where the store hands the expiry out. The engine
remembers which sessions it served for each user lately, so that a change of a user
state reaches the ``on_remote_change`` listeners of the user's other sessions, and
``engine.watch(user=...)`` streams, in this process and in others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from . import _fork
from ._checks import qualname, user_record
from ._copying import copy_value
from ._core import Core
from ._entry import Entry
from ._events import Event, EventState
from ._states import MISSING, UserState
from ._steps import CreateSession, Steps, ask, drive
from .exceptions import InvalidDeclaration, SessionExpired, SessionNotFound
from .stores.base import SessionIdTaken

if TYPE_CHECKING:
    import logging

    from ._watch import Watchers

__all__ = ["RenewingUserEvent", "UserEvent", "UserPart", "Users"]

T = TypeVar("T")

#: How many users, and sessions of each, an engine remembers for listeners.
REMEMBERED_USERS = 10_000
SESSIONS_PER_USER = 64


class UserEvent(Event):
    """An :class:`~statekit.Event` opened for a user (``engine.event(sid, user=...)``):
    it holds the user's record too, and its user states' writes commit with the
    session's."""

    __slots__ = ()

    def __enter__(self) -> UserEvent:
        self.host.enter_user(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.host.leave_user(self, exc_type is not None)

    async def __aenter__(self) -> UserEvent:
        await self.host.aenter_user(self)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        await self.host.aleave_user(self, exc_type is not None)

    def extend(self) -> None:
        """As :meth:`Event.extend`, for the session and for the user's record."""
        super().extend()
        if self.user_part is not None:
            self.host.extend(self.user_part)

    async def aextend(self) -> None:
        """:meth:`extend` without blocking the event loop."""
        await super().aextend()
        if self.user_part is not None:
            await self.host.aextend(self.user_part)


class RenewingUserEvent(UserEvent):
    """A :class:`UserEvent` whose leases (the session's and the user's) the engine
    renews while it runs."""

    __slots__ = ()

    renew = True


class UserPart(Event):
    """An event's hold on its user's record (never handed to the host's code)."""

    __slots__ = ()


class Users:
    """The user records of one engine: entering and leaving them with an event, the
    sessions served for each user, their changes' listeners. Thread-safe."""

    def __init__(self, core: Core, entry: Entry, logger: logging.Logger) -> None:
        self._core = core
        self._entry = entry
        self._logger = logger
        ttl = core.settings.user_idle_ttl
        # The parts' classes carry the records' idle ttl (the entries read it).
        self._part = type("UserPart", (UserPart,), {"__slots__": (), "idle_ttl": ttl})
        self._renewing = type(
            "RenewingUserPart", (UserPart,), {"__slots__": (), "idle_ttl": ttl, "renew": True}
        )
        self._lock = threading.Lock()
        _fork.after_fork_in_child(self)
        # Record id -> the user's id and the sessions served lately (newest last).
        self._seen: OrderedDict[str, tuple[str, dict[str, None]]] = OrderedDict()
        # Session id -> the record of the user it was last served for.
        self._user_of: OrderedDict[str, str] = OrderedDict()
        #: The engine's open watches (set by the engine).
        self.watchers: Watchers | None = None
        core.user_ended = self.ended

    def _after_fork(self) -> None:
        _fork.free_lock(self._lock)

    def check_store(self, name: str) -> None:
        """Refuse a user state on a store that cannot commit a session and a user
        together."""
        store = self._core.store
        if not getattr(store, "joint_commits", False):
            raise InvalidDeclaration(
                f"user state {name!r} needs a store that commits a session's writes and "
                f"its user's together (joint_commits); {store!r} does not: use the "
                "memory, SQLite or Redis store"
            )

    # -- entering and leaving --------------------------------------------------------

    def part_for(self, ev: EventState) -> EventState:
        """A new hold on ``ev``'s user's record."""
        assert ev.user is not None
        cls = self._renewing if ev.renew else self._part
        part: EventState = cls(ev.engine, ev.host, user_record(ev.user))
        return part

    def enter_part(self, ev: EventState) -> None:
        """Take ``ev``'s user's record (its session is held), making it on first use."""
        for attempt in range(3):
            part = self.part_for(ev)
            try:
                self._entry.enter(part)
            except (SessionNotFound, SessionExpired):
                if attempt == 2:
                    raise
                drive(self._create_steps(part.sid), self._core.ns)
                continue
            ev.user_part = part
            self._saw(ev)
            return

    async def aenter_part(self, ev: EventState) -> None:
        """:meth:`enter_part` without blocking the event loop."""
        for attempt in range(3):
            part = self.part_for(ev)
            try:
                await self._entry.aenter(part)
            except (SessionNotFound, SessionExpired):
                if attempt == 2:
                    raise
                await self._core.adrive(self._create_steps(part.sid))
                continue
            ev.user_part = part
            self._saw(ev)
            return

    def _create_steps(self, record: str) -> Steps[None]:
        """Make a user's record (another process may have just made it)."""
        core = self._core
        now = core.clock()
        try:
            evicted = yield from ask(
                CreateSession(
                    record, now, now + core.settings.user_idle_ttl, core.settings.capacity
                )
            )
        except SessionIdTaken:
            return
        core.run_ended(evicted)

    def _saw(self, ev: EventState) -> None:
        """Remember that this engine served ``ev``'s session for its user (two ordered
        dicts, the least recently used dropped past their bound)."""
        assert ev.user is not None
        assert ev.user_part is not None
        record, sid = ev.user_part.sid, ev.sid
        with self._lock:
            before = self._user_of.get(sid)
            if before == record:  # the common case: the same user as last time
                self._user_of.move_to_end(sid)
                seen = self._seen.get(record)
                if seen is not None:
                    self._seen.move_to_end(record)
                    seen[1].pop(sid, None)
                    seen[1][sid] = None
                    return
            elif before is not None:  # signed in as another user since
                other = self._seen.get(before)
                if other is not None:
                    other[1].pop(sid, None)
            self._user_of[sid] = record
            self._user_of.move_to_end(sid)
            if len(self._user_of) > REMEMBERED_USERS * 4:
                self._user_of.popitem(last=False)
            seen = self._seen.get(record)
            if seen is None:
                seen = self._seen[record] = (ev.user, {})
                if len(self._seen) > REMEMBERED_USERS:
                    self._seen.popitem(last=False)
            self._seen.move_to_end(record)
            sids = seen[1]
            sids.pop(sid, None)
            sids[sid] = None
            if len(sids) > SESSIONS_PER_USER:
                del sids[next(iter(sids))]

    def sessions_of(self, record: str) -> tuple[str | None, list[str]]:
        """The user of ``record`` and the sessions served for it lately, if known."""
        with self._lock:
            seen = self._seen.get(record)
            return (None, []) if seen is None else (seen[0], list(seen[1]))

    def ended(self, record: str) -> None:
        """A user's record ended: forget its sessions (its watches stay open: the
        user's next event makes a new record)."""
        with self._lock:
            self._seen.pop(record, None)

    # -- after a commit ----------------------------------------------------------------

    def heard(self, ev: EventState) -> bool:
        """Whether anyone listens for the changes of ``ev``'s user: a watch here, or a
        remote listener of a user state that ``ev`` committed."""
        if ev.done is None and ev.changed is None:  # nothing was committed
            return False
        part = ev.user_part
        assert part is not None
        if self.watchers is not None and self.watchers.watching(part.sid):
            return True
        return any(state.remote_listeners for state in self._core.user_states.values())

    @staticmethod
    def changes(ev: EventState) -> list[tuple[str, Any]]:
        """The user states ``ev`` changed, with their values (MISSING: read afresh,
        after listener rounds)."""
        part = ev.user_part
        if part is None:
            return []
        if ev.done is None:
            return [
                (state.name, part.work[state])
                for state in ev.changed or ()
                if state.__class__ is UserState
            ]
        return [
            (name, MISSING)
            for name in sorted(ev.done.changed)
            if isinstance(ev.engine.states.get(name), UserState)
        ]

    def changed(
        self, record: str, values: Iterable[tuple[str, Any]], *, by: str | None = None
    ) -> None:
        """Tell the watches of ``record`` and the remote listeners of its states in
        the user's other sessions (all but ``by``) the new ``values`` (name, value)."""
        values = [(name, value) for name, value in values if value is not MISSING]
        if not values:
            return
        if self.watchers is not None and self.watchers.watching(record):
            self.watchers.session_changed(record, values)
        _, sids = self.sessions_of(record)
        for name, value in values:
            state = self._core.user_states.get(name)
            if state is None or not state.remote_listeners:
                continue
            for sid in sids:
                if sid == by:
                    continue
                for listener in state.remote_listeners:
                    try:
                        listener(sid, copy_value(value))
                    except Exception:
                        self._logger.exception(
                            "remote change listener %s of user state %r raised",
                            qualname(listener),
                            name,
                        )
