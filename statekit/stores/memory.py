"""The in-memory store: the default, for one process.

Values are kept as Python objects, never serialized. Lifetimes need no heap: the
engine uses one idle ttl, one closed grace, one idle ttl for users' records (ids
beginning ``u:``) and one ttl per state, so in each of these queues deadlines arrive in
the order entries are touched. Each queue is an ``OrderedDict`` (touching moves an
entry to the end, in O(1)), and reaping looks only at the queue fronts. The queues
double as the least-recently-used order for capacity eviction: closed sessions first,
then open ones, then users' records.

Each session's record also carries its lock (a :class:`~statekit._locks.Latch`): the
engine's events take it in the same critical section as they load the session
(:meth:`_MemoryNamespace.enter`) and give it back in the same one as they commit
(:meth:`_MemoryNamespace.leave`), so an event costs two passes through the store's
lock. Every engine of an application shares its records, hence its session locks.

If deadlines were ever given out of order (a wall clock stepping back), an entry is
reaped late, never early, and a load still refuses anything past its own deadline.
Engines that share an application through one store share its sessions, values and
globals until the last handle on the application shuts down (or is garbage-collected
without a shutdown): only that shutdown ends them (reason ``shutdown``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from statekit import _fork
from statekit._checks import USER_PREFIX
from statekit._codec import Codec
from statekit._locks import AsyncWaiter, await_turn, wait_turn
from statekit.exceptions import SessionExpired, SessionNotFound, StoreConflict

from ._memory_records import AppState, MemoryGlobals, Queued, Record, UserRecord, eviction_victim
from .base import (
    Busy,
    CommitPart,
    DeleteReason,
    Ended,
    Gone,
    Lease,
    Loaded,
    Notice,
    SessionIdTaken,
    Turn,
)

logger = logging.getLogger("statekit")

__all__ = ["MemoryStore"]

# How many ended session ids are remembered, to answer "expired" rather than "unknown".
# Bounded, so that churn cannot grow memory without limit.
TOMBSTONES = 100_000


class MemoryStore:
    """Keeps every application's state in this process's memory.

    The default store. Fastest; nothing is serialized, so any deep-copyable value can be
    stored. Its data dies with the process: when the last engine using an application
    shuts down (:meth:`StateEngine.shutdown`), the deletion callbacks of every value it
    held run. Thread-safe.

    Args:
        check_values: a codec (for example :class:`~statekit.JSONCodec`, the shared
            stores' default) that every value written must be encodable by: a value a
            shared store would refuse then raises :class:`~statekit.ValueNotStorable`
            here too, during development and tests rather than in production. It costs
            one encoding per value written; leave it ``None`` (the default) in
            production. ``statekit.testing.checked_store()`` makes such a store.
    """

    shared = False
    joint_commits = True
    codec: Codec | None = None

    def __init__(self, *, check_values: Codec | None = None) -> None:
        if check_values is not None and not isinstance(check_values, Codec):
            raise TypeError(
                "check_values takes a codec such as JSONCodec(), got "
                f"{type(check_values).__name__}"
            )
        self.check_values = check_values
        self._apps: dict[str, AppState] = {}
        self._lock = threading.Lock()
        _fork.after_fork_in_child(self)

    def __repr__(self) -> str:
        return f"MemoryStore(apps={sorted(self._apps)!r})"

    def namespace(self, app: str) -> _MemoryNamespace:
        """A handle on application ``app``; handles of one name share their state,
        which lives until every handle has shut down."""
        with self._lock:
            state = self._apps.get(app)
            if state is None:
                state = self._apps[app] = AppState()
            handle = _MemoryNamespace(state)
            with state.lock:
                state.handles.add(handle)
            return handle

    def _after_fork(self) -> None:
        """In the child of a fork: the locks of the parent's threads are free again,
        and sessions its events held are free (those events go on in the parent)."""
        _fork.free_lock(self._lock)
        me = threading.get_ident()  # an event open across the fork goes on here
        for state in self._apps.values():
            _fork.free_lock(state.lock)
            for queue in (state.open, state.closed, state.users):
                for rec in queue.values():
                    if rec.owner != me:
                        rec.owner = None
                    rec.waiters = None


_handles = itertools.count(1)


class _MemoryNamespace(MemoryGlobals):
    """A handle on one application's state in a :class:`MemoryStore`. Thread-safe: one
    lock guards every structure, and no user code runs under it. Notices go, after the
    lock is released, to the subscribers of the application's other handles.

    An :class:`~statekit.stores.base.EnteringNamespace`: each session's lock lives in
    its record, shared by every engine of the application."""

    entered_type = Record

    def __init__(self, state: AppState) -> None:
        self._state = state
        self.origin = f"memory-{next(_handles)}"
        self._lock = state.lock
        self._open = state.open
        self._closed = state.closed
        self._users = state.users
        self._ttl = state.ttl
        self._gone = state.gone
        self._globals = state.globals
        self._subscribers = state.subscribers
        self._shut = False

    # -- notices -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        key = next(_handles)
        with self._lock:
            self._subscribers[key] = (self.origin, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return unsubscribe

    def _publish(self, notices: Iterable[Notice]) -> None:
        """Deliver notices to other handles' subscribers; call without the lock."""
        subscribers = list(self._subscribers.values())
        if not subscribers:
            return
        for notice in notices:
            for origin, callback in subscribers:
                if origin == notice.origin:
                    continue
                try:
                    callback(notice)
                except Exception:
                    logger.exception("store notice subscriber raised")

    def _ended_notices(self, ended: Iterable[Ended]) -> list[Notice]:
        """Notices of ended sessions (not of values, nor of one noticed at its close)."""
        return [
            Notice(kind="ended", sid=e.sid, reason=e.reason, origin=self.origin)
            for e in ended
            if e.state is None and not e.was_closed
        ]

    def release(self, sid: str, *, lease: str) -> None:
        """Leases are for shared stores; within one process the engine's locks serve."""

    def renew(self, sid: str, *, lease: str, until: float) -> bool:
        return True  # no leases (see release): the session's lock is held as long as needed

    # -- sessions ---------------------------------------------------------------

    def create_session(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> tuple[Ended, ...]:
        evicted: list[Ended] = []
        with self._lock:
            if sid in self._open or sid in self._closed or sid in self._users:
                raise SessionIdTaken
            while self._open or self._closed or self._users:
                if len(self._open) + len(self._closed) + len(self._users) < capacity:
                    break
                victim = eviction_victim(self._closed, self._open, self._users)
                if victim.deadline <= now:
                    reason = DeleteReason.CLOSED if victim.closed else DeleteReason.IDLE
                    at = victim.deadline
                else:
                    reason, at = DeleteReason.EVICTED, now
                evicted.append(self._remove(victim, reason, at))
            if sid.startswith(USER_PREFIX):
                self._users[sid] = UserRecord(sid, deadline, self._users)
            else:
                self._open[sid] = Record(sid, deadline, self._open)
        if evicted and self._subscribers:
            self._publish(self._ended_notices(evicted))
        return tuple(evicted)

    def load_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        return self._loaded(sid, now, touch_until)  # leases are for shared stores

    def _loaded(self, sid: str, now: float, touch_until: float | None) -> Loaded | Gone | None:
        expired: list[Ended] = []
        with self._lock:
            rec = self._open_touched(sid, now, touch_until)
            if rec is not None:  # the common case, inline
                return Loaded(sid=sid, version=rec.version, closed=False, values=rec.values)
            rec = self._open.get(sid) or self._closed.get(sid) or self._users.get(sid)
            if rec is None:
                return self._gone_answer(sid)
            gone = self._load(rec, expired, now, touch_until)
            if gone is None:
                return Loaded(
                    sid=sid,
                    version=rec.version,
                    closed=rec.closed,
                    values=rec.values,
                    expired=tuple(expired),
                )
        if self._subscribers:
            self._publish(self._ended_notices((gone.ended,)))  # type: ignore[arg-type]
        return gone

    def _load(
        self, rec: Record, expired: list[Ended], now: float, touch_until: float | None
    ) -> Gone | None:
        """Under the lock: end a session past its deadline (its ``Gone``), or else move
        its values past their own ttl to ``expired`` and slide its deadline to
        ``touch_until`` (if open and given)."""
        if rec.deadline <= now:
            reason = DeleteReason.CLOSED if rec.closed else DeleteReason.IDLE
            ended = self._remove(rec, reason, rec.deadline)
            return Gone(reason=reason, at=rec.deadline, ended=ended)
        if rec.value_deadlines:
            expired.extend(self._claim_values(rec, now))
        if not rec.closed and touch_until is not None:
            order = rec.order  # kept in deadline order: never slid behind a later one
            last = order[next(reversed(order))]
            rec.deadline = max(touch_until, last.deadline) if last is not rec else touch_until
            order.move_to_end(rec.sid)
        return None

    # -- events: the session's lock and its load or commit in one critical section ---

    def enter(
        self,
        sid: str,
        owner: object,
        expired: list[Ended],
        blocking: bool,
        now: float,
        touch_until: float,
    ) -> Record | Gone | Queued | None:
        """Take the lock of session ``sid`` for ``owner`` and load it (touching it):
        the session's record, whose values and version the caller reads while it holds
        the lock; ``Gone`` or None (unknown) if it cannot be entered; or, when another
        event holds the session, a place in its queue (a thread waiter when
        ``blocking``, else a task waiter) to wait on before :meth:`enter_after_wait`.
        Values found past their own ttl are removed and added to ``expired``.

        Raises:
            UsageError: ``owner`` already holds the session (nested events).
        """
        # acquire/release rather than 'with': half the cost, on every event
        self._lock.acquire()
        try:
            rec = self._open.get(sid) or self._closed.get(sid)  # (a user's: enter_user)
            if rec is None:
                return self._gone_answer(sid)
            if rec.owner is not None:
                return Queued(rec, rec.queue(sid, owner, blocking=blocking))
            rec.owner = owner
            if rec.deadline > now and not rec.value_deadlines and not rec.closed:
                rec.deadline = touch_until  # the common case, inline
                rec.order.move_to_end(sid)
                return rec
            entered = self._load_held(rec, expired, now, touch_until)
        finally:
            self._lock.release()
        if type(entered) is Gone and self._subscribers:
            self._publish(self._ended_notices((entered.ended,)))  # type: ignore[arg-type]
        return entered

    def enter_user(
        self,
        sid: str,
        owner: object,
        expired: list[Ended],
        blocking: bool,
        now: float,
        touch_until: float,
    ) -> Record | Gone | Queued | None:
        """As :meth:`enter`, for a user's record (``engine.user_state``): only these
        find one, so that a session id naming a record touches nothing."""
        with self._lock:
            rec = self._users.get(sid)
            if rec is None:
                return self._gone_answer(sid)
            if rec.owner is not None:
                return Queued(rec, rec.queue(sid, owner, blocking=blocking))
            rec.owner = owner
            entered = self._load_held(rec, expired, now, touch_until)
        if type(entered) is Gone and self._subscribers:
            self._publish(self._ended_notices((entered.ended,)))  # type: ignore[arg-type]
        return entered

    def wait_turn(self, queued: Turn, owner: object, timeout: float) -> bool:
        """Block this thread until the session's lock is handed to ``owner``, at most
        ``timeout`` seconds; returns whether it was. A wait that times out or is
        interrupted leaves the queue (or passes on a lock granted meanwhile)."""
        assert isinstance(queued, Queued)
        assert not isinstance(queued.waiter, AsyncWaiter)
        rec = queued.record
        return self._granted(
            rec, owner, wait_turn(queued.waiter, rec, self._lock, **self._waiting(rec, timeout))
        )

    async def await_turn(self, queued: Turn, owner: object, timeout: float) -> bool:
        """Wait, without blocking the event loop, until the session's lock is handed to
        ``owner``, this task, at most ``timeout`` seconds; returns whether it was. A
        wait that times out or is cancelled leaves the queue (or passes on a lock
        granted meanwhile)."""
        assert isinstance(queued, Queued)
        assert isinstance(queued.waiter, AsyncWaiter)
        rec = queued.record
        waiting = self._waiting(rec, timeout)
        return self._granted(
            rec, owner, await await_turn(queued.waiter, rec, self._lock, **waiting)
        )

    def _waiting(self, rec: Record, timeout: float) -> dict[str, Any]:
        """How long a waiter waits, and how it passes on a lock granted as it leaves."""
        return {"timeout": timeout, "release": lambda: self.release_entered(rec)}

    @staticmethod
    def _granted(rec: Record, owner: object, turn_came: bool) -> bool:
        """Record the new owner of a session whose lock was handed over."""
        if turn_came:
            rec.owner = owner
        return turn_came

    def enter_after_wait(
        self,
        queued: Turn,
        expired: list[Ended],
        *,
        now: float,
        touch_until: float,
    ) -> Record | Gone | None:
        """Load a session whose lock the caller holds after waiting for its turn."""
        assert isinstance(queued, Queued)
        rec = queued.record
        with self._lock:
            if rec.removed:
                rec.hand_over()
                return self._gone_answer(rec.sid)
            entered = self._load_held(rec, expired, now, touch_until)
        if type(entered) is Gone and self._subscribers:
            self._publish(self._ended_notices((entered.ended,)))  # type: ignore[arg-type]
        return entered

    def _load_held(
        self, rec: Record, expired: list[Ended], now: float, touch_until: float
    ) -> Record | Gone:
        """Under the lock, for the holder of the record's latch: load or end it."""
        gone = self._load(rec, expired, now, touch_until)
        if gone is not None:
            rec.hand_over()  # whoever waits finds it removed
            return gone
        return rec

    def leave(
        self,
        rec: Any,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float] | None,
        now: float,
    ) -> None:
        """Commit an entered session's ``writes`` (if any) and release its lock, which
        passes to the longest waiter. The lock is released even when the commit is
        refused.

        Raises:
            SessionExpired, SessionNotFound: the session left the store meanwhile
                (evicted, say); nothing was written.
        """
        self._lock.acquire()
        try:
            if writes:
                if rec.removed:
                    raise self._ended_error(rec.sid, now)
                if ttl_deadlines or rec.value_deadlines:
                    rec.write(writes, ttl_deadlines, self._ttl)
                else:  # the common case, inline
                    rec.values.update(writes)
                    rec.version += 1
        finally:
            if rec.waiters:
                rec.hand_over()
            else:
                rec.owner = None
            self._lock.release()
        if writes and self._subscribers:
            self._publish(
                [Notice(kind="changed", sid=rec.sid, names=tuple(writes), origin=self.origin)]
            )

    def give_back(self, turn: Turn, owner: object) -> None:
        """Release the session's lock if ``owner`` holds it (after a failure around a
        wait, when whether the turn came is not known)."""
        assert isinstance(turn, Queued)
        with self._lock:
            if turn.record.owner == owner:
                turn.record.hand_over()

    def release_entered(self, rec: Any) -> None:
        """Release an entered session's lock without committing."""
        self._lock.acquire()
        try:
            if rec.waiters:
                rec.hand_over()
            else:  # the common case, inline
                rec.owner = None
        finally:
            self._lock.release()

    def occupancy(self) -> tuple[int, int]:
        """How many sessions events hold or wait for, and how many events wait (a
        diagnostic: it looks at every session)."""
        held = waiting = 0
        with self._lock:
            for queue in (self._open, self._closed, self._users):
                for rec in queue.values():
                    if not rec.idle:
                        held += 1
                        waiting += len(rec.waiters) if rec.waiters else 0
        return held, waiting

    def peek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Loaded | Gone | None:
        return self._loaded(sid, now, touch_until)

    def peek_inline(self, sid: str, now: float, touch_until: float) -> Mapping[str, Any] | None:
        """:meth:`peek`'s common case, for the engine's read outside an event (see
        :meth:`_open_touched`): the session's values, or None (then :meth:`peek`)."""
        self._lock.acquire()
        try:
            rec = self._open_touched(sid, now, touch_until)
            return None if rec is None else rec.values
        finally:
            self._lock.release()

    def _open_touched(self, sid: str, now: float, touch_until: float | None) -> Record | None:
        """Under the lock: open session ``sid``'s record, touched (``touch_until`` not
        None), if live with no value ttl due; else None, nothing done."""
        rec = self._open.get(sid)
        if rec is None or rec.deadline <= now or rec.value_deadlines:
            return None
        if touch_until is not None:
            rec.deadline = touch_until
            self._open.move_to_end(sid)
        return rec

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
        keep: object = None,  # no leases here: lease, release and keep mean nothing
    ) -> int:
        with self._lock:
            rec = self._open.get(sid) or self._closed.get(sid) or self._users.get(sid)
            if rec is None:
                raise self._ended_error(sid, now)
            if rec.version != version:
                raise StoreConflict(sid, version, rec.version)
            version = rec.write(writes, ttl_deadlines, self._ttl)
        if self._subscribers:  # notices are built only for someone to read them
            self._publish(
                [Notice(kind="changed", sid=sid, names=tuple(writes), origin=self.origin)]
            )
        return version

    def commit_joint(self, parts: Iterable[CommitPart], *, now: float) -> tuple[int, ...]:
        parts = tuple(parts)
        with self._lock:
            recs = []
            for part in parts:  # every part checked before any is written
                sid = part.sid
                rec = self._open.get(sid) or self._closed.get(sid) or self._users.get(sid)
                if rec is None:
                    raise self._ended_error(part.sid, now)
                if rec.version != part.version:
                    raise StoreConflict(part.sid, part.version, rec.version)
                recs.append(rec)
            queues = self._ttl
            versions = tuple(
                rec.write(part.writes, part.ttl_deadlines, queues) if part.writes else rec.version
                for rec, part in zip(recs, parts, strict=True)
            )
        if self._subscribers:
            self._publish(
                Notice(kind="changed", sid=p.sid, names=tuple(p.writes), origin=self.origin)
                for p in parts
                if p.writes
            )
        return versions

    def _ended_error(self, sid: str, now: float) -> SessionExpired | SessionNotFound:
        gone = self._gone.get(sid)
        if gone is None:
            return SessionNotFound(sid)
        return SessionExpired(sid, gone[0].value, max(0.0, now - gone[1]))

    def close_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        with self._lock:
            rec = self._open.get(sid)
            if rec is None:
                if sid in self._closed:
                    return False
                return self._gone_answer(sid)
            if rec.deadline <= now:
                ended = self._remove(rec, DeleteReason.IDLE, rec.deadline)
                outcome: bool | Gone = Gone(reason=DeleteReason.IDLE, at=rec.deadline, ended=ended)
            else:
                del self._open[sid]
                rec.closed = True
                rec.deadline = deadline
                self._closed[sid] = rec
                rec.order = self._closed
                ended = Ended(sid=sid, reason=DeleteReason.CLOSED, values={}, at=now)
                outcome = True
        if self._subscribers:
            self._publish(self._ended_notices((ended,)))
        return outcome

    def session_count(self) -> int:
        return len(self._open) + len(self._closed) + len(self._users)

    def reap(self, *, now: float, limit: int) -> tuple[Ended, ...]:
        out: list[Ended] = []
        with self._lock:
            while len(out) < limit:
                best: float = now
                pick: Any = None
                for queue in (self._open, self._closed, self._users):
                    if queue:
                        rec = next(iter(queue.values()))
                        if rec.deadline <= best:
                            best, pick = rec.deadline, rec
                for name, ttl_queue in self._ttl.items():
                    if ttl_queue:
                        sid, deadline = next(iter(ttl_queue.items()))
                        if deadline <= best:
                            best, pick = deadline, (name, sid)
                if pick is None:
                    break
                if isinstance(pick, Record):
                    reason = DeleteReason.CLOSED if pick.closed else DeleteReason.IDLE
                    out.append(self._remove(pick, reason, pick.deadline))
                else:
                    name, sid = pick
                    rec = self._open.get(sid) or self._closed.get(sid) or self._users[sid]
                    out.append(self._claim_value(rec, name, best))
        if out and self._subscribers:
            self._publish(self._ended_notices(out))
        return tuple(out)

    def _claim_values(self, rec: Record, now: float) -> tuple[Ended, ...]:
        assert rec.value_deadlines is not None
        due = [name for name, deadline in rec.value_deadlines.items() if deadline <= now]
        return tuple(self._claim_value(rec, name, rec.value_deadlines[name]) for name in due)

    def _claim_value(self, rec: Record, name: str, at: float) -> Ended:
        assert rec.value_deadlines is not None
        del rec.value_deadlines[name]
        del self._ttl[name][rec.sid]
        value = rec.values.pop(name)
        return Ended(sid=rec.sid, reason=DeleteReason.TTL, values={name: value}, state=name, at=at)

    def _remove(self, rec: Record, reason: DeleteReason, at: float) -> Ended:
        rec.order.pop(rec.sid)
        rec.removed = True
        if rec.value_deadlines:
            for name in rec.value_deadlines:
                del self._ttl[name][rec.sid]
        self._gone[rec.sid] = (reason, at)
        if len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)
        return Ended(sid=rec.sid, reason=reason, values=rec.values, was_closed=rec.closed, at=at)

    def _gone_answer(self, sid: str) -> Gone | None:
        gone = self._gone.get(sid)
        return None if gone is None else Gone(reason=gone[0], at=gone[1])

    def shutdown(self) -> tuple[Ended, ...]:
        """Let go of the application: its data ends (and is returned, with reason
        ``shutdown``) only when this is its last handle. A second call does nothing."""
        with self._lock:
            if self._shut:
                return ()
            self._shut = True
            for key, (origin, _) in list(self._subscribers.items()):
                if origin == self.origin:
                    del self._subscribers[key]
            self._state.handles.discard(self)
            if self._state.handles:
                return ()
            records = [*self._open.values(), *self._closed.values(), *self._users.values()]
            for rec in records:
                rec.removed = True
            self._open.clear()
            self._closed.clear()
            self._users.clear()
            self._ttl.clear()
            self._globals.clear()
        return tuple(
            Ended(
                sid=rec.sid,
                reason=DeleteReason.SHUTDOWN,
                values=rec.values,
                was_closed=rec.closed,
            )
            for rec in records
        )
