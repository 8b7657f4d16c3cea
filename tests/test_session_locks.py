"""The memory store keeps each session's lock in the session's record: an event takes
it as it loads the session and gives it back as it commits. These tests hold a session
in one thread and make others wait, then end the session under them."""

from __future__ import annotations

import asyncio
import inspect
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from statekit import (
    DeleteReason,
    EngineClosed,
    Event,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionState,
    StateEngine,
    StateNotCopyable,
    UsageError,
    _locks,
)
from statekit.testing import FakeClock

JOIN = 30.0


class Holder:
    """Holds an event of ``sid`` open in a thread until released."""

    def __init__(self, engine: StateEngine, sid: str, body: Callable[[Any], None]) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                with engine.event(sid) as ev:
                    self.entered.set()
                    assert self.go.wait(JOIN)
                    body(ev)
            except BaseException as exc:
                self.error = exc
            finally:
                self.entered.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.entered.wait(JOIN)

    def finish(self) -> BaseException | None:
        self.go.set()
        self.thread.join(JOIN)
        assert not self.thread.is_alive()
        return self.error


def waiter(engine: StateEngine, sid: str, body: Callable[[Any], None]) -> Holder:
    """An event of ``sid`` that waits for the session; started, not yet run."""
    holder = Holder.__new__(Holder)
    holder.entered = threading.Event()
    holder.go = threading.Event()
    holder.error = None

    def run() -> None:
        try:
            with engine.event(sid) as ev:
                body(ev)
        except BaseException as exc:
            holder.error = exc

    holder.thread = threading.Thread(target=run)
    holder.thread.start()
    return holder


def queued(engine: StateEngine, sid: str) -> int:
    """How many events wait (the tests here contend for one session, ``sid``)."""
    return engine.stats().waiting


def wait_for_waiters(engine: StateEngine, sid: str, count: int) -> None:
    """Until ``count`` events queue for ``sid``."""
    deadline = time.monotonic() + JOIN
    while time.monotonic() < deadline:
        if queued(engine, sid) >= count:
            return
        time.sleep(0.001)
    raise AssertionError(f"{count} waiters never queued")


async def await_waiters(engine: StateEngine, sid: str, count: int) -> None:
    """Until ``count`` events queue for ``sid``, letting the other tasks of this loop
    run meanwhile."""
    deadline = time.monotonic() + JOIN
    while queued(engine, sid) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} waiters never queued")
        await asyncio.sleep(0)


@pytest.fixture
def engine(clock: FakeClock) -> StateEngine:
    return StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=2)


def test_waiters_are_served_in_arrival_order(engine: StateEngine) -> None:
    log: SessionState[list[Any]] = engine.session_state("log", [])
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: ev[log].append("holder"))
    waiters = []
    for i in range(5):

        def append(ev: Event, i: int = i) -> None:
            ev[log].append(i)

        waiters.append(waiter(engine, sid, append))
        wait_for_waiters(engine, sid, i + 1)
    assert holder.finish() is None
    for w in waiters:
        w.thread.join(JOIN)
        assert w.error is None
    assert log.get(sid) == ["holder", 0, 1, 2, 3, 4]
    assert engine.stats().held == 0


def test_session_evicted_under_an_event_and_its_waiter(
    engine: StateEngine, clock: FakeClock
) -> None:
    count = engine.session_state("count", 0)
    ended: list[tuple[int, DeleteReason]] = []
    count.on_delete(lambda value, reason: ended.append((value, reason)))
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[count] = 7
    holder = Holder(engine, sid, lambda ev: ev.__setitem__(count, 8))
    queued = waiter(engine, sid, lambda ev: ev.__setitem__(count, 9))
    wait_for_waiters(engine, sid, 1)
    # Capacity 2, and both sessions held by events: the open evicts one all the same,
    # the least recently used (an open passes over a held session only while another
    # can go).
    other = Holder(engine, engine.open_session(), lambda ev: None)
    engine.open_session()
    assert other.finish() is None
    error = holder.finish()
    assert isinstance(error, SessionExpired)
    assert error.reason == "evicted"
    queued.thread.join(JOIN)
    assert isinstance(queued.error, SessionExpired)
    assert queued.error.reason == "evicted"
    assert ended == [(7, DeleteReason.EVICTED)]  # the stored value, written once
    assert engine.stats().held == 0


def test_session_expiring_while_an_event_waits_is_refused_to_it(
    engine: StateEngine, clock: FakeClock
) -> None:
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: None)
    queued = waiter(engine, sid, lambda ev: None)
    wait_for_waiters(engine, sid, 1)
    clock.advance(61)  # the holder touched the session at its start, 61 s ago
    assert holder.finish() is None
    queued.thread.join(JOIN)
    assert isinstance(queued.error, SessionExpired)
    assert queued.error.reason == "idle"
    assert engine.stats().held == 0


def test_shutdown_under_an_event_says_the_engine_is_closed(engine: StateEngine) -> None:
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: ev.__setitem__(count, 1))
    engine.shutdown()
    assert isinstance(holder.finish(), EngineClosed)


@pytest.mark.parametrize("listening", [False, True])
def test_shutdown_inside_an_event_says_the_engine_is_closed(
    engine: StateEngine, listening: bool
) -> None:
    n = engine.session_state("n", 0)
    if listening:
        n.on_change(lambda ev, value: None)
    sid = engine.open_session()
    with pytest.raises(EngineClosed), engine.event(sid) as ev:
        ev[n] = 1
        engine.shutdown()


def test_a_failing_commit_gives_the_session_back(engine: StateEngine) -> None:
    box: SessionState[Any] = engine.session_state("box", None)
    sid = engine.open_session()
    with pytest.raises(StateNotCopyable), engine.event(sid) as ev:
        ev[box] = threading.Lock()
    assert engine.stats().held == 0
    with engine.event(sid) as ev:
        ev[box] = "fine"
    assert box.get(sid) == "fine"


def test_a_raising_listener_and_a_loop_give_the_session_back(engine: StateEngine) -> None:
    ping = engine.session_state("ping", 0)
    pong = engine.session_state("pong", 0)

    @ping.on_change
    def to_pong(ev: Event, value: int) -> None:
        ev[pong] = value + 1

    @pong.on_change
    def to_ping(ev: Event, value: int) -> None:
        ev[ping] = value + 1

    sid = engine.open_session()
    with pytest.raises(Exception, match="rounds"), engine.event(sid) as ev:
        ev[ping] = 1
    assert engine.stats().held == 0
    with engine.event(sid) as ev:
        assert ev[ping] > 1


def test_nested_event_is_refused_and_the_outer_one_goes_on(engine: StateEngine) -> None:
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        with pytest.raises(UsageError, match="cannot nest"), engine.event(sid):
            pass
        ev[count] = 1
    assert count.get(sid) == 1
    assert engine.stats().held == 0


@pytest.mark.parametrize(
    "sid", ["", "x" * 257, "caf\u00e9", "tab\there", "never-issued"], ids=repr
)
def test_malformed_and_unknown_ids_are_refused_on_entering(engine: StateEngine, sid: str) -> None:
    with pytest.raises(SessionNotFound) as info, engine.event(sid):
        pass
    assert "open_session()" in str(info.value)
    assert len(sid) <= 6 or sid not in str(info.value)  # long ids are redacted
    assert engine.session_count() == 0


class FlakyClock(FakeClock):
    """A fake clock that raises once when told to (in the thread ``fail_in``, if set)."""

    fail_next = False
    fail_in: threading.Thread | None = None

    def __call__(self) -> float:
        if self.fail_next and self.fail_in in (None, threading.current_thread()):
            self.fail_next = False
            raise OSError("clock unavailable")
        return super().__call__()


def test_a_failing_clock_after_the_wait_gives_the_session_back() -> None:
    clock = FlakyClock()
    engine = StateEngine(clock=clock)
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: None)
    queued = waiter(engine, sid, lambda ev: None)
    wait_for_waiters(engine, sid, 1)
    clock.fail_in = queued.thread  # the waiter's next clock call, once it has the turn
    clock.fail_next = True
    assert holder.finish() is None
    queued.thread.join(JOIN)
    assert isinstance(queued.error, OSError)
    assert engine.stats().held == 0
    with engine.event(sid) as ev:
        ev[count] = 1
    assert count.get(sid) == 1


class Interrupted(Exception):
    pass


def test_a_wait_interrupted_by_a_signal_leaves_the_queue(engine: StateEngine) -> None:
    count = engine.session_state("count", 0)
    sid = engine.open_session()

    # Where a thread blocks for its turn: the interruption must land there, not while
    # the event is still on its way to the queue (where it would test nothing).
    lines, first = inspect.getsourcelines(_locks.wait_turn)
    blocked_at = first + next(i for i, line in enumerate(lines) if "waiter.acquire(" in line)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if frame is None or (frame.f_code, frame.f_lineno) != (
            _locks.wait_turn.__code__,
            blocked_at,
        ):
            signal.setitimer(signal.ITIMER_REAL, 0.001)  # not waiting yet: look again
            return
        raise Interrupted  # a request timeout, say

    previous = signal.signal(signal.SIGALRM, on_alarm)
    holder = Holder(engine, sid, lambda ev: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.001)
        with pytest.raises(Interrupted), engine.event(sid):
            pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert holder.finish() is None
    assert engine.stats().held == 0
    with engine.event(sid) as ev:  # would wait forever for the stranded waiter
        ev[count] = 1
    assert count.get(sid) == 1


def run_loop_briefly(main: Callable[[], Any]) -> dict[str, Any]:
    """Run ``asyncio.run(main())`` in a thread; fail instead of hanging."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = asyncio.run(main())
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive(), "the event loop is blocked for good"
    return outcome


@pytest.mark.parametrize("ahead", ["a task being handed the lock", "a task queued first"])
def test_blocking_event_inside_async_code_never_waits_for_its_own_loop(
    engine: StateEngine, ahead: str
) -> None:
    n = engine.session_state("n", 0)
    sid = engine.open_session()
    holder: Holder | None = None

    async def bump() -> None:
        async with engine.aevent(sid) as ev:
            ev[n] += 1

    async def main() -> str:
        nonlocal holder
        if ahead == "a task being handed the lock":
            async with engine.aevent(sid):
                task = asyncio.create_task(bump())
                await await_waiters(engine, sid, 1)  # queued behind this task
        else:
            holder = Holder(engine, sid, lambda ev: None)
            task = asyncio.create_task(bump())
            await await_waiters(engine, sid, 1)  # the task queues behind the thread
        try:
            with engine.event(sid):  # a blocking event inside async code
                pass
            verdict = "entered"
        except UsageError as exc:
            verdict = str(exc)
        if holder is not None:
            holder.go.set()  # its thread hands the session to the task
        await task
        return verdict

    outcome = run_loop_briefly(main)
    assert "error" not in outcome
    assert "aevent" in outcome["result"]
    assert holder is None or holder.finish() is None
    assert n.get(sid) == 1
    assert engine.stats().held == 0


def test_waiting_longer_than_lease_wait_raises_session_busy() -> None:
    engine = StateEngine(lease_wait=0.2)
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: ev.__setitem__(count, 1))
    started = time.monotonic()
    with pytest.raises(SessionBusy) as info, engine.event(sid):
        pass
    assert 0.2 <= time.monotonic() - started < JOIN
    assert "lease_wait" in str(info.value)

    async def in_a_task() -> None:
        async with engine.aevent(sid):
            pass

    with pytest.raises(SessionBusy):
        asyncio.run(in_a_task())
    assert holder.finish() is None
    assert engine.stats().held == 0  # the timed-out waiters left the queue
    with engine.event(sid) as ev:
        ev[count] += 1
    assert count.get(sid) == 2


@pytest.mark.parametrize("steps", range(6))
def test_a_task_cancelled_as_the_session_is_handed_to_it_is_cancelled(
    engine: StateEngine, steps: int
) -> None:
    sid = engine.open_session()
    ran: list[str] = []

    async def main() -> None:
        async def wait_then_work() -> None:
            async with engine.aevent(sid):
                ran.append("body")
                await asyncio.sleep(0.05)

        holder = engine.aevent(sid)
        await holder.__aenter__()
        task = asyncio.create_task(wait_then_work())
        await await_waiters(engine, sid, 1)  # the task queues
        await holder.__aexit__(None, None, None)  # hands the session to the task
        for _ in range(steps):  # the cancellation lands at each step of the hand-over
            await asyncio.sleep(0)
        assert task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert engine.stats().held == 0
    with engine.event(sid):
        pass


def test_a_blocking_event_in_another_loop_waits_for_a_task_of_this_one(
    engine: StateEngine,
) -> None:
    sid = engine.open_session()
    holding, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def other_loop() -> None:
        async def hold() -> None:
            async with engine.aevent(sid):
                holding.set()
                # Hold until the blocking event below waits (its own loop keeps
                # running meanwhile, in this thread).
                released.append(await asyncio.to_thread(release.wait, JOIN))

        asyncio.run(hold())

    def release_once_queued() -> None:
        try:
            wait_for_waiters(engine, sid, 1)
        finally:
            release.set()

    thread = threading.Thread(target=other_loop)
    thread.start()
    assert holding.wait(JOIN)
    releaser = threading.Thread(target=release_once_queued)
    releaser.start()

    async def blocking_inside_async_code() -> str:
        with engine.event(sid):  # the holder's loop runs in its own thread: no deadlock
            return "entered"

    outcome = run_loop_briefly(blocking_inside_async_code)
    thread.join(JOIN)
    releaser.join(JOIN)
    assert released == [True]  # else the blocking event never waited for the task
    assert outcome == {"result": "entered"}
    assert engine.stats().held == 0


def test_a_lease_wait_beyond_what_locks_accept_still_waits() -> None:
    engine = StateEngine(lease_wait=1e10)  # past threading.TIMEOUT_MAX
    sid = engine.open_session()
    holder = Holder(engine, sid, lambda ev: None)
    queued = waiter(engine, sid, lambda ev: None)
    wait_for_waiters(engine, sid, 1)
    assert holder.finish() is None
    queued.thread.join(JOIN)
    assert queued.error is None
