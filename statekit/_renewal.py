"""Automatic lease renewal, for events that asked for it
(``engine.event(sid, renew=True)``) on a store other processes share; on the memory
store, which has no leases, the same thread only slides the idle deadline of such
events' sessions.

One daemon thread per engine, started with the first such event, renews the lease of
every such event every ``lease_ttl / 3`` seconds (real time; ``idle_ttl / 3`` if that
is shorter), each to the engine's
clock plus ``lease_ttl``, fenced by the lease's token as a commit is. A renewal the
store refuses means another event took the session: the event is marked lost, and its
end raises :class:`~statekit.LeaseLost` instead of committing. A renewal that fails
(the store cannot be reached) is logged and tried again at the next round, while the
lease still runs.

Each renewal also slides the session's idle deadline, as a read does: a session an
event renews is in use, and its idle ttl runs again from the last renewal, so that a
handler that works longer than the idle ttl still finds its session when it commits.

Renewal keeps a *running* handler's session; a handler that hangs keeps it too, for as
long as its event is open. That is why it is asked for per event, not on by default.

Thread-safe. No user code runs here, but for the callbacks of what a renewal's touch
removed after its event ended (see ``Renewer._touch``).
"""

from __future__ import annotations

import logging
import threading
import weakref

from . import _fork
from ._core import Core
from ._events import EventState
from ._steps import Peek
from .exceptions import redact
from .stores.base import Ended, Gone, Loaded

__all__ = ["TOUCH", "Renewer", "touch", "touched"]

#: The state name a renewal peeks at to slide its session's idle deadline (a peek
#: slides it as a read does; no state has this name, so nothing is read or claimed).
#: Without it, an event that ran longer than the idle ttl found its session ended.
TOUCH = "\x00renewal"


def touch(core: Core, ev: EventState, now: float) -> Peek:
    """The read that slides the idle deadline of ``ev``'s session from ``now``: a
    session an event renews is in use, not idle (its answer goes to :func:`touched`)."""
    return Peek(ev.sid, TOUCH, now, now + (ev.idle_ttl or core.idle_ttl))


def touched(answer: object) -> list[Ended]:
    """What the peek of a renewal's touch removed: values found past their ttl, or the
    session, found past its deadline (their callbacks are the caller's to run)."""
    if isinstance(answer, Loaded):
        return list(answer.expired)
    if isinstance(answer, Gone) and answer.ended is not None:
        return [answer.ended]
    return []


logger = logging.getLogger("statekit")


class Renewer:
    """Renews the leases of one engine's events that asked for it, from one thread."""

    def __init__(self, core: Core) -> None:
        self._core = core
        #: Seconds between rounds: a third of the lease, or of the idle ttl if shorter
        #: (each round also slides the idle deadline); bounded, as a wait past
        #: threading.TIMEOUT_MAX raised and stopped the thread.
        self.interval = min(min(core.settings.lease_ttl, core.idle_ttl) / 3, threading.TIMEOUT_MAX)
        self._lock = threading.Lock()
        # Events being renewed, and those whose lease was found lost.
        self._events: dict[int, EventState] = {}
        self._lost: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        """In a forked child the parent's events are the parent's, and no thread runs."""
        _fork.free_lock(self._lock)
        self._events.clear()
        self._lost.clear()
        self._thread = None
        stopped, self._stop = self._stop.is_set(), threading.Event()
        if stopped:
            self._stop.set()

    def add(self, ev: EventState) -> None:
        """Renew ``ev``'s lease from now on (it was just granted)."""
        with self._lock:
            self._events[id(ev)] = ev
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=_run,
                    args=(weakref.ref(self), self._stop, self.interval),
                    name=f"statekit-renew-{self._core.app}",
                    daemon=True,
                )
                self._thread.start()

    def remove(self, ev: EventState) -> bool:
        """Stop renewing ``ev``'s lease (its event is ending); whether a renewal found
        the lease lost meanwhile."""
        key = id(ev)
        with self._lock:
            self._events.pop(key, None)
            if key in self._lost:
                self._lost.discard(key)
                return True
        return False

    def stop(self) -> None:
        """Stop the thread (at the engine's shutdown)."""
        self._stop.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _touch(self, key: int, ev: EventState, now: float) -> None:
        """Slide the session's idle deadline (see TOUCH). What that read removed (values
        past their ttl, or the session, found past its deadline) is the event's to
        run the callbacks of as it ends; if it ended meanwhile, they run here."""
        core = self._core
        try:
            answer = touch(core, ev, now).run(core.ns)
        except Exception as exc:
            logger.warning(
                "could not slide the idle deadline of session %s, which an event renews "
                "(tried again in %.3gs): %s",
                redact(ev.sid),
                self.interval,
                exc,
            )
            return
        removed = touched(answer)
        if removed:
            with self._lock:
                if key in self._events:
                    ev.pending.extend(removed)
                    return
            core.run_ended(removed)

    def round(self) -> None:
        """Renew every event's lease once (the thread's work, every interval)."""
        with self._lock:
            events = list(self._events.items())
        for key, ev in events:
            self._renew(key, ev)

    def _renew(self, key: int, ev: EventState) -> None:
        core = self._core
        token = ev.lease
        if token is None:
            if core.shared:  # given back already: nothing held to renew
                return
            # The memory store: no lease (the session's lock never lapses), but the
            # session is in use all the same: only its idle deadline slides.
            self._touch(key, ev, core.clock())
            return
        try:
            now = core.clock()
            held = core.ns.renew(ev.sid, lease=token, until=now + core.settings.lease_ttl)
        except Exception as exc:
            logger.warning(
                "could not renew the lease of an event of session %s (tried again in %.3gs): %s",
                redact(ev.sid),
                self.interval,
                exc,
            )
            return
        if held:
            self._touch(key, ev, now)
        with self._lock:
            if key not in self._events:  # the event ended meanwhile: not its answer
                return
            if held:
                core.meter.count("renewals")
                return
            self._lost.add(key)
            del self._events[key]
        logger.warning(
            "the lease of an event of session %s was lost (another event took the "
            "session after %.3gs): the event will not commit",
            redact(ev.sid),
            now - ev.now,
        )


def _run(renewer: weakref.ref[Renewer], stop: threading.Event, interval: float) -> None:
    """The renewer's thread: a round every ``interval`` seconds until ``stop``, or
    until its engine is gone (an engine dropped without ``shutdown()``: the thread
    holds it only weakly, and ends at its next wake)."""
    while not stop.wait(interval):
        alive = renewer()
        if alive is None:
            return
        alive.round()
        del alive
