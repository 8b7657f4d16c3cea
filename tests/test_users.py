"""User state: one value per user, shared by all of the user's sessions, on every store.

Every test here would fail if user state were kept per session (the second session
would see the default), if its writes were committed apart from the session's (the
joint-commit tests see one part without the other), or if events of two sessions of
one user did not take turns (the totals would come out short).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statekit import (
    DeleteReason,
    InvalidDeclaration,
    SessionBusy,
    SessionNotFound,
    SessionState,
    StateEngine,
    UsageError,
)
from statekit._checks import user_record
from statekit.exceptions import StoreConflict
from statekit.stores import RedisStore, SQLiteStore, Store
from statekit.stores.base import CommitPart, Notice
from statekit.testing import FakeClock

from . import _workers

StoreFactory = Callable[[], Store]


@pytest.fixture
def user_store(make_store: StoreFactory) -> StoreFactory:
    """Makes stores of one kind (memory, SQLite, Redis, a Redis Cluster); stores made
    for one test share their data."""
    return make_store


@pytest.fixture
def engines(user_store: StoreFactory) -> Iterator[Callable[..., StateEngine]]:
    """Makes engines on the test's store kind (each on a store of its own, sharing its
    data); shuts them down afterwards."""
    made: list[StateEngine] = []

    def make(**kw: Any) -> StateEngine:
        engine = StateEngine(user_store(), app="users", **kw)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def test_two_sessions_of_one_user_share_its_values(
    engines: Any,
) -> None:
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    phone, laptop, other = engine.open_session(), engine.open_session(), engine.open_session()
    with engine.event(phone, user="alice") as ev:
        ev[cart].append("apple")
    with engine.event(laptop, user="alice") as ev:
        assert ev[cart] == ["apple"]  # a per-session value would be []
        ev[cart].append("pear")
    with engine.event(other, user="bob") as ev:
        assert ev[cart] == []  # another user's is their own
    assert cart.get("alice") == ["apple", "pear"]
    assert cart.get("carol") == []  # no record yet: the default
    # Another engine (another process, on a shared store) reads the same record.
    if engine.store.shared:
        second = engines()
        cart2 = second.user_state("cart", [])
        assert cart2.get("alice") == ["apple", "pear"]


def test_at_capacity_an_events_users_record_never_evicts_its_own_session(
    engines: Any,
) -> None:
    """An event of one tab for three users in turn, at capacity 3: each user's record
    is made at capacity, evicting the least recently used, which is never the session
    the event holds (it was just used). Fails on a store whose order of use skipped the
    event's load (Redis skipped moving a session whose deadline moved by under a
    second): the event then evicted its own session and failed."""
    engine = engines(capacity=3)
    plan = engine.user_state("plan", "free")
    sid = engine.open_session()
    for user in ("alice", "bob", "carol"):
        with engine.event(sid, user=user) as ev:
            ev[plan] = "pro"
    assert engine.exists(sid)
    assert plan.get("carol") == "pro"


def test_an_event_writes_its_session_and_its_user_together_or_not_at_all(
    engines: Any,
) -> None:
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    count: SessionState[int] = engine.session_state("count", 0)
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
        ev[count] += 1
    assert ev.result.changed == {"cart", "count"}
    with pytest.raises(RuntimeError), engine.event(sid, user="alice") as ev:
        ev[cart].append("lost")
        ev[count] += 1
        raise RuntimeError("the handler failed")
    assert cart.get("alice") == ["apple"]
    assert count.get(sid) == 1


def test_a_refused_joint_commit_writes_no_part(user_store: StoreFactory) -> None:
    """The store's own guarantee: a joint commit checks every part before it writes
    one. Here the second part's version is stale; a store that wrote the first part
    before checking the second would leave "written" in the first session."""
    engine = StateEngine(user_store(), app="joint")
    try:
        note = engine.session_state("note", "")
        a, b = engine.open_session(), engine.open_session()
        with engine.event(b) as ev:
            ev[note] = "b moved on"
        ns: Any = engine._ns  # the engine's own handle: what its commits use
        stored = engine._core.values.store("note", "written")
        with pytest.raises(StoreConflict):
            ns.commit_joint(
                (
                    CommitPart(sid=a, version=0, writes={"note": stored}, ttl_deadlines={}),
                    CommitPart(sid=b, version=0, writes={"note": stored}, ttl_deadlines={}),
                ),
                now=engine.clock(),
            )
        assert note.get(a) == ""
        assert note.get(b) == "b moved on"
        # Both current: both written, each version one more.
        versions = ns.commit_joint(
            (
                CommitPart(sid=a, version=0, writes={"note": stored}, ttl_deadlines={}),
                CommitPart(sid=b, version=1, writes={"note": stored}, ttl_deadlines={}),
            ),
            now=engine.clock(),
        )
        assert tuple(versions) == (1, 2)
        assert note.get(a) == note.get(b) == "written"
    finally:
        engine.shutdown()


def test_events_of_one_users_sessions_take_turns(
    engines: Any,
) -> None:
    """4 threads, each on a session of its own, 50 read-modify-writes each of one
    user's counter: any two overlapping would lose an increment."""
    engine = engines()
    total: SessionState[int] = engine.user_state("total", 0)
    sids = [engine.open_session() for _ in range(4)]
    errors: list[BaseException] = []

    def work(sid: str) -> None:
        try:
            for _ in range(50):
                with engine.event(sid, user="alice") as ev:
                    ev[total] = ev[total] + 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(sid,)) for sid in sids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert total.get("alice") == 200


def test_async_events_of_a_user(
    engines: Any,
) -> None:
    engine = engines()
    total: SessionState[int] = engine.user_state("total", 0)
    sids = [engine.open_session() for _ in range(3)]

    async def work(sid: str) -> None:
        for _ in range(20):
            async with engine.aevent(sid, user="alice") as ev:
                value = ev[total]
                await asyncio.sleep(0)  # another task runs here: it must wait
                ev[total] = value + 1

    async def main() -> None:
        await asyncio.gather(*(work(sid) for sid in sids))

    asyncio.run(main())
    assert total.get("alice") == 60
    assert asyncio.run(total.aget("alice")) == 60


def test_an_event_without_a_user_cannot_touch_user_state() -> None:
    engine = StateEngine()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    sid = engine.open_session()
    with engine.event(sid) as ev:
        with pytest.raises(UsageError, match=r"engine\.event\(sid, user=user_id\)"):
            ev[cart]
        with pytest.raises(UsageError, match="needs an event opened for a user"):
            ev[cart] = ["x"]
    for bad in ("", 42, "x" * 1025):
        with pytest.raises(UsageError, match="user= takes the id of the user"):
            engine.event(sid, user=bad)  # type: ignore[arg-type]
    engine.shutdown()


def test_a_users_record_is_not_a_session_anywhere(
    engines: Any,
) -> None:
    """A client that learns (or computes) a record's id cannot open it as a session."""
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    note: SessionState[str] = engine.session_state("note", "")
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
        record = ev.user_part.sid
    assert record.startswith("u:")
    with pytest.raises(SessionNotFound, match="a user's record"), engine.event(record):
        pass
    with pytest.raises(SessionNotFound, match="a user's record"):
        engine.close_session(record)
    with pytest.raises(SessionNotFound, match="a user's record"):
        note.get(record)
    with pytest.raises(SessionNotFound, match="a user's record"):
        engine.watch(record)
    assert not engine.exists(record)
    assert cart.get("alice") == ["apple"]


def test_a_users_record_expires_after_user_idle_ttl_and_on_delete_runs_once() -> None:
    clock = FakeClock()
    deleted: list[tuple[Any, DeleteReason]] = []
    engine = StateEngine(clock=clock, idle_ttl=10_000, user_idle_ttl=100)
    cart: SessionState[list[str]] = engine.user_state(
        "cart", [], on_delete=lambda v, r: deleted.append((v, r))
    )
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
    clock.advance(90)
    with engine.event(sid, user="alice") as ev:  # use slides the record's deadline
        assert ev[cart] == ["apple"]
    clock.advance(90)
    assert engine.reap() == 0
    assert deleted == []
    clock.advance(20)
    assert engine.reap() == 1
    assert deleted == [(["apple"], DeleteReason.IDLE)]
    assert engine.exists(sid)  # the session lives on; its user's record is new
    with engine.event(sid, user="alice") as ev:
        assert ev[cart] == []
    engine.shutdown()
    assert deleted[1:] == [([], DeleteReason.SHUTDOWN)]


def test_user_state_listeners(
    engines: Any,
) -> None:
    """on_change runs in an event that holds the user too; on_remote_change runs for the
    user's other sessions (here and in another engine), not for the one that changed."""
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    size: SessionState[int] = engine.user_state("size", 0)
    last: SessionState[str] = engine.session_state("last", "")

    @cart.on_change
    def count(ev: Any, value: list[str]) -> None:
        ev[size] = len(value)
        ev[last] = value[-1]

    told: list[tuple[str, Any]] = []
    cart.on_remote_change(lambda sid, value: told.append((sid, value)))
    phone, laptop = engine.open_session(), engine.open_session()
    with engine.event(laptop, user="alice") as ev:
        ev[size]
    with engine.event(phone, user="alice") as ev:
        ev[cart].append("apple")
    assert ev.result.changed == {"cart", "size", "last"}
    assert size.get("alice") == 1
    assert last.get(phone) == "apple"
    assert told == [(laptop, ["apple"])]


def test_watch_a_user(
    engines: Any,
) -> None:
    """A tab's stream carries its user's changes made from another session, in this
    engine and in another one on the same store."""
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    other = engines() if engine.store.shared else engine
    cart2 = other.user_state("cart", []) if other is not engine else cart
    tab, phone = engine.open_session(), engine.open_session()

    async def main() -> list[Any]:
        got = []
        async with engine.watch(tab, user="alice") as watch:
            with engine.event(phone, user="alice") as ev:
                ev[cart].append("apple")
            got.append(await asyncio.wait_for(watch.__anext__(), 10))
            with other.event(phone, user="alice") as ev:
                ev[cart2].append("pear")
            got.append(await asyncio.wait_for(watch.__anext__(), 10))
        return got

    got = asyncio.run(main())
    assert [(c.sid, c.state, c.value) for c in got] == [
        (None, "cart", ["apple"]),
        (None, "cart", ["apple", "pear"]),
    ]


def test_versioned_user_state_is_migrated(tmp_path: Path) -> None:
    """A deploy: version 1 wrote the user's value; version 2 renamed its key."""
    store = SQLiteStore(tmp_path / "deploy.db")
    old = StateEngine(store, app="v")
    old.user_state("prefs", {"colour": "red"})
    sid = old.open_session()
    with old.event(sid, user="alice") as ev:
        ev[old.states["prefs"]]["colour"] = "blue"
    new = StateEngine(store, app="v")
    prefs = new.user_state(
        "prefs", {"color": "red"}, version=2, migrate=lambda v, old: {"color": old["colour"]}
    )
    assert prefs.get("alice") == {"color": "blue"}
    new.shutdown()
    old.shutdown()


def test_extend_renews_the_users_record_too(tmp_path: Path) -> None:
    """Long work in a user's event: ``ev.extend()`` keeps both leases. Without the
    user's record renewed, the other session's event would take the record once its
    lease lapsed (instead of SessionBusy), and the long event's commit would fail."""
    clock = FakeClock(1_000_000.0)
    store = SQLiteStore(tmp_path / "long.db")
    engine = StateEngine(store, clock=clock, lease_ttl=30, lease_wait=0.2)
    other = StateEngine(store, clock=clock, lease_ttl=30, lease_wait=0.2)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        other.user_state("cart", [])
        mine, theirs = engine.open_session(), engine.open_session()
        with engine.event(mine, user="alice") as ev:
            ev[cart].append("apple")
            for _ in range(3):  # 60 s of work, renewed every 20 s
                clock.advance(20)
                ev.extend()
            with pytest.raises(SessionBusy), other.event(theirs, user="alice"):
                pass
        assert cart.get("alice") == ["apple"]
    finally:
        engine.shutdown()
        other.shutdown()
        store.close()


def test_lost_notices_do_not_call_session_listeners_with_a_users_record() -> None:
    """After a resync, the engine re-checks what it used lately, users' records too:
    those go to the user states' listeners, never to a session state's (which would
    receive the record's id as a session id)."""
    engine = StateEngine()
    note: SessionState[str] = engine.session_state("note", "")
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    heard: list[str] = []
    note.on_remote_change(lambda sid, value: heard.append(sid))
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
    engine._remote.saw(ev.user_part.sid, 0)  # type: ignore[union-attr]  # as a shared store's entry does
    engine._remote._on_notice(Notice(kind="resync", sid=""))
    assert heard == []
    engine.shutdown()


@pytest.mark.parametrize(
    ("step", "committed"),
    [("DECIDE", False), ("APPLY", True)],
    ids=["after-staging", "after-deciding"],
)
def test_a_process_dying_inside_a_cluster_commit_leaves_it_whole(
    redis_cluster: Any, step: str, committed: bool
) -> None:
    """On a cluster a session's and its user's writes commit in steps (the user's
    staged, then the decision on the session's slot, then the user's applied). A
    process killed before the decision commits neither part; one killed after it,
    both: the next event of the user (and a mere peek) finds it settled. Fails if the
    staged writes were lost after the decision, or applied without one, or if the
    record stayed stuck."""
    nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    url, prefix = f"redis+cluster://{nodes}", f"c{uuid.uuid4().hex[:8]}"
    store = RedisStore(url, prefix=prefix)
    engine = StateEngine(store, app="mp", lease_ttl=1, lease_wait=10)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        note: SessionState[str] = engine.session_state("note", "")
        doomed, mine = engine.open_session(), engine.open_session()
        with engine.event(mine, user="alice") as ev:
            ev[cart].append("before")
        spawn = multiprocessing.get_context("spawn")
        child = spawn.Process(
            target=_workers.die_in_a_users_commit, args=(url, prefix, step, doomed)
        )
        child.start()
        child.join(60)
        assert child.exitcode == 3  # it died at that step
        expected = ["before", "from the process that died"] if committed else ["before"]
        if committed:  # decided: a look applies it (no lease needed)
            assert cart.get("alice") == expected
        # The dead process's leases lapse (lease_ttl 1 s); the next event settles.
        with engine.event(mine, user="alice") as ev:
            assert ev[cart] == expected
            ev[cart].append("after")
        assert cart.get("alice") == [*expected, "after"]
        assert note.get(doomed) == ("written with the cart" if committed else "")
        record = store.namespace("mp").layout.of(user_record("alice"))
        staged = store.client.hmget(record.P + "s:" + user_record("alice"), "_tx", "_txw")
        assert staged == [None, None]  # nothing left staged
    finally:
        engine.shutdown()
        store.close()


def test_a_store_without_joint_commits_refuses_user_state(tmp_path: Path) -> None:
    """A store of one's own that cannot commit a session and a user together."""

    class Apart(SQLiteStore):
        joint_commits = False

    store = Apart(tmp_path / "apart.db")
    engine = StateEngine(store)
    try:
        with pytest.raises(InvalidDeclaration, match="joint_commits"):
            engine.user_state("cart", [])
        assert "cart" not in engine.states
    finally:
        engine.shutdown()
        store.close()


def test_a_look_that_applies_a_decided_commit_first_leaves_the_lease_to_be_given_back(
    redis_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster, a look at the user's record between a commit's decision and its
    last step applies the commit itself; the committer's last step must still give the
    record's lease back. Were it not, the user's next event (here with lease_wait
    0.5 s against a lease_ttl of 30 s) would wait for the lease and raise
    SessionBusy."""
    from statekit.stores._redis_namespace import RedisNamespace

    nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    store = RedisStore(f"redis+cluster://{nodes}", prefix=f"c{uuid.uuid4().hex[:8]}")
    engine = StateEngine(store, lease_wait=0.5)
    looker = StateEngine(store)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        note: SessionState[str] = engine.session_state("note", "")
        seen: SessionState[list[str]] = looker.user_state("cart", [])
        first, second = engine.open_session(), engine.open_session()
        send = RedisNamespace._run
        looked: list[list[str]] = []

        def run(self: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
            if name == "APPLY" and not looked and args[2]:  # the committer's, with its lease
                looked.append(seen.get("alice"))  # the look applies it first
            return send(self, name, keys, args)

        monkeypatch.setattr(RedisNamespace, "_run", run)
        with engine.event(first, user="alice") as ev:
            ev[cart].append("apple")
            ev[note] = "with it"
        assert looked == [["apple"]]
        with engine.event(second, user="alice") as ev:  # the lease was given back
            assert ev[cart] == ["apple"]
    finally:
        engine.shutdown()
        looker.shutdown()
        store.close()


def test_a_session_id_naming_a_users_record_touches_nothing() -> None:
    """A record's id is a digest anyone can compute from a user id. Sent as a session's,
    it is refused before the store touches the record: its deadline stays the user's
    (had the refused event slid it by the sessions' idle_ttl of 10 s, reaping 20 s
    later would delete alice's cart)."""
    clock = FakeClock()
    engine = StateEngine(clock=clock, idle_ttl=10, user_idle_ttl=10_000)
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
    with pytest.raises(SessionNotFound), engine.event(user_record("alice")):
        pass
    clock.advance(20)
    engine.reap()
    assert cart.get("alice") == ["apple"]
    engine.shutdown()


def test_a_committed_event_stands_when_its_listeners_cannot_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After listener rounds, the user's values are read again for its watches and
    listeners; a store failing then must not make the committed event raise (its
    caller would retry it, and apply it twice)."""
    from statekit._engine_host import EngineHost
    from statekit.exceptions import StoreUnavailable

    engine = StateEngine()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    size: SessionState[int] = engine.user_state("size", 0)
    cart.on_change(lambda ev, value: ev.__setitem__(size, len(value)))
    heard: list[object] = []
    cart.on_remote_change(lambda sid, value: heard.append(value))

    def failing(self: Any, user: Any, state: Any) -> Any:
        raise StoreUnavailable("memory", "the store failed just then")

    monkeypatch.setattr(EngineHost, "peek_user", failing)
    sid = engine.open_session()
    with engine.event(sid, user="alice") as ev:  # does not raise
        ev[cart].append("apple")
    monkeypatch.undo()
    assert (cart.get("alice"), size.get("alice")) == (["apple"], 1)
    assert "could not be read" in caplog.text
    engine.shutdown()


def test_a_session_signed_in_as_another_user_hears_only_its_new_user() -> None:
    """A shared computer: alice signs out, bob signs in, in the same session. Alice's
    later changes must not reach that session's listeners (bob's screen)."""
    engine = StateEngine()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    heard: list[tuple[str, list[str]]] = []
    cart.on_remote_change(lambda sid, value: heard.append((sid, value)))
    shared, alices_phone, bobs_phone = (engine.open_session() for _ in range(3))
    with engine.event(shared, user="alice") as ev:
        ev[cart]
    with engine.event(shared, user="bob") as ev:  # alice signed out, bob in
        ev[cart]
    with engine.event(alices_phone, user="alice") as ev:
        ev[cart].append("private item")
    with engine.event(bobs_phone, user="bob") as ev:
        ev[cart].append("gift")
    assert heard == [(shared, ["gift"])]
    engine.shutdown()


def test_listeners_hear_what_a_cut_listener_loop_committed() -> None:
    """Listener rounds cut by ChangeLoopError: what was committed before the cut
    stands, and the user's other sessions hear it."""
    from statekit import ChangeLoopError

    engine = StateEngine()
    count: SessionState[int] = engine.user_state("count", 0)
    count.on_change(lambda ev, value: ev.__setitem__(count, value + 1))  # never settles
    heard: list[int] = []
    count.on_remote_change(lambda sid, value: heard.append(value))
    mine, other = engine.open_session(), engine.open_session()
    with engine.event(other, user="alice") as ev:
        ev[count]
    with pytest.raises(ChangeLoopError), engine.event(mine, user="alice") as ev:
        ev[count] = 1
    assert heard == [count.get("alice")]
    assert heard[0] > 1
    engine.shutdown()


def test_an_event_of_a_user_counts_once_in_the_stats(engines: Any) -> None:
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    sid = engine.open_session()
    for _ in range(5):
        with engine.event(sid, user="alice") as ev:
            ev[cart].append("x")
    assert engine.stats().events == 5


def test_a_cluster_commit_leaves_no_decision_behind(redis_cluster: Any) -> None:
    """Each commit of a session and a user on a cluster decides on a key of its own;
    once applied, the key goes (else each commit would leave a key for a month)."""
    nodes = ",".join(f"{host}:{port}" for host, port in redis_cluster.startup_nodes)
    prefix = f"c{uuid.uuid4().hex[:8]}"
    store = RedisStore(f"redis+cluster://{nodes}", prefix=prefix)
    engine = StateEngine(store)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        note: SessionState[str] = engine.session_state("note", "")
        sid = engine.open_session()
        for i in range(5):
            with engine.event(sid, user="alice") as ev:
                ev[cart].append(str(i))
                ev[note] = str(i)
        assert cart.get("alice") == ["0", "1", "2", "3", "4"]
        left = list(store.client.scan_iter(match=f"{prefix}:*tx:*", target_nodes="all"))
        assert left == []
    finally:
        engine.shutdown()
        store.close()


def test_an_event_opened_with_renew_keeps_its_users_record_too(tmp_path: Path) -> None:
    """renew=True: the engine renews the event's leases while it runs, the user's
    record's included, so another process's event of the user waits (SessionBusy
    after lease_wait) rather than take the record once lease_ttl (1 s) passed; the
    long event then commits. Real time: about 2 s."""
    store, other_store = SQLiteStore(tmp_path / "r.db"), SQLiteStore(tmp_path / "r.db")
    engine = StateEngine(store, lease_ttl=1, lease_wait=0.3)
    other = StateEngine(other_store, lease_ttl=1, lease_wait=0.3)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        other.user_state("cart", [])
        mine, theirs = engine.open_session(), engine.open_session()
        outcome: list[str] = []

        def meanwhile() -> None:
            time.sleep(1.3)  # past lease_ttl: the record's lease was renewed
            try:
                with other.event(theirs, user="alice"):
                    outcome.append("entered")
            except SessionBusy:
                outcome.append("busy")

        thread = threading.Thread(target=meanwhile)
        thread.start()
        with engine.event(mine, user="alice", renew=True) as ev:
            ev[cart].append("apple")
            time.sleep(1.8)
        thread.join(10)
        assert outcome == ["busy"]
        assert cart.get("alice") == ["apple"]
    finally:
        engine.shutdown()
        other.shutdown()
        store.close()
        other_store.close()


def test_an_event_writing_only_to_its_user_leaves_its_session_as_it_was(
    engines: Any,
) -> None:
    """The session's part of such an event writes nothing: its version stays, and its
    lease is given back (a next event of the session, from another engine, enters at
    once)."""
    engine = engines()
    cart: SessionState[list[str]] = engine.user_state("cart", [])
    sid = engine.open_session()
    with engine.event(sid) as ev:
        before = ev.loaded.version
    with engine.event(sid, user="alice") as ev:
        ev[cart].append("apple")
    other = engines(lease_wait=0.5) if engine.store.shared else engine
    with other.event(sid) as ev:
        assert ev.loaded.version == before
    assert cart.get("alice") == ["apple"]


def test_on_one_redis_server_a_user_only_event_gives_its_session_back_in_its_commit(
    redis_server: Any,
) -> None:
    """Three scripts: the session's load, the record's, one joint commit that also
    gives the session's lease back (four before: a commit of the record, then a
    release of the session)."""
    import redis

    store = RedisStore(redis_server.url, prefix=f"f{uuid.uuid4().hex[:8]}")
    # A clock that stands still: no reaping look (a script of its own) in between.
    engine = StateEngine(store, clock=FakeClock(2_000_000_000.0))
    client = redis.Redis.from_url(redis_server.url)
    try:
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        sid = engine.open_session()
        with engine.event(sid, user="alice") as ev:
            ev[cart].append("first")  # the record made
        before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        with engine.event(sid, user="alice") as ev:
            ev[cart].append("apple")
        after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        assert after - before == 3
        assert cart.get("alice") == ["first", "apple"]
    finally:
        engine.shutdown()
        store.close()
        client.close()
