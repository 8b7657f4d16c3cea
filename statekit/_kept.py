"""Leases kept between events (``StateEngine(lease_keep=...)``).

On a store whose commits can keep their lease (``keeps_leases``: Redis), an event that
ends well may leave its session leased to this engine, with the values it committed,
so that the session's next event here skips its load: one round trip (the commit)
where there were two, and none for an event that only reads. A kept lease is:

- **short**: a commit that keeps its lease makes it end ``lease_keep`` seconds later,
  so that a process that dies holding kept leases leaves their sessions waiting that
  long at most. An event that only read keeps its lease only if it ends as soon (one
  on a kept lease does; one that loaded holds it for ``lease_ttl`` and gives it back);
- **used** by the session's next event here only while the lease has at least half of
  ``lease_keep`` left (each commit renews it) — the time the event is sure to hold its
  session before another process may take it; its commit is refused after that — the
  session's deadline is at least half the idle ttl away (each commit slides it), none
  of its values has a ttl of its own (a kept copy would not see such a value end), and
  the event does not renew its lease by itself (``renew=True``). Otherwise the event
  loads the session as usual, with the kept token, which the store grants at once;
- **fenced** as every commit is: refused unless the lease still holds and the session
  is at the version kept, so a copy that is no longer the session's is never written
  over it;
- **given up** when another handle wants the session: its load (or a close, or the
  session's end), finding the lease kept, publishes a ``wanted`` notice, and this
  engine releases the lease (at the end of the event, if one runs) and keeps that
  session no more for a ``lease_ttl``: a session processes use in turn is loaded by
  each event, as without ``lease_keep``;
- **dropped** when the session ends (after a close, here or elsewhere, the next event
  loads the session: its deadline is its grace's now), given back at shutdown, and
  forgotten in the child of a fork (the parent's).

"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import attrs
import cachetools

from . import _fork
from ._checks import check_seconds
from ._core import Core
from ._steps import Release, Steps, ask
from .exceptions import InvalidDeclaration
from .stores.base import DeleteReason, Keep, Notice, SessionData, Store

__all__ = ["Kept", "KeptLeases", "check_lease_keep"]

logger = logging.getLogger("statekit")

#: The most sessions one engine keeps leased between events.
MAX_KEPT = 10_000

#: Seconds shutdown spends giving kept leases back; the rest lapse by themselves.
RELEASE_AT_SHUTDOWN = 5.0


def check_lease_keep(lease_keep: object, lease_ttl: float, store: Store) -> float:
    """``lease_keep`` as seconds, checked against ``lease_ttl`` and the store.

    Raises:
        InvalidDeclaration: not a duration, longer than ``lease_ttl``, or
            on a store whose commits cannot keep their lease.
    """
    if lease_keep == 0 and not isinstance(lease_keep, bool):
        return 0.0
    keep = check_seconds(lease_keep, "lease_keep")
    if keep > lease_ttl:
        raise InvalidDeclaration(
            f"lease_keep ({keep:g}s) must be at most lease_ttl ({lease_ttl:g}s): a lease "
            "kept between events lasts no longer than an event's"
        )
    if not getattr(store, "keeps_leases", False):
        raise InvalidDeclaration(
            "lease_keep needs a store whose commits can keep their lease (RedisStore); "
            f"{type(store).__name__} cannot: leave lease_keep at 0"
        )
    return keep


@attrs.define(slots=True)
class Kept:
    """A session this engine keeps leased between events.

    Attributes:
        token: the lease's token.
        loaded: the session as this engine last saw it (version, closed, values).
        until: when the lease lapses (engine clock), as last written.
        deadline: the session's deadline as last slid.
    """

    token: str
    loaded: SessionData
    until: float
    deadline: float


class KeptLeases:
    """The leases one engine keeps between events. Thread-safe."""

    def __init__(self, core: Core, keep: float) -> None:
        self._core = core
        self.keep = keep
        self._kept: dict[str, Kept] = {}
        # Sessions another handle asked for lately: not kept again meanwhile.
        self._wanted: cachetools.TTLCache[str, bool] = cachetools.TTLCache(
            maxsize=MAX_KEPT, ttl=core.settings.lease_ttl, timer=time.monotonic
        )
        self._lock = threading.Lock()
        core.add_hook("end", self._ended)
        subscribe: Callable[[Callable[[Notice], None]], object] = core.ns.subscribe_wanted  # type: ignore[attr-defined]
        subscribe(self._on_notice)
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        """In the child of a fork: the kept leases are the parent's."""
        _fork.free_lock(self._lock)
        self._kept.clear()
        self._wanted.clear()

    def count(self) -> int:
        """How many leases this engine keeps now: those that lapsed are forgotten (and
        the values they held with them)."""
        now = self._core.clock()
        with self._lock:
            self._drop_lapsed(now)
            return len(self._kept)

    def take(self, sid: str, now: float) -> tuple[Kept | None, str | None]:
        """Take the session's kept lease, if any: ``(kept, token)`` when the event
        may skip its load, ``(None, token)`` when it loads the session with the kept
        token, ``(None, None)`` when nothing is kept."""
        with self._lock:
            kept = self._kept.pop(sid, None)
        if kept is None:
            return None, None
        if self.usable(kept, now):
            return kept, kept.token
        return None, kept.token

    def usable(self, kept: Kept, now: float) -> bool:
        """Whether an event starting at ``now`` may use ``kept`` without a load."""
        settings = self._core.settings
        idle = settings.idle_ttl
        ttl_states = self._core.ttl_states
        return (
            kept.until - now >= self.keep / 2
            # A touch may have been skipped (it moves a deadline by at least a second,
            # or a tenth of the idle ttl): the deadline is at least this.
            and kept.deadline - min(1.0, idle / 10) - now >= idle / 2
            and not (ttl_states and any(name in ttl_states for name in kept.loaded.values))
        )

    def wanted(self, sid: str) -> bool:
        """Whether an event of ``sid`` gives its lease back rather than keep it."""
        if self._core.shut:
            return True
        with self._lock:
            return sid in self._wanted

    def keep_for(self, now: float) -> Keep:
        """What a commit at ``now`` that keeps its lease asks of the store."""
        return Keep(until=now + self.keep, touch_until=now + self._core.settings.idle_ttl)

    def put(self, sid: str, kept: Kept) -> bool:
        """Keep ``kept``; False (the caller gives the lease back) once the engine is
        shut down, when another handle asked for the session meanwhile (during the
        commit that kept it: a close or a claim asks once), or when this engine keeps
        as many sessions as it may."""
        with self._lock:
            if self._core.shut or sid in self._wanted:
                return False
            if len(self._kept) >= MAX_KEPT:
                self._drop_lapsed(kept.until - self._core.settings.lease_ttl)
                if len(self._kept) >= MAX_KEPT:
                    return False
            self._kept[sid] = kept
            return True

    def _drop_lapsed(self, now: float) -> None:
        """Forget the kept leases that lapsed by ``now`` (under the lock)."""
        for sid in [sid for sid, kept in self._kept.items() if kept.until <= now]:
            del self._kept[sid]

    def _ended(self, sid: str, reason: DeleteReason) -> None:
        """A session ended. A closed one is still leased here, but its deadline is now
        its grace's: its next event loads it (with the kept token, granted at once).
        Any other is gone, and its lease with it."""
        with self._lock:
            kept = self._kept.get(sid)
            if kept is None:
                return
            if reason is DeleteReason.CLOSED:
                kept.deadline = -math.inf  # (never usable again: see usable())
            else:
                del self._kept[sid]

    def _on_notice(self, notice: Notice) -> None:
        """Another handle wants ``notice.sid`` (in the store's notification thread):
        give its kept lease back, or mark it so that the event under way gives it
        back. (After a lost connection, a load still waiting asks again.)"""
        if notice.kind != "wanted" or self._core.shut:
            return
        sid = notice.sid
        with self._lock:
            kept = self._kept.pop(sid, None)
            self._wanted[sid] = True
        if kept is not None:
            self._release(sid, kept.token)

    def _release(self, sid: str, token: str) -> None:
        try:
            self._core.ns.release(sid, lease=token)
        except Exception as exc:  # it lapses by itself
            logger.warning("could not give back a kept lease: %s", exc)

    def release_steps(self) -> Steps[None]:
        """Give back every kept lease that has not lapsed (at shutdown, once the engine
        is marked shut), for at most :data:`RELEASE_AT_SHUTDOWN` seconds; the rest
        lapse by themselves."""
        with self._lock:
            kept, self._kept = self._kept, {}
        if not kept:
            return
        try:
            now = self._core.clock()
        except Exception:
            now = float("-inf")
        stop = time.monotonic() + RELEASE_AT_SHUTDOWN
        for sid, lease in kept.items():
            if lease.until <= now:
                continue
            if time.monotonic() > stop:
                logger.warning(
                    "gave back kept leases for %.0f s at shutdown; the rest lapse by "
                    "themselves (within lease_ttl)",
                    RELEASE_AT_SHUTDOWN,
                )
                return
            try:
                yield from ask(Release(sid=sid, lease=lease.token))
            except Exception as exc:  # it lapses by itself
                logger.warning("could not give back a kept lease: %s", exc)
