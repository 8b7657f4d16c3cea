"""What an engine counts and measures about itself, for operations: events, how long
they waited for and held their sessions, conflicts, busy sessions, lease renewals,
sessions ended by reason, the largest values written; and the warnings it logs when an
event holds its session too long or a value grows too large.

Cheap on an event's path: an event leaving draws its number from a counter and writes
how long it held its session into a ring of the last :data:`WINDOW` holds, at that
number; one C call and one list store, no lock (``next`` of an :func:`itertools.count`
is a single step under CPython's GIL, so no two events draw one number). Only an event
that had to wait notes its wait (with the number of events before it): the others
waited 0, which reading the figures fills in. The rest
(rare: a conflict, a busy session, a session ended, a new largest value, a warning)
takes the meter's lock. Percentiles are computed when :meth:`Meter.read` is called.

Memory is bounded: two windows of :data:`WINDOW` entries, and one size per session
state declared.

Thread-safe. The warnings go to the ``statekit`` logger; no other code runs here.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from ._clock import Clock
from ._copying import Sealed
from .exceptions import redact
from .stores.base import DeleteReason

__all__ = [
    "LARGEST",
    "WARN_EVERY",
    "WINDOW",
    "EngineStats",
    "Meter",
    "Timings",
    "ValueSize",
    "stored_size",
]

logger = logging.getLogger("statekit")

#: How many of the latest events the wait and hold percentiles are taken over (a power
#: of two: an event's place in the ring is its number masked).
WINDOW = 1024
_MASK = WINDOW - 1
#: How many of the largest values :attr:`Meter.largest` names.
LARGEST = 5
#: Each kind of warning is logged at most once per this many seconds (engine clock);
#: the next one says how many were held back.
WARN_EVERY = 60.0


@attrs.frozen(kw_only=True)
class Timings:
    """Percentiles of a duration over the latest events (at most :data:`WINDOW`), in
    seconds on the engine's clock; all 0 before any event.

    Attributes:
        p50: the median.
        p99: the 99th percentile.
        samples: how many events they are taken over.
    """

    p50: float
    p99: float
    samples: int


@attrs.frozen(kw_only=True)
class ValueSize:
    """The largest value an event of this engine wrote for a state (its name only).

    Attributes:
        state: the session state's name.
        size: bytes: the codec's encoding on SQLite and Redis; on the memory store a
            string's UTF-8 length, a bytes value's length, or the sealed image's (a
            value kept as a private deep copy is not sized there).
    """

    state: str
    size: int


def stored_size(stored: Any) -> int | None:
    """How many bytes a stored form takes, when it is bytes (a codec's, or a bytes
    value the memory store keeps as it is), a sealed image or a string (its UTF-8
    length, as a codec would write it); None for an object whose size is not known
    without walking it."""
    cls = stored.__class__
    if cls is bytes:
        return len(stored)
    if cls is str:
        return len(stored) if stored.isascii() else len(stored.encode("utf-8", "surrogatepass"))
    if cls is Sealed:
        return len(stored.blob)
    return None


def _count(counter: itertools.count[int]) -> int:
    """An :func:`itertools.count`'s next value, without taking it (``count(5)``)."""
    return int(repr(counter)[6:-1])


def _timings(samples: list[float]) -> Timings:
    if not samples:
        return Timings(p50=0.0, p99=0.0, samples=0)
    samples.sort()
    n = len(samples)
    # The nearest-rank percentile: the smallest sample at or above that share.
    return Timings(
        p50=samples[max(0, math.ceil(0.5 * n) - 1)],
        p99=samples[max(0, math.ceil(0.99 * n) - 1)],
        samples=n,
    )


class _Limiter:
    """Lets a kind of warning through at most once per :data:`WARN_EVERY` seconds,
    counting those held back. Used under the meter's lock."""

    __slots__ = ("held_back", "next_at")

    def __init__(self) -> None:
        self.next_at = -math.inf
        self.held_back = 0

    def allow(self, now: float) -> int | None:
        """How many were held back since the last one let through, if this one may be;
        else None (it is counted)."""
        # (A clock that stepped back further than WARN_EVERY does not hold warnings
        # back until it has caught up.)
        if now < self.next_at and self.next_at - now <= WARN_EVERY:
            self.held_back += 1
            return None
        held_back, self.held_back = self.held_back, 0
        self.next_at = now + WARN_EVERY
        return held_back


class Meter:
    """One engine's figures (see the module's docstring).

    Args:
        clock: the engine's clock, which warnings are rate-limited by.
        warn_hold: log a warning when an event holds its session longer than this
            many seconds; None: never.
        warn_size: log a warning when an event writes a value larger than this many
            bytes; None: never.
    """

    def __init__(self, clock: Clock, *, warn_hold: float | None, warn_size: int | None) -> None:
        self._clock = clock
        self.warn_hold: float = math.inf if warn_hold is None else warn_hold
        self.warn_size: float = math.inf if warn_size is None else warn_size
        self._lock = threading.Lock()
        # The hot path, no lock: events[next(number) & MASK] = hold. Events' own
        # figures count from the event numbered ``_first`` (0, or the fork's).
        self._events = itertools.count()
        self._first = 0
        #: The ring of the latest holds, written at each event's number masked.
        self.holds = [0.0] * WINDOW
        #: Draws the next event's number.
        self.number = self._events.__next__
        # The waits of events that waited, with the number of events before them.
        self._waits: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self._zero()

    def _zero(self) -> None:
        """The counts at zero (under the lock, but for a new or forked meter)."""
        self._counts = {
            "conflicts": 0,
            "busy": 0,
            "renewals": 0,
            "kept_events": 0,
            "leases_lost": 0,
        }
        self._ended = dict.fromkeys(DeleteReason, 0)
        self._largest: dict[str, int] = {}
        self._slow = _Limiter()
        self._large = _Limiter()

    def after_fork(self) -> None:
        """In a forked child: the lock freed, and every figure at zero. A child's figures
        are its own from the fork on, so that the sum over a server's workers counts
        what the parent did before forking once, not once per worker. (The ring and the
        numbering stay the same objects: events' entries hold them.)"""
        self._lock = threading.Lock()
        self._first = _count(self._events)
        self.holds[:] = [0.0] * WINDOW
        self._waits.clear()
        self._zero()

    # -- counting ------------------------------------------------------------------

    def held(self, hold: float) -> None:
        """One more event, which held its session ``hold`` seconds."""
        self.holds[self.number() & _MASK] = hold

    def waited(self, wait: float) -> None:
        """An event waited ``wait`` seconds (more than 0) for its session."""
        self._waits.append((_count(self._events), wait))

    def wait_of(self, ev: Any, wait: float) -> None:
        """``ev`` waited ``wait`` seconds (more than 0) to enter: one sample, or, for an
        event of a user or its hold on the user's record, kept on the event (the two
        make one sample: see :meth:`user_waited`)."""
        if ev.user is None and ev.idle_ttl is None:
            self._waits.append((_count(self._events), wait))
        else:
            ev.waited = wait

    def user_waited(self, ev: Any) -> None:
        """An event of a user entered its session and its user's record: how long it
        waited for both, as one sample."""
        part = ev.user_part
        wait = ev.waited + (part.waited if part is not None else 0.0)
        if wait > 0.0:
            self._waits.append((_count(self._events), wait))

    def count(self, what: str) -> None:
        """One more of ``what``: ``conflicts``, ``busy``, ``renewals``, ``kept_events``,
        ``leases_lost``."""
        with self._lock:
            self._counts[what] += 1

    def ended(self, reason: DeleteReason) -> None:
        """A session this process removed from the store, for ``reason``."""
        with self._lock:
            self._ended[reason] += 1

    def sized(self, sid: str, name: str, stored: Any) -> None:
        """Note the size of a value an event writes (and warn of one too large); a
        stored form whose size is not known (see :func:`stored_size`) is left out."""
        size = stored_size(stored)
        if size is None:
            return
        largest = self._largest
        if size > largest.get(name, -1):
            with self._lock:
                if size > largest.get(name, -1):
                    largest[name] = size
        if size > self.warn_size:
            self._warn_large(sid, name, size)

    # -- warnings ------------------------------------------------------------------

    def slow(self, sid: str, hold: float) -> None:
        """An event held its session ``hold`` seconds, past ``warn_hold``."""
        held_back = self._allow(self._slow)
        if held_back is not None:
            logger.warning(
                "an event held session %s for %.3gs (warn_hold=%gs): other requests of "
                "the session waited meanwhile; move slow work out of the event, or renew "
                "its lease if it must run that long%s",
                redact(sid),
                hold,
                self.warn_hold,
                _more(held_back),
            )

    def _allow(self, limiter: _Limiter) -> int | None:
        try:
            now = self._clock()
        except Exception:  # a warning is not worth failing an event for
            return None
        with self._lock:
            return limiter.allow(now)

    def _warn_large(self, sid: str, name: str, size: int) -> None:
        held_back = self._allow(self._large)
        if held_back is not None:
            logger.warning(
                "state %r wrote a value of %d bytes in session %s (warn_size=%d bytes): "
                "every load of the session reads it; keep large data elsewhere and store "
                "a reference%s",
                name,
                size,
                redact(sid),
                self.warn_size,
                _more(held_back),
            )

    # -- reading -------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """The figures now, as :class:`~statekit.EngineStats` fields."""
        waited, ring = list(self._waits), list(self.holds)
        first, drawn = self._first, _count(self._events)
        events = drawn - first
        latest = min(events, WINDOW)
        holds = ring if latest == WINDOW else [ring[(first + i) & _MASK] for i in range(latest)]
        # The waits of the latest events: those noted, and 0 for the others.
        since = max(first, drawn - WINDOW)
        waits = [wait for number, wait in waited if number >= since]
        waits += [0.0] * (latest - len(waits))
        with self._lock:
            counts = dict(self._counts)
            ended = {reason.value: n for reason, n in self._ended.items()}
            largest = sorted(self._largest.items(), key=lambda item: (-item[1], item[0]))
        return {
            "events": events,
            **counts,
            "ended": ended,
            "lease_wait": _timings(waits),
            "lease_hold": _timings(holds),
            "largest": tuple(ValueSize(state=n, size=s) for n, s in largest[:LARGEST]),
        }


def _more(held_back: int) -> str:
    return f" ({held_back} more since the last such warning)" if held_back else ""


_NO_TIMINGS = Timings(p50=0.0, p99=0.0, samples=0)


@attrs.frozen(kw_only=True)
class EngineStats:
    """What an engine can tell about itself, for operations and tests. Counts are of
    this engine since it was made (in this process); see the operations guide.

    Attributes:
        sessions: live sessions: those the store holds (open, or closed within their
            grace), of every process; users' records count too, as in
            :meth:`~statekit.StateEngine.session_count`.
        held: sessions that events of this process hold or wait for (on the memory
            store, of every engine of the app); 0 when no event is open. An event
            opened with ``user=`` holds two: its session and its user's record.
        waiting: events waiting for a session another event holds.
        events: events that entered their session.
        ended: sessions this engine removed from the store, by reason (every
            :class:`~statekit.DeleteReason` value is a key): reaped when idle or
            after their close grace, evicted at capacity, ended at shutdown. With a
            shared store each ended session is counted by one process only.
        conflicts: events whose commit was refused (:class:`~statekit.StoreConflict`,
            :class:`~statekit.LeaseLost` included).
        busy: events that gave up waiting for their session
            (:class:`~statekit.SessionBusy`).
        renewals: leases renewed (:meth:`Event.extend` and ``renew=True``).
        kept: sessions whose leases this engine keeps between events now
            (``lease_keep``).
        kept_events: events that ran on a lease kept from the session's previous
            event here, without loading it (``lease_keep``).
        leases_lost: events that lost their lease to another
            (:class:`~statekit.LeaseLost`).
        lease_wait: how long the latest events waited for their session (for the
            other events of the session, and on a shared store for its lease).
        lease_hold: how long the latest events held their session (entering to
            leaving their block).
        largest: the largest values written, as state names and sizes in bytes,
            largest first (at most five; never the values).
    """

    sessions: int
    held: int
    waiting: int
    events: int = 0
    ended: Mapping[str, int] = attrs.field(factory=dict)
    conflicts: int = 0
    busy: int = 0
    renewals: int = 0
    kept: int = 0
    kept_events: int = 0
    leases_lost: int = 0
    lease_wait: Timings = _NO_TIMINGS
    lease_hold: Timings = _NO_TIMINGS
    largest: tuple[ValueSize, ...] = ()
