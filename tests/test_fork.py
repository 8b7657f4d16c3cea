"""An engine made before ``fork`` (gunicorn ``--preload``, multiprocessing with fork)
works in every child: it receives the store's notices there, so that per-session
objects of sessions ended by another process are cleaned up, exactly once, and it
shares nothing by accident with its parent."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statekit import StateEngine
from statekit.stores import Store
from statekit.stores.redis import RedisStore
from statekit.stores.sqlite import SQLiteStore
from statekit.testing import FakeClock, RedisServer

ROOT = Path(__file__).resolve().parent.parent
#: Bounds every wait: a child, a worker, a notice.
WAIT = 20.0


@pytest.fixture(params=["sqlite", "redis"])
def where(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> Iterator[tuple[str, str, str]]:
    """(kind, file or URL, key prefix) of a shared store."""
    if request.param == "sqlite":
        yield "sqlite", str(tmp_path / "fork.db"), ""
    else:
        yield "redis", redis_server.url, f"fk{uuid.uuid4().hex[:6]}"


def store_at(kind: str, where: str, prefix: str) -> Store:
    return SQLiteStore(where) if kind == "sqlite" else RedisStore(where, prefix=prefix)


def close(store: Store) -> None:
    store.close()  # type: ignore[attr-defined]


def read_lines(fd: int, until: float) -> list[str]:
    """What a child wrote to the pipe ``fd`` so far (waiting at most until ``until``
    for something to arrive)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, until - time.monotonic()))
    return os.read(fd, 65536).decode().split() if ready else []


def wait_for(fd: int, wanted: str, seen: list[str]) -> None:
    """Read the pipe into ``seen`` until ``wanted`` arrives."""
    deadline = time.monotonic() + WAIT
    while wanted not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted!r} never arrived; got {seen}")
        seen.extend(read_lines(fd, deadline))


def test_an_engine_made_before_fork_works_in_the_child(where: tuple[str, str, str]) -> None:
    """Without the fix, the child never received notices (the parent's receiving
    thread does not exist in it), and named itself as the parent does in notices, so
    the cleanup of the session closed elsewhere never ran in the child."""
    kind, place, prefix = where
    engine = StateEngine(store_at(kind, place, prefix), app="forked")
    note = engine.session_state("note", "")
    reader, writer = os.pipe()
    # What this process's cleanups finished (the child's copy is its own). The child
    # waits for this, not for the object to leave the registry: the registry takes an
    # object out of its table first and runs its cleanup after, so a child exiting as
    # soon as the marker is gone could end before the cleanup's line is written.
    cleaned: list[str] = []

    def cleanup(obj: str) -> None:
        os.write(writer, f"{os.getpid()}:{obj}\n".encode())
        cleaned.append(obj)

    # Declaring the registry starts the parent's notice thread.
    objects = engine.registry("conn", lambda sid: sid, cleanup)
    parents_sid, childs_sid, marker = (engine.open_session() for _ in range(3))
    objects.open(parents_sid)
    with warnings.catch_warnings():  # Python 3.12+ warns about fork with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            assert parents_sid not in objects  # the parent's objects stay the parent's
            with engine.event(childs_sid) as ev:
                ev[note] = "from the child"
            objects.open(childs_sid)
            objects.open(marker)
            os.write(writer, b"ready\n")
            deadline = time.monotonic() + WAIT
            while marker not in cleaned and time.monotonic() < deadline:
                time.sleep(0.01)
            code = 0 if marker in cleaned and marker not in objects else 2
        finally:
            os._exit(code)
    seen: list[str] = []
    try:
        wait_for(reader, "ready", seen)
        # A third party ends the sessions: another engine with a store of its own.
        closer = StateEngine(store_at(kind, place, prefix), app="forked")
        assert closer.session_state("note", "").get(childs_sid) == "from the child"
        closer.close_session(childs_sid)
        closer.close_session(parents_sid)
        # Notices arrive in order: once the marker's cleanup ran, every earlier one has.
        closer.close_session(marker)
        wait_for(reader, f"{pid}:{marker}", seen)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_for(reader, f"{os.getpid()}:{parents_sid}", seen)
        seen.extend(read_lines(reader, time.monotonic() + 0.2))
    finally:
        with_pid = [line for line in seen if ":" in line]
        os.close(reader)
        os.close(writer)
    # Each object cleaned up once, in the process that made it.
    assert sorted(with_pid) == sorted(
        [f"{pid}:{childs_sid}", f"{pid}:{marker}", f"{os.getpid()}:{parents_sid}"]
    )
    for each in (closer, engine):
        each.shutdown()
        close(each.store)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(port: int, sid: str) -> str:
    """One request on a new connection (so that either worker may take it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(f"GET /open?{sid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def _open_in_both_workers(port: int, sid: str) -> set[str]:
    """Open the session's object in both workers; return their pids."""
    pids: set[str] = set()
    deadline = time.monotonic() + WAIT
    while len(pids) < 2:
        assert time.monotonic() < deadline, f"only workers {pids} answered"
        pids.add(_get(port, sid))
    return pids


def test_gunicorn_preload_workers_each_clean_up_once(
    where: tuple[str, str, str], tmp_path: Path
) -> None:
    """gunicorn --preload imports the app (and makes its engine) in the master, then
    forks 2 workers. A session closed by a third process must be cleaned up once in
    each worker that opened an object for it."""
    kind, place, prefix = where
    log = tmp_path / "cleanups.log"
    log.touch()
    errors = tmp_path / "gunicorn.err"
    port = _free_port()
    env = {
        **os.environ,
        "STATEKIT_TEST_KIND": kind,
        "STATEKIT_TEST_WHERE": place,
        "STATEKIT_TEST_PREFIX": prefix,
        "STATEKIT_TEST_LOG": str(log),
    }
    with errors.open("wb") as err:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "gunicorn", "--preload", "--workers", "2"),
                *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "2"),
                "tests._preload_app:app",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    engine = StateEngine(store_at(kind, place, prefix), app="preload")
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, errors.read_text()
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.05)
        sid, marker = engine.open_session(), engine.open_session()
        workers = _open_in_both_workers(port, sid)
        assert _open_in_both_workers(port, marker) == workers
        engine.close_session(sid)  # this test's process is the third one
        engine.close_session(marker)
        # Notices arrive in order: once both marker cleanups ran, every earlier one has.
        deadline = time.monotonic() + WAIT
        while True:
            lines = log.read_text().split("\n")
            if sum(line.endswith(f" {marker}") for line in lines) >= 2:
                break
            assert time.monotonic() < deadline, f"cleanups seen: {lines}"
            time.sleep(0.05)
        cleaned = sorted(line.split()[0] for line in lines if line.endswith(f" {sid}"))
        assert cleaned == sorted(workers)  # once in each worker, never twice
    finally:
        server.terminate()
        server.wait(timeout=WAIT)
        engine.shutdown()
        close(engine.store)


def fork_quietly() -> int:
    with warnings.catch_warnings():  # Python 3.12+ warns about fork with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def exit_code_of(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_an_event_open_across_a_fork_keeps_its_session_in_the_child() -> None:
    """The child's copy of an open event goes on in the child (its thread is the one
    that forked): another thread of the child must not enter that session meanwhile.
    Without care, the fork freed every session lock, this one included."""
    engine = StateEngine(lease_wait=0.3)
    note = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        pid = fork_quietly()
        if pid == 0:
            outcome: list[str] = []

            def other() -> None:
                try:
                    with engine.event(sid):
                        outcome.append("entered")
                except Exception as exc:
                    outcome.append(type(exc).__name__)

            thread = threading.Thread(target=other)
            thread.start()
            thread.join(WAIT)
            os._exit(0 if outcome == ["SessionBusy"] else 1)
        ev[note] = "parent"
    assert exit_code_of(pid) == 0
    assert note.get(sid) == "parent"


class _LeaveInChild(Exception):
    pass


def test_a_shared_store_event_open_across_a_fork_ends_cleanly_in_the_child(
    where: tuple[str, str, str],
) -> None:
    """The child's copy of the event gives its session lock back on leaving (here by
    raising, so that it writes nothing): the lock must still be in the child's table,
    or leaving raises there (the fork used to empty the table)."""
    kind, place, prefix = where
    engine = StateEngine(store_at(kind, place, prefix), app="forked")
    note = engine.session_state("note", "")
    sid = engine.open_session()
    parent = os.getpid()
    go, wait = os.pipe()
    try:
        with engine.event(sid) as ev:
            pid = fork_quietly()
            if pid == 0:
                os.read(go, 1)  # after the parent's commit: the lease is the parent's
                raise _LeaveInChild
            ev[note] = "parent"
    except BaseException as exc:
        if os.getpid() != parent:  # the child, after its copy of the event left
            os._exit(0 if isinstance(exc, _LeaveInChild) else 2)
        raise
    os.write(wait, b"x")
    assert exit_code_of(pid) == 0
    os.close(go)
    os.close(wait)
    assert note.get(sid) == "parent"
    engine.shutdown()
    close(engine.store)


def test_an_asyncio_client_made_before_a_fork_is_not_shared_with_the_child(
    redis_server: RedisServer,
) -> None:
    import asyncio

    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    store = RedisStore(redis_server.url, async_client=client, prefix=f"fa{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="forked")
    note = engine.session_state("note", "")
    sid = engine.open_session()

    async def write(text: str) -> None:
        async with engine.aevent(sid) as ev:
            ev[note] = text

    pid = fork_quietly()
    if pid == 0:
        code = 1
        try:
            asyncio.run(write("child"))  # through worker threads, not the parent's sockets
            code = 0 if store.async_client is None else 2
        finally:
            os._exit(code)
    assert exit_code_of(pid) == 0
    assert note.get(sid) == "child"
    assert store.async_client is client  # the parent keeps its own

    async def main() -> None:
        await write("parent")
        await client.aclose()

    asyncio.run(main())
    assert note.get(sid) == "parent"
    engine.shutdown()
    store.close()


def _child_outcome(work: Callable[[], object]) -> str:
    """Fork; run ``work`` in the child; what happened there ("ok" or the error)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            work()
            os.write(write, b"ok")
        except BaseException as exc:
            os.write(write, f"{type(exc).__name__}: {exc}".encode()[:500])
        finally:
            os._exit(0)
    os.close(write)
    try:
        deadline = time.monotonic() + WAIT
        got = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read], [], [], 0.5)
            chunk = os.read(read, 4096) if ready else b""
            if ready and not chunk:
                break
            got += chunk
        return got.decode() or "no answer"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_a_fork_while_a_thread_writes_to_sqlite_leaves_the_child_able_to_write(
    tmp_path: Path,
) -> None:
    """A thread of the parent is inside a write transaction when another thread forks
    (a reaper, an event of another request, under gunicorn --preload): the fork waits
    for the transaction, and the child's events write. Fails if the child inherits
    SQLite's record of the parent's write lock (every write there then fails with
    "database is locked")."""
    store = SQLiteStore(tmp_path / "fork.db", timeout=2)
    engine = StateEngine(store, app="shop")
    note = engine.session_state("note", "")
    sid = engine.open_session()
    inside, done = threading.Event(), threading.Event()

    def write() -> None:
        with store.transaction() as db:
            db.execute("SELECT 1")
            inside.set()
            time.sleep(0.3)  # the fork comes meanwhile
        done.set()

    def in_child() -> None:
        with engine.event(sid) as ev:
            ev[note] = "child"

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert inside.wait(WAIT)
        assert not done.is_set()  # the fork below starts inside the transaction
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
            outcome = _child_outcome(in_child)
    finally:
        writer.join(WAIT)
    assert outcome == "ok"
    assert note.get(sid) == "child"
    engine.shutdown()
    store.close()


def test_two_threads_forking_at_once_keep_the_gate_closed_until_both_forked() -> None:
    """While two forks are under way, work of other threads waits until both are
    done; the forking threads and hooks that run during a fork pass. Fails if the
    first fork to end opens the gate while the second still waits for it (the
    second then split a transaction)."""
    from statekit._fork import ForkGate

    gate = ForkGate("a test's work")
    deadline = time.monotonic() + WAIT
    entered = threading.Event()

    def other() -> None:
        with gate:
            entered.set()

    gate.before_fork(deadline)  # this thread forks...
    with gate:  # ...and may pass (a fork hook of its own, say)
        pass
    gate.before_fork(deadline)  # ...and forks again, before the first fork ended
    worker = threading.Thread(target=other)
    worker.start()
    gate.after_fork_in_parent()  # the first fork ends
    assert not entered.wait(0.2)  # the second is still under way: held back
    gate.after_fork_in_parent()
    assert entered.wait(WAIT)
    worker.join(WAIT)


def test_a_fork_waits_for_a_gate_only_so_long_and_never_for_its_own_thread(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork waits for work in flight in other threads at most FORK_PATIENCE, then
    forks all the same (saying so); a fork from inside the gate waits for nobody (the
    other thread may be waiting for what the forking one holds). Fails if a fork hangs
    behind a stuck thread or behind itself."""
    from statekit import _fork

    monkeypatch.setattr(_fork, "FORK_PATIENCE", 0.2)
    gate = _fork.ForkGate("a test's work")
    inside, release = threading.Event(), threading.Event()

    def stuck() -> None:
        with gate:
            inside.set()
            release.wait(WAIT)

    worker = threading.Thread(target=stuck)
    worker.start()
    assert inside.wait(WAIT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            started = time.monotonic()
            assert _child_outcome(lambda: None) == "ok"
            waited = time.monotonic() - started
            with gate:  # forking from inside: no wait
                started = time.monotonic()
                assert _child_outcome(lambda: None) == "ok"
                inside_wait = time.monotonic() - started
    finally:
        release.set()
        worker.join(WAIT)
    assert 0.2 <= waited < WAIT
    assert inside_wait < 0.2
    assert "forking while a test's work is in flight" in caplog.text
    with gate:  # open again in the parent
        pass


def test_a_forked_childs_figures_start_at_zero_and_count_its_own_events() -> None:
    """A server's workers each export their engine's figures, summed over workers: a
    child that started with what its parent did before forking (events, holds, sizes,
    ended sessions) would add the parent's figures once per worker. The parent's own
    figures are unchanged by the fork."""
    clock = FakeClock()
    engine = StateEngine(clock=clock, closed_ttl=1)
    note = engine.session_state("note", "")
    sids = [engine.open_session() for _ in range(3)]
    for sid in sids:
        with engine.event(sid) as ev:
            ev[note] = "x" * 100
    engine.close_session(sids[0])
    clock.advance(2)
    assert engine.reap() == 1
    before = engine.stats()
    assert (before.events, before.ended["closed"], before.lease_hold.samples) == (3, 1, 3)
    read, write = os.pipe()
    pid = fork_quietly()
    if pid == 0:
        os.close(read)
        at_fork = engine.stats()
        with engine.event(sids[1]) as ev:
            ev[note] = "yz"
        after = engine.stats()
        figures = [
            at_fork.events,
            at_fork.ended["closed"],
            at_fork.lease_hold.samples,
            len(at_fork.largest),
            after.events,
            after.lease_hold.samples,
            after.largest[0].size,
        ]
        os.write(write, " ".join(map(str, figures)).encode())
        os._exit(0)
    os.close(write)
    assert exit_code_of(pid) == 0
    got = read_lines(read, time.monotonic() + WAIT)
    os.close(read)
    # Without the reset: 3 1 3 1 4 4 100 (the parent's figures, its 100-character value).
    assert got == ["0", "0", "0", "0", "1", "1", "2"]
    assert engine.stats().events == 3  # the parent's, untouched


@pytest.mark.parametrize("deployment", ["one server", "cluster"])
def test_a_fork_while_a_thread_holds_the_redis_clients_pool_lock_leaves_the_child_working(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    """redis-py's pool notices a fork at its next use and resets itself under its own
    lock. A fork while another thread of the parent held that lock (taking or giving
    back a connection: a request thread, the notice thread reconnecting) copied it
    held into the child, where no thread would ever release it: the child's first
    store call hung. Fails if the child does not answer within the bound."""
    if deployment == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes)
    else:
        url = request.getfixturevalue("redis_server").url
    store = RedisStore(url, prefix=f"fl{uuid.uuid4().hex[:6]}")
    engine = StateEngine(store, app="shop")
    sid = engine.open_session()
    client: Any = store.client
    if deployment == "cluster":  # the pool of the master holding the session
        key = store.namespace("shop").layout.of(sid).P + "s:" + sid
        pool = client.get_redis_connection(client.get_node_from_key(key)).connection_pool
    else:
        pool = client.connection_pool
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with pool._lock:
            held.set()
            release.wait(WAIT)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(WAIT)
    pid = fork_quietly()
    if pid == 0:
        code = 1
        try:
            code = 0 if engine.exists(sid) else 2
        finally:
            os._exit(code)
    release.set()
    thread.join()
    deadline = time.monotonic() + WAIT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child's first store call hung on the pool's lock")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    engine.shutdown()
    store.close()
