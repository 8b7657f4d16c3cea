"""Leases kept between events (``StateEngine(lease_keep=...)``) on Redis: the next
event here skips its load, another engine (in this process, in another, or in a fork)
gets the session when it asks, a stale copy is never written over, and a kept session
still slides its deadline and its place in the capacity order."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
import uuid
import warnings
from typing import Any

import pytest
import redis.asyncio as aioredis

from statekit import (
    InvalidDeclaration,
    LeaseLost,
    MemoryStore,
    SessionState,
    SQLiteStore,
    StateEngine,
)
from statekit.stores._redis_namespace import RedisNamespace
from statekit.stores.redis import RedisStore
from statekit.testing import FakeClock, RedisCluster, RedisServer

from . import _workers

SPAWN = multiprocessing.get_context("spawn")


def prefix() -> str:
    return f"k{uuid.uuid4().hex[:6]}"


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the scripts the Redis stores run, in order (blocking and async)."""
    handle: Any = RedisNamespace
    ran: list[str] = []
    run, arun = handle._run, handle._arun

    def counted(self: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
        ran.append(name)
        return run(self, name, keys, args)

    async def acounted(self: Any, client: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
        ran.append(name)
        return await arun(self, client, name, keys, args)

    monkeypatch.setattr(handle, "_run", counted)
    monkeypatch.setattr(handle, "_arun", acounted)
    return ran


def lease_of(store: RedisStore, sid: str) -> list[bytes | None]:
    """The session's lease fields as stored (app ``kept``): token, end, kept token; a
    lease given back reads ``[None, None, None]`` (a commit giving back a kept lease
    empties the fields, so that replicas learn of it in the commit's write; other ways
    of giving a lease back delete them)."""
    key = store.namespace("kept").layout.of(sid).P + "s:" + sid
    fields = list(store.client.hmget(key, "_l", "_lu", "_lk"))
    return [None, None, None] if fields == [b"", b"0", b""] else fields


def wait_until(condition: Any, what: str, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.01)


def test_the_next_event_here_needs_only_its_commit(
    redis_server: RedisServer, scripts: list[str]
) -> None:
    """After the first event, each event sends only its commit, and an event that only
    reads sends nothing. Fails if events load their session each time (as they do
    without lease_keep, which the second half shows)."""
    for keep, expected in ((5.0, ["LOAD"] + ["COMMIT"] * 10), (0, ["LOAD", "COMMIT"] * 10)):
        engine = StateEngine(RedisStore(redis_server.url, prefix=prefix()), lease_keep=keep)
        count = engine.session_state("count", 0)
        sid = engine.open_session()
        scripts.clear()
        for _ in range(10):
            with engine.event(sid) as ev:
                ev[count] += 1
        assert scripts == expected
        scripts.clear()
        with engine.event(sid) as ev:
            assert ev[count] == 10
        assert scripts == ([] if keep else ["LOAD", "RELEASE"])
        assert count.get(sid) == 10
        stats = engine.stats()  # the operator's view: events that skipped their load
        assert (stats.kept, stats.kept_events) == ((1, 10) if keep else (0, 0))
        engine.shutdown()


def test_another_engine_gets_a_kept_session_when_it_asks(redis_server: RedisServer) -> None:
    """An engine with a store of its own, and one sharing the keeper's store object,
    each get the session while the keeper's lease (30 s) still runs, and see the
    keeper's writes; the keeper then sees theirs. Fails if nobody gives the kept lease
    back: the others wait past their lease_wait (2 s) and raise SessionBusy."""
    where = prefix()
    keeper_store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(keeper_store, app="kept", lease_keep=10)
    own = StateEngine(RedisStore(redis_server.url, prefix=where), app="kept", lease_wait=2)
    sharing = StateEngine(keeper_store, app="kept", lease_wait=2, lease_keep=10)
    counts = [engine.session_state("count", 0) for engine in (keeper, own, sharing)]
    sid = keeper.open_session()
    with keeper.event(sid) as ev:
        ev[counts[0]] += 1
    assert lease_of(keeper_store, sid)[2] is not None  # kept
    for round_ in range(3):
        if round_:  # asked for it once: loads and gives it back since
            with keeper.event(sid) as ev:
                ev[counts[0]] += 1
        for other, count in ((own, counts[1]), (sharing, counts[2])):
            with other.event(sid) as ev:
                ev[count] += 1
    with keeper.event(sid) as ev:
        assert ev[counts[0]] == 9  # three rounds of three, each seen by the next
    for engine in (keeper, own, sharing):
        engine.shutdown()


def test_processes_taking_turns_end_at_the_exact_total(redis_server: RedisServer) -> None:
    """Two processes, each keeping leases, increment one session 150 times each: every
    increment counts and neither waits out a lease (lease_wait 20 s, lease_ttl 30 s).
    Fails if a kept copy is written over (a lost increment) or if a process never gives
    a kept lease back (SessionBusy in a worker, whose exit code is then not 0)."""
    where = prefix()
    engine = StateEngine(RedisStore(redis_server.url, prefix=where), app="mp")
    count: SessionState[int] = engine.session_state("count", 0)
    sid = engine.open_session()
    workers = [
        SPAWN.Process(target=_workers.increment_kept, args=(redis_server.url, where, sid, 150))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert count.get(sid) == 300


def test_a_stale_kept_copy_is_never_written_over(redis_server: RedisServer) -> None:
    """The keeper's clock runs 100 s behind another process's: that process finds the
    kept lease lapsed, takes it and writes. The keeper's next event, on its kept copy,
    is refused at its commit (LeaseLost), the other's value stays, and the keeper's
    following event loads it. Fails if a commit on a kept lease is not fenced by the
    lease (the stale count would overwrite 100)."""
    where = prefix()
    behind, ahead = FakeClock(1_000_000.0), FakeClock(1_000_100.0)
    keeper = StateEngine(
        RedisStore(redis_server.url, prefix=where), app="kept", clock=behind, lease_keep=10
    )
    other = StateEngine(RedisStore(redis_server.url, prefix=where), app="kept", clock=ahead)
    count, counted = keeper.session_state("count", 0), other.session_state("count", 0)
    sid = keeper.open_session()
    with keeper.event(sid) as ev:
        ev[count] = 1
    with other.event(sid) as ev:
        ev[counted] = 100
    with pytest.raises(LeaseLost), keeper.event(sid) as ev:
        ev[count] += 1  # on the kept copy: 1 + 1
    assert counted.get(sid) == 100
    with keeper.event(sid) as ev:
        assert ev[count] == 100
    keeper.shutdown()
    other.shutdown()


def test_a_close_elsewhere_reaches_the_keeper(redis_server: RedisServer) -> None:
    """Another process closes a kept session: the keeper is asked for the lease, gives
    it back, and its next event sees the session closed. Fails if a close does not ask
    the keeper (the lease stays kept and the keeper's events go on as if open)."""
    where = prefix()
    store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(store, app="kept", lease_keep=10)
    closer = StateEngine(RedisStore(redis_server.url, prefix=where), app="kept")
    count = keeper.session_state("count", 0)
    sid = keeper.open_session()
    with keeper.event(sid) as ev:
        ev[count] = 1
    assert lease_of(store, sid)[0] is not None
    closer.close_session(sid)
    wait_until(lambda: lease_of(store, sid)[0] is None, "the keeper gave the lease back")
    with keeper.event(sid) as ev:
        assert ev.closed
    keeper.shutdown()
    closer.shutdown()


def test_a_close_here_makes_the_next_event_load(
    redis_server: RedisServer, scripts: list[str]
) -> None:
    """The keeper closes a kept session itself: the next event loads it (the kept
    copy's deadline is not the grace's), reusing the kept lease at once, and sees it
    closed. Fails if the event ran on the kept copy (ev.closed would be False, and
    after the grace a deleted session's handler would run before its commit fails)."""
    engine = StateEngine(
        RedisStore(redis_server.url, prefix=prefix()), app="kept", lease_keep=10, lease_wait=2
    )
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[count] = 1
    engine.close_session(sid)
    scripts.clear()
    with engine.event(sid) as ev:
        assert ev.closed
        ev[count] += 1
    assert scripts[0] == "LOAD"
    assert count.get(sid) == 2
    engine.shutdown()


def test_a_close_elsewhere_during_an_event_is_not_kept_over(
    redis_server: RedisServer,
) -> None:
    """Another process closes the session while this engine's event runs (its lease not
    yet a kept one, so nobody is asked): the event's commit gives the lease back rather
    than keep it, and the next event sees the session closed. Fails if the lease is
    kept on a closed session (the next events would say it is open and go on past its
    grace)."""
    where = prefix()
    store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(store, app="kept", lease_keep=10)
    closer = StateEngine(RedisStore(redis_server.url, prefix=where), app="kept")
    count = keeper.session_state("count", 0)
    sid = keeper.open_session()
    with keeper.event(sid) as ev:
        closer.close_session(sid)
        ev[count] = 1
    assert lease_of(store, sid) == [None, None, None]  # given back
    with keeper.event(sid) as ev:
        assert ev.closed
    keeper.shutdown()
    closer.shutdown()


def test_a_close_while_the_keeping_commit_is_in_flight_is_heard(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process closes the session just after the commit that keeps its lease
    was applied, and its one request for the lease reaches the keeper before the
    keeper records the kept lease. The lease is given back all the same. Fails if the
    request is lost in that window (the lease stays kept on a closed session)."""
    where = prefix()
    store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(store, app="kept", lease_keep=10)
    closer = StateEngine(RedisStore(redis_server.url, prefix=where), app="kept")
    count = keeper.session_state("count", 0)
    sid = keeper.open_session()
    run = RedisNamespace._run

    def commit_then_close(self: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
        reply = run(self, name, keys, args)
        if name == "COMMIT":
            closer.close_session(sid)  # asks the keeper, once
            time.sleep(0.3)  # the request arrives before the keeper records the lease
        return reply

    monkeypatch.setattr(RedisNamespace, "_run", commit_then_close)
    with keeper.event(sid) as ev:
        ev[count] = 1
    monkeypatch.setattr(RedisNamespace, "_run", run)
    wait_until(lambda: lease_of(store, sid)[0] is None, "the lease was given back")
    with keeper.event(sid) as ev:
        assert ev.closed
    keeper.shutdown()
    closer.shutdown()


def test_a_kept_session_slides_its_deadline_and_its_place(redis_server: RedisServer) -> None:
    """Events on a kept lease (no load) still keep their session alive and recent: used
    every 4 s for 160 s with idle_ttl 60, it is not reaped; at capacity, an idle
    session is evicted rather than it. Fails if a commit that keeps its lease does not
    slide the session's deadline (reaped at 60 s) or its place in the capacity order
    (the busiest session, last loaded at the start, is evicted)."""
    clock = FakeClock(1_000_000.0)
    engine = StateEngine(
        RedisStore(redis_server.url, prefix=prefix()),
        app="kept",
        clock=clock,
        idle_ttl=60,
        lease_ttl=30,
        lease_keep=10,
        capacity=3,
    )
    count = engine.session_state("count", 0)
    busy = engine.open_session()
    idle = engine.open_session()
    clock.advance(1)
    with engine.event(idle) as ev:
        ev[count] = 1
    for _ in range(40):
        clock.advance(4)
        with engine.event(busy) as ev:  # on its kept lease (renewed for 10 s each time)
            ev[count] += 1
    engine.reap()
    assert engine.exists(busy)
    assert not engine.exists(idle)  # unused since 1 s: reaped at 61 s
    older = engine.open_session()
    clock.advance(4)
    with engine.event(busy) as ev:  # on its kept lease
        ev[count] += 1
    newer = engine.open_session()  # the third: at capacity
    clock.advance(4)
    engine.open_session()  # evicts the least recently used: older, not busy
    assert engine.exists(busy)
    assert engine.exists(newer)
    assert not engine.exists(older)
    assert count.get(busy) == 41
    engine.shutdown()


def test_values_with_a_ttl_of_their_own_are_loaded_each_time(
    redis_server: RedisServer, scripts: list[str]
) -> None:
    """A session holding a value with a ttl of its own is loaded by each event (a kept
    copy would not see the value end). Fails if such a session's events skip their
    load."""
    engine = StateEngine(RedisStore(redis_server.url, prefix=prefix()), lease_keep=5)
    code = engine.session_state("code", "", ttl=60)
    sid = engine.open_session()
    scripts.clear()
    for value in ("a", "b", "c"):
        with engine.event(sid) as ev:
            ev[code] = value
    assert scripts == ["LOAD", "COMMIT"] * 3
    engine.shutdown()


def test_shutdown_gives_kept_leases_back(redis_server: RedisServer) -> None:
    """After shutdown no lease stays kept: another engine gets the session at once (its
    lease_wait is 1 s; the kept lease would run 30 s). Fails if shutdown leaves kept
    leases to lapse."""
    where = prefix()
    store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(store, app="kept", lease_keep=10)
    count = keeper.session_state("count", 0)
    sids = [keeper.open_session() for _ in range(5)]
    for sid in sids:
        with keeper.event(sid) as ev:
            ev[count] = 1
    assert all(lease_of(store, sid)[0] is not None for sid in sids)
    keeper.shutdown()
    assert all(lease_of(store, sid) == [None, None, None] for sid in sids)


def test_a_forked_child_does_not_use_the_parents_kept_leases(
    redis_server: RedisServer,
) -> None:
    """An engine that keeps leases, made before a fork: the child's event on a session
    the parent keeps waits for the parent to give it back (not reuse the parent's
    copy). The child then exits without shutting its engine down, keeping the lease:
    the parent's next event waits for it at most lease_keep (1 s), and sees the child's
    write. Fails if the child used the parent's kept lease, if the parent, asked, did
    not give it back (the child raises SessionBusy after 5 s), or if a kept lease
    lasted as long as an event's (30 s: the parent raises SessionBusy)."""
    where = prefix()
    engine = StateEngine(
        RedisStore(redis_server.url, prefix=where), app="kept", lease_keep=1, lease_wait=5
    )
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[count] = 1
    with warnings.catch_warnings():  # Python 3.12+ warns about fork with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            with engine.event(sid) as ev:
                code = 0 if ev[count] == 1 else 2
                ev[count] += 10
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with engine.event(sid) as ev:
        assert ev[count] == 11
    engine.shutdown()


def test_async_events_keep_their_leases_too(redis_server: RedisServer, scripts: list[str]) -> None:
    """aevent on an asyncio client keeps its lease as event does, and another engine's
    aevent gets the session when it asks. Fails if async events load every time, or
    if the other waits out the kept lease (SessionBusy after its lease_wait of 2 s)."""

    async def scenario() -> None:
        where = prefix()
        client = aioredis.Redis.from_url(redis_server.url)
        store = RedisStore(redis_server.url, async_client=client, prefix=where)
        keeper = StateEngine(store, app="kept", lease_keep=10)
        other = StateEngine(
            RedisStore(redis_server.url, async_client=client, prefix=where),
            app="kept",
            lease_wait=2,
        )
        count, counted = keeper.session_state("count", 0), other.session_state("count", 0)
        sid = await keeper.aopen_session()
        scripts.clear()
        for _ in range(5):
            async with keeper.aevent(sid) as ev:
                ev[count] += 1
        assert scripts == ["LOAD"] + ["COMMIT"] * 5
        async with other.aevent(sid) as ev:
            assert ev[counted] == 5
            ev[counted] += 1
        async with keeper.aevent(sid) as ev:
            assert ev[count] == 6
        await keeper.ashutdown()
        await other.ashutdown()
        await client.aclose()

    asyncio.run(scenario())


def test_kept_leases_on_a_cluster(redis_cluster: RedisCluster, scripts: list[str]) -> None:
    """On a cluster (sessions in 48 buckets, requests on each bucket's shard channel),
    two engines taking turns on sessions of several buckets end at exact totals, and a
    keeper alone sends one load per session. Fails if a request for a kept lease does
    not reach its keeper through sharded pub/sub (SessionBusy after 3 s)."""
    url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in redis_cluster.startup_nodes)
    where = prefix()
    one = StateEngine(RedisStore(url, prefix=where), app="kept", lease_keep=10, lease_wait=3)
    two = StateEngine(RedisStore(url, prefix=where), app="kept", lease_keep=10, lease_wait=3)
    counts = [engine.session_state("count", 0) for engine in (one, two)]
    sids = [one.open_session() for _ in range(6)]
    scripts.clear()
    for _ in range(3):
        for sid in sids:
            with one.event(sid) as ev:
                ev[counts[0]] += 1
    assert scripts.count("LOAD") == len(sids)
    for _ in range(2):
        for sid in sids:
            for engine, count in zip((one, two), counts, strict=True):
                with engine.event(sid) as ev:
                    ev[count] += 1
    assert [counts[0].get(sid) for sid in sids] == [7] * len(sids)
    one.shutdown()
    two.shutdown()


@pytest.mark.parametrize(
    ("store", "keep", "fault"),
    [
        ("memory", 5, "cannot"),
        ("sqlite", 5, "cannot"),
        ("redis", 40, "at most lease_ttl"),
        ("redis", -1, "positive"),
        ("redis", True, "positive"),
    ],
)
def test_lease_keep_is_checked(
    store: str, keep: Any, fault: str, redis_server: RedisServer, tmp_path: Any
) -> None:
    made = (
        MemoryStore()
        if store == "memory"
        else SQLiteStore(tmp_path / "s.db")
        if store == "sqlite"
        else RedisStore(redis_server.url, prefix=prefix())
    )
    with pytest.raises(InvalidDeclaration, match=fault):
        StateEngine(made, lease_ttl=30, lease_keep=keep)


def test_stats_count_only_the_leases_kept_now(redis_server: RedisServer) -> None:
    """A kept lease that lapsed is no longer kept: the count (and the Prometheus gauge
    made from it) drops, and the values it held are let go. Fails if lapsed leases are
    counted until 10,000 pile up."""
    clock = FakeClock(1_000_000.0)
    engine = StateEngine(
        RedisStore(redis_server.url, prefix=prefix()),
        app="kept",
        clock=clock,
        lease_ttl=5,
        lease_keep=1,
    )
    count = engine.session_state("count", 0)
    for sid in [engine.open_session() for _ in range(5)]:
        with engine.event(sid) as ev:
            ev[count] += 1
    assert engine.stats().kept == 5
    clock.advance(2)  # every kept lease lapsed
    assert engine.stats().kept == 0
    engine.shutdown()


def test_an_event_loaded_on_its_kept_token_is_held_at_capacity(
    redis_server: RedisServer,
) -> None:
    """A kept lease too short to use is loaded again with its token: the event then
    holds the session, and an open at capacity passes it over for a session that is
    only kept. Fails if the loaded event still looks like a kept lease (the store then
    took it, oldest, and the event's commit failed with SessionExpired)."""
    clock = FakeClock()
    store = RedisStore(redis_server.url, prefix=prefix())
    engine = StateEngine(
        store, app="shop", clock=clock, idle_ttl=600, capacity=3, lease_keep=5, warn_hold=1000
    )
    note = engine.session_state("note", "")
    first, *others = [engine.open_session() for _ in range(3)]
    with engine.event(first) as ev:
        ev[note] = "kept"
    clock.advance(3)  # 2 s of the kept lease left: the next event loads
    with engine.event(first) as ev:
        clock.advance(1)
        for sid in others:  # kept leases of their own, used after the load
            with engine.event(sid) as other:
                other[note] = "other"
        clock.advance(1)
        engine.open_session()
        ev[note] = "long"
    assert note.get(first) == "long"
    assert sum(engine.exists(sid) for sid in others) == 1
    engine.shutdown()
    store.close()


def test_an_event_that_loaded_and_only_read_gives_its_lease_back(
    redis_server: RedisServer,
) -> None:
    """With ``lease_keep`` as long as ``lease_ttl`` (allowed), an event that loaded and
    wrote nothing holds a lease the store never marked kept: it is given back, so that
    another process's event runs at once. Fails (the other waits, never asking, and
    raises SessionBusy) if the engine kept it without the store's mark."""
    where = prefix()
    clock = FakeClock(2_000_000_000.0)
    keeper_store = RedisStore(redis_server.url, prefix=where)
    other_store = RedisStore(redis_server.url, prefix=where)
    keeper = StateEngine(keeper_store, app="kept", clock=clock, lease_ttl=10, lease_keep=10)
    other = StateEngine(other_store, app="kept", clock=clock, lease_ttl=10, lease_wait=0.3)
    count = keeper.session_state("count", 0)
    other_count = other.session_state("count", 0)
    sid = keeper.open_session()
    with other.event(sid) as ev:
        ev[other_count] = 1
    with keeper.event(sid) as ev:  # loads, reads
        assert ev[count] == 1
    assert lease_of(keeper_store, sid) == [None, None, None]
    with other.event(sid) as ev:  # not SessionBusy
        ev[other_count] += 1
    with keeper.event(sid) as ev:
        assert ev[count] == 2
    keeper.shutdown()
    other.shutdown()
