"""User state: what an event of a user costs beside an event of a session alone.

Three events per store, in the same run: a one-state event on a session (the
baseline); an event opened with ``user=`` that writes one session state and one user
state (the session, then the user's record, committed together); and an event with
``user=`` that writes the user state only. On the memory store, SQLite, one private
Redis server (one script commits both) and a Redis Cluster (three steps around one
decision, the session and the record on different slots). Interleaved rounds, median.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from statekit import MemoryStore, SQLiteStore, StateEngine
from statekit.stores import Store
from statekit.testing import RedisCluster, RedisServer

from ._timing import Measure, best_per_op

TITLE = "user state"
BASELINE = "session event (one state)"
BOTH = "user event, session + user written"
USER_ONLY = "user event, user state written"


def contenders(make: Callable[[], Store]) -> dict[str, Callable[[int], object]]:
    engine = StateEngine(make(), app=f"u{uuid.uuid4().hex[:6]}")
    count = engine.session_state("count", 0)
    total = engine.user_state("total", 0)
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:  # the user's record made
        ev[total] = 0

    def session(ops: int) -> None:
        for i in range(ops):
            with engine.event(sid) as ev:
                ev[count] = i

    def both(ops: int) -> None:
        for i in range(ops):
            with engine.event(sid, user="alice") as ev:
                ev[count] = i
                ev[total] = i

    def user_only(ops: int) -> None:
        for i in range(ops):
            with engine.event(sid, user="alice") as ev:
                ev[total] = -i

    return {BASELINE: session, BOTH: both, USER_ONLY: user_only}


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    from statekit.stores.redis import RedisStore

    rounds = 3 if quick else 11
    groups = [
        (
            "memory store",
            best_per_op(contenders(MemoryStore), ops=2000, rounds=rounds, statistic="median"),
        )
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "users.db"
        groups.append(
            (
                "SQLite",
                best_per_op(
                    contenders(lambda: SQLiteStore(path)),
                    ops=100 if quick else 300,
                    rounds=rounds,
                    statistic="median",
                ),
            )
        )
    server = RedisServer().start()
    try:
        groups.append(
            (
                "Redis, one private server",
                best_per_op(
                    contenders(lambda: RedisStore(server.url, prefix=f"u{uuid.uuid4().hex[:6]}")),
                    ops=100 if quick else 300,
                    rounds=rounds,
                    statistic="median",
                ),
            )
        )
    finally:
        server.stop()
    with RedisCluster() as cluster:
        nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
        url = f"redis+cluster://{nodes}"
        groups.append(
            (
                "Redis Cluster (3 masters)",
                best_per_op(
                    contenders(lambda: RedisStore(url, prefix=f"u{uuid.uuid4().hex[:6]}")),
                    ops=100 if quick else 300,
                    rounds=rounds,
                    statistic="median",
                ),
            )
        )
    return groups
