"""Remote stores: RedisStore against raw redis-py on the same deployment, in one run
(one private server, then a private Redis Cluster of 3 masters and 3 replicas against
raw ``redis.cluster.RedisCluster``); and SQLite commits per second.

Every contender talks to private nodes on 127.0.0.1, through the same client library
and reply parser. A statekit read is ``state.get(sid)`` (one round trip: a plain
``HMGET`` of the session's hash); a write is one commit (one round trip); a one-state
event is load-and-lease then commit-and-release (two round trips), compared with a raw
GET then SET of one key; on the one server, the same event awaited (``engine.aevent``
on the store's asyncio client) against ``redis.asyncio`` GET then SET. Each pair's
ratio is printed under its group.
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statekit import SessionState, SQLiteStore, StateEngine
from statekit.testing import RedisCluster, RedisServer

from ._timing import Measure, Target, best_per_op

TITLE = "remote stores"
BASELINE = "raw redis-py GET"
READ, WRITE, EVENT, KEPT = (
    "statekit read (state.get)",
    "statekit write (one commit)",
    "statekit one-state event",
    "statekit event, lease kept",
)
RAW_GET, RAW_SET, RAW_GET_SET = "raw redis-py GET", "raw redis-py SET", "raw redis-py GET + SET"
RAW_AWAITED, AWAITED = "raw redis.asyncio GET + SET", "statekit awaited one-state event"
TARGETS = [
    Target(READ, RAW_GET, "within", 1.2),
    Target(WRITE, RAW_SET, "within", 1.2),
    Target(EVENT, RAW_GET_SET, "within", 1.3),
    Target(KEPT, RAW_GET_SET, "within", 1.0),  # the stretch: one round trip
    Target(AWAITED, RAW_AWAITED, "within", 1.3),  # the event's target, awaited
]


def redis_contenders(url: str, raw: Any) -> dict[str, Callable[[int], object]]:
    """The contenders on the deployment at ``url`` (a RedisStore URL), ``raw`` a
    redis-py client of the same deployment."""
    from statekit.stores.redis import RedisStore

    store = RedisStore(url, prefix=f"b{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="bench")
    counter: SessionState[int] = engine.session_state("counter", 0)
    sids = [engine.open_session() for _ in range(100)]
    # One-state events on an engine that keeps its leases between events: sessions of
    # their own, which it keeps (the first engine's sessions' leases are given back).
    keeping = StateEngine(RedisStore(url, prefix=store.prefix), app="bench", lease_keep=5)
    kept_counter: SessionState[int] = keeping.session_state("counter", 0)
    # The writes' sessions are their own: their versions are the writes' to keep.
    written = [engine.open_session() for _ in range(100)]
    for sid in sids + written:
        with engine.event(sid) as ev:
            ev[counter] = 1
    kept_sids = [keeping.open_session() for _ in range(100)]
    for sid in kept_sids:
        with keeping.event(sid) as ev:
            ev[kept_counter] = 1
    ns = store.namespace(engine.app)  # a handle of its own on the same data
    keys = [f"raw:{sid}" for sid in sids]
    for key in keys:
        raw.set(key, b"1")
    versions = dict.fromkeys(written, 1)

    def raw_get(ops: int) -> None:
        for key, _ in zip(itertools.cycle(keys), range(ops), strict=False):
            raw.get(key)

    def raw_set(ops: int) -> None:
        for key, i in zip(itertools.cycle(keys), range(ops), strict=False):
            raw.set(key, str(i).encode())

    def raw_get_set(ops: int) -> None:
        for key, i in zip(itertools.cycle(keys), range(ops), strict=False):
            raw.get(key)
            raw.set(key, str(i).encode())

    def statekit_read(ops: int) -> None:
        for sid, _ in zip(itertools.cycle(sids), range(ops), strict=False):
            counter.get(sid)

    def statekit_write(ops: int) -> None:
        for sid, i in zip(itertools.cycle(written), range(ops), strict=False):
            versions[sid] = ns.commit(
                sid,
                version=versions[sid],
                writes={"counter": str(i).encode()},
                ttl_deadlines={},
                now=engine.clock(),
            )

    def statekit_event(ops: int) -> None:
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
            with engine.event(sid) as ev:
                ev[counter] = i

    def statekit_kept_event(ops: int) -> None:
        for sid, i in zip(itertools.cycle(kept_sids), range(ops), strict=False):
            with keeping.event(sid) as ev:
                ev[kept_counter] = i

    return {
        RAW_GET: raw_get,
        READ: statekit_read,
        RAW_SET: raw_set,
        WRITE: statekit_write,
        RAW_GET_SET: raw_get_set,
        EVENT: statekit_event,
        KEPT: statekit_kept_event,
    }


def awaited_contenders(url: str, cluster_url: str = "") -> dict[str, Callable[[int], object]]:
    """An awaited one-state event (``engine.aevent`` on the store's asyncio client)
    against raw ``redis.asyncio`` GET then SET, both on one event loop of their own;
    with ``cluster_url`` (the cluster's nodes, ``url`` the store's), on
    ``redis.asyncio.cluster.RedisCluster`` clients."""
    import asyncio

    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster

    from statekit.stores.redis import RedisStore

    loop = asyncio.new_event_loop()

    def client() -> Any:
        if cluster_url:
            return aiocluster.RedisCluster.from_url(cluster_url)
        return aioredis.Redis.from_url(url)

    raw = client()
    store = RedisStore(url, prefix=f"a{uuid.uuid4().hex[:6]}", async_client=client())
    engine = StateEngine(store, app="bench")
    counter: SessionState[int] = engine.session_state("counter", 0)
    # Past Redis's 128-member small encoding of the app's capacity order, as the other
    # engines' sessions together are (its updates scan a small one).
    sids = [engine.open_session() for _ in range(300)]
    keys = [f"awaited:{sid}" for sid in sids]

    async def raw_pairs(ops: int) -> None:
        for key, i in zip(itertools.cycle(keys), range(ops), strict=False):
            await raw.get(key)
            await raw.set(key, str(i).encode())

    async def events(ops: int) -> None:
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
            async with engine.aevent(sid) as ev:
                ev[counter] = i

    loop.run_until_complete(raw_pairs(len(keys)))
    loop.run_until_complete(events(len(sids)))
    return {
        RAW_AWAITED: lambda ops: loop.run_until_complete(raw_pairs(ops)),
        AWAITED: lambda ops: loop.run_until_complete(events(ops)),
    }


def sqlite_contenders(folder: Path) -> dict[str, Callable[[int], object]]:
    engine = StateEngine(SQLiteStore(folder / "bench.db"), app="bench")
    counter: SessionState[int] = engine.session_state("counter", 0)
    sid = engine.open_session()

    def event(ops: int) -> None:
        for i in range(ops):
            with engine.event(sid) as ev:
                ev[counter] = i

    def read(ops: int) -> None:
        for _ in range(ops):
            counter.get(sid)

    return {"SQLite one-state event": event, "SQLite read (state.get)": read}


def replicated(
    masters: list[int], contenders: dict[str, Callable[[int], object]], *, ops: int
) -> list[Measure]:
    """What a raw GET + SET and a statekit one-state event send the replicas (and the
    AOF), in bytes per operation: the growth of the masters' replication offsets, over
    ``ops`` operations run right after as many others on the same sessions (so that no
    session's deadline slides: a slide, at most once a second per session, sends its
    own write)."""

    def offsets() -> int:
        import redis

        total = 0
        for port in masters:
            with redis.Redis(port=port) as node:
                total += int(node.info("replication")["master_repl_offset"])
        return total

    out = []
    for name in (RAW_GET_SET, EVENT):
        contenders[name](ops)
        before = offsets()
        contenders[name](ops)
        per_op = (offsets() - before) / ops
        out.append(Measure(name=f"replicated: {name}", per_op=per_op, unit="bytes"))
    return out


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    import redis
    import redis.cluster

    ops, rounds = (200, 3) if quick else (400, 21)
    server = RedisServer().start()
    try:
        single = best_per_op(
            {
                **redis_contenders(server.url, redis.Redis.from_url(server.url)),
                **awaited_contenders(server.url),
            },
            ops=ops,
            rounds=rounds,
            statistic="median",
        )
    finally:
        server.stop()
    with RedisCluster() as cluster:
        port = cluster.masters()[0]
        store_url = f"redis+cluster://127.0.0.1:{port}"
        contenders = redis_contenders(store_url, redis.cluster.RedisCluster.from_url(cluster.url))
        clustered = best_per_op(
            {**contenders, **awaited_contenders(store_url, cluster.url)},
            ops=ops,
            rounds=rounds,
            statistic="median",
        )
        clustered += replicated(cluster.masters(), contenders, ops=ops)
    with tempfile.TemporaryDirectory() as folder:
        sqlite_measures = best_per_op(
            sqlite_contenders(Path(folder)),
            ops=100 if quick else 500,
            rounds=3 if quick else 7,
            statistic="median",
        )
    base: Any = next(m for m in single if m.name == BASELINE)
    return [
        ("RedisStore vs raw redis.Redis, one private server", single),
        ("RedisStore vs raw redis.cluster.RedisCluster, 3 masters + 3 replicas", clustered),
        ("SQLiteStore (ops/s = 1 / time)", [base, *sqlite_measures]),
    ]
