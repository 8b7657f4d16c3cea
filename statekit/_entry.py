"""How an event enters its session and leaves it: two strategies, chosen once per
engine by what its store offers.

- :class:`LatchEntry`, for a store that keeps each session's lock beside the session
  (an :class:`~statekit.stores.base.EnteringNamespace`: the memory store). Entering
  takes the lock and loads the session in one call; leaving commits and gives the lock
  back in one. No lease: the store is this process's.
- :class:`~statekit._lease_entry.LeaseEntry` (its own module), for any other store:
  the engine's own table of session locks serializes this process's events, and a
  *lease* taken with the load serializes processes; the commit is fenced by it.

Both wait at most ``lease_wait`` for a session (then :class:`~statekit.SessionBusy`),
both for threads (blocking) and asyncio tasks (without blocking their loop), and both
run the callbacks of what ended only once the session is given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Protocol

from ._checks import check_sid
from ._commit import Committer
from ._core import Core
from ._events import Collected, EventState
from ._locks import current_owner
from ._metrics import WINDOW
from ._renewal import Renewer, touch, touched
from ._steps import drive
from .exceptions import (
    SessionBusy,
    SessionNotFound,
    StoreConflict,
    UsageError,
)
from .stores.base import (
    EnteringNamespace,
    Gone,
    SessionData,
    Turn,
)

__all__ = ["Entry", "LatchEntry", "start_event"]

logger = logging.getLogger("statekit")

_get_running_loop = asyncio._get_running_loop
_MASK = WINDOW - 1  # an event's place in the meter's ring of holds
_get_ident = threading.get_ident


class Entry(Protocol):
    """How an engine's events take and give back their session."""

    def enter(self, ev: EventState) -> None: ...

    async def aenter(self, ev: EventState) -> None: ...

    def leave(self, ev: EventState, failed: bool) -> None: ...

    async def aleave(self, ev: EventState, failed: bool) -> None: ...

    def occupancy(self) -> tuple[int, int]:
        """How many sessions events of this process hold or wait for, and how many
        events wait."""
        ...

    def extend(self, ev: EventState) -> None:
        """Renew the open event's hold on its session for another ``lease_ttl``."""
        ...

    async def aextend(self, ev: EventState) -> None: ...

    def give_back(self, ev: EventState) -> None:
        """Give back a session held with nothing to write, counting no event (an
        event's hold on its user's record)."""
        ...

    async def agive_back(self, ev: EventState) -> None: ...


def start_event(core: Core, ev: EventState) -> None:
    """Mark ``ev`` entered, or raise: the engine was shut down, or it was entered before."""
    core.check_usable()
    if ev.started:
        raise UsageError("an Event can be entered only once; open a new one")
    ev.started = True


class LatchEntry:
    """Events on a store that keeps each session's lock with the session."""

    def __init__(self, core: Core, ns: EnteringNamespace, committer: Committer) -> None:
        self._core = core
        self._ns = ns
        self._renewer: Renewer | None = None
        self._record = ns.entered_type
        self._committer = committer
        # Bound once, for the fastest path.
        self._enter = ns.enter
        # A user's record is entered by a call of its own, where the store has one (so
        # that an id naming a record, sent as a session's, finds nothing).
        self._enter_user = getattr(ns, "enter_user", ns.enter)
        self._leave = ns.leave
        self._clock = core.clock
        self._idle_ttl = core.idle_ttl
        self._ttl_states = core.ttl_states  # filled in place as states are declared
        meter = self._meter = core.meter
        self._holds = meter.holds
        self._number = meter.number
        self._warn_hold = meter.warn_hold

    def occupancy(self) -> tuple[int, int]:
        return self._ns.occupancy()

    def extend(self, ev: EventState) -> None:
        """No lease to renew (the session's lock is this process's and never lapses),
        but, as a renewal does, slide the session's idle deadline: it is in use."""
        # What the touch removed has its callbacks run as the event ends.
        ev.pending.extend(touched(touch(self._core, ev, self._clock()).run(self._ns)))

    async def aextend(self, ev: EventState) -> None:
        """As :meth:`extend` (the memory store does no I/O)."""
        self.extend(ev)

    def enter(self, ev: EventState) -> None:
        core = self._core
        if core.shut or ev.started:
            start_event(core, ev)  # raises
        ev.started = True
        owner = _get_ident() if _get_running_loop() is None else current_owner()
        ev.now = now = self._clock()
        # positional arguments: sid, owner, expired, blocking, now, touch_until
        idle = ev.idle_ttl
        if idle is None:
            entered = self._enter(ev.sid, owner, ev.pending, True, now, now + self._idle_ttl)
        else:  # an event's hold on its user's record
            entered = self._enter_user(ev.sid, owner, ev.pending, True, now, now + idle)
        if type(entered) is self._record and not entered.closed:  # type: ignore[union-attr]
            ev.loaded = entered  # type: ignore[assignment]
            ev.active = True
            if ev.renew:
                self._renewing().add(ev)
            return
        ns = self._ns
        if isinstance(entered, Turn):
            with self._giving_back(entered, owner):
                waited = ns.wait_turn(entered, owner, core.settings.lease_wait)
                entered = self._after_wait(ev, entered, waited)
        self._entered(ev, entered)
        if ev.now > now:
            self._meter.wait_of(ev, ev.now - now)
        if ev.renew:
            self._renewing().add(ev)

    async def aenter(self, ev: EventState) -> None:
        core = self._core
        start_event(core, ev)
        ns = self._ns
        owner = current_owner()
        ev.now = now = core.clock()
        enter = ns.enter if ev.idle_ttl is None else self._enter_user
        touch = now + (ev.idle_ttl or core.idle_ttl)
        entered = enter(ev.sid, owner, ev.pending, False, now, touch)
        if isinstance(entered, Turn):
            with self._giving_back(entered, owner):
                waited = await ns.await_turn(entered, owner, core.settings.lease_wait)
                entered = self._after_wait(ev, entered, waited)
        self._entered(ev, entered)
        if ev.now > now:
            self._meter.wait_of(ev, ev.now - now)
        if ev.renew:
            self._renewing().add(ev)

    @contextlib.contextmanager
    def _giving_back(self, turn: Turn, owner: object) -> Iterator[None]:
        """From the wait on, anything raised gives the lock back if it is ours."""
        try:
            yield
        except BaseException:
            self._ns.give_back(turn, owner)
            raise

    def _after_wait(self, ev: EventState, turn: Turn, came: bool) -> SessionData | Gone | None:
        """Load the session whose lock was just handed to this event (if it ``came``:
        else :class:`~statekit.SessionBusy`)."""
        if not came:
            self._meter.count("busy")
            raise SessionBusy(ev.sid, self._core.settings.lease_wait)
        ev.now = now = self._core.clock()
        return self._ns.enter_after_wait(
            turn, ev.pending, now=now, touch_until=now + (ev.idle_ttl or self._core.idle_ttl)
        )

    def _entered(self, ev: EventState, entered: object) -> None:
        """Open the event on what ``enter`` or ``enter_after_wait`` answered, or raise
        (after running the callbacks of what ended) if it could not be entered."""
        core = self._core
        if type(entered) is not self._record:
            if isinstance(entered, self._record):  # a user's record, of a subclass
                if ev.idle_ttl is None:  # asked for as a session: refused
                    self._ns.release_entered(entered)  # type: ignore[arg-type]
                    check_sid(ev.sid)  # raises, saying what it is
            else:
                assert entered is None or isinstance(entered, Gone)
                if entered is None:
                    check_sid(ev.sid)  # a malformed id: say what is wrong with it
                try:
                    core.loaded_or_raise(ev.sid, ev.now, entered, ev.pending)
                finally:
                    core.run_ended(ev.pending)
        ev.loaded = entered  # type: ignore[assignment]
        ev.closed = ev.loaded.closed  # as entered: the record may be closed meanwhile
        ev.active = True

    def _renewing(self) -> Renewer:
        """The thread that slides the idle deadline of renew=True events' sessions
        (no lease to renew here; made with the first such event)."""
        if self._renewer is None:
            self._renewer = Renewer(self._core)
            self._core.add_hook("shutdown", self._renewer.stop)
        return self._renewer

    def leave(self, ev: EventState, failed: bool) -> None:
        # Commit and give the session back in one call, unless a listener is due
        # (listener events then run first, under the session's lock).
        core = self._core
        ns = self._ns
        ev.active = False
        if ev.renew and self._renewer is not None:
            self._renewer.remove(ev)
        entered = ev.loaded
        try:
            hold = self._clock() - ev.now
        except Exception:  # a measure only: the session is given back all the same
            hold = 0.0
        if hold < 0.0:  # a clock that stepped back: no negative hold in the figures
            hold = 0.0
        self._holds[self._number() & _MASK] = hold
        try:
            if ev.user_part is not None and not failed:  # writes to its user, perhaps
                self._leave_with_listeners(ev, None)
                return
            if failed or not ev.work:
                ns.release_entered(entered)
                if not failed:
                    ev.changed = []
                return
            try:
                writes, tokens, changed = collected = ev.collect()
            except BaseException:
                ns.release_entered(entered)
                raise
            for state in changed:
                if state.listeners:
                    self._leave_with_listeners(ev, collected)
                    return
            try:
                self._leave(
                    entered,
                    writes,
                    # (a value's ttl runs from its write: the commit, now)
                    self._ttl_states and core.ttl_deadlines(ev.now + max(hold, 0.0), writes),
                    ev.now,
                )
            except SessionNotFound:
                core.check_usable()  # a shutdown emptied the store: say so
                raise
            except StoreConflict:
                self._meter.count("conflicts")
                raise
            if tokens:
                ev.hand_out(tokens)
            ev.changed = changed  # the result is made when asked for
        finally:
            if ev.pending:
                core.run_ended(ev.pending)
            if ev.now >= core.next_local_look:
                core.reap_some(ev.now)
            if hold > self._warn_hold:
                self._meter.slow(ev.sid, hold)

    async def aleave(self, ev: EventState, failed: bool) -> None:
        self.leave(ev, failed)  # direct calls: nothing to wait for

    def give_back(self, ev: EventState) -> None:
        """Give back a session held with nothing to write, and count no event (an
        event's hold on its user's record, whose writes went with the event's)."""
        ev.active = False
        if ev.renew and self._renewer is not None:
            self._renewer.remove(ev)
        try:
            self._ns.release_entered(ev.loaded)
        finally:
            if ev.pending:
                self._core.run_ended(ev.pending)

    async def agive_back(self, ev: EventState) -> None:
        self.give_back(ev)

    def _leave_with_listeners(self, ev: EventState, collected: Collected | None) -> None:
        """Commit, run the listener rounds, give the session back."""
        entered = ev.loaded
        try:
            loop_error = drive(self._committer.commit_with_listeners(ev, collected), self._ns)
        except SessionNotFound:
            self._core.check_usable()  # a shutdown emptied the store: say so
            raise
        finally:
            self._ns.release_entered(entered)
        if loop_error is not None:
            raise loop_error
