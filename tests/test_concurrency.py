"""Threads: events of one session serialize, different sessions run in parallel, no
update is lost and nothing deadlocks. Every join is bounded in time."""

from __future__ import annotations

import threading

from statekit import Event, SessionState, StateEngine
from statekit.testing import FakeClock

from .threads import THREADS, run_threads


def test_one_session_from_8_threads_loses_no_update(engine: StateEngine) -> None:
    counter = engine.session_state("counter", 0)
    items: SessionState[list[int]] = engine.session_state("items", [])
    sid = engine.open_session()

    def work(k: int) -> None:
        for i in range(250):
            with engine.event(sid) as ev:
                ev[counter] = ev[counter] + 1
                ev[items].append(k * 1000 + i)

    run_threads(work)
    assert counter.get(sid) == THREADS * 250
    assert sorted(items.get(sid)) == sorted(
        k * 1000 + i for k in range(THREADS) for i in range(250)
    )
    assert engine.stats().held == 0


def test_many_sessions_from_8_threads(engine: StateEngine) -> None:
    counter = engine.session_state("counter", 0)
    sids = [engine.open_session() for _ in range(64)]

    def work(k: int) -> None:
        for i in range(1000):
            sid = sids[(k * 7 + i) % len(sids)]
            with engine.event(sid) as ev:
                ev[counter] += 1

    run_threads(work)
    assert sum(counter.get(sid) for sid in sids) == THREADS * 1000


def test_listeners_that_write_under_contention(engine: StateEngine) -> None:
    cart: SessionState[list[int]] = engine.session_state("cart", [])
    size = engine.session_state("size", 0)

    @cart.on_change
    def count(ev: Event, value: list[int]) -> None:
        ev[size] = len(value)

    sid = engine.open_session()

    def work(k: int) -> None:
        for i in range(200):
            with engine.event(sid) as ev:
                ev[cart].append(k * 1000 + i)

    run_threads(work)
    assert len(cart.get(sid)) == THREADS * 200
    assert size.get(sid) == THREADS * 200


def test_open_close_and_reap_race_with_events() -> None:
    clock = FakeClock()
    engine = StateEngine(clock=clock, idle_ttl=100_000, closed_ttl=30)
    deleted: list[int] = []
    lock = threading.Lock()

    def on_delete(value: int, reason: object) -> None:
        with lock:
            deleted.append(value)

    state = engine.session_state("v", 0, on_delete=on_delete)
    written = 0
    written_lock = threading.Lock()

    def work(k: int) -> None:
        nonlocal written
        for i in range(100):
            sid = engine.open_session()
            with engine.event(sid) as ev:
                ev[state] = 1
            with written_lock:
                written += 1
            if i % 2:
                engine.close_session(sid)
            if k == 0 and i % 10 == 0:
                clock.advance(31)  # closed sessions' grace ends; open ones stay
            engine.reap(limit=5)

    run_threads(work)
    engine.shutdown()
    assert written == THREADS * 100
    assert len(deleted) == written  # every value deleted exactly once
