"""The engine as the objects it hands out see it: the one implementation of
:class:`~statekit._host.Host`.

States, registries and events hold an :class:`EngineHost` and call only its methods:
declarations, session checks, values (each written once as steps, driven blocking or
awaited), entering and leaving sessions. The engine makes one, with its parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ._checks import user_record
from ._core import Core
from ._entry import Entry
from ._events import EventState
from ._globals import Globals
from ._registry import SessionRegistry
from ._remote import Remote
from ._states import MISSING, BrowserState, GlobalState, SessionState, State, UserState
from ._steps import drive
from ._users import Users
from ._values import CheckedObjectValues, ValuePolicy
from ._watch import Watchers
from .exceptions import InvalidDeclaration, SessionNotFound
from .stores.base import DeleteReason

__all__ = ["EngineHost"]

logger = logging.getLogger("statekit")

T = TypeVar("T")


class EngineHost:
    """The engine as its states, registries and events see it
    (:class:`~statekit._host.Host`): declarations, session checks, value access,
    entering and leaving sessions. Thread-safe."""

    def __init__(
        self, core: Core, entry: Entry, remote: Remote, globals_: Globals, users: Users
    ) -> None:
        self._core = core
        self._users = users
        self._remote = remote
        self._globals = globals_
        self.app = core.app
        self.values: ValuePolicy = core.values
        self.meter = core.meter
        self._ns = core.ns
        self._adrive = core.adrive
        self._entry = entry
        #: The engine's open watches (set by the engine); see :meth:`watched`.
        self.watchers: Watchers | None = None
        # The hot paths, bound once.
        self.enter = entry.enter
        self.aenter = entry.aenter
        self.leave = entry.leave
        self.aleave = entry.aleave
        self.extend = entry.extend
        self.aextend = entry.aextend
        self.open_value = core.open_value
        self.read_value = core.read_value
        self.check_writable = core.check_writable
        self.check_usable = core.check_usable
        self.listen = remote.listen
        # A store of this process may read a session's values in one call.
        self._peek_inline = None if core.shared else getattr(core.ns, "peek_inline", None)

    def watched(self, active: bool) -> None:
        """Route events through the watches while one is open (``active``), so that
        each event's changes reach them; else straight to the entry, at no cost."""
        if active:
            self.leave, self.aleave = self._leave_watched, self._aleave_watched
        else:
            self.leave, self.aleave = self._entry.leave, self._entry.aleave

    def _leave_watched(self, ev: EventState, failed: bool) -> None:
        try:
            self._entry.leave(ev, failed)
        finally:  # (a ChangeLoopError after the commit: what was committed stands)
            if failed:
                pass
            elif ev.done is None:  # no listener round: the event's own changes (fast)
                changed = ev.changed
                watchers = self.watchers
                if changed and watchers is not None and watchers.watching(ev.sid):
                    work = ev.work
                    watchers.session_changed(
                        ev.sid,
                        [(s.name, work[s]) for s in changed if s.__class__ is SessionState],
                    )
            elif self._committed(ev):
                changes = self._changes(ev)
                for i, (name, value) in enumerate(changes):
                    if value is MISSING:  # after listener rounds: read it as committed
                        state = self._core.session_states[name]
                        changes[i] = (name, self.peek(ev.sid, state))
                self.watchers.session_changed(ev.sid, changes)  # type: ignore[union-attr]

    async def _aleave_watched(self, ev: EventState, failed: bool) -> None:
        try:
            await self._entry.aleave(ev, failed)
        finally:
            if not failed and self._committed(ev):
                changes = self._changes(ev)
                for i, (name, value) in enumerate(changes):
                    if value is MISSING:
                        state = self._core.session_states[name]
                        changes[i] = (name, await self.apeek(ev.sid, state))
                self.watchers.session_changed(ev.sid, changes)  # type: ignore[union-attr]

    # -- events of a user: the session, then the user's record ------------------------

    def enter_user(self, ev: EventState) -> None:
        self.enter(ev)
        try:
            self._users.enter_part(ev)
        except BaseException:
            self.meter.user_waited(ev)  # (its wait for the session, at least)
            self._entry.leave(ev, True)
            raise
        self.meter.user_waited(ev)

    async def aenter_user(self, ev: EventState) -> None:
        await self.aenter(ev)
        try:
            await self._users.aenter_part(ev)
        except BaseException:
            self.meter.user_waited(ev)  # (its wait for the session, at least)
            await self._entry.aleave(ev, True)
            raise
        self.meter.user_waited(ev)

    def leave_user(self, ev: EventState, failed: bool) -> None:
        part = ev.user_part
        assert part is not None
        try:
            self.leave(ev, failed)
        finally:  # (a ChangeLoopError after the commit: what was committed stands)
            try:
                self._entry.give_back(part)  # its writes went with ev's
            finally:
                if not failed and self._users.heard(ev):
                    changes = self._users.changes(ev)
                    for i, (name, value) in enumerate(changes):
                        if value is MISSING:  # after listener rounds: as committed
                            changes[i] = (name, self._read_user(ev, name))
                    self._users.changed(part.sid, changes, by=ev.sid)

    async def aleave_user(self, ev: EventState, failed: bool) -> None:
        part = ev.user_part
        assert part is not None
        try:
            await self.aleave(ev, failed)
        finally:
            try:
                await self._entry.agive_back(part)
            finally:
                if not failed and self._users.heard(ev):
                    changes = self._users.changes(ev)
                    for i, (name, value) in enumerate(changes):
                        if value is MISSING:
                            changes[i] = (name, await self._aread_user(ev, name))
                    self._users.changed(part.sid, changes, by=ev.sid)

    def _read_user(self, ev: EventState, name: str) -> Any:
        """A user's value as committed, for its watches and listeners (MISSING, logged,
        if the store fails: the event committed, and stands)."""
        try:
            return self.peek_user(ev.user, self._core.user_states[name])
        except Exception:
            logger.exception("a user's changed value could not be read for its listeners")
            return MISSING

    async def _aread_user(self, ev: EventState, name: str) -> Any:
        try:
            return await self.apeek_user(ev.user, self._core.user_states[name])
        except Exception:
            logger.exception("a user's changed value could not be read for its listeners")
            return MISSING

    def _committed(self, ev: EventState) -> bool:
        """Whether ``ev`` committed changes a watch of its session waits for."""
        watchers = self.watchers
        return (
            watchers is not None
            and (ev.done is not None or ev.changed is not None)
            and watchers.watching(ev.sid)
        )

    def _changes(self, ev: EventState) -> list[tuple[str, Any]]:
        """The session states an event changed, with their values; MISSING for those
        to read afresh (after listener rounds, which may have changed any of them)."""
        if ev.done is None:  # no listener round: the event's own changes
            work = ev.work
            return [
                (state.name, work[state])
                for state in ev.changed or ()
                if state.__class__ is not UserState and isinstance(state, SessionState)
            ]
        states = self._core.session_states
        return [(name, MISSING) for name in sorted(ev.done.changed) if name in states]

    def declare(self, state: State[Any]) -> None:
        core = self._core
        if isinstance(state, BrowserState):
            for other in core.states.values():
                if isinstance(other, BrowserState) and other.storage_key == state.storage_key:
                    raise InvalidDeclaration(
                        f"browser states {other.name!r} and {state.name!r} would share the "
                        f"localStorage key {state.storage_key!r}; give each its own"
                    )
        if state.name in core.states:
            raise InvalidDeclaration(
                f"a state named {state.name!r} is already declared on this engine "
                f"(app {core.app!r}); state names must be unique"
            )
        if state.version > 1:
            core.values.versions[state.name] = state.version
        if core.store.codec is not None or isinstance(core.values, CheckedObjectValues):
            # A store that encodes values (or checks them) must be able to encode the
            # default: refused now, not at its first use.
            core.values.store(state.name, state.default)
        if isinstance(state, UserState):
            self._users.check_store(state.name)
        core.states[state.name] = state
        if isinstance(state, UserState):
            core.user_states[state.name] = state
            if state.ttl is not None:
                core.ttl_states[state.name] = state.ttl
        elif isinstance(state, SessionState):
            core.session_states[state.name] = state
            if state.ttl is not None:
                core.ttl_states[state.name] = state.ttl

    def declare_registry(
        self,
        registry: SessionRegistry[Any],
        *,
        ended: Callable[[str, DeleteReason], object],
        shutdown: Callable[[], object],
        resync: Callable[[], object],
    ) -> None:
        core = self._core
        core.check_usable()
        registries = core.registries
        with core.hooks_lock:
            if registry.name in registries:
                raise InvalidDeclaration(
                    f"a registry named {registry.name!r} is already declared on this "
                    f"engine (app {core.app!r}); registry names must be unique"
                )
            registries[registry.name] = registry
        core.add_hook("end", ended)
        core.add_hook("shutdown", shutdown)
        core.add_hook("resync", resync)
        self._remote.listen()

    def require_open(self, sid: str) -> None:
        self._core.check_usable()
        drive(self._core.open_steps(sid, touch=True), self._ns)

    async def arequire_open(self, sid: str) -> None:
        self._core.check_usable()
        await self._adrive(self._core.open_steps(sid, touch=True))

    def is_open(self, sid: str) -> bool:
        try:
            drive(self._core.open_steps(sid, touch=False), self._ns)
        except SessionNotFound:
            return False
        return True

    # -- values: each written once as steps, driven blocking or awaited -------------

    def peek(self, sid: str, state: SessionState[T]) -> T:
        core = self._core
        inline = self._peek_inline
        if inline is not None and sid.__class__ is str and not core.shut:
            now = core.clock()
            values = inline(sid, now, now + core.idle_ttl)
            if values is not None:  # the common case on the memory store, inline
                stored = values.get(state.name, MISSING)
                return state.new_value() if stored is MISSING else self.open_value(state, stored)
        value: T = drive(core.peek_steps(sid, state), self._ns)
        return value

    def peek_user(self, user: str | None, state: SessionState[T]) -> T:
        value: T = drive(self._core.peek_user_steps(user_record(user), state), self._ns)
        return value

    async def apeek_user(self, user: str | None, state: SessionState[T]) -> T:
        value: T = await self._adrive(self._core.peek_user_steps(user_record(user), state))
        return value

    async def apeek(self, sid: str, state: SessionState[T]) -> T:
        value: T = await self._adrive(self._core.peek_steps(sid, state))
        return value

    def global_named(self, name: str) -> Any:
        """The value now of the global state declared as ``name``."""
        state = self._core.states[name]
        assert isinstance(state, GlobalState)
        return self.global_get(state)

    def global_get(self, state: GlobalState[T]) -> T:
        return drive(self._globals.get(state), self._ns)

    async def aglobal_get(self, state: GlobalState[T]) -> T:
        return await self._adrive(self._globals.get(state))

    def global_update(self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any) -> T:
        return drive(self._globals.update(state, fn, new), self._ns)

    async def aglobal_update(
        self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any
    ) -> T:
        return await self._adrive(self._globals.update(state, fn, new))

    def global_increment(self, state: GlobalState[T], n: int | float) -> T:
        return drive(self._globals.increment(state, n), self._ns)

    async def aglobal_increment(self, state: GlobalState[T], n: int | float) -> T:
        return await self._adrive(self._globals.increment(state, n))
