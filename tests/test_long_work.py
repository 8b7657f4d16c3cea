"""Long work: an event that runs longer than the engine's ``lease_ttl`` keeps its
session by renewing its lease (``ev.extend()``, or ``engine.event(sid, renew=True)``),
fenced by its token as commits are; once another event took the session, the long
event fails with LeaseLost and never writes.

On the memory store sessions are held by a lock of this process, which never lapses:
extend() only slides the idle deadline there (as every renewal does: a session in use
is not idle). "Another process" is a
second engine on the same store (its own locks and leases); it tries the session from
a thread of its own, with a short ``lease_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from typing import Any

import pytest

from statekit import (
    LeaseLost,
    SessionBusy,
    SessionNotFound,
    StateEngine,
    StoreConflict,
    UsageError,
)
from statekit.stores import Busy, Lease, Store
from statekit.stores.redis import RedisStore
from statekit.testing import FakeClock, RedisCluster

from .conftest import StoreFactory, declared

LEASE_TTL = 30.0


def engines(
    make_store: StoreFactory, clock: Any, lease_ttl: float = LEASE_TTL, idle_ttl: float = 3600
) -> Any:
    """Two engines of one app on one store: "this process" and "another process"."""
    store = make_store()
    ours = StateEngine(
        store, app="long", clock=clock, lease_ttl=lease_ttl, lease_wait=5, idle_ttl=idle_ttl
    )
    # The rival gives up at once (a real-time wait: the fake clock stands still).
    theirs = StateEngine(
        make_store(),
        app="long",
        clock=clock,
        lease_ttl=lease_ttl,
        lease_wait=0.05,
        idle_ttl=idle_ttl,
    )
    return store, ours, theirs


def rival(engine: StateEngine, sid: str, value: str) -> str:
    """Try the session from another thread (as another process would): "busy" when
    the session stayed held, "wrote" when the rival got it and wrote ``value``."""
    outcome: list[str] = []

    def attempt() -> None:
        try:
            with engine.event(sid) as ev:
                ev[declared(engine, "log")] = value
        except SessionBusy:
            outcome.append("busy")
        else:
            outcome.append("wrote")

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(timeout=30)
    assert outcome, "the rival's attempt did not finish"
    return outcome[0]


def declare(*pair: StateEngine) -> None:
    for engine in pair:
        engine.session_state("log", "")


def kind(store: Store) -> str:
    return type(store).__name__


def test_store_renews_a_lease_only_with_its_token(make_store: StoreFactory) -> None:
    """The store call under extend(): a renewal moves the lease's end (a rival's load
    is then refused until the new end), and a lease given back or taken by another
    token is not renewed. Fails if a store renews a lease it does not hold (an event
    could then write after losing its session) or ignores a renewal."""
    store = make_store()
    ns = store.namespace(f"renew-{id(store)}")
    now = 1_000.0
    ns.create_session("s" * 32, now=now, deadline=now + 3600, capacity=10)
    sid = "s" * 32
    assert not isinstance(
        ns.load_session(sid, now=now, touch_until=None, lease=Lease(token="a", until=now + 30)),
        Busy,
    )
    assert ns.renew(sid, lease="a", until=now + 100) is True
    if not store.shared:
        return  # the memory store has no leases: a renewal is always granted
    # At now+50 the first lease would have lapsed; renewed, it holds until now+100.
    taken = ns.load_session(
        sid, now=now + 50, touch_until=None, lease=Lease(token="b", until=now + 80)
    )
    assert isinstance(taken, Busy)
    assert ns.renew(sid, lease="zzz", until=now + 200) is False
    # Past its end, unrenewed, it is taken; the old token can no longer renew.
    taken = ns.load_session(
        sid, now=now + 101, touch_until=None, lease=Lease(token="b", until=now + 131)
    )
    assert not isinstance(taken, Busy)
    assert ns.renew(sid, lease="a", until=now + 300) is False
    ns.release(sid, lease="b")
    assert ns.renew(sid, lease="b", until=now + 300) is False


def test_two_minutes_of_work_with_extend_commits(make_store: StoreFactory) -> None:
    """A handler doing 2 minutes of work with lease_ttl=30, calling ev.extend() every
    20 s: another process trying the session meanwhile finds it busy every time, and
    the work commits. Fails if extend() does not renew (the rival takes the session
    once 30 s passed) or if renewing breaks the commit."""
    clock = FakeClock()
    _store, ours, theirs = engines(make_store, clock)
    declare(ours, theirs)
    sid = ours.open_session()
    with ours.event(sid) as ev:
        for step in range(6):
            clock.advance(20)
            ev.extend()
            assert rival(theirs, sid, f"rival {step}") == "busy"
            ev[declared(ours, "log")] = f"step {step}"
    assert ev.result.changed == {"log"}
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "step 5"
    ours.shutdown()
    theirs.shutdown()


def test_work_longer_than_the_idle_ttl_keeps_its_session_by_renewing(
    make_store: StoreFactory,
) -> None:
    """Two minutes of work with ``idle_ttl=60``, renewing every 20 s, while another
    process tries the session and reaps: a session an event renews is in use, not
    idle, so nobody ends it, the work commits, and the next event finds it within the
    idle ttl of the last renewal. Fails if the idle deadline stayed where the load put
    it (the rival's load or its reap ended the session as idle under the event, whose
    commit then failed, or the next event found it ended)."""
    clock = FakeClock()
    _store, ours, theirs = engines(make_store, clock, idle_ttl=60)
    declare(ours, theirs)
    sid = ours.open_session()
    with ours.event(sid) as ev:
        for step in range(6):
            clock.advance(20)
            ev.extend()
            assert rival(theirs, sid, f"rival {step}") == "busy"
            theirs.reap()
            ev[declared(ours, "log")] = f"step {step}"
    clock.advance(30)
    theirs.reap()
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "step 5"
    ours.shutdown()
    theirs.shutdown()


def test_long_work_without_renewal_fails_clearly(make_store: StoreFactory) -> None:
    """The same work without extend(): on a shared store, once lease_ttl passed another
    process takes the session and commits, and the long event's commit raises
    LeaseLost (a StoreConflict) — its write is not applied over the other's. On the
    memory store nothing lapses: the rival stays out and the work commits. Fails if a
    lapsed event's write lands."""
    clock = FakeClock()
    store, ours, theirs = engines(make_store, clock)
    declare(ours, theirs)
    sid = ours.open_session()
    log = declared(ours, "log")
    if not store.shared:
        with ours.event(sid) as ev:
            clock.advance(120)
            assert rival(theirs, sid, "rival") == "busy"
            ev[log] = "long work"
        assert ev.result.changed == {"log"}
        return
    with pytest.raises(LeaseLost, match="lease lapsed") as caught, ours.event(sid) as ev:
        clock.advance(LEASE_TTL + 1)
        assert rival(theirs, sid, "rival") == "wrote"
        ev[log] = "long work"
    assert isinstance(caught.value, StoreConflict)
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "rival"
    ours.shutdown()
    theirs.shutdown()


def test_extend_after_losing_the_lease_raises(make_store: StoreFactory) -> None:
    """extend() called once another process took the session raises LeaseLost at once
    (the handler can stop its work), and nothing of the event is written. Fails if a
    lost lease is renewed back (two events would hold one session)."""
    clock = FakeClock()
    store, ours, theirs = engines(make_store, clock)
    declare(ours, theirs)
    sid = ours.open_session()
    if not store.shared:
        with ours.event(sid) as ev:
            clock.advance(LEASE_TTL + 1)
            ev.extend()  # nothing to renew: no error
        return
    with pytest.raises(LeaseLost), ours.event(sid) as ev:
        ev[declared(ours, "log")] = "mine"
        clock.advance(LEASE_TTL + 1)
        assert rival(theirs, sid, "rival") == "wrote"
        ev.extend()
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "rival"
    ours.shutdown()
    theirs.shutdown()


def test_async_extend(make_store: StoreFactory) -> None:
    """``await ev.aextend()`` renews as extend() does, from an async event."""
    clock = FakeClock()
    _store, ours, theirs = engines(make_store, clock)
    declare(ours, theirs)
    sid = ours.open_session()

    async def work() -> None:
        async with ours.aevent(sid) as ev:
            for _ in range(4):
                clock.advance(20)
                await ev.aextend()
            assert await asyncio.to_thread(rival, theirs, sid, "rival") == "busy"
            ev[declared(ours, "log")] = "async work"

    asyncio.run(work())
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "async work"
    ours.shutdown()
    theirs.shutdown()


def test_extend_outside_an_event_is_refused(engine: StateEngine) -> None:
    """extend() on an event that is not open says where to call it."""
    sid = engine.open_session()
    ev = engine.event(sid)
    with pytest.raises(UsageError, match="inside its 'with' block"):
        ev.extend()


@pytest.mark.parametrize("way", ["blocking", "async"])
def test_automatic_renewal_keeps_a_long_event(make_store: StoreFactory, way: str) -> None:
    """engine.event(sid, renew=True) on the real wall clock, with a short lease_ttl
    (1.5 s): the handler works 2 lease_ttls (simulated by sleeping), a rival process
    keeps finding the session busy, and the work commits. Fails if the engine's
    renewer does not renew (the rival gets in after 1.5 s and the commit raises
    LeaseLost). Bounded: about 3 s per store; nothing is timed."""
    ttl = 1.5
    store = make_store()
    # An idle ttl shorter than the work: each renewal slides it (the session is in
    # use; on the memory store, which has no lease to renew, the renewer only slides it).
    ours = StateEngine(store, app="auto", lease_ttl=ttl, lease_wait=5, idle_ttl=2)
    theirs = StateEngine(make_store(), app="auto", lease_ttl=ttl, lease_wait=0.05, idle_ttl=2)
    declare(ours, theirs)
    sid = ours.open_session()
    tries: list[str] = []

    def work() -> None:
        for step in range(4):
            time.sleep(ttl / 2)
            tries.append(rival(theirs, sid, f"rival {step}"))

    if way == "blocking":
        with ours.event(sid, renew=True) as ev:
            work()
            ev[declared(ours, "log")] = "renewed"
    else:

        async def main() -> None:
            async with ours.aevent(sid, renew=True) as ev:
                await asyncio.to_thread(work)
                ev[declared(ours, "log")] = "renewed"

        asyncio.run(main())
    assert tries == ["busy"] * 4
    with theirs.event(sid) as ev:
        assert ev[declared(theirs, "log")] == "renewed"
    ours.shutdown()
    theirs.shutdown()


def test_a_lease_the_renewer_finds_taken_fails_the_event(
    make_store: StoreFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """With renew=True, once another event took the session (here a load leasing it
    directly in the store, at a time past our lease), the engine's renewer finds the
    lease gone, logs it, and the event ends with LeaseLost instead of committing —
    counted in stats(). On the memory store nothing can take a held session: the event
    commits. Fails if the renewer renews a lease it lost, or the event still writes."""
    caplog.set_level(logging.WARNING, logger="statekit")
    clock = FakeClock()
    store = make_store()
    engine = StateEngine(store, app="stolen", clock=clock, lease_ttl=0.3, lease_wait=5)
    declare(engine)
    sid = engine.open_session()
    thief = make_store().namespace("stolen")
    with pytest.raises(LeaseLost) if store.shared else contextlib.nullcontext():  # noqa: SIM117
        with engine.event(sid, renew=True) as ev:
            ev[declared(engine, "log")] = "mine"
            if store.shared:
                later = clock() + 100  # past any renewal the engine makes meanwhile
                taken = thief.load_session(
                    sid, now=later, touch_until=None, lease=Lease(token="thief", until=later + 30)
                )
                assert not isinstance(taken, Busy)
                deadline = time.monotonic() + 20
                while not any("was lost" in r.getMessage() for r in caplog.records):
                    assert time.monotonic() < deadline, "the renewer never ran"
                    time.sleep(0.01)
    assert engine.stats().leases_lost == (1 if store.shared else 0)
    if store.shared:
        thief.release(sid, lease="thief")
    assert declared(engine, "log").get(sid) == ("" if store.shared else "mine")
    engine.shutdown()


def test_long_work_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """On a real Redis Cluster (the renewal script runs on the session's slot): extend()
    keeps a long event's session from another process, and an event left to lapse
    fails with LeaseLost while the other's write stands. Fails if RENEW is routed to
    another slot or renews a lease taken by another token."""
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    prefix = f"lw{uuid.uuid4().hex[:6]}"
    stores = [RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)]
    clock = FakeClock()
    ours = StateEngine(stores[0], app="long", clock=clock, lease_wait=5)
    theirs = StateEngine(stores[1], app="long", clock=clock, lease_wait=0.05)
    declare(ours, theirs)
    try:
        sid = ours.open_session()
        with ours.event(sid) as ev:
            for _ in range(4):
                clock.advance(20)
                ev.extend()
                assert rival(theirs, sid, "rival") == "busy"
            ev[declared(ours, "log")] = "extended"
        with pytest.raises(LeaseLost), ours.event(sid) as ev:
            clock.advance(LEASE_TTL + 1)
            assert rival(theirs, sid, "rival") == "wrote"
            ev[declared(ours, "log")] = "too late"
        assert declared(theirs, "log").get(sid) == "rival"
        assert ours.stats().renewals == 4
    finally:
        ours.shutdown()
        theirs.shutdown()
        for store in stores:
            store.close()


def test_renewal_with_a_lease_longer_than_a_thread_can_wait(tmp_path: Any) -> None:
    """lease_ttl=1e11 is accepted, and the renewer waited lease_ttl / 3 at a time:
    past threading.TIMEOUT_MAX, so its thread died of an OverflowError at its first
    wait (pytest reports the thread's exception; the event then went unrenewed)."""
    from statekit import SQLiteStore

    engine = StateEngine(SQLiteStore(tmp_path / "long.db"), lease_ttl=1e11)
    note = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid, renew=True) as ev:
        time.sleep(0.05)  # the renewer's thread is started and waits
        ev[note] = "done"
    assert note.get(sid) == "done"
    engine.shutdown()


def test_an_engine_dropped_without_shutdown_leaves_no_renewal_thread(tmp_path: Any) -> None:
    """The renewer's thread held its engine: an engine dropped without shutdown()
    after one renew=True event left a thread that woke for ever, keeping its store.
    Fails if the thread outlives its engine (it ends at its next wake)."""
    import gc

    from statekit import SQLiteStore

    name = f"statekit-renew-dropped{uuid.uuid4().hex[:6]}"
    engine = StateEngine(
        SQLiteStore(tmp_path / "d.db"), app=name[len("statekit-renew-") :], lease_ttl=0.3
    )
    note = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid, renew=True) as ev:
        ev[note] = "done"

    def running() -> bool:
        return any(thread.name == name for thread in threading.enumerate())

    assert running()
    del engine, note, ev
    gc.collect()
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not running()


def test_what_a_renewal_finds_past_its_time_has_its_callbacks_run_once(
    make_store: StoreFactory,
) -> None:
    """A renewal slides the idle deadline with a read, and a read removes what it
    finds past its time: a value past its ttl (memory, SQLite), or the session past
    its idle deadline. Their callbacks run once, as the event ends. Fails if that
    read's answer is dropped (the value's on_delete and the session's on_close never
    ran, and no reap could find them again)."""
    clock = FakeClock()
    engine = StateEngine(make_store(), clock=clock, idle_ttl=60, lease_ttl=30)
    dropped: list[Any] = []
    closed: list[Any] = []
    token = engine.session_state("token", "", ttl=30, on_delete=lambda v, r: dropped.append(v))
    count = engine.session_state("count", 0)
    engine.on_close(lambda sid, reason: closed.append(reason))
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[token] = "t"
    with engine.event(sid) as ev:
        clock.advance(40)  # the value's ttl passes during the event
        ev.extend()
    engine.reap()
    assert dropped == ["t"]
    with pytest.raises(SessionNotFound), engine.event(sid) as ev:
        clock.advance(61)  # and then the session's idle ttl, before a renewal
        ev.extend()
        ev[count] = 1
    engine.reap()
    assert [reason.value for reason in closed] == ["idle"]
    assert engine.stats().ended.get("idle") == 1
    engine.shutdown()


def test_what_the_renewer_finds_past_its_time_has_its_callbacks_run_once(tmp_path: Any) -> None:
    """As above, with the engine's own renewer (renew=True, real time, SQLite, whose
    touch removes a value past its ttl): the value's on_delete runs once, as the
    event ends. Bounded: about 0.8 s."""
    from statekit import SQLiteStore

    engine = StateEngine(SQLiteStore(tmp_path / "r.db"), lease_ttl=0.6, idle_ttl=60)
    dropped: list[Any] = []
    token = engine.session_state("token", "", ttl=0.3, on_delete=lambda v, r: dropped.append(v))
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[token] = "t"
    with engine.event(sid, renew=True):
        time.sleep(0.8)  # the value's ttl passes; the renewer touches every 0.2 s
    engine.reap()
    assert dropped == ["t"]
    engine.shutdown()


def test_renewal_keeps_a_session_whose_idle_ttl_is_shorter_than_a_third_of_the_lease(
    make_store: StoreFactory,
) -> None:
    """renew=True with idle_ttl=0.5 and the default lease_ttl (30 s): the renewer woke
    every lease_ttl / 3 = 10 s, so a handler working 1.2 s while another thread reaped
    lost its session (SessionExpired, its on_close run under the event). It now wakes
    every third of the shorter of the two. Bounded: about 1.2 s per store."""
    engine = StateEngine(make_store(), idle_ttl=0.5)
    count = engine.session_state("count", 0)
    closed: list[str] = []
    engine.on_close(lambda sid, reason: closed.append(sid))
    sid = engine.open_session()
    stop = threading.Event()

    def reaper() -> None:
        while not stop.wait(0.05):
            engine.reap()

    thread = threading.Thread(target=reaper)
    thread.start()
    try:
        with engine.event(sid, renew=True) as ev:
            time.sleep(1.2)
            ev[count] = 1
    finally:
        stop.set()
        thread.join(timeout=10)
    assert count.get(sid) == 1
    assert closed == []
    engine.shutdown()
