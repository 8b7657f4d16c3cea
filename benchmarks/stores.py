"""Remote stores: RedisStore against raw redis-py on the same server, in one run; and
SQLite commits per second.

Every contender talks to one private redis-server on 127.0.0.1. A statekit read is
``state.get(sid)`` (one round trip: load and touch the session); a write is one
commit (one round trip); a one-state event is load-and-lease then commit-and-release
(two round trips), compared with a raw GET then SET of one key.
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statekit import SessionState, SQLiteStore, StateEngine
from statekit.stores import Loaded
from statekit.testing import RedisServer

from ._timing import Measure, best_per_op

TITLE = "remote stores"
BASELINE = "raw redis-py GET"


def redis_contenders(server: RedisServer) -> dict[str, Callable[[int], object]]:
    import redis

    from statekit.stores.redis import RedisStore

    store = RedisStore(server.url, prefix=f"b{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="bench")
    counter: SessionState[int] = engine.session_state("counter", 0)
    sids = [engine.open_session() for _ in range(100)]
    for sid in sids:
        with engine.event(sid) as ev:
            ev[counter] = 1
    ns = store.namespace(engine.app)  # a handle of its own on the same data
    raw = redis.Redis.from_url(server.url)
    keys = [f"raw:{sid}" for sid in sids]
    for key in keys:
        raw.set(key, b"1")
    versions = dict.fromkeys(sids, 1)

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
        for sid, i in zip(itertools.cycle(sids), range(ops), strict=False):
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
        for sid in sids:  # keep statekit_write's versions true
            loaded = ns.load_session(sid, now=engine.clock(), touch_until=None)
            assert isinstance(loaded, Loaded)
            versions[sid] = loaded.version

    return {
        "raw redis-py GET": raw_get,
        "statekit read (state.get)": statekit_read,
        "raw redis-py SET": raw_set,
        "statekit write (one commit)": statekit_write,
        "raw redis-py GET + SET": raw_get_set,
        "statekit one-state event": statekit_event,
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


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    server = RedisServer().start()
    try:
        redis_measures = best_per_op(
            redis_contenders(server),
            ops=200 if quick else 400,
            rounds=3 if quick else 21,
            statistic="median",
        )
    finally:
        server.stop()
    with tempfile.TemporaryDirectory() as folder:
        sqlite_measures = best_per_op(
            sqlite_contenders(Path(folder)),
            ops=100 if quick else 500,
            rounds=3 if quick else 7,
            statistic="median",
        )
    base: Any = next(m for m in redis_measures if m.name == BASELINE)
    return [
        ("RedisStore vs raw redis-py, one private server", redis_measures),
        ("SQLiteStore (ops/s = 1 / time)", [base, *sqlite_measures]),
    ]
