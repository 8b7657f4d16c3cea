"""How an event enters its session and leaves it: two strategies, chosen once per
engine by what its store offers.

- :class:`LatchEntry`, for a store that keeps each session's lock beside the session
  (an :class:`~statekit.stores.base.EnteringNamespace`: the memory store). Entering
  takes the lock and loads the session in one call; leaving commits and gives the lock
  back in one. No lease: the store is this process's.
- :class:`LeaseEntry`, for any other store: the engine's own table of session locks
  (:class:`~statekit._locks.SessionLocks`) serializes this process's events, and a
  *lease* taken with the load serializes processes; the commit is fenced by it.

Both wait at most ``lease_wait`` for a session (then :class:`~statekit.SessionBusy`),
both for threads (blocking) and asyncio tasks (without blocking their loop), and both
run the callbacks of what ended only once the session is given back. A lease is renewed
by the event (``ev.extend()``) or, for an event that asked, by the engine's
:class:`~statekit._renewal.Renewer`; a lease another event took is lost for good, and
the event raises :class:`~statekit.LeaseLost` rather than write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import cachetools

from . import _fork
from ._checks import check_sid
from ._commit import Committer, no_listeners
from ._core import Core
from ._events import Collected, EventState
from ._locks import SessionLocks, current_owner
from ._metrics import WINDOW
from ._remote import Remote
from ._renewal import Renewer
from ._steps import LoadSession, Release, Renew, Sleep, Steps, ask, drive
from .exceptions import (
    ChangeLoopError,
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    StoreConflict,
    UsageError,
)
from .stores.base import (
    Busy,
    EnteringNamespace,
    Gone,
    Lease,
    Loaded,
    SessionData,
    Turn,
)

__all__ = ["Entry", "LatchEntry", "LeaseEntry"]

logger = logging.getLogger("statekit")

_get_running_loop = asyncio._get_running_loop
_MASK = WINDOW - 1  # an event's place in the meter's ring of holds
_get_ident = threading.get_ident
_urandom = os.urandom
_monotonic = time.monotonic


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


def _start(core: Core, ev: EventState) -> None:
    core.check_usable()
    if ev.started:
        raise UsageError("an Event can be entered only once; open a new one")
    ev.started = True


class LatchEntry:
    """Events on a store that keeps each session's lock with the session."""

    def __init__(self, core: Core, ns: EnteringNamespace, committer: Committer) -> None:
        self._core = core
        self._ns = ns
        self._record = ns.entered_type
        self._committer = committer
        # Bound once, for the fastest path.
        self._enter = ns.enter
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
        """Nothing to renew: the session's lock is this process's and never lapses."""

    async def aextend(self, ev: EventState) -> None:
        """As :meth:`extend`."""

    def enter(self, ev: EventState) -> None:
        core = self._core
        if core.shut or ev.started:
            _start(core, ev)  # raises
        ev.started = True
        owner = _get_ident() if _get_running_loop() is None else current_owner()
        ev.now = now = self._clock()
        # positional arguments: sid, owner, expired, blocking, now, touch_until
        entered = self._enter(ev.sid, owner, ev.pending, True, now, now + self._idle_ttl)
        if type(entered) is self._record and not entered.closed:  # type: ignore[union-attr]
            ev.loaded = entered  # type: ignore[assignment]
            ev.active = True
            return
        ns = self._ns
        if isinstance(entered, Turn):
            with self._giving_back(entered, owner):
                waited = ns.wait_turn(entered, owner, core.settings.lease_wait)
                entered = self._after_wait(ev, entered, waited)
        self._entered(ev, entered)
        if ev.now > now:
            self._meter.waited(ev.now - now)

    async def aenter(self, ev: EventState) -> None:
        core = self._core
        _start(core, ev)
        ns = self._ns
        owner = current_owner()
        ev.now = now = core.clock()
        entered = ns.enter(ev.sid, owner, ev.pending, False, now, now + core.idle_ttl)
        if isinstance(entered, Turn):
            with self._giving_back(entered, owner):
                waited = await ns.await_turn(entered, owner, core.settings.lease_wait)
                entered = self._after_wait(ev, entered, waited)
        self._entered(ev, entered)
        if ev.now > now:
            self._meter.waited(ev.now - now)

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
            turn, ev.pending, now=now, touch_until=now + self._core.idle_ttl
        )

    def _entered(self, ev: EventState, entered: object) -> None:
        """Open the event on what ``enter`` or ``enter_after_wait`` answered, or raise
        (after running the callbacks of what ended) if it could not be entered."""
        core = self._core
        if type(entered) is not self._record:
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

    def leave(self, ev: EventState, failed: bool) -> None:
        # Commit and give the session back in one call, unless a listener is due
        # (listener events then run first, under the session's lock).
        core = self._core
        ns = self._ns
        ev.active = False
        entered = ev.loaded
        try:
            hold = self._clock() - ev.now
        except Exception:  # a measure only: the session is given back all the same
            hold = 0.0
        self._holds[self._number() & _MASK] = hold
        try:
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
                    self._ttl_states and core.ttl_deadlines(ev.now, writes),
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

    def _leave_with_listeners(self, ev: EventState, collected: Collected) -> None:
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


class LeaseEntry:
    """Events on a store other processes share: this engine's session locks, then a
    lease on the store, taken with the load and given back with the commit."""

    def __init__(self, core: Core, committer: Committer, remote: Remote) -> None:
        self._core = core
        self._ns = core.ns
        self._committer = committer
        self._remote = remote
        self._locks = SessionLocks()
        # Leases this engine failed to give back (the store was down): its next event
        # of the session takes the lease back rather than waiting it out.
        self._orphans: cachetools.LRUCache[str, str] = cachetools.LRUCache(10_000)
        self._orphans_lock = threading.Lock()
        # Events polling for a lease another process holds (they hold this engine's
        # lock of the session meanwhile).
        self._polling = 0
        self._polling_lock = threading.Lock()
        self.renewer = Renewer(core)
        self._meter = core.meter
        core.add_hook("shutdown", self.renewer.stop)
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        """In the child of a fork: the parent's events and leases are the parent's
        (taking its leases back here would let two processes hold one session)."""
        self._locks.keep_only_this_thread()
        _fork.free_lock(self._orphans_lock)
        self._orphans.clear()
        _fork.free_lock(self._polling_lock)
        self._polling = 0

    def occupancy(self) -> tuple[int, int]:
        held, waiting = self._locks.occupancy()
        return held, waiting + self._polling

    def _count_polling(self, step: int) -> None:
        with self._polling_lock:
            self._polling += step

    def enter(self, ev: EventState) -> None:
        core = self._core
        if core.shut or ev.started:
            _start(core, ev)  # raises
        ev.started = True
        sid = ev.sid
        check_sid(sid)
        started = _monotonic()  # lease_wait bounds the whole wait
        clock = core.clock
        asked = clock()
        held = False
        try:
            self._locks.acquire(sid, core.settings.lease_wait)
            held = True
            token = self._lease_token(ev)
            # The first try is a direct call (the lease is most often free); the steps
            # poll while another process holds it.
            ev.now = now = clock()
            outcome = self._ns.load_session(
                sid,
                now=now,
                touch_until=now + core.idle_ttl,
                lease=Lease(token=token, until=now + core.settings.lease_ttl),
            )
            if isinstance(outcome, Busy):
                outcome = drive(self._load_steps(ev, started, token, busy=True), self._ns)
            self._loaded(ev, outcome)
        except BaseException as exc:
            self._not_entered(ev, held, exc)
            raise
        ev.active = True
        if ev.now > asked:
            self._meter.waited(ev.now - asked)
        if ev.renew:
            self.renewer.add(ev)

    def _entered(self, ev: EventState, asked: float) -> None:
        ev.active = True
        if ev.now > asked:
            self._meter.waited(ev.now - asked)
        if ev.renew:
            self.renewer.add(ev)

    async def aenter(self, ev: EventState) -> None:
        _start(self._core, ev)
        check_sid(ev.sid)
        started = time.monotonic()
        asked = self._core.clock()
        held = False
        try:
            await self._locks.aacquire(ev.sid, self._core.settings.lease_wait)
            held = True
            token = self._lease_token(ev)
            outcome = await self._core.adrive(self._load_steps(ev, started, token))
            self._loaded(ev, outcome)
        except BaseException as exc:
            self._not_entered(ev, held, exc, in_task=True)
            raise
        self._entered(ev, asked)

    def _lease_token(self, ev: EventState) -> str:
        """The event's lease token: a lease this engine failed to give back, else a new
        one. Known before the load is sent: if the caller is cancelled while the store
        grants the lease, the failure path still knows what to give back."""
        token = None
        if self._orphans:  # (most often empty: no lock to take)
            with self._orphans_lock:
                token = self._orphans.get(ev.sid)
        ev.lease = token = token or _urandom(12).hex()  # as secrets.token_hex(12)
        return token

    def _load_steps(
        self, ev: EventState, started: float, token: str, *, busy: bool = False
    ) -> Steps[Loaded | Gone | None]:
        """Lease and load the session, waiting while it is busy until ``lease_wait``
        after ``started`` (when the event began to wait); ``busy``: a first try found
        the session leased already."""
        core = self._core
        settings = core.settings
        delay = 0.0005
        polling = False
        try:
            while True:
                if not busy:
                    ev.now = core.clock()
                    outcome = yield from ask(
                        LoadSession(
                            sid=ev.sid,
                            now=ev.now,
                            touch_until=ev.now + core.idle_ttl,
                            lease=Lease(token=token, until=ev.now + settings.lease_ttl),
                        )
                    )
                    if not isinstance(outcome, Busy):
                        return outcome
                busy = False
                waited = time.monotonic() - started
                if waited > settings.lease_wait:
                    raise SessionBusy(ev.sid, waited)
                if not polling:  # waiting for another process: counted as waiting
                    polling = True
                    self._count_polling(1)
                yield from ask(Sleep(seconds=delay * (0.5 + secrets.randbelow(1000) / 1000)))
                delay = min(delay * 2, 0.02)
        finally:
            if polling:
                self._count_polling(-1)

    def _loaded(self, ev: EventState, outcome: Loaded | Gone | None) -> None:
        """Open the event on what its load answered (or raise)."""
        if self._orphans:
            with self._orphans_lock:
                self._orphans.pop(ev.sid, None)
        if outcome.__class__ is Loaded and not outcome.expired:
            loaded: Loaded = outcome
            ev.loaded = loaded
        else:
            loaded = ev.loaded = self._core.loaded_or_raise(ev.sid, ev.now, outcome, ev.pending)
        ev.closed = loaded.closed
        self._remote.saw(ev.sid, loaded.version)

    def _not_entered(
        self, ev: EventState, held: bool, exc: BaseException, *, in_task: bool = False
    ) -> None:
        """After an event failed to start (with ``exc``): give back its session lock (if
        ``held``) and any lease it may have been granted, run due callbacks."""
        if isinstance(exc, SessionBusy):
            self._meter.count("busy")
        if held:
            self._locks.release(ev.sid)
        release = self._abandon_lease(ev)
        if release is not None:
            if in_task:  # do not wait: this task may be being cancelled
                asyncio.get_running_loop().run_in_executor(None, release)
            else:
                release()
        self._core.run_ended(ev.pending)

    def _orphan(self, sid: str, token: str) -> None:
        with self._orphans_lock:
            self._orphans[sid] = token

    def _abandon_lease(self, ev: EventState) -> Callable[[], None] | None:
        """After an event failed to start: the lease it asked for may have been granted
        (its caller was cancelled mid-load, say). Return a release to run; if that fails
        too, the lease is remembered so that this engine's next event takes it back."""
        token, ev.lease = ev.lease, None
        if token is None:
            return None
        sid = ev.sid

        def release() -> None:
            try:
                self._ns.release(sid, lease=token)
            except Exception:
                # It lapses by itself; meanwhile this engine's next event takes it back.
                self._orphan(sid, token)

        return release

    def leave(self, ev: EventState, failed: bool) -> None:
        ev.active = False
        hold, lost = self._held(ev)
        loop_error: ChangeLoopError | None = None
        try:
            if failed or lost or ev.lease is None:
                loop_error = drive(self._leave_steps(ev, failed or lost), self._ns)
            else:
                loop_error = self._commit_and_release(ev)
        finally:
            self._locks.release(ev.sid)
            core = self._core
            if ev.pending:
                core.run_ended(ev.pending)
            core.reap_some(ev.now)
            if hold > self._meter.warn_hold:
                self._meter.slow(ev.sid, hold)
        if lost and not failed:
            raise self._lost(ev, hold)
        if loop_error is not None:
            raise loop_error

    def _held(self, ev: EventState) -> tuple[float, bool]:
        """Note how long the event held its session (the clock read once as it
        leaves); that, and whether the renewer found its lease lost."""
        try:
            hold = self._core.clock() - ev.now
        except Exception:  # a measure only: the session is given back all the same
            hold = 0.0
        if hold < 0.0:
            hold = 0.0
        self._meter.held(hold)
        return hold, ev.renew and self.renewer.remove(ev)

    def _hold(self, ev: EventState) -> float:
        """How long the event has held its session (0 if the clock fails: a measure
        only, the session is given back all the same)."""
        try:
            return max(0.0, self._core.clock() - ev.now)
        except Exception:
            return 0.0

    def _lost(self, ev: EventState, held: float) -> LeaseLost:
        self._meter.count("conflicts")
        self._meter.count("leases_lost")
        return LeaseLost(ev.sid, held)

    async def aleave(self, ev: EventState, failed: bool) -> None:
        ev.active = False
        hold, lost = self._held(ev)
        loop_error: ChangeLoopError | None = None
        try:
            loop_error = await self._core.adrive(self._leave_steps(ev, failed or lost))
        finally:
            self._locks.release(ev.sid)
            self._core.run_ended(ev.pending)
            if hold > self._meter.warn_hold:
                self._meter.slow(ev.sid, hold)
        if self._core.look_due(ev.now):
            await self._core.adrive(self._core.look(ev.now))
        if lost and not failed:
            raise self._lost(ev, hold)
        if loop_error is not None:
            raise loop_error

    def extend(self, ev: EventState) -> None:
        drive(self._extend_steps(ev), self._ns)

    async def aextend(self, ev: EventState) -> None:
        await self._core.adrive(self._extend_steps(ev))

    def _extend_steps(self, ev: EventState) -> Steps[None]:
        """Renew the event's lease for another ``lease_ttl``, fenced by its token."""
        token = ev.lease
        if token is None:  # given back already: nothing held to renew
            return
        core = self._core
        now = core.clock()
        held = yield from ask(Renew(ev.sid, token, now + core.settings.lease_ttl))
        if not held:
            raise self._lost(ev, now - ev.now)
        self._meter.count("renewals")

    def _commit_and_release(self, ev: EventState) -> ChangeLoopError | None:
        """:meth:`_leave_steps` of a block that did not fail, with the store's blocking
        methods; an event that writes with no listener due commits and gives its lease
        back in one direct call (the most common event)."""
        try:
            collected = writes, tokens, changed = ev.collect()
        except BaseException:
            self._give_back(ev)
            raise
        if not writes or not no_listeners(changed):
            return drive(self._leave_steps(ev, False, collected), self._ns)
        lease = ev.lease
        try:
            self._ns.commit(
                ev.sid,
                version=ev.loaded.version,
                writes=writes,
                ttl_deadlines=self._core.ttl_deadlines(ev.now, writes),
                now=ev.now,
                lease=lease,
                release=True,
            )
        except BaseException as exc:
            try:
                if isinstance(exc, StoreConflict):
                    raise self._conflict(ev, exc) from exc
                raise
            finally:
                self._give_back(ev)
        ev.lease = None  # given back with the commit
        ev.hand_out(tokens)
        ev.changed = changed  # no round: the result is made when asked for
        return None

    def _give_back(self, ev: EventState) -> None:
        """Give back the event's lease, if it still holds one (blocking)."""
        if ev.lease is not None:
            try:
                self._ns.release(ev.sid, lease=ev.lease)
            except BaseException as exc:
                self._release_failed(ev, exc)

    def _release_failed(self, ev: EventState, exc: BaseException) -> None:
        """The event's lease could not be given back (``exc``)."""
        assert ev.lease is not None
        # Other processes wait until the lease lapses; this engine's next event of the
        # session takes it back at once.
        self._orphan(ev.sid, ev.lease)
        if not isinstance(exc, Exception):
            raise exc
        logger.warning("could not release the lease of an event: %s", exc)

    def _conflict(self, ev: EventState, exc: StoreConflict) -> StoreConflict:
        """What a commit refused (``exc``) raises: under a lease no other event
        commits, so the lease was lost."""
        if isinstance(exc, LeaseLost) or ev.lease is None:
            self._meter.count("conflicts")
            return exc
        return self._lost(ev, self._hold(ev))

    def _leave_steps(
        self, ev: EventState, failed: bool, collected: Collected | None = None
    ) -> Steps[ChangeLoopError | None]:
        """Commit (unless the block failed), run listener rounds, give the lease back.
        ``collected``: what ``ev.collect()`` found, if the caller asked already."""
        try:
            if failed:
                return None
            try:
                return (yield from self._committer.commit_with_listeners(ev, collected))
            except StoreConflict as exc:
                error = self._conflict(ev, exc)
                if error is exc:
                    raise
                raise error from exc
        finally:
            if ev.lease is not None:
                try:
                    yield from ask(Release(sid=ev.sid, lease=ev.lease))
                except BaseException as exc:
                    self._release_failed(ev, exc)
