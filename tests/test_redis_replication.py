"""What a Redis store's replicas get: leases stay on the master (a load sends its
replicas nothing, a commit one write), and a commit's outcome travels with its write,
so that a commit sent again where its remembered reply is gone (a master that failed
over, a restart) still gets its first outcome.

The tests run on the shared Sentinel set-up's master and its replica, and wait for
the replica (``WAIT``) before reading it, so that what it lacks was never sent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from statekit import SessionState, StateEngine
from statekit.stores.redis import RedisStore
from statekit.testing import RedisSentinel

LEASE_FIELDS = (b"_l", b"_lu", b"_lk")


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


def test_a_lease_is_on_the_master_only(nodes: tuple[redis.Redis, redis.Redis]) -> None:
    """During an event the master holds its lease and the replica, in sync, does not;
    after the commit the replica has the values and version but no lease field, and
    the commit's request key is on the master only. Fails if a load's or a commit's
    lease write, or the remembered reply, is replicated."""
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
        assert master.hmget(key, *LEASE_FIELDS) == [None, None, None]  # given back
        on_replica = replica.hgetall(key)
        assert not set(LEASE_FIELDS) & set(on_replica)
        assert on_replica[b"_v"] == master.hget(key, "_v")
        # Remembered replies: the open's (replicated) and the commit's (here only).
        requests = list(master.scan_iter(match=f"{prefix}*q:*", count=1000))
        assert len(requests) == 2
        assert sum(replica.exists(request) for request in requests) == 1
    finally:
        engine.shutdown()
        store.close()


def test_a_kept_lease_is_on_the_master_only(nodes: tuple[redis.Redis, redis.Redis]) -> None:
    """An engine keeping its leases between events (``lease_keep``) marks the kept one
    on the master; the replica never sees it. Fails if the keeping commit's lease
    fields are replicated with its values."""
    master, replica = nodes
    prefix = f"rep{uuid.uuid4().hex[:6]}"
    store = store_on(master, prefix)
    engine = StateEngine(store, app="shop", lease_keep=5)
    count = engine.session_state("count", 0)
    sid = engine.open_session()
    key = session_key(master, prefix, sid)
    try:
        for _ in range(3):
            with engine.event(sid) as ev:
                ev[count] += 1
        synced(master)
        kept = master.hmget(key, *LEASE_FIELDS)
        assert kept[0] is not None
        assert kept[2] == kept[0]
        assert replica.hmget(key, *LEASE_FIELDS) == [None, None, None]
        assert count.get(sid) == 3
    finally:
        engine.shutdown()
        store.close()


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


def store_on(master: redis.Redis, prefix: str) -> RedisStore:
    kwargs = master.connection_pool.connection_kwargs
    return RedisStore(f"redis://{kwargs['host']}:{kwargs['port']}", prefix=prefix)


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
    try:
        for _ in range(6):
            with engine.event(sid) as ev:
                ev[count] += 1
        assert count.get(sid) == 6
        assert [int(reply[1]) for reply in resent] == [1, 2, 3, 4, 5, 6]
        # The hash keeps the last four commits' outcomes, newest first.
        recent = master.hget(session_key(master, prefix, sid), "_q")
        assert isinstance(recent, bytes)
        assert [entry.split(b":")[1] for entry in recent.split()] == [b"6", b"5", b"4", b"3"]
    finally:
        engine.shutdown()
        store.close()


def test_a_lease_given_back_is_said_again_when_sent_again(
    nodes: tuple[redis.Redis, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event on a kept lease whose session was closed meanwhile (by a process whose
    request to give the lease up has not come yet) commits and gives the lease back,
    and its reply says so; sent again with its request key gone, it says so again.
    Fails if the recent commits forget the mark: the engine would go on keeping a
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
        assert master.hmget(key, *LEASE_FIELDS) == [None, None, None]
    finally:
        engine.shutdown()
        store.close()
