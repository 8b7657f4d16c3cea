"""How an event enters its session and leaves it on a store other processes share
(:class:`LeaseEntry`): this engine's table of session locks
(:class:`~statekit._locks.SessionLocks`) serializes this process's events, and a
*lease* taken with the load serializes processes; the commit is fenced by it.

A lease is renewed by the event (``ev.extend()``) or, for an event that asked, by the
engine's :class:`~statekit._renewal.Renewer`; a lease another event took is lost for
good, and the event raises :class:`~statekit.LeaseLost` rather than write. With
``lease_keep``, an event that ends well may keep its lease for the session's next
event here (:mod:`statekit._kept`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import cachetools

from . import _fork
from ._checks import check_sid
from ._commit import Committer, no_listeners
from ._core import Core
from ._entry import start_event
from ._events import Collected, EventState
from ._kept import Kept, KeptLeases
from ._locks import SessionLocks
from ._remote import Remote
from ._renewal import Renewer, touch, touched
from ._steps import Commit, LoadSession, Release, Renew, Sleep, Steps, ask, drive
from .exceptions import ChangeLoopError, LeaseLost, SessionBusy, StoreConflict
from .stores.base import Busy, GivenBack, Gone, Lease, Loaded

__all__ = ["LeaseEntry"]

logger = logging.getLogger("statekit")

_urandom = os.urandom
_monotonic = time.monotonic


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
        #: Leases kept between events (``lease_keep``), or None.
        self.kept = (
            KeptLeases(core, core.settings.lease_keep) if core.settings.lease_keep else None
        )
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
            start_event(core, ev)  # raises
        ev.started = True
        sid = ev.sid
        if ev.idle_ttl is None:  # (a user's record, which has its own, is not checked)
            check_sid(sid)
        started = _monotonic()  # lease_wait bounds the whole wait
        clock = core.clock
        asked = clock()
        held = False
        try:
            self._locks.acquire(sid, core.settings.lease_wait)
            held = True
            ev.now = now = clock()
            kept = reuse = None
            if self.kept is not None:
                kept, reuse = self.kept.take(sid, now)
                if ev.renew:  # renewed by the renewer from the start: loaded
                    kept = None
            if kept is not None:
                self._use_kept(ev, kept)
            else:
                token = self._lease_token(ev, reuse)
                # The first try is a direct call (the lease is most often free); the
                # steps poll while another process holds it.
                outcome = self._ns.load_session(
                    sid,
                    now=now,
                    touch_until=now + (ev.idle_ttl or core.idle_ttl),
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
            self._meter.wait_of(ev, ev.now - asked)
        if ev.renew:
            self.renewer.add(ev)

    def _entered(self, ev: EventState, asked: float) -> None:
        ev.active = True
        if ev.now > asked:
            self._meter.wait_of(ev, ev.now - asked)
        if ev.renew:
            self.renewer.add(ev)

    async def aenter(self, ev: EventState) -> None:
        start_event(self._core, ev)
        if ev.idle_ttl is None:
            check_sid(ev.sid)
        started = time.monotonic()
        asked = self._core.clock()
        held = False
        try:
            await self._locks.aacquire(ev.sid, self._core.settings.lease_wait)
            held = True
            kept = reuse = None
            if self.kept is not None:
                ev.now = self._core.clock()
                kept, reuse = self.kept.take(ev.sid, ev.now)
                if ev.renew:
                    kept = None
            if kept is not None:
                self._use_kept(ev, kept)
            else:
                token = self._lease_token(ev, reuse)
                # As enter: the first try is a direct call, the steps poll while busy.
                core = self._core
                ev.now = now = core.clock()
                outcome = await core.acall(
                    LoadSession(
                        sid=ev.sid,
                        now=now,
                        touch_until=now + (ev.idle_ttl or core.idle_ttl),
                        lease=Lease(token=token, until=now + core.settings.lease_ttl),
                    )
                )
                if isinstance(outcome, Busy):
                    outcome = await core.adrive(self._load_steps(ev, started, token, busy=True))
                self._loaded(ev, outcome)
        except BaseException as exc:
            self._not_entered(ev, held, exc, in_task=True)
            raise
        self._entered(ev, asked)

    def _use_kept(self, ev: EventState, kept: Kept) -> None:
        """Open the event on a lease this engine kept, without a load."""
        self._meter.count("kept_events")
        ev.lease = kept.token
        ev.lease_until = kept.until
        ev.on_kept = True
        ev.deadline = kept.deadline
        ev.loaded = loaded = kept.loaded
        ev.closed = loaded.closed
        self._remote.saw(ev.sid, loaded.version)

    def _lease_token(self, ev: EventState, reuse: str | None = None) -> str:
        """The event's lease token: ``reuse`` (a lease kept here), a lease this engine
        failed to give back, else a new one. Known before the load is sent: if the
        caller is cancelled while the store grants the lease, the failure path still
        knows what to give back."""
        token = reuse
        if token is None and self._orphans:  # (most often empty: no lock to take)
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
                            touch_until=ev.now + (ev.idle_ttl or core.idle_ttl),
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
        settings = self._core.settings
        ev.lease_until = ev.now + settings.lease_ttl
        ev.deadline = ev.now + (ev.idle_ttl or settings.idle_ttl)
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
        """The error of an event whose lease another event took; counted once per
        event, however many of its calls (renewals, its commit) find it lost."""
        self._count_conflict(ev, lease_lost=True)
        return LeaseLost(ev.sid, held)

    def _count_conflict(self, ev: EventState, *, lease_lost: bool) -> None:
        """Count ``ev``'s refused commit or lost lease, once per event."""
        if not ev.lost:
            ev.lost = True
            self._meter.count("conflicts")
            if lease_lost:
                self._meter.count("leases_lost")

    async def aleave(self, ev: EventState, failed: bool) -> None:
        ev.active = False
        hold, lost = self._held(ev)
        loop_error: ChangeLoopError | None = None
        try:
            if failed or lost or ev.lease is None:
                loop_error = await self._core.adrive(self._leave_steps(ev, failed or lost))
            else:
                loop_error = await self._acommit_and_release(ev)
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

    def give_back(self, ev: EventState) -> None:
        """Give back a session held with nothing to write, counting no event (an
        event's hold on its user's record): its lease, then its lock here."""
        ev.active = False
        if ev.renew:
            self.renewer.remove(ev)
        try:
            drive(self._leave_steps(ev, True), self._ns)
        finally:
            self._locks.release(ev.sid)
            if ev.pending:
                self._core.run_ended(ev.pending)

    async def agive_back(self, ev: EventState) -> None:
        ev.active = False
        if ev.renew:
            self.renewer.remove(ev)
        try:
            await self._core.adrive(self._leave_steps(ev, True))
        finally:
            self._locks.release(ev.sid)
            if ev.pending:
                self._core.run_ended(ev.pending)

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
        ev.lease_until = now + core.settings.lease_ttl
        self._meter.count("renewals")
        # What the touch removed has its callbacks run as the event ends.
        ev.pending.extend(touched((yield from ask(touch(core, ev, now)))))

    def _commit_and_release(self, ev: EventState) -> ChangeLoopError | None:
        """:meth:`_leave_steps` of a block that did not fail, with the store's blocking
        methods; an event that writes with no listener due commits and gives its lease
        back in one direct call (the most common event)."""
        if ev.user_part is not None:  # its writes commit with its user's
            return drive(self._leave_steps(ev, False), self._ns)
        try:
            collected = writes, tokens, changed = ev.collect()
        except BaseException:
            self._give_back(ev)
            raise
        if self.kept is not None and no_listeners(changed) and not self.kept.wanted(ev.sid):
            try:
                drive(self._keep_steps(ev, collected, self.kept), self._ns)
            except BaseException as exc:
                self._commit_failed(ev, exc)
            self._give_back(ev)  # (when this engine could keep it no more)
            return None
        if not writes or not no_listeners(changed):
            return drive(self._leave_steps(ev, False, collected), self._ns)
        lease = ev.lease
        try:
            self._ns.commit(
                ev.sid,
                version=ev.loaded.version,
                writes=writes,
                ttl_deadlines=self._core.written_deadlines(ev.now, writes),
                now=ev.now,
                lease=lease,
                release=True,
            )
        except BaseException as exc:
            self._commit_failed(ev, exc)
        ev.lease = None  # given back with the commit
        ev.hand_out(tokens)
        ev.changed = changed  # no round: the result is made when asked for
        return None

    async def _acommit_and_release(self, ev: EventState) -> ChangeLoopError | None:
        """:meth:`_commit_and_release`, awaited: an event that writes with no listener
        due and no lease to keep commits and gives its lease back in one direct call;
        any other leaves by its steps."""
        core = self._core
        if ev.user_part is not None or self.kept is not None:
            return await core.adrive(self._leave_steps(ev, False))
        try:
            collected = writes, tokens, changed = ev.collect()
        except BaseException:
            await self._agive_back(ev)
            raise
        if not writes or not no_listeners(changed):
            return await core.adrive(self._leave_steps(ev, False, collected))
        try:
            await core.acall(
                Commit(
                    sid=ev.sid,
                    version=ev.loaded.version,
                    writes=writes,
                    ttl_deadlines=core.written_deadlines(ev.now, writes),
                    now=ev.now,
                    lease=ev.lease,
                    release=True,
                )
            )
        except BaseException as exc:
            try:
                if isinstance(exc, StoreConflict):
                    error = self._conflict(ev, exc)
                    if error is not exc:
                        raise error from exc
                raise
            finally:
                await self._agive_back(ev)  # (a no-op if the commit gave it back)
        ev.lease = None  # given back with the commit
        ev.hand_out(tokens)
        ev.changed = changed  # no round: the result is made when asked for
        return None

    async def _agive_back(self, ev: EventState) -> None:
        """:meth:`_give_back`, awaited."""
        if ev.lease is not None:
            try:
                await self._core.acall(Release(sid=ev.sid, lease=ev.lease))
            except BaseException as exc:
                self._release_failed(ev, exc)

    def _keep_steps(self, ev: EventState, collected: Collected, kept: KeptLeases) -> Steps[None]:
        """Leave an event that ended well with its lease kept for the session's next
        event here: its writes committed with the lease kept (renewed, the session's
        deadline slid), or, without writes, no store call at all. ``ev.lease`` stays
        set if the lease could not be kept (the caller gives it back)."""
        writes, tokens, changed = collected
        token = ev.lease
        assert token is not None
        now = self._core.clock()
        if writes:
            keep = kept.keep_for(now)
            version = yield from ask(
                Commit(
                    sid=ev.sid,
                    version=ev.loaded.version,
                    writes=writes,
                    ttl_deadlines=self._core.written_deadlines(ev.now, writes),
                    now=ev.now,
                    lease=token,
                    release=False,
                    keep=keep,
                )
            )
            if isinstance(version, GivenBack):  # closed meanwhile: nothing is kept
                ev.lease = None
                entry = None
            else:
                loaded = Loaded(
                    sid=ev.sid,
                    version=version,
                    closed=ev.closed,
                    values={**ev.loaded.values, **writes},
                )
                entry = Kept(
                    token=token, loaded=loaded, until=keep.until, deadline=keep.touch_until
                )
        elif ev.closed:  # a closed session's next event loads it: not kept
            entry = None
        elif ev.on_kept and ev.lease_until - now <= kept.keep:
            # Still kept: the store marks it so. (An event that loaded holds a lease the
            # store does not mark kept: other processes would wait for it without
            # asking, and a promoted replica would not have it. It is given back.)
            entry = Kept(token=token, loaded=ev.loaded, until=ev.lease_until, deadline=ev.deadline)
        else:  # given back by the caller
            entry = None
        if entry is not None and kept.put(ev.sid, entry):
            ev.lease = None  # kept: not given back
        ev.hand_out(tokens)
        ev.changed = changed  # no round: the result is made when asked for

    def _commit_failed(self, ev: EventState, exc: BaseException) -> NoReturn:
        """Raise what a direct commit's failure ``exc`` means (a refused commit under a
        lease: the lease was lost), once the event's lease is given back."""
        try:
            if isinstance(exc, StoreConflict):
                raise self._conflict(ev, exc) from exc
            raise exc
        finally:
            self._give_back(ev)

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
            self._count_conflict(ev, lease_lost=False)
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
                kept = self.kept
                if (
                    kept is not None
                    and ev.lease is not None
                    and ev.user_part is None
                    and not kept.wanted(ev.sid)
                ):
                    if collected is None:
                        collected = ev.collect()
                    if no_listeners(collected[2]):
                        yield from self._keep_steps(ev, collected, kept)
                        return None
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
