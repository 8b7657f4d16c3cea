"""Committing an event and running its change listeners.

An event's changes are written in one store commit, version-checked (and, on a shared
store, lease-fenced). Then rounds of listeners run: each listener of a changed state
gets an event of its own on the same session (loaded afresh, under the session's lock
the first event still holds), may write, and its writes may make further listeners
due — up to :data:`MAX_CASCADE` rounds, then :class:`~statekit.ChangeLoopError`. A
listener that raises is logged and listed in the result; its writes are discarded and
the event stands. Written as steps (``_steps.py``), so that blocking and async events
share it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ._checks import qualname
from ._core import Core
from ._events import (
    BrowserIO,
    Changeable,
    Collected,
    Event,
    EventResult,
    EventState,
    ListenerFailure,
)
from ._steps import Commit, CommitJoint, LoadSession, Steps, ask
from .exceptions import ChangeLoopError
from .stores.base import CommitPart

__all__ = ["MAX_CASCADE", "Committer", "no_listeners"]

logger = logging.getLogger("statekit")

#: How many rounds of change listeners may follow one event.
MAX_CASCADE = 16


def no_listeners(states: list[Changeable]) -> bool:
    """Whether none of ``states`` has a change listener (no listener round follows)."""
    return not any(state.listeners for state in states)


def _never(states: list[Changeable]) -> bool:
    return False


class Committer:
    """Commits events and runs their listener rounds, for one engine."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def commit_steps(
        self,
        ev: EventState,
        lease: str | None,
        release: Callable[[list[Changeable]], bool],
        collected: Collected | None = None,
    ) -> Steps[list[Changeable]]:
        """Write an event's changes in one store commit; return the states that changed.

        ``release(changed)`` says whether the commit also gives the lease back (it does
        when no listener round follows). Browser tokens are handed out only once the
        commit succeeded. ``collected``: what ``ev.collect()`` found, if the caller
        asked already."""
        writes, tokens, changed = collected if collected is not None else ev.collect()
        part = ev.user_part
        if part is not None and part.work:
            user_writes, _, user_changed = part.collect()
            if user_writes:
                changed = yield from self._commit_with_user(
                    ev, lease, release, writes, [*changed, *user_changed], user_writes
                )
                ev.hand_out(tokens)
                return changed
        if writes:
            releasing = lease is not None and release(changed)
            yield from ask(
                Commit(
                    sid=ev.sid,
                    version=ev.loaded.version,
                    writes=writes,
                    ttl_deadlines=self._core.written_deadlines(ev.now, writes),
                    now=ev.now,
                    lease=lease,
                    release=releasing,
                )
            )
            if releasing:
                ev.lease = None  # given back with the commit
        ev.hand_out(tokens)
        return changed

    def _commit_with_user(
        self,
        ev: EventState,
        lease: str | None,
        release: Callable[[list[Changeable]], bool],
        writes: dict[str, Any],
        changed: list[Changeable],
        user_writes: dict[str, Any],
    ) -> Steps[list[Changeable]]:
        """Commit an event's writes to its session and to its user's record together:
        one joint commit. When the session has none, the session's part only gives its
        lease back (where a joint commit is one round trip), or the record alone is
        committed and the lease given back after."""
        part = ev.user_part
        assert part is not None
        core = self._core
        releasing = release(changed)
        user = CommitPart(
            sid=part.sid,
            version=part.loaded.version,
            writes=user_writes,
            ttl_deadlines=core.written_deadlines(ev.now, user_writes),
            lease=part.lease,
            release=part.lease is not None and releasing,
        )
        folded = (
            not writes
            and lease is not None
            and releasing
            and getattr(core.store, "joint_round_trips", 1) == 1
        )
        if writes or folded:
            own = CommitPart(
                sid=ev.sid,
                version=ev.loaded.version,
                writes=writes,
                ttl_deadlines=core.written_deadlines(ev.now, writes),
                lease=lease,
                release=lease is not None and releasing,
            )
            yield from ask(CommitJoint((own, user), ev.now))
            if own.release:
                ev.lease = None  # given back with the commit
        else:
            yield from ask(
                Commit(
                    sid=user.sid,
                    version=user.version,
                    writes=user_writes,
                    ttl_deadlines=user.ttl_deadlines,
                    now=ev.now,
                    lease=user.lease,
                    release=user.release,
                )
            )
        if user.release:
            part.lease = None
        part.changed = [state for state in changed if state in part.work]
        return changed

    def commit_with_listeners(
        self, ev: EventState, collected: Collected | None
    ) -> Steps[ChangeLoopError | None]:
        """Commit the event, then run rounds of listeners, each in its own event; the
        event's result is set. Returns the ChangeLoopError to raise, if the cascade was
        cut (everything before the cut is committed)."""
        changed = yield from self.commit_steps(ev, ev.lease, no_listeners, collected)
        if no_listeners(changed):
            ev.changed = changed  # no round: the result is made when asked for
            return None
        all_changed = {state.name for state in changed}
        outputs = dict(ev.emitted) if ev.emitted else {}
        browser = ev.browser_io()
        problems = dict(ev.problems) if ev.problems else {}
        errors: list[ListenerFailure] = []
        loop_error: ChangeLoopError | None = None
        pending = [state for state in changed if state.listeners]
        rounds = 0
        while pending:
            rounds += 1
            if rounds > MAX_CASCADE:
                loop_error = ChangeLoopError(MAX_CASCADE, tuple(s.name for s in pending))
                break
            next_round: dict[Changeable, None] = {}
            for state in pending:
                for listener in state.listeners:
                    sub = yield from self._listener_event(ev, browser)
                    try:
                        listener(sub, sub[state])
                        sub.active = False
                        sub_changed = yield from self.commit_steps(sub, ev.lease, _never)
                    except Exception as exc:
                        sub.active = False
                        logger.exception(
                            "change listener %s of state %r raised; its writes were "
                            "discarded and the event stands",
                            qualname(listener),
                            state.name,
                        )
                        errors.append(
                            ListenerFailure(
                                state=state.name, listener=qualname(listener), error=exc
                            )
                        )
                        continue
                    if sub.emitted:
                        outputs.update(sub.emitted)
                    sub_browser = sub.browser_io()
                    browser.out.update(sub_browser.out)
                    for name, problem in sub_browser.problems.items():
                        browser.problems.setdefault(name, problem)
                    for name, text in (sub.problems or {}).items():
                        problems.setdefault(name, text)
                    for changed_state in sub_changed:
                        all_changed.add(changed_state.name)
                        if changed_state.listeners:
                            next_round[changed_state] = None
            pending = list(next_round)
        ev.done = EventResult(
            sid=ev.sid,
            changed=frozenset(all_changed),
            outputs=outputs,
            errors=tuple(errors),
            browser=dict(browser.out),
            browser_problems=dict(browser.problems),
            value_problems=problems,
        )
        return loop_error

    def _listener_event(self, ev: EventState, browser: BrowserIO) -> Steps[Event]:
        """A listener's own event on ``ev``'s session, loaded afresh (under the lock and
        lease ``ev`` holds), sharing its browser tokens."""
        core = self._core
        sub = Event(ev.engine, ev.host, ev.sid, BrowserIO(browser.tokens, browser.bind))
        sub.started = True
        sub.now = ev.now
        # The session is used now: its idle deadline slides from now (ev.now may be
        # long past, and an earlier deadline would sit behind later ones in the store's
        # order).
        touch = core.now_since(ev.now) + (ev.idle_ttl or core.idle_ttl)
        outcome = yield from ask(LoadSession(sid=ev.sid, now=ev.now, touch_until=touch))
        sub.loaded = core.loaded_or_raise(ev.sid, ev.now, outcome, ev.pending)
        sub.closed = sub.loaded.closed
        part = ev.user_part
        if part is not None:  # the user's record too, under the lease ev holds
            sub.user = ev.user
            sub_part = sub.user_part = type(part)(ev.engine, ev.host, part.sid)
            sub_part.started = True
            sub_part.now = ev.now
            outcome = yield from ask(LoadSession(sid=part.sid, now=ev.now, touch_until=None))
            sub_part.loaded = core.loaded_or_raise(part.sid, ev.now, outcome, ev.pending)
            sub_part.lease = part.lease
            sub_part.active = True
        sub.active = True
        return sub
