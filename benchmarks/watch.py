"""Change streams: what a watch nobody reads costs the writer, in the same process.

The same one-state event (a counter written) against the same session, with no watch
and with a watch of that session whose consumer never reads (it keeps its 256 latest
changes and counts the rest as missed), on the memory store, SQLite and one private
Redis server. Interleaved rounds, median.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from statekit import MemoryStore, SQLiteStore, StateEngine
from statekit.stores import Store
from statekit.testing import RedisServer

from ._timing import Measure, Target, best_per_op

TITLE = "change streams"
BASELINE = "event, no watch"
WATCHED = "event, watched (never read)"
TARGETS = [Target(WATCHED, BASELINE, "within", 1.1)]


def contenders(make: Callable[[], Store]) -> dict[str, Callable[[int], object]]:
    engine = StateEngine(make(), app=f"w{uuid.uuid4().hex[:6]}")
    count = engine.session_state("count", 0)
    plain, watched = engine.open_session(), engine.open_session()
    watch = engine.watch(watched)  # never read: it keeps the latest and counts the rest
    assert not watch.closed

    def writer(sid: str) -> Callable[[int], object]:
        def write(ops: int) -> None:
            for i in range(ops):
                with engine.event(sid) as ev:
                    ev[count] = i

        return write

    return {BASELINE: writer(plain), WATCHED: writer(watched)}


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    from statekit.stores.redis import RedisStore

    rounds = 3 if quick else 15
    groups = [
        (
            "memory store",
            best_per_op(contenders(MemoryStore), ops=2000, rounds=rounds, statistic="median"),
        )
    ]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "watch.db"
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
                    contenders(lambda: RedisStore(server.url, prefix=f"w{uuid.uuid4().hex[:6]}")),
                    ops=200 if quick else 500,
                    rounds=rounds,
                    statistic="median",
                ),
            )
        )
    finally:
        server.stop()
    return groups
