"""Sessions as an engine opens, closes, checks and counts them.

Each operation is written once, as steps (``_steps.py``): the engine's blocking method
drives them with the store's blocking calls, its async twin without blocking the event
loop. Hooks and callbacks (``on_open``, ``on_close``, ``on_delete``) run in the thread
that drives the steps — the caller's, or the event loop's — outside every lock.
"""

from __future__ import annotations

import secrets

from ._checks import check_sid
from ._core import Core, run_hooks
from ._steps import CloseSession, CreateSession, LoadSession, SessionCount, Steps, ask
from .exceptions import SessionNotFound
from .stores.base import DeleteReason, Ended, Gone, Loaded, SessionIdTaken

__all__ = ["SID_BYTES", "Sessions"]

#: Session ids are this many random bytes (192 bits), URL-safe base64 encoded.
SID_BYTES = 24


class Sessions:
    """The session operations of one engine. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def open(self) -> Steps[str]:
        """Start a session (evicting at capacity) and return its id."""
        core = self._core
        core.check_usable()
        now = core.clock()
        evicted: tuple[Ended, ...] = ()
        for attempt in range(3):
            sid = secrets.token_urlsafe(SID_BYTES)
            try:
                evicted = yield from ask(
                    CreateSession(sid, now, now + core.idle_ttl, core.settings.capacity)
                )
                break
            except SessionIdTaken:  # 192 random bits: a broken random source, or a store
                if attempt == 2:
                    raise
        if evicted:
            core.run_ended(evicted)
        if core.look_due(now):
            yield from core.look(now)
        if core.open_hooks:
            run_hooks(core.open_hooks, "session-open", sid)
        return sid

    def close(self, sid: str) -> Steps[bool]:
        """Close a session: whether this call closed it."""
        core = self._core
        core.check_usable()
        check_sid(sid)
        now = core.clock()
        outcome = yield from ask(
            CloseSession(sid=sid, now=now, deadline=now + core.settings.closed_ttl)
        )
        if outcome is None:
            core.check_usable()  # a shutdown meanwhile emptied the store: say so
            raise SessionNotFound(sid)
        if isinstance(outcome, Gone):
            if outcome.ended is not None:
                core.run_ended((outcome.ended,))
            return False
        if outcome:
            core.run_end_hooks(sid, DeleteReason.CLOSED)
        if core.look_due(now):
            yield from core.look(now)
        return outcome

    def exists(self, sid: str) -> Steps[bool]:
        """Whether ``sid`` is live, without touching it (damaged data: not live)."""
        core = self._core
        core.check_usable()  # after a shutdown, "no" would read as "it ended"
        try:
            check_sid(sid)
            outcome = yield from ask(LoadSession(sid, core.clock(), None))
        except SessionNotFound:  # a malformed id, or damaged data (SessionCorrupt)
            return False
        core.salvage(outcome)
        return isinstance(outcome, Loaded)

    def count(self, *, after_shutdown: bool = False) -> Steps[int]:
        """How many sessions (open or closed) the store holds (``after_shutdown``: also
        once the engine was shut down, for its last figures)."""
        if not after_shutdown:
            self._core.check_usable()
        return (yield from ask(SessionCount()))
