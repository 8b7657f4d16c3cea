"""Change streams: what a watch nobody reads costs the writer, in the same process.

The same one-state event (a counter written), by an engine with no watch and by one
whose session is watched by a consumer that never reads (it keeps its 256 latest
changes and counts the rest as missed), on the memory store, SQLite and one private
Redis server. Interleaved rounds, median. With a shared store the watching engine also
listens to the store's notices (its own commits' included), as a watch needs.
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
    """Two engines of one app, each on a store object of its own: one with no watch
    at all (it does not listen to the store's notices either), one whose session is
    watched by a consumer that never reads."""
    app = f"w{uuid.uuid4().hex[:6]}"
    plain, watched = StateEngine(make(), app=app), StateEngine(make(), app=app)
    written = {}
    for engine in (plain, watched):
        count = engine.session_state("count", 0)
        written[engine] = (engine.open_session(), count)
    watch = watched.watch(written[watched][0])  # never read: keeps the latest 256
    assert not watch.closed

    def writer(engine: StateEngine) -> Callable[[int], object]:
        sid, count = written[engine]

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
