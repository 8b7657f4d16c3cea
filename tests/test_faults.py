"""Store outages: a clear StoreUnavailable, nothing half-written, recovery without a
restart of the engine. Servers here are private, on free loopback ports."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from statekit import SessionState, StateEngine, StoreUnavailable
from statekit.stores.redis import RedisStore
from statekit.stores.sqlite import SQLiteStore
from statekit.testing import RedisServer


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    server = RedisServer(persist=True).start()
    yield server
    server.stop()


def test_redis_outage_raises_then_recovers(durable_redis: RedisServer) -> None:
    store = RedisStore(durable_redis.url, prefix=f"f{uuid.uuid4().hex[:6]}", socket_timeout=2)
    # lease_wait=1: the event that failed left its lease behind; the engine must take
    # it back rather than wait the 30 s lease out (which would raise SessionBusy).
    engine = StateEngine(store, app="shop", lease_wait=1)
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    visitors = engine.global_state("visitors", 0)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[cart].append("kept")
    visitors.increment()

    # The server dies while an event is open: its commit fails, nothing is written.
    event = engine.event(sid)
    ev = event.__enter__()
    ev[cart].append("lost")
    durable_redis.stop()
    with pytest.raises(StoreUnavailable, match=r"RedisStore\('redis://127\.0\.0\.1:\d+/0'\)"):
        event.__exit__(None, None, None)
    with pytest.raises(StoreUnavailable, match="nothing was written"):
        engine.open_session()
    with pytest.raises(StoreUnavailable):
        visitors.increment()
    with pytest.raises(StoreUnavailable), engine.event(sid):
        pass

    # Back on the same port and data: the same engine works again.
    durable_redis.start()
    assert cart.get(sid) == ["kept"]
    assert visitors.get() == 1
    with engine.event(sid) as ev:
        ev[cart].append("after")
    assert cart.get(sid) == ["kept", "after"]
    assert visitors.increment() == 2
    engine.shutdown()
    store.close()


def test_remote_listeners_resync_after_the_server_returns(durable_redis: RedisServer) -> None:
    prefix = f"f{uuid.uuid4().hex[:6]}"
    writer_store = RedisStore(durable_redis.url, prefix=prefix, socket_timeout=2)
    reader_store = RedisStore(durable_redis.url, prefix=prefix, socket_timeout=2)
    writer = StateEngine(writer_store, app="shop")
    reader = StateEngine(reader_store, app="shop")
    cart_w: SessionState[list[str]] = writer.session_state("cart", [])
    cart_r: SessionState[list[str]] = reader.session_state("cart", [])
    seen: list[list[str]] = []
    got = threading.Event()

    def on_remote(sid: str, value: list[str]) -> None:
        seen.append(value)
        got.set()

    cart_r.on_remote_change(on_remote)
    sid = writer.open_session()
    with reader.event(sid):  # the reader knows this session and its version
        pass
    durable_redis.stop()
    durable_redis.start()
    # A change made while the reader may not yet be resubscribed is not lost.
    with writer.event(sid) as ev:
        ev[cart_w].append("during reconnect")
    assert got.wait(10)
    assert seen[-1] == ["during reconnect"]
    for engine, store in ((writer, writer_store), (reader, reader_store)):
        engine.shutdown()
        store.close()


def test_sqlite_locked_database_raises_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    engine = StateEngine(SQLiteStore(path, timeout=0.2), app="shop")
    note = engine.session_state("note", "")
    sid = engine.open_session()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"), engine.event(sid) as ev:
            ev[note] = "x"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with engine.event(sid) as ev:  # and it works once the lock is gone
        ev[note] = "y"
    assert note.get(sid) == "y"


def test_sqlite_unwritable_location_raises_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="SQLiteStore"):
        SQLiteStore(tmp_path / "missing-folder" / "state.db")


def test_notices_lost_while_the_client_reconnects_by_itself_are_made_up_for(
    redis_server: RedisServer,
) -> None:
    """redis-py reconnects a pub/sub connection that was cut (a proxy, CLIENT KILL) and
    subscribes again without raising: notices published in the gap were lost without
    any sign. The receiver watches for such a reconnection and resyncs, so that a
    registry's object of a session closed meanwhile is still cleaned up."""
    import redis

    prefix = f"rc{uuid.uuid4().hex[:6]}"
    closer = StateEngine(RedisStore(redis_server.url, prefix=prefix), app="shop")
    worker = StateEngine(RedisStore(redis_server.url, prefix=prefix), app="shop")
    cleaned: list[str] = []
    objects = worker.registry("conn", lambda sid: sid, cleaned.append)
    sid = closer.open_session()
    objects.open(sid)
    admin = redis.Redis.from_url(redis_server.url)
    admin.client_kill_filter(_type="pubsub")  # the worker's receiver is cut ...
    closer.close_session(sid)  # ... and the notice of this close is published now
    deadline = time.monotonic() + 10
    while cleaned != [sid] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cleaned == [sid]
    admin.close()
    for engine in (closer, worker):
        engine.shutdown()
        engine.store.close()  # type: ignore[attr-defined]
