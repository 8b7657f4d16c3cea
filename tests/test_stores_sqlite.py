from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from statekit import SessionState, StateEngine, StoreUnavailable
from statekit.stores import Store
from statekit.stores.sqlite import SQLiteStore
from statekit.testing import FakeClock

from .store_contract import SharedStoreContract


class TestSQLiteStore(SharedStoreContract):
    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path

    def make_store(self) -> Store:
        return SQLiteStore(self.folder / "state.db")


@pytest.mark.parametrize("name", ["timeout", "poll_interval"])
@pytest.mark.parametrize("bad", [0, -1, float("nan"), "0.1", True])
def test_settings_that_are_not_seconds_are_refused(tmp_path: Path, name: str, bad: object) -> None:
    # Fails if one is taken: a poll_interval of 0, -1 or nan made the notice thread
    # spin a core for ever, and "0.1" killed it (no cleanup heard of again).
    with pytest.raises(ValueError, match=name):
        SQLiteStore(tmp_path / "s.db", **{name: bad})  # type: ignore[arg-type]


def test_an_open_at_capacity_passes_over_a_session_an_event_holds(tmp_path: Path) -> None:
    # Fails if the least recently used session is evicted although an event holds it
    # and another could go: the event then failed with SessionExpired, its work lost.
    clock = FakeClock()
    engine = StateEngine(SQLiteStore(tmp_path / "s.db"), capacity=2, clock=clock)
    cart: SessionState[list[str]] = engine.session_state("cart", [])
    a = engine.open_session()
    clock.advance(1)
    b = engine.open_session()
    with engine.event(a) as ev:
        clock.advance(1)
        cart.get(b)  # b used after a: a is the least recently used
        engine.open_session()
        ev[cart].append("Milk")
    assert (engine.exists(a), engine.exists(b)) == (True, False)
    assert cart.get(a) == ["Milk"]
    engine.shutdown()


def test_a_removed_database_file_is_unavailable_never_written_apart(tmp_path: Path) -> None:
    # Fails if a connection opened before keeps writing into the removed file (the
    # write acknowledged, then lost), or a new one makes an empty database at the path.
    path = tmp_path / "s.db"
    engine = StateEngine(SQLiteStore(path))
    visits = engine.global_state("visits", 0)
    sid = engine.open_session()
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        visits.increment()
    with pytest.raises(StoreUnavailable, match="removed or replaced"), engine.event(sid):
        pass
    failed: list[BaseException] = []

    def elsewhere() -> None:  # a thread with no connection yet
        try:
            visits.get()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert [type(exc) for exc in failed] == [StoreUnavailable]
    assert not path.exists()  # no new, empty database beside the old one


def test_a_notice_thread_whose_first_read_fails_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails if the thread dies when its first read fails (a file descriptor shortage,
    # say): sessions ended in another process then never ran their hooks here.
    path = tmp_path / "s.db"
    store = SQLiteStore(path, poll_interval=0.02)
    read = store.read
    failures = [StoreUnavailable("SQLiteStore('s.db')", "unable to open database file")]

    def flaky(sql: str, args: tuple[object, ...]) -> list[object]:
        if failures and "MAX(seq)" in sql:
            raise failures.pop()
        return read(sql, args)

    monkeypatch.setattr(store, "read", flaky)
    here = StateEngine(store)
    ended: list[str] = []
    here.on_close(lambda sid, reason: ended.append(sid))
    elsewhere = StateEngine(SQLiteStore(path))
    sid = elsewhere.open_session()
    time.sleep(0.3)  # the thread reads again (what came meanwhile: a resync)
    elsewhere.close_session(sid)
    deadline = time.monotonic() + 5
    while sid not in ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert failures == []  # the first read did fail
    assert sid in ended
    elsewhere.shutdown()
    here.shutdown()


def test_a_store_opened_while_another_connection_writes_waits_for_it(tmp_path: Path) -> None:
    """Switching a file to WAL takes a lock SQLite's busy wait does not cover: the
    store failed at once, whatever its timeout, when it was opened while another
    connection wrote (as when several workers open a new database together). It now
    waits, as a busy write does; past its timeout it is unavailable, said once. Fails
    if the open raises while the write is shorter than the timeout."""
    import sqlite3

    path = tmp_path / "busy.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")

    def hold(seconds: float) -> threading.Thread:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO t VALUES (1)")
        thread = threading.Timer(seconds, lambda: writer.execute("COMMIT"))
        thread.start()
        return thread

    held = hold(0.3)
    store = SQLiteStore(path, timeout=5)  # waits for the write, then opens
    held.join()
    # Its writes wait the whole timeout again (the open waited in shorter turns).
    assert store._connection().execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    engine = StateEngine(store)
    assert engine.exists(engine.open_session())
    engine.shutdown()
    store.close()

    writer.close()
    writer = sqlite3.connect(tmp_path / "other.db", isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    held = hold(1.0)
    try:
        with pytest.raises(StoreUnavailable) as raised:
            SQLiteStore(tmp_path / "other.db", timeout=0.2)
    finally:
        held.join()
        writer.close()
    assert str(raised.value).count("is unavailable") == 1, str(raised.value)


@pytest.mark.parametrize("path", [":memory:", "file:x?mode=memory&cache=shared"])
def test_an_in_memory_database_is_refused_with_what_to_use(path: str) -> None:
    """``:memory:`` gave each of the store's threads (each has its own connection) an
    empty database of its own: another thread's call failed with "no such table".
    Refused at once, naming MemoryStore. Fails if it is accepted."""
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(path)
