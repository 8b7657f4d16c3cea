"""What a Redis store's replicas get: an event's lease stays on the master (a load sends
its replicas nothing), a commit sends them one write, which carries its outcome and the
lease's new state (kept, or given back), so that a promoted replica keeps a kept lease
and answers a commit sent again with its first outcome.

The tests run on the shared Sentinel set-up's master and its replica, and wait for
the replica (``WAIT``) before reading it, so that what it lacks was never sent; the
failover test runs on a master and replica of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from statekit import LeaseLost, SessionBusy, SessionState, StateEngine, StoreUnavailable
from statekit.stores._redis_wire import forget_demoted
from statekit.stores.redis import RedisStore
from statekit.testing import FakeClock, RedisSentinel, RedisServer

from ._proxy import ReplyDropper

LEASE_FIELDS = ("_l", "_lu", "_lk")
GIVEN_BACK = [b"", b"0", b""]  # a kept lease a commit gives back: emptied, replicated
COMMITS = ("_q0", "_q1", "_q2", "_q3")


@pytest.fixture
def nodes(redis_sentinel: RedisSentinel) -> Iterator[tuple[redis.Redis, redis.Redis]]:
    """The set-up's master and its replica, as clients."""
    host, port = redis_sentinel.master()
    master = redis.Redis(host=host, port=port)
    replica_info = master.info("replication")["slave0"]
    replica = redis.Redis(host=replica_info["ip"], port=replica_info["port"])
    yield master, replica
    master.close()
    replica.close()


def synced(master: redis.Redis) -> None:
    """Wait until the replica has everything the master sent it."""
    assert master.wait(1, 5000) == 1


def session_key(master: redis.Redis, prefix: str, sid: str) -> bytes:
    (key,) = list(master.scan_iter(match=f"{prefix}*s:{sid}", count=1000))
    return bytes(key)


def follow(replica: redis.Redis, master_port: int) -> None:
    """Make ``replica`` a replica of the server on ``master_port``; return once in sync."""
    replica.replicaof("127.0.0.1", master_port)
    deadline = time.monotonic() + 10
    while replica.info("replication").get("master_link_status") != "up":
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)


def store_on(master: redis.Redis, prefix: str) -> RedisStore:
    kwargs = master.connection_pool.connection_kwargs
    return RedisStore(f"redis://{kwargs['host']}:{kwargs['port']}", prefix=prefix)


def test_an_events_lease_is_on_the_master_only(nodes: tuple[redis.Redis, redis.Redis]) -> None:
    """During an event the master holds its lease and the replica, in sync, does not;
    the commit gives it back on the master only, and its values, version and outcome
    reach the replica; the commit's request key stays on the master. Fails if a
    load's lease, or the remembered reply, is replicated, or if the hashes differ."""
    master, replica = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop")
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    try:
        with engine.event(sid) as ev:
            ev[cart].append("milk")
            synced(master)
            assert master.hget(key, "_l") is not None  # the event's lease
            assert replica.hmget(key, *LEASE_FIELDS) == [None, None, None]
            assert replica.exists(key)  # the session itself is replicated
        synced(master)
        assert master.hmget(key, *LEASE_FIELDS) == [None, None, None]
        assert replica.hgetall(key) == master.hgetall(key)
        # Remembered replies: the open's (replicated) and the commit's (here only).
        requests = list(master.scan_iter(match=f"{prefix}*q:*", count=1000))
        assert len(requests) == 2
        assert sum(replica.exists(request) for request in requests) == 1
    finally:
        engine.shutdown()
        store.close()


def test_a_kept_lease_and_its_end_reach_the_replica(
    nodes: tuple[redis.Redis, redis.Redis],
) -> None:
    """An engine keeping its leases between events (``lease_keep``) marks the kept lease
    in the commit's write, which the replica gets; giving it back (at shutdown) reaches
    the replica too. Fails if a promoted replica could not know the lease is kept, or
    would keep it after it was given back."""
    master, replica = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop", lease_keep=5)
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    for _ in range(3):
        with engine.event(sid) as ev:
            ev[count] += 1
    synced(master)
    kept = master.hmget(key, *LEASE_FIELDS)
    assert kept[0] is not None
    assert kept[2] == kept[0]  # kept
    assert replica.hmget(key, *LEASE_FIELDS) == kept
    engine.shutdown()  # gives its kept leases back
    store.close()
    synced(master)
    assert master.hmget(key, *LEASE_FIELDS) == [None, None, None]
    assert replica.hmget(key, *LEASE_FIELDS) == [None, None, None]


def test_a_kept_lease_turned_into_an_events_lease_ends_on_the_replica(
    nodes: tuple[redis.Redis, redis.Redis],
) -> None:
    """A keeper whose kept copy cannot serve the next event (a value with a ttl of its
    own) loads with its kept token, and the event only reads: the lease is then an
    event's, given back on the master alone. The replica must not go on holding the
    kept lease: promoted, it would make every other process wait for a keeper that no
    longer keeps it. Fails if the load ends the kept lease on the master only."""
    master, replica = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop", lease_keep=8)
    count = engine.session_state("count", 0)
    token = engine.session_state("token", "", ttl=300)
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    try:
        with engine.event(sid) as ev:
            ev[token] = "x"
            ev[count] += 1
        synced(master)
        kept = replica.hmget(key, *LEASE_FIELDS)
        assert kept[0] is not None
        assert kept[2] == kept[0]  # kept, and the replica knows it
        with engine.event(sid) as ev:  # loads with the kept token; reads only
            assert ev[count] == 1
        synced(master)
        on_replica = replica.hmget(key, *LEASE_FIELDS)
        assert on_replica[2] in (None, b"")  # no kept lease left there
        assert master.hmget(key, *LEASE_FIELDS) == [None, None, None]
    finally:
        engine.shutdown()
        store.close()


def test_a_kept_lease_still_holds_after_a_failover(tmp_path: Any) -> None:
    """A master dies after an engine kept its session's lease; its replica is promoted.
    Another engine's event must not take the session from under the keeper: it asks
    the keeper and waits, and the keeper's next event sees what the other wrote, never
    a stale copy. Fails (the other's event runs at once, and the keeper's next event
    reads its old copy) if the kept lease is not on the replica."""
    master, replica = RedisServer().start(), RedisServer().start()
    proxy = None
    try:
        to_replica = redis.Redis(port=replica.port)
        follow(to_replica, master.port)
        proxy = ReplyDropper(("127.0.0.1", master.port))
        keeper_store, other_store = (
            RedisStore(proxy.url, prefix="k"),
            RedisStore(proxy.url, prefix="k"),
        )
        keeper = StateEngine(keeper_store, app="a", lease_keep=20, lease_wait=10)
        other = StateEngine(other_store, app="a", lease_wait=10)
        count = keeper.session_state("count", 0)
        other_count = other.session_state("count", 0)
        sid = keeper.open_session()
        with keeper.event(sid) as ev:
            ev[count] += 1
        assert redis.Redis(port=master.port).wait(1, 5000) == 1
        # The failover: the replica promoted, clients led to it, the master gone.
        to_replica.replicaof("NO", "ONE")
        proxy.target = ("127.0.0.1", replica.port)
        master.stop()
        asked = time.monotonic()
        while True:
            try:
                with other.event(sid) as ev:
                    ev[other_count] += 100
                break
            except (SessionBusy, LeaseLost):
                assert time.monotonic() - asked < 30, "the keeper never gave the lease up"
        with keeper.event(sid) as ev:
            assert ev[count] == 101  # not the kept copy's 1
        keeper.shutdown()
        other.shutdown()
        keeper_store.close()
        other_store.close()
    finally:
        if proxy is not None:
            proxy.close()
        master.stop()
        replica.stop()


@pytest.mark.parametrize("path", ["blocking", "awaited", "wait_replicas"])
def test_a_switch_over_behind_one_address_is_followed(path: str) -> None:
    """A store on one address that leads to whichever server is master (a virtual IP,
    a proxy, a DNS name): after a switch-over its pooled connections still reach the
    demoted master, which refuses writes (READONLY, before writing anything). The
    store drops such a connection and the next call connects again: the blocking
    client made from the URL at once (it sends again), an asyncio client of the app's
    own and a write with ``wait_replicas`` after one refusal, which says nothing was
    written. Fails if READONLY is raised on every call made on an old connection, or
    said to have perhaps been applied."""
    old, new = RedisServer().start(), RedisServer().start()
    proxy = None
    try:
        to_old, to_new = redis.Redis(port=old.port), redis.Redis(port=new.port)
        follow(to_new, old.port)
        proxy = ReplyDropper(("127.0.0.1", old.port))
        clock = FakeClock()
        store = RedisStore(
            proxy.url,
            prefix="p",
            async_client=aioredis.Redis.from_url(proxy.url) if path == "awaited" else None,
            wait_replicas=1 if path == "wait_replicas" else 0,
        )
        engine = StateEngine(store, app="a", clock=clock, idle_ttl=60)
        count = engine.session_state("count", 0)

        async def add() -> None:
            async with engine.aevent(sid) as ev:
                ev[count] += 1

        loop = asyncio.new_event_loop()  # the asyncio client's connections are this loop's

        def event() -> None:
            if path == "awaited":
                loop.run_until_complete(add())
            else:
                with engine.event(sid) as ev:
                    ev[count] += 1

        sid = engine.open_session()
        event()
        assert to_old.wait(1, 5000) == 1
        # The switch-over: roles swapped, the address now leads to the new master.
        to_new.replicaof("NO", "ONE")
        proxy.target = ("127.0.0.1", new.port)
        follow(to_old, new.port)
        refusals: list[StoreUnavailable] = []
        done = 1
        for step in range(6):
            clock.advance(20 if step % 2 == 0 else 0)  # loads that slide, and not
            try:
                event()
                done += 1
            except StoreUnavailable as exc:
                refusals.append(exc)
        assert len(refusals) <= (0 if path == "blocking" else 1)
        # (with wait_replicas, the WAIT's own refusal: "cannot be used with replica")
        assert all("ReadOnlyError" in str(exc) or "replica" in str(exc) for exc in refusals)
        assert not any(exc.outcome_unknown for exc in refusals)
        assert count.get(sid) == done
        assert to_new.hget(f"p:{{a}}:s:{sid}", "v:count") == str(done).encode()
        engine.shutdown()
        if path == "awaited":
            loop.run_until_complete(store.async_client.aclose())
        loop.close()
        store.close()
        to_old.close()
        to_new.close()
    finally:
        if proxy is not None:
            proxy.close()
        old.stop()
        new.stop()


def test_a_url_leading_to_a_replica_is_refused_with_nothing_written(
    nodes: tuple[redis.Redis, redis.Redis],
) -> None:
    """A store pointed at a replica by mistake: its writes are refused (READONLY), and
    the error says nothing was written, at once (the retries find the same replica).
    Fails if the retried refusal reads as a lost reply (outcome unknown)."""
    _, replica = nodes
    kwargs = replica.connection_pool.connection_kwargs
    store = RedisStore(f"redis://{kwargs['host']}:{kwargs['port']}", prefix="wrong")
    engine = StateEngine(store, app="shop")
    try:
        with pytest.raises(StoreUnavailable, match="ReadOnlyError") as raised:
            engine.open_session()
        assert not raised.value.outcome_unknown
    finally:
        engine.shutdown()
        store.close()


def test_notices_reach_a_listener_on_a_demoted_master(
    nodes: tuple[redis.Redis, redis.Redis],
) -> None:
    """A listener still subscribed to a master demoted behind the address it knows
    (nothing tells it to move) must go on hearing notices: they are replicated, so its
    server, now a replica, passes them on. Checked on a replica directly: a commit's
    and a global's notices reach its subscribers. Fails if notices are master-only."""
    master, replica = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop")
    count = engine.session_state("count", 0)
    hits = engine.global_state("hits", 0)
    listener = replica.pubsub()  # type: ignore[no-untyped-call]
    try:
        listener.psubscribe(f"{prefix}*")
        assert listener.get_message(timeout=5)["type"] == "psubscribe"
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[count] += 1
        hits.increment()
        heard: list[str] = []
        deadline = time.monotonic() + 5
        while len(heard) < 2 and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)
            if message is not None and message["type"] == "pmessage":
                heard.append(json.loads(message["data"])["k"])
        assert "changed" in heard
        assert "global" in heard
    finally:
        listener.close()
        engine.shutdown()
        store.close()


def test_a_store_closed_during_a_call_gives_each_connection_back_once(
    redis_server: RedisServer,
) -> None:
    """``close()`` gives the connections the store kept back to the caller's pool; a
    call still in flight that then meets a demoted master forgets those it knows of.
    Each must reach the pool once: twice, a blocking pool hands one socket to two of
    the caller's threads. Fails if close() leaves them where the call still sees them."""
    pool: Any = redis.BlockingConnectionPool.from_url(redis_server.url, max_connections=10)
    client = redis.Redis(connection_pool=pool)
    store = RedisStore(client=client, prefix=f"close{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    sid = engine.open_session()
    with engine.event(sid):
        pass
    stacks = store._stacks
    assert stacks is not None
    kept = stacks[pool]  # what a call in flight holds
    assert kept
    engine.shutdown()
    store.close()
    held = pool.get_connection()  # one of the caller's threads takes one
    forget_demoted(pool, kept)  # that call, meeting a READONLY after the close
    other = pool.get_connection()  # another of the caller's threads
    assert other is not held  # not one socket for two threads
    pool.release(other)
    pool.release(held)
    client.close()


def resend_commits(monkeypatch: pytest.MonkeyPatch, master: redis.Redis) -> list[Any]:
    """Send every commit twice from now on, its request key deleted in between (as
    when the master that remembered it failed over to a replica that never had it),
    asserting that the second send answers as the first; the replies, in order."""
    original = RedisStore.run
    replies: list[Any] = []

    def twice(self: RedisStore, script: Any, keys: list[Any], args: list[Any], **kw: Any) -> Any:
        first = original(self, script, keys, args, **kw)
        if script == "COMMIT":
            assert master.delete(keys[1]) == 1  # the remembered reply, lost
            assert original(self, script, keys, args, **kw) == first
            replies.append(first)
        return first

    monkeypatch.setattr(RedisStore, "run", twice)
    return replies


def test_a_commit_sent_again_after_its_request_key_is_gone_gets_its_first_outcome(
    nodes: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second send of each commit, its request key gone, must answer the first
    outcome from the session's hash. Without it, the second send finds the lease given
    back and the version moved, and answers a conflict, which the event raises though
    its write was applied."""
    master, _ = nodes
    resent = resend_commits(monkeypatch, master)
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop")
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    try:
        for _ in range(6):
            with engine.event(sid) as ev:
                ev[count] += 1
        assert count.get(sid) == 6
        assert [int(reply[1]) for reply in resent] == [1, 2, 3, 4, 5, 6]
        # The hash keeps the last four commits' outcomes, version v in _q<v % 4>.
        outcomes = master.hmget(key, *COMMITS)
        versions = []
        for outcome in outcomes:
            assert isinstance(outcome, bytes)
            versions.append(int(outcome.split(b":")[1]))
        assert versions == [4, 5, 6, 3]
        # Each in a field small enough for the compact encoding of a small hash.
        assert master.object("encoding", key) == b"listpack"
    finally:
        engine.shutdown()
        store.close()


def test_a_lease_given_back_is_said_again_when_sent_again(
    nodes: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event on a kept lease whose session was closed meanwhile (by a process whose
    request to give the lease up has not come yet) commits and gives the lease back,
    and its reply says so; sent again with its request key gone, it says so again.
    Fails if the commit's outcome forgets the mark: the engine would go on keeping a
    lease it no longer holds."""
    master, _ = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop", lease_keep=5)
    note = engine.session_state("note", "")
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    try:
        with engine.event(sid) as ev:
            ev[note] = "kept"
        assert master.hget(key, "_lk") is not None
        master.hset(key, "_c", "1")  # closed, unknown to the keeper
        resent = resend_commits(monkeypatch, master)
        with engine.event(sid) as ev:  # on the kept lease: no load
            ev[note] = "late"
        assert [reply[2] for reply in resent] == [b"given back"]
        assert master.hmget(key, *LEASE_FIELDS) == GIVEN_BACK
    finally:
        engine.shutdown()
        store.close()
