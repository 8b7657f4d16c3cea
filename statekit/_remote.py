"""What other engines did: the store's notices, and the listeners they call here.

A shared store publishes a notice for every commit and every ended session (other
engines on one memory store get them too). An engine listens once something needs
them — a remote change listener, a close hook, a registry — and then:

- for an ended session, runs this engine's session-end hooks (close hooks, registry
  cleanups), so that per-process objects are cleaned up where they live;
- for a commit, loads the session and calls the remote listeners of the states written;
- after a gap (``resync``: notices may have been lost), runs the resync hooks and
  re-checks the sessions it used lately, calling remote listeners where the version
  moved.

Notices arrive in the store's notification thread; nothing here holds a lock while
calling user code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import cachetools

from . import _fork
from ._checks import USER_PREFIX, qualname
from ._core import Core, run_hooks
from ._states import MISSING, SessionState
from ._watch import Watchers

if TYPE_CHECKING:
    from ._users import Users
from .stores.base import Busy, Gone, Loaded, Notice

__all__ = ["Remote"]

logger = logging.getLogger("statekit")


class Remote:
    """Notices from other engines, for one engine. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._unsubscribe: Callable[[], None] | None = None
        self._lock = threading.Lock()
        # Versions of sessions this engine used lately, to re-check after lost notices.
        self._seen: cachetools.LRUCache[str, int] = cachetools.LRUCache(10_000)
        self._seen_lock = threading.Lock()
        #: The engine's open watches (set by the engine), fed by other processes' commits.
        self.watchers: Watchers | None = None
        #: The engine's user records (set by the engine): their changes' listeners.
        self.users: Users | None = None
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        _fork.free_lock(self._lock)
        _fork.free_lock(self._seen_lock)
        # Sessions the parent used: a resync in the child must not look each one up.
        self._seen.clear()

    def listen(self) -> None:
        """Receive the store's notices from now on (once)."""
        with self._lock:
            if self._unsubscribe is None and not self._core.shut:
                self._unsubscribe = self._core.ns.subscribe(self._on_notice)

    def stop(self) -> None:
        """Receive no more notices."""
        with self._lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None

    def saw(self, sid: str, version: int) -> None:
        """This engine used ``sid`` at ``version`` (re-checked after lost notices)."""
        with self._seen_lock:
            self._seen[sid] = version

    def _on_notice(self, notice: Notice) -> None:
        """Handle what another engine did. Runs in the store's notification thread."""
        core = self._core
        if core.shut:
            return
        if notice.kind == "ended":
            assert notice.reason is not None
            core.run_end_hooks(notice.sid, notice.reason)
        elif notice.kind == "changed" and notice.sid.startswith(USER_PREFIX):
            self._user_changed(notice.sid, notice.names)
        elif notice.kind == "changed":
            states = [
                state
                for name in notice.names
                if (state := core.session_states.get(name)) is not None and state.remote_listeners
            ]
            watched = self.watchers is not None and self.watchers.watching(notice.sid)
            if states or watched:
                self._fire(notice.sid, states, notice.names if watched else ())
        elif notice.kind == "resync":  # notices may have been lost
            run_hooks(core.resync_hooks, "resync")
            with self._seen_lock:
                seen = list(self._seen.items())
            listened = [s for s in core.session_states.values() if s.remote_listeners]
            for sid, version in seen:
                if sid.startswith(USER_PREFIX):  # a user's record: its own listeners
                    self._user_changed(sid, core.user_states, version)
                    continue
                outcome = self._look(sid)
                if isinstance(outcome, Loaded) and outcome.version != version:
                    self._fire(sid, listened)

    def _user_changed(self, record: str, names: Iterable[str], seen: int | None = None) -> None:
        """Another engine committed to a user's record: tell the watches and the
        remote listeners of the user's sessions here, if any wait for it (after lost
        notices: unless its version is still ``seen``)."""
        users = self.users
        core = self._core
        wanted = [
            state
            for name in names
            if (state := core.user_states.get(name)) is not None
            and (state.remote_listeners or (self.watchers and self.watchers.watching(record)))
        ]
        if not wanted or users is None:
            return
        outcome = self._look(record)
        if not isinstance(outcome, Loaded) or outcome.version == seen:
            return
        self.saw(record, outcome.version)
        changes = []
        for state in wanted:
            stored = outcome.values.get(state.name, MISSING)
            if stored is MISSING:
                continue
            try:
                changes.append((state.name, core.open_value(state, stored)))
            except Exception:
                logger.exception("a user's value changed elsewhere could not be read")
        users.changed(record, changes)

    def _look(self, sid: str) -> Loaded | Gone | Busy | None:
        """Load a session without touching it, for notices; run the callbacks of what
        the load claimed (it is their only caller). None if the store failed."""
        core = self._core
        try:
            outcome = core.ns.load_session(sid, now=core.clock(), touch_until=None)
        except Exception:
            logger.exception("could not load a session changed by another process")
            return None
        core.salvage(outcome)
        return outcome

    def _fire(
        self, sid: str, states: list[SessionState[Any]], watched: Iterable[str] = ()
    ) -> None:
        """Load the session once; call the remote listeners of ``states`` and give the
        session's watches the new values of the states named ``watched``."""
        outcome = self._look(sid)
        if not isinstance(outcome, Loaded):
            return
        self.saw(sid, outcome.version)
        if watched and self.watchers is not None:
            changes = []
            for name in watched:
                state = self._core.session_states.get(name)
                stored = outcome.values.get(name, MISSING)
                if state is None or stored is MISSING:
                    continue
                try:
                    changes.append((name, self._core.open_value(state, stored)))
                except Exception:
                    logger.exception("a watched value changed elsewhere could not be read")
            self.watchers.session_changed(sid, changes)
        for state in states:
            stored = outcome.values.get(state.name, MISSING)
            for listener in state.remote_listeners:
                try:
                    value = (
                        state.new_value()
                        if stored is MISSING
                        else self._core.open_value(state, stored)
                    )
                    listener(sid, value)
                except Exception:
                    logger.exception(
                        "remote change listener %s of state %r raised",
                        qualname(listener),
                        state.name,
                    )
