"""The Redis store on a real Redis Cluster (3 masters, 3 replicas on loopback): the
whole store contract, sessions spread evenly over the masters, reaping on every master
with each callback once, and exact totals from several processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio.cluster as aiocluster

from statekit import SessionBusy, SessionState, StateEngine, StoreUnavailable
from statekit.stores import Loaded, Notice, Store, StoreNamespace
from statekit.stores.redis import RedisStore
from statekit.testing import RedisCluster

from . import _workers
from .store_contract import Awaited, SharedStoreContract

SPAWN = multiprocessing.get_context("spawn")


def cluster_url(cluster: RedisCluster) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)


def keys_per_master(cluster: RedisCluster, match: str) -> dict[int, int]:
    """How many keys matching ``match`` each master holds."""
    counts = {}
    for port in cluster.masters():
        node = redis.Redis(port=port)
        try:
            counts[port] = sum(1 for _ in node.scan_iter(match=match, count=1000))
        finally:
            node.close()
    return counts


class TestRedisStoreOnCluster(SharedStoreContract):
    """The store contract on a cluster: every script runs on one slot (the cluster
    refuses a script that touches keys of two), capacity and claims keep their
    meaning across the buckets, notices arrive through sharded pub/sub."""

    @pytest.fixture(autouse=True)
    def _cluster(self, redis_cluster: RedisCluster) -> None:
        self.url = cluster_url(redis_cluster)

    def make_store(self) -> Store:
        return RedisStore(self.url, prefix=f"c{uuid.uuid4().hex[:6]}")


class TestRedisStoreOnClusterAwaited(SharedStoreContract):
    """The contract through the async methods, on ``redis.asyncio.cluster``."""

    @pytest.fixture(autouse=True)
    def _loop(self, redis_cluster: RedisCluster) -> Iterator[None]:
        self.url = cluster_url(redis_cluster)
        self.loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        thread.start()
        self.client = aiocluster.RedisCluster.from_url(redis_cluster.url)
        yield
        asyncio.run_coroutine_threadsafe(self.client.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread.join(10)
        self.loop.close()

    def make_store(self) -> Store:
        return RedisStore(self.url, async_client=self.client, prefix=f"ca{uuid.uuid4().hex[:6]}")

    def through(self, ns: StoreNamespace) -> StoreNamespace:
        return Awaited(ns, self.loop)


def test_a_new_asyncio_cluster_client_takes_many_first_calls_at_once(
    redis_cluster: RedisCluster,
) -> None:
    """An app's first requests arrive together, on an asyncio cluster client that has
    not yet read the cluster's layout: each call reaches its key's node and the total
    is exact. Fails without the store reading the layout before the first call:
    redis-py 8 then sends those calls to any node, and tasks recovering from the MOVED
    replies together disconnect connections others are opening (an AttributeError
    from inside redis-py, in about one round of five)."""

    async def rounds() -> None:
        for _ in range(12):
            client = aiocluster.RedisCluster.from_url(redis_cluster.url)
            store = RedisStore(
                cluster_url(redis_cluster), async_client=client, prefix=f"f{uuid.uuid4().hex[:6]}"
            )
            try:
                ns = store.namespace("first")
                await asyncio.gather(*(ns.aglobal_add("n", 1, default=0) for _ in range(24)))
                found = ns.global_get("n")
                assert found is not None
                assert int(found[0]) == 24
            finally:
                await client.aclose()
                store.close()

    asyncio.run(rounds())


def test_a_cluster_is_chosen_by_url_or_by_client(redis_cluster: RedisCluster) -> None:
    """``redis+cluster://`` and a RedisCluster client both make a cluster store (48
    buckets, sharded notices); a plain URL to one node would not reach the others'
    slots. Fails if either is taken for a single server."""
    by_url = RedisStore(cluster_url(redis_cluster), prefix="kind")
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    by_client = RedisStore(client=client, prefix="kind")
    try:
        assert by_url.cluster
        assert by_client.cluster
        assert by_url.buckets == by_client.buckets == 48
        with pytest.raises(ValueError, match="async_client"):
            RedisStore(client=client, async_client=redis.asyncio.Redis())
        # Set later, as a worker does after a fork: checked the same way (a
        # one-server client would find none of the cluster's sessions).
        with pytest.raises(ValueError, match=r"on a cluster, so give it .*cluster"):
            by_url.async_client = redis.asyncio.Redis()
        assert by_url.async_client is None
    finally:
        by_url.close()
        by_client.close()


def test_10000_sessions_spread_evenly_over_the_masters(redis_cluster: RedisCluster) -> None:
    """Each master holds a third of the sessions, within 10%. Fails when an app's
    sessions share one slot (the old single hash tag) or buckets land unevenly."""
    prefix = f"spread{uuid.uuid4().hex[:6]}"
    store = RedisStore(cluster_url(redis_cluster), prefix=prefix)
    ns = store.namespace("shop")
    try:
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: ns.create_session(
                        f"sid{i:05d}", now=0.0, deadline=4e9, capacity=1_000_000
                    ),
                    range(10_000),
                )
            )
        assert ns.session_count() == 10_000
        counts = keys_per_master(redis_cluster, f"{prefix}:*:s:*")
        assert len(counts) == 3
        assert sum(counts.values()) == 10_000
        assert all(abs(n - 10_000 / 3) <= 10_000 / 3 * 0.10 for n in counts.values()), counts
    finally:
        store.close()


def test_capacity_holds_across_buckets(redis_cluster: RedisCluster) -> None:
    """An app at capacity evicts its least recently used session, whichever bucket
    holds it, and the count stays at capacity. Fails if capacity were checked per
    bucket (evicting early) or not at all."""
    store = RedisStore(cluster_url(redis_cluster), prefix=f"cap{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop", capacity=10)
    ended: list[str] = []
    engine.on_close(lambda sid, reason: ended.append(sid))
    try:
        first = [engine.open_session() for _ in range(10)]
        assert engine.session_count() == 10
        assert ended == []
        later = [engine.open_session() for _ in range(5)]
        assert engine.session_count() == 10
        assert ended == first[:5]
        assert all(engine.exists(sid) for sid in first[5:] + later)
    finally:
        engine.shutdown()
        store.close()


def _populate(url: str, prefix: str, sids: list[str], now: float) -> None:
    store = RedisStore(url, prefix=prefix)
    ns = store.namespace("mp")
    try:
        for sid in sids:
            ns.create_session(sid, now=now, deadline=now + 60, capacity=1_000_000)
            note = {"note": f'"{sid}"'.encode()}
            ns.commit(sid, version=0, writes=note, ttl_deadlines={}, now=now)
    finally:
        store.close()


def test_reaping_10000_sessions_runs_on_every_master_each_callback_once(
    redis_cluster: RedisCluster,
) -> None:
    """Four processes reap 10,000 expired sessions spread over the three masters:
    every session's deletion callback runs exactly once, in one of them, and no
    session is left on any master. Fails if a bucket were never reaped (its master's
    sessions stay), or an entry were claimed twice."""
    import time

    url, prefix = cluster_url(redis_cluster), f"reap{uuid.uuid4().hex[:6]}"
    sids = [f"r{i:05d}{uuid.uuid4().hex[:8]}" for i in range(10_000)]
    now = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: _populate(url, prefix, sids[k::8], now), range(8)))
    before = keys_per_master(redis_cluster, f"{prefix}:*:s:*")
    assert len(before) == 3
    assert min(before.values()) > 3000
    out, start = SPAWN.Queue(), SPAWN.Barrier(4)
    reapers = [
        SPAWN.Process(target=_workers.reap, args=("redis", url, prefix, 120.0, out, start))
        for _ in range(4)
    ]
    try:
        for p in reapers:
            p.start()
        calls = [out.get(timeout=120) for _ in range(10_000)]
        for p in reapers:
            p.join(60)
        assert [p.exitcode for p in reapers] == [0] * 4
    finally:
        for p in reapers:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert out.empty()
    assert sorted(value for value, _ in calls) == sorted(sids)
    assert {reason for _, reason in calls} == {"idle"}
    assert keys_per_master(redis_cluster, f"{prefix}:*:s:*") == dict.fromkeys(before, 0)


def _run_all(processes: list[Any], timeout: float = 240) -> None:
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
        assert [p.exitcode for p in processes] == [0] * len(processes), "workers failed"
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join(10)


def test_8_processes_x_1000_increments_are_exact_on_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """A global's add is one script on the global's own slot: 8,000 increments from 8
    processes give exactly 8,000."""
    url, prefix = cluster_url(redis_cluster), f"inc{uuid.uuid4().hex[:6]}"
    _run_all(
        [
            SPAWN.Process(target=_workers.increment, args=("redis", url, prefix, 1000))
            for _ in range(8)
        ]
    )
    engine = _workers.engine("redis", url, prefix)
    try:
        assert engine.global_state("visitors", 0).get() == 8000
    finally:
        engine.shutdown()
        engine.store.close()  # type: ignore[attr-defined]


def test_8_processes_x_200_events_on_one_session_lose_none_on_a_cluster(
    redis_cluster: RedisCluster,
) -> None:
    """Events of one session from 8 processes take turns by the lease: every one of
    the 1,600 appends is kept, once."""
    url, prefix = cluster_url(redis_cluster), f"ev{uuid.uuid4().hex[:6]}"
    engine = _workers.engine("redis", url, prefix)
    try:
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        _run_all(
            [
                SPAWN.Process(target=_workers.append, args=("redis", url, prefix, sid, k, 200))
                for k in range(8)
            ]
        )
        assert sorted(log.get(sid)) == sorted(k * 10_000 + i for k in range(8) for i in range(200))
    finally:
        engine.shutdown()
        engine.store.close()  # type: ignore[attr-defined]


def test_a_session_loaded_on_the_cluster_reads_back_what_was_written(
    redis_cluster: RedisCluster,
) -> None:
    """A value written through one store is read through another (another client,
    another process's view): the layout is the same for both."""
    url = cluster_url(redis_cluster)
    prefix = f"rw{uuid.uuid4().hex[:6]}"
    one, two = RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)
    try:
        a, b = one.namespace("shop"), two.namespace("shop")
        a.create_session("s1", now=0.0, deadline=4e9, capacity=10)
        a.commit("s1", version=0, writes={"cart": b"[1]"}, ttl_deadlines={}, now=0.0)
        loaded = b.load_session("s1", now=1.0, touch_until=None)
        assert isinstance(loaded, Loaded)
        assert loaded.values == {"cart": b"[1]"}
    finally:
        one.close()
        two.close()


def _master_of(store: RedisStore, sid: str) -> int:
    """The port of the master holding session ``sid``."""
    key = store.namespace("shop").layout.of(sid).P + "s:" + sid
    return int(store.client.get_node_from_key(key).port)


def _events_until(
    engine: StateEngine, sid: str, n: SessionState[int], ok: int
) -> tuple[int, list[StoreUnavailable]]:
    """Events adding 1 to ``n`` until ``ok`` of them succeeded in a row (at most 60 s);
    returns (successes, the StoreUnavailable raised, in order)."""
    acked, row = 0, 0
    errors: list[StoreUnavailable] = []
    deadline = time.monotonic() + 60
    while row < ok:
        assert time.monotonic() < deadline, f"no recovery: {errors[-3:]}"
        try:
            with engine.event(sid) as ev:
                ev[n] += 1
        except StoreUnavailable as exc:
            errors.append(exc)
            row = 0
            time.sleep(0.05)
        else:
            acked += 1
            row += 1
    return acked, errors


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_a_master_killed_mid_run_raises_store_unavailable_then_the_engine_recovers(
    redis_cluster: RedisCluster, wait_replicas: int
) -> None:
    """SIGKILL the master of a session while events run on it: events raise
    StoreUnavailable (an event whose commit may have been applied says
    outcome_unknown), and once the replica is promoted (and, for the replica-wait
    option, has a replica of its own again) the same engine carries on. With
    ``wait_replicas=1`` no acknowledged event is lost: the count stored is at least
    the events acknowledged, and above it only by events whose outcome was said
    unknown. Fails if an error of another kind escapes, if the engine needs a
    restart, or (with the option) if an acknowledged event is missing."""
    url = cluster_url(redis_cluster)
    store = RedisStore(
        url, prefix=f"fo{uuid.uuid4().hex[:6]}", socket_timeout=1.0, wait_replicas=wait_replicas
    )
    engine = StateEngine(store, app="shop")
    n: SessionState[int] = engine.session_state("n", 0)
    try:
        sid = engine.open_session()
        before, errors = _events_until(engine, sid, n, 50)
        assert errors == []
        port = _master_of(store, sid)
        redis_cluster.kill(port)
        try:
            with pytest.raises(StoreUnavailable), engine.event(sid) as ev:
                ev[n] += 1
            redis_cluster.wait_for_failover(port)
            if wait_replicas:  # a promoted master needs a replica to acknowledge
                redis_cluster.restore()
            after, errors = _events_until(engine, sid, n, 50)
        finally:
            redis_cluster.restore()
        acked = before + after
        unknown = sum(1 for exc in errors if exc.outcome_unknown)
        stored = n.get(sid)
        if wait_replicas:
            assert acked <= stored <= acked + unknown + 1  # +1: the event that raised
        else:
            assert stored <= acked + unknown + 1
            assert stored >= after  # what came after the failover is all there
    finally:
        engine.shutdown()
        store.close()


def test_awaited_events_follow_a_slot_the_client_places_wrong_and_free_every_connection(
    redis_cluster: RedisCluster,
) -> None:
    """Awaited events send their scripts straight to the master the asyncio cluster
    client knows for the session's slot. When that is wrong (the slot moved: here the
    client's map is made wrong on purpose), the master answers MOVED, and the call is
    sent again through the cluster client, which follows the redirection and learns
    the slot: every event commits once. A burst of events leaves every node's
    connections free. Fails if a redirection escaped as an error, an event were
    applied twice or lost, or a connection stayed taken."""
    url = cluster_url(redis_cluster)

    async def scenario() -> None:
        client = aiocluster.RedisCluster.from_url(redis_cluster.url)
        store = RedisStore(url, async_client=client, prefix=f"mv{uuid.uuid4().hex[:6]}")
        engine = StateEngine(store, app="shop")
        n: SessionState[int] = engine.session_state("n", 0)
        try:
            await _wrong_slot(client, store, engine, n)
        finally:
            await engine.ashutdown()
            store.close()
            await client.aclose()

    asyncio.run(scenario())


async def _wrong_slot(
    client: Any, store: RedisStore, engine: StateEngine, n: SessionState[int]
) -> None:
    """The events of the test above, on a slot the client places wrong."""
    sids = [await engine.aopen_session() for _ in range(8)]

    async def bump(sid: str) -> None:
        async with engine.aevent(sid) as ev:
            ev[n] += 1

    through_client = 0  # scripts sent through the cluster client's own path
    real = client.execute_command

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal through_client
        through_client += args[0] == "EVALSHA"
        return await real(*args, **kwargs)

    client.execute_command = counting
    await asyncio.gather(*(bump(sid) for sid in sids))
    first = through_client  # the client's first calls learn the slots
    key = store.namespace("shop").layout.of(sids[0]).P + "s:" + sids[0]
    slot = client.keyslot(key)
    right = client.nodes_manager.slots_cache[slot]
    wrong = next(node for node in client.get_primaries() if node is not right[0])
    client.nodes_manager.slots_cache[slot] = [wrong]
    for _ in range(3):
        await bump(sids[0])
    assert client.nodes_manager.slots_cache[slot][0].name == right[0].name  # learnt
    redirected = through_client
    assert redirected > first  # the MOVED call went through the cluster client
    await asyncio.gather(*(bump(sid) for sid in sids for _ in range(5)))
    assert through_client == redirected  # and every other straight to its master
    assert [await n.aget(sid) for sid in sids] == [9] + [6] * 7
    for node in client.get_nodes():
        assert set(node._free) == set(node._connections), node.name


def test_an_awaited_event_on_a_killed_master_raises_store_unavailable_then_recovers(
    redis_cluster: RedisCluster,
) -> None:
    """SIGKILL the master of a session between awaited events: the next one raises
    StoreUnavailable, and once the replica is promoted the same engine and asyncio
    client carry on, every acknowledged event stored. Fails if another error escapes
    or the engine needs a restart."""
    url = cluster_url(redis_cluster)

    async def scenario() -> None:
        client = aiocluster.RedisCluster.from_url(redis_cluster.url, socket_timeout=1.0)
        store = RedisStore(
            url, async_client=client, prefix=f"ak{uuid.uuid4().hex[:6]}", socket_timeout=1.0
        )
        engine = StateEngine(store, app="shop")
        n: SessionState[int] = engine.session_state("n", 0)
        try:
            await _kill_between_events(redis_cluster, store, engine, n)
        finally:
            await engine.ashutdown()
            store.close()
            await client.aclose()

    asyncio.run(scenario())


async def _kill_between_events(
    redis_cluster: RedisCluster, store: RedisStore, engine: StateEngine, n: SessionState[int]
) -> None:
    """The events of the test above, around the kill of their session's master."""
    sid = await engine.aopen_session()
    for _ in range(5):
        async with engine.aevent(sid) as ev:
            ev[n] += 1
    port = _master_of(store, sid)
    redis_cluster.kill(port)
    try:
        with pytest.raises(StoreUnavailable):
            async with engine.aevent(sid) as ev:
                ev[n] += 1
        await asyncio.to_thread(redis_cluster.wait_for_failover, port)
        acked, deadline = 0, time.monotonic() + 60
        while acked < 5:
            assert time.monotonic() < deadline, "the engine never recovered"
            try:
                async with engine.aevent(sid) as ev:
                    ev[n] += 1
                acked += 1
            except StoreUnavailable:
                await asyncio.sleep(0.1)
    finally:
        redis_cluster.restore()
    # Replication is asynchronous: the events before the kill may be lost with
    # their master, those acknowledged after the failover may not.
    assert await n.aget(sid) >= acked


def test_notices_of_one_busy_master_keep_up(redis_cluster: RedisCluster) -> None:
    """200 commits of one session (one bucket, one master) reach another handle's
    subscriber as 200 notices within 10 s. Fails if the receiver waits on the quiet
    masters' connections in turn, as redis-py's sharded read does (a fifth of a second
    per quiet master per notice: about 80 s)."""
    url, prefix = cluster_url(redis_cluster), f"nb{uuid.uuid4().hex[:6]}"
    writer = StateEngine(RedisStore(url, prefix=prefix), app="shop")
    listening = RedisStore(url, prefix=prefix)
    n: SessionState[int] = writer.session_state("n", 0)
    changed: list[str] = []
    all_heard = threading.Event()

    def on_notice(notice: Notice) -> None:
        if notice.kind == "changed":
            changed.append(notice.sid)
            if len(changed) == 200:
                all_heard.set()

    unsubscribe = listening.namespace("shop").subscribe(on_notice)
    try:
        sid = writer.open_session()
        for i in range(200):
            with writer.event(sid) as ev:
                ev[n] = i
        assert all_heard.wait(10), f"{len(changed)} of 200 notices"
        assert set(changed) == {sid}
    finally:
        unsubscribe()
        writer.shutdown()
        for store in (writer.store, listening):
            store.close()  # type: ignore[attr-defined]


def test_remote_listeners_hear_again_after_a_master_fails_over(
    redis_cluster: RedisCluster,
) -> None:
    """Notices are sharded: the subscription to a killed master's channels is lost
    with it. The listening engine subscribes again where the slots went and hears
    later changes (after a resync). Fails if it kept asking the dead master."""
    url, prefix = cluster_url(redis_cluster), f"nf{uuid.uuid4().hex[:6]}"
    writer = StateEngine(RedisStore(url, prefix=prefix, socket_timeout=1.0), app="shop")
    reader = StateEngine(RedisStore(url, prefix=prefix, socket_timeout=1.0), app="shop")
    n: SessionState[int] = writer.session_state("n", 0)
    heard: list[int] = []
    got = threading.Condition()

    def on_change(sid: str, value: int) -> None:
        with got:
            heard.append(value)
            got.notify_all()

    reader.session_state("n", 0).on_remote_change(on_change)
    try:
        sid = writer.open_session()
        with writer.event(sid) as ev:
            ev[n] = 1
        with got:
            assert got.wait_for(lambda: 1 in heard, timeout=10)
        port = _master_of(writer.store, sid)  # type: ignore[arg-type]
        redis_cluster.kill(port)
        try:
            redis_cluster.wait_for_failover(port)
            _events_until(writer, sid, n, 1)
            with writer.event(sid) as ev:
                ev[n] = 100
            with got:
                assert got.wait_for(lambda: 100 in heard, timeout=30), heard
        finally:
            redis_cluster.restore()
    finally:
        for engine in (writer, reader):
            engine.shutdown()
            engine.store.close()  # type: ignore[attr-defined]


def _owner(cluster: RedisCluster, slot: int) -> tuple[str, int]:
    """(node id, port) of the master serving ``slot``."""
    for v in cluster.view():
        if "master" not in v.flags:
            continue
        for span in v.slots:
            if span.startswith("["):  # a slot being migrated or imported
                continue
            low, _, high = span.partition("-")
            if int(low) <= slot <= int(high or low):
                return v.id, v.port
    raise AssertionError(f"no master serves slot {slot}")


def _move_slot(cluster: RedisCluster, slot: int, to: tuple[str, int], pause: float) -> int:
    """Move ``slot`` to the master ``to`` (id, port) as ``redis-cli --cluster
    reshard`` does: IMPORTING on the target, MIGRATING on the source, its keys moved
    20 to a MIGRATE (``pause`` seconds apart, so that calls meet the slot half moved:
    some keys on each side), then the slot given to the target everywhere. Returns
    how many MIGRATEs it took."""
    src_id, src_port = _owner(cluster, slot)
    dst_id, dst_port = to
    if src_id == dst_id:
        return 0
    batches = 0
    src: Any = redis.Redis(port=src_port)
    dst: Any = redis.Redis(port=dst_port)
    try:
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 20):
            src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *keys)
            batches += 1
            time.sleep(pause)
        for port in [dst_port, src_port, *cluster.masters()]:
            node: Any = redis.Redis(port=port)
            try:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            finally:
                node.close()
    finally:
        src.close()
        dst.close()
    return batches


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_slots_resharded_while_events_run_lose_no_acknowledged_write(
    redis_cluster: RedisCluster, wait_replicas: int
) -> None:
    """Move the slots of some sessions' buckets and of a global to another master,
    key by key, while two threads run events on those sessions (each appends a number
    to a list) and increment the global; then move them back. Calls that meet a slot
    half moved (a script's keys on two nodes: ASK, TRYAGAIN) may fail, but only with
    StoreUnavailable or SessionBusy; afterwards every acknowledged append is stored
    exactly once, nothing else is stored but appends whose outcome was said unknown,
    the global counts every acknowledged increment (and at most the unknown ones
    besides), and every session is still there. Fails if a call raises anything else
    (a StoreConflict, a redirection error), returns a wrong value, or if a write is
    lost or applied twice, or if a session cannot take an event once the slots are
    back. With ``wait_replicas=1`` the writes take the path that waits for a replica
    (sent to the master the client knows, the slots learnt again after a
    redirection)."""
    url = cluster_url(redis_cluster)
    store = RedisStore(
        url, prefix=f"rs{uuid.uuid4().hex[:6]}", socket_timeout=2.0, wait_replicas=wait_replicas
    )
    engine = StateEngine(store, app="shop", lease_wait=2)
    log: SessionState[list[int]] = engine.session_state("log", [])
    visitors = engine.global_state("visitors", 0)
    sids = [engine.open_session() for _ in range(6)]
    layout = store.namespace("shop").layout
    slots = sorted(
        {store.client.keyslot(layout.of(sid).P) for sid in sids}
        | {store.client.keyslot(layout.global_prefix("visitors"))}
    )
    home = {slot: _owner(redis_cluster, slot) for slot in slots}
    masters = {v.port: v.id for v in redis_cluster.view() if "master" in v.flags and v.slots}
    ports = sorted(masters)
    away = {
        slot: (masters[p], p)
        for slot, (_, port) in home.items()
        for p in [ports[(ports.index(port) + 1) % len(ports)]]
    }
    stop = threading.Event()
    lock = threading.Lock()
    acked: dict[str, list[int]] = {sid: [] for sid in sids}
    unknown: dict[str, list[int]] = {sid: [] for sid in sids}
    adds = {"acked": 0, "unknown": 0}
    refused: list[BaseException] = []
    counter = iter(range(10**9))

    def work() -> None:
        while not stop.is_set():
            for sid in sids:
                with lock:
                    i = next(counter)
                try:
                    with engine.event(sid) as ev:
                        ev[log].append(i)
                    with lock:
                        acked[sid].append(i)
                except (StoreUnavailable, SessionBusy) as exc:
                    with lock:
                        refused.append(exc)
                        if getattr(exc, "outcome_unknown", False):
                            unknown[sid].append(i)
                try:
                    value = visitors.increment()
                    assert isinstance(value, int)
                    with lock:
                        adds["acked"] += 1
                except StoreUnavailable as exc:
                    with lock:
                        refused.append(exc)
                        if exc.outcome_unknown:
                            adds["unknown"] += 1

    deadline, batches = time.monotonic() + 30, 0
    try:
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(work) for _ in range(2)]
            try:
                time.sleep(0.2)
                for there in (away, home):
                    for slot in slots:
                        batches += _move_slot(redis_cluster, slot, there[slot], pause=0.02)
                time.sleep(0.2)
            finally:
                stop.set()
            for each in running:
                each.result(timeout=max(1.0, deadline - time.monotonic()))
        assert time.monotonic() < deadline
        for slot in slots:
            assert _owner(redis_cluster, slot) == home[slot]
        for sid in sids:  # each session is there and takes events again at once
            assert acked[sid], f"{sid}: no event succeeded"
            with engine.event(sid) as ev:
                ev[log].append(-1)
            acked[sid].append(-1)
        reader = StateEngine(RedisStore(url, prefix=store.prefix), app="shop")
        try:
            stored_log: SessionState[list[int]] = reader.session_state("log", [])
            for sid in sids:
                stored = stored_log.get(sid)
                assert len(stored) == len(set(stored)), f"{sid}: an append applied twice"
                assert set(acked[sid]) <= set(stored), f"{sid}: an acknowledged append lost"
                assert set(stored) <= set(acked[sid]) | set(unknown[sid])
            total = reader.global_state("visitors", 0).get()
            assert adds["acked"] <= total <= adds["acked"] + adds["unknown"]
        finally:
            reader.shutdown()
            reader.store.close()  # type: ignore[attr-defined]
        assert sum(map(len, acked.values())) > 0
        assert batches > 2 * len(slots)  # some slot was met half moved, keys on both sides
    finally:
        stop.set()
        for slot, owner in home.items():  # whatever happened, give every slot back
            for port in masters:  # ending any move left half done
                with redis.Redis(port=port) as node:
                    node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
            if _owner(redis_cluster, slot) != owner:
                _move_slot(redis_cluster, slot, owner, pause=0)
        redis_cluster.restore()
        engine.shutdown()
        store.close()


@pytest.mark.parametrize("path", ["blocking", "awaited"])
def test_a_commit_every_master_refuses_says_nothing_was_written(
    redis_cluster: RedisCluster, path: str
) -> None:
    """A commit refused with an error reply (OOM: the masters at ``maxmemory``) on its
    direct send, and again through the cluster client: nothing was applied, and the
    event says so. Fails if a refusal on the direct send were taken for a send that may
    have been applied."""
    url = cluster_url(redis_cluster)
    masters = [redis.Redis(port=port) for port in redis_cluster.masters()]

    async def awaited(engine: StateEngine, sid: str, n: SessionState[int]) -> StoreUnavailable:
        assert client is not None
        try:
            with pytest.raises(StoreUnavailable) as raised:
                async with engine.aevent(sid) as ev:
                    ev[n] += 1
                    for master in masters:
                        master.config_set("maxmemory", 1)
        finally:
            await client.aclose()  # (it belongs to this loop)
        return raised.value

    client = aiocluster.RedisCluster.from_url(redis_cluster.url) if path == "awaited" else None
    store = RedisStore(url, async_client=client, prefix=f"om{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    n: SessionState[int] = engine.session_state("n", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[n] += 1
    try:
        if path == "blocking":
            with pytest.raises(StoreUnavailable) as raised, engine.event(sid) as ev:
                ev[n] += 1
                for master in masters:
                    master.config_set("maxmemory", 1)
            error = raised.value
        else:
            error = asyncio.run(awaited(engine, sid, n))
    finally:
        for master in masters:
            master.config_set("maxmemory", 0)
    assert not error.outcome_unknown, error
    assert n.get(sid) == 1
    engine.shutdown()
    store.close()
    for master in masters:
        master.close()
