"""Real processes sharing one SQLite file or one Redis server. Every wait is bounded."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statekit import SessionState
from statekit.testing import RedisServer

from . import _workers

SPAWN = multiprocessing.get_context("spawn")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "redis"])
def shared(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[str, str, str]]:
    """(kind, location, key prefix) of a fresh shared store."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "shared.db"), ""
    else:
        yield "redis", redis_server.url, f"mp{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def shared_or_cluster(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[str, str, str]]:
    """As ``shared``, and a Redis Cluster too (where a session's and its user's writes
    commit in steps: ``_redis_staged``)."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "shared.db"), ""
    elif request.param == "redis":
        yield "redis", redis_server.url, f"mp{uuid.uuid4().hex[:8]}"
    else:
        cluster = request.getfixturevalue("redis_cluster")
        nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
        yield "redis", f"redis+cluster://{nodes}", f"mp{uuid.uuid4().hex[:8]}"


@pytest.fixture
def parent() -> Iterator[Any]:
    """Makes the test process's own engines; closes their stores afterwards."""
    made: list[Any] = []

    def make(kind: str, where: str, prefix: str, **kw: Any) -> Any:
        engine = _workers.engine(kind, where, prefix, **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()
        engine.store.close()


def run_all(processes: list[Any], timeout: float = 240) -> None:
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "workers did not finish in time"
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_8_processes_x_2000_increments_are_exact(
    shared: tuple[str, str, str], parent: Any
) -> None:
    kind, where, prefix = shared
    workers = [
        SPAWN.Process(target=_workers.increment, args=(kind, where, prefix, 2000))
        for _ in range(8)
    ]
    run_all(workers)
    engine = parent(kind, where, prefix)
    assert engine.global_state("visitors", 0).get() == 16_000


def test_8_processes_x_500_events_on_one_session_lose_nothing(
    shared: tuple[str, str, str], parent: Any
) -> None:
    kind, where, prefix = shared
    engine = parent(kind, where, prefix)
    log: SessionState[list[int]] = engine.session_state("log", [])
    sid = engine.open_session()
    workers = [
        SPAWN.Process(target=_workers.append, args=(kind, where, prefix, sid, k, 500))
        for k in range(8)
    ]
    run_all(workers)
    assert sorted(log.get(sid)) == sorted(k * 10_000 + i for k in range(8) for i in range(500))


def test_change_in_one_process_fires_listener_in_another(
    shared: tuple[str, str, str], parent: Any
) -> None:
    """The listener process says it is ready only once its subscription is confirmed
    (on_remote_change returns then), so no sleep is needed before the change; the
    notice must arrive within a bounded wait, not within a measured time."""
    kind, where, prefix = shared
    ready, out = SPAWN.Event(), SPAWN.Queue()
    listener = SPAWN.Process(target=_workers.listen, args=(kind, where, prefix, ready, out))
    listener.start()
    try:
        assert ready.wait(30)
        engine = parent(kind, where, prefix)
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart].append("milk")
        got_sid, value, _received = out.get(timeout=10)
        assert (got_sid, value) == (sid, ["milk"])
    finally:
        listener.kill()
        listener.join(10)


def test_expired_session_is_reaped_exactly_once_across_4_processes(
    shared: tuple[str, str, str], parent: Any
) -> None:
    kind, where, prefix = shared
    engine = parent(kind, where, prefix, idle_ttl=60)
    note: SessionState[str] = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[note] = "x"
    out, start = SPAWN.Queue(), SPAWN.Barrier(4)
    # The reapers' clocks run 120 s ahead: to them the session expired 60 s ago.
    reapers = [
        SPAWN.Process(target=_workers.reap, args=(kind, where, prefix, 120.0, out, start))
        for _ in range(4)
    ]
    run_all(reapers, timeout=60)
    calls = []
    while not out.empty():
        calls.append(out.get(timeout=1))
    assert calls == [("x", "idle")]


def test_sqlite_writer_killed_mid_stream_loses_no_acknowledged_event(
    tmp_path: Path, parent: Any
) -> None:
    where = str(tmp_path / "durable.db")
    engine = parent("sqlite", where, "")
    counter: SessionState[int] = engine.session_state("counter", 0)
    sid = engine.open_session()
    child = subprocess.Popen(
        [sys.executable, "-m", "tests._workers", "sqlite", where, "", sid],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    acknowledged = 0
    try:
        deadline = time.monotonic() + 60
        while acknowledged < 200 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
        os.kill(child.pid, signal.SIGKILL)
        # Commits acknowledged after we stopped reading count too: read the rest.
        for line in child.stdout:
            acknowledged = int(line)
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()
    assert acknowledged >= 200
    stored = counter.get(sid)
    assert stored >= acknowledged
    import sqlite3

    with sqlite3.connect(where) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_8_processes_opening_at_capacity_all_succeed_and_evict_each_session_once(
    shared: tuple[str, str, str], parent: Any
) -> None:
    """Eviction when several processes open sessions at once, at capacity: every open
    succeeds, every marked session is either still there or was deleted exactly once
    (its on_delete ran in one process), and the store holds about ``capacity``."""
    kind, where, prefix = shared
    capacity = 20
    engine = parent(kind, where, prefix, capacity=capacity)
    mark: SessionState[str] = engine.session_state("mark", "")
    for _ in range(capacity):  # full before the race starts
        engine.open_session()
    out, start = SPAWN.Queue(), SPAWN.Barrier(8)
    workers = [
        SPAWN.Process(
            target=_workers.open_at_capacity,
            args=(kind, where, prefix, capacity, 100, start, out),
        )
        for _ in range(8)
    ]
    run_all(workers)
    opened: list[str] = []
    deleted: list[str] = []
    for _ in workers:
        got_opened, failures, got_deleted = out.get(timeout=10)
        assert failures == 0
        opened += got_opened
        deleted += got_deleted
    assert len(deleted) == len(set(deleted))  # no session's callback ran twice
    alive = {sid for sid in opened if engine.exists(sid)}
    assert alive | set(deleted) == set(opened)  # each one still there, or deleted once
    assert not alive & set(deleted)
    assert all(mark.get(sid) == sid for sid in alive)
    # Over capacity by at most one per open that kept losing its candidates, and the
    # next opens evict back: one more open here brings it to capacity.
    engine.open_session()
    assert engine.session_count() == capacity


def test_8_processes_x_200_events_on_one_users_state_are_exact(
    shared_or_cluster: tuple[str, str, str], parent: Any
) -> None:
    """Each process adds to user alice's cart from a session of its own, and to that
    session's own count in the same events: the cart must hold all 1,600 items (events
    of the user's sessions took turns) and each session's count 200 (its writes
    committed with the user's)."""
    kind, where, prefix = shared_or_cluster
    out = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=_workers.user_events, args=(kind, where, prefix, k, 200, out))
        for k in range(8)
    ]
    run_all(workers)
    engine = parent(kind, where, prefix)
    cart: SessionState[list[int]] = engine.user_state("cart", [])
    count: SessionState[int] = engine.session_state("count", 0)
    assert sorted(cart.get("alice")) == sorted(
        k * 10_000 + i for k in range(8) for i in range(200)
    )
    sids = [out.get(timeout=10) for _ in range(8)]
    assert [count.get(sid) for sid in sids] == [200] * 8


def test_a_users_idle_expiry_runs_on_delete_once_across_4_processes(
    shared: tuple[str, str, str], parent: Any
) -> None:
    kind, where, prefix = shared
    engine = parent(kind, where, prefix, user_idle_ttl=60)
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("x")
    out, start = SPAWN.Queue(), SPAWN.Barrier(4)
    # The reapers' clocks run 120 s ahead: to them alice's record expired 60 s ago
    # (and her session, with its idle ttl of an hour, did not).
    reapers = [
        SPAWN.Process(target=_workers.reap_users, args=(kind, where, prefix, 120.0, out, start))
        for _ in range(4)
    ]
    run_all(reapers, timeout=60)
    calls = []
    while not out.empty():
        calls.append(out.get(timeout=1))
    assert calls == [(["x"], "idle")]
    assert engine.exists(sid)
    assert cart.get("alice") == []  # a new record: the default
