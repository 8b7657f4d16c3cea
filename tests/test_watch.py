"""Change streams (``engine.watch``): the changes of a session and of globals, from this
engine's events and writes and from other processes' commits, bounded for a slow
consumer, ending with their session."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from statekit import (
    ChangeLoopError,
    Event,
    GlobalState,
    MemoryStore,
    SessionState,
    StateChange,
    StateEngine,
    UsageError,
    WrongEngine,
)
from statekit.testing import RedisCluster, RedisServer

from . import _workers

SPAWN = multiprocessing.get_context("spawn")


async def take(watch: Any, count: int, timeout: float = 5.0) -> list[StateChange]:
    """The next ``count`` changes of ``watch``."""
    return [await asyncio.wait_for(anext(watch), timeout) for _ in range(count)]


def test_a_watch_sees_each_change_of_its_session_and_globals() -> None:
    """Each event's changed states arrive in order with their values (copies), global
    writes too; another session's changes and unchanged states do not. Fails if a
    commit or a global write does not reach the watch, or if a change is seen twice."""

    async def scenario() -> None:
        engine = StateEngine()
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        note = engine.session_state("note", "")
        visitors = engine.global_state("visitors", 0)
        sid, other = engine.open_session(), engine.open_session()
        async with engine.watch(sid, globals=[visitors]) as watch:
            for item in ("apple", "pear"):
                async with engine.aevent(sid) as ev:
                    ev[cart].append(item)
                    assert ev[note] == ""  # read, not changed: not streamed
            async with engine.aevent(other) as ev:
                ev[cart].append("not mine")
            await visitors.aincrement()
            changes = await take(watch, 3)
        assert changes == [
            StateChange(sid=sid, state="cart", value=["apple"]),
            StateChange(sid=sid, state="cart", value=["apple", "pear"]),
            StateChange(sid=None, state="visitors", value=1, scope="global"),
        ]
        changes[1].value.append("mutated")  # the consumer's own copy
        assert cart.get(sid) == ["apple", "pear"]
        assert watch.closed

    asyncio.run(scenario())


def test_a_watch_streams_what_was_committed_not_what_the_host_did_after() -> None:
    """The host keeps the objects it read or assigned in an event (and a global's new
    value it set) and may go on changing them: the watch must stream the values as
    committed. Fails if a watch queues the host's own objects (copied only when read):
    the changes made after the commit then reach the stream, never the store."""

    async def scenario() -> None:
        engine = StateEngine()
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        note: SessionState[dict[str, str]] = engine.session_state("note", {})
        saved: SessionState[list[str]] = engine.user_state("saved", [])
        board: GlobalState[list[str]] = engine.global_state("board", [])
        sid = engine.open_session()
        async with engine.watch(sid, user="alice", globals=[board]) as watch:
            async with engine.aevent(sid, user="alice") as ev:
                items = ev[cart]
                items.append("apple")
                data = {"text": "hello"}
                ev[note] = data
                kept = ev[saved]
                kept.append("pear")
            posted = ["hi"]
            await board.aset(posted)
            items.append("NOT COMMITTED")
            data["text"] = "NOT COMMITTED"
            kept.append("NOT COMMITTED")
            posted.append("NOT COMMITTED")
            seen = {change.state: change.value for change in await take(watch, 4)}
        assert seen == {
            "cart": ["apple"],
            "note": {"text": "hello"},
            "saved": ["pear"],
            "board": ["hi"],
        }

    asyncio.run(scenario())


def test_changes_made_by_a_listener_are_streamed_too() -> None:
    """A change listener's own writes (in its own event) reach the watch with the
    value committed. Fails if only the outer event's states are streamed."""

    async def scenario() -> None:
        engine = StateEngine()
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        count = engine.session_state("count", 0)

        @cart.on_change
        def recount(ev: Event, items: list[str]) -> None:
            ev[count] = len(items)

        sid = engine.open_session()
        async with engine.watch(sid) as watch:
            async with engine.aevent(sid) as ev:
                ev[cart].append("apple")
            changes = await take(watch, 2)
        assert {(c.state, repr(c.value)) for c in changes} == {
            ("cart", "['apple']"),
            ("count", "1"),
        }

    asyncio.run(scenario())


def test_an_event_cut_by_its_listeners_still_streams_what_it_committed() -> None:
    """Listeners that keep changing states end the event with ChangeLoopError after
    its commit and the rounds before the cut: the watch gets the values as committed.
    Fails if a leave that raises streams nothing, or the event's own (pre-listener)
    values."""

    async def scenario() -> None:
        engine = StateEngine()
        a, b = engine.session_state("a", 0), engine.session_state("b", 0)
        a.on_change(lambda ev, value: ev.__setitem__(b, ev[b] + 1))
        b.on_change(lambda ev, value: ev.__setitem__(a, ev[a] + 1))
        sid = engine.open_session()
        async with engine.watch(sid) as watch:
            with pytest.raises(ChangeLoopError):
                async with engine.aevent(sid) as ev:
                    ev[a] = 1
            changes = {c.state: c.value for c in await take(watch, 2)}
        assert changes == {"a": a.get(sid), "b": b.get(sid)}
        assert changes["a"] > 1  # the listeners' value, not the event's own 1

    asyncio.run(scenario())


def test_a_consumer_that_never_reads_loses_the_oldest_and_is_told() -> None:
    """With maxsize 10 and 1,000 changes unread, the watch holds the latest 10, and the
    first change read says 990 were missed; writers were never held up. Fails if the
    queue grows without bound, keeps the oldest, or hides the loss."""

    async def scenario() -> None:
        engine = StateEngine()
        n = engine.session_state("n", 0)
        sid = engine.open_session()
        watch = engine.watch(sid, maxsize=10)
        for i in range(1, 1001):
            with engine.event(sid) as ev:
                ev[n] = i
        changes = await take(watch, 10)
        watch.close()
        assert [c.value for c in changes] == list(range(991, 1001))
        assert [c.missed for c in changes] == [990] + [0] * 9
        with pytest.raises(StopAsyncIteration):
            await anext(watch)

    asyncio.run(scenario())


def test_a_watch_ends_with_its_session_or_the_engine() -> None:
    """A watch ends (after what it queued) when its session is closed or expires, at
    once for an unknown or closed session, and at shutdown. Fails if a consumer waits
    forever on a session that is gone (a closed session's end was told before a watch
    opened on it)."""

    async def scenario() -> None:
        engine = StateEngine()
        n = engine.session_state("n", 0)
        visitors = engine.global_state("visitors", 0)
        sid = engine.open_session()
        closing = engine.watch(sid)
        async with engine.aevent(sid) as ev:
            ev[n] = 1
        await engine.aclose_session(sid)
        assert [c.value async for c in closing] == [1]
        unknown = engine.watch("x" * 32)
        assert [c async for c in unknown] == []
        assert [c async for c in engine.watch(sid)] == []  # opened after the close
        lasting = engine.watch(globals=[visitors])
        ended = asyncio.ensure_future(anext(lasting))
        await asyncio.sleep(0.01)
        await engine.ashutdown()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(ended, 5)

    asyncio.run(scenario())


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def shared(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> tuple[str, str, str]:
    """A shared store: its kind, place and key prefix (for the worker processes)."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "state.db"), ""
    prefix = f"w{uuid.uuid4().hex[:6]}"
    if request.param == "redis":
        return "redis", redis_server.url, prefix
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
    return "redis", f"redis+cluster://{nodes}", prefix


def test_a_change_in_another_process_reaches_the_watch(shared: tuple[str, str, str]) -> None:
    """Another process commits to the watched session: the new value reaches the
    consumer within a second (SQLite polls every 0.1 s; Redis publishes). Fails if
    watches hear only this process's events."""
    kind, where, prefix = shared

    async def scenario() -> None:
        store = _workers.make_store(kind, where, prefix)
        engine = StateEngine(store, app="mp")
        engine.session_state("log", [])
        sid = await engine.aopen_session()
        async with engine.watch(sid) as watch:
            waiting = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.2)  # the subscription is up
            writer = SPAWN.Process(target=_workers.append, args=(kind, where, prefix, sid, 7, 1))
            await asyncio.to_thread(writer.start)
            await asyncio.to_thread(writer.join, 60)
            assert writer.exitcode == 0
            change = await asyncio.wait_for(waiting, 1.0)
        assert (change.sid, change.state, change.value) == (sid, "log", [70_000])
        await engine.ashutdown()
        store.close()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_a_global_written_in_another_process_reaches_the_watch(
    shared: tuple[str, str, str],
) -> None:
    """Another process increments a watched global: its new value reaches the watch
    within a second. Fails if global writes publish no notice, or the watch does not
    listen for them."""
    kind, where, prefix = shared

    async def scenario() -> None:
        store = _workers.make_store(kind, where, prefix)
        engine = StateEngine(store, app="mp")
        visitors = engine.global_state("visitors", 0)
        async with engine.watch(globals=[visitors]) as watch:
            waiting = asyncio.ensure_future(anext(watch))
            await asyncio.sleep(0.2)  # the subscription is up
            writer = SPAWN.Process(target=_workers.increment, args=(kind, where, prefix, 1))
            await asyncio.to_thread(writer.start)
            await asyncio.to_thread(writer.join, 60)
            assert writer.exitcode == 0
            change = await asyncio.wait_for(waiting, 1.0)
        assert (change.sid, change.state, change.value) == (None, "visitors", 1)
        await engine.ashutdown()
        store.close()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_another_engine_on_one_memory_store_is_heard_too() -> None:
    """Two engines of one app on one memory store: a global the other engine writes
    reaches this engine's watch. Fails if only shared stores' notices are heard."""

    async def scenario() -> None:
        store = MemoryStore()
        mine, theirs = StateEngine(store, app="a"), StateEngine(store, app="a")
        visitors, their_visitors = mine.global_state("n", 0), theirs.global_state("n", 0)
        async with mine.watch(globals=[visitors]) as watch:
            their_visitors.increment(5)
            change = await asyncio.wait_for(anext(watch), 5)
        assert (change.state, change.value) == ("n", 5)

    asyncio.run(scenario())


def test_watch_is_checked() -> None:
    engine, other = StateEngine(), StateEngine()
    theirs = other.global_state("visitors", 0)
    with pytest.raises(UsageError, match="needs a session id"):
        engine.watch()
    with pytest.raises(UsageError, match="maxsize"):
        engine.watch(engine.open_session(), maxsize=0)
    with pytest.raises(WrongEngine):
        engine.watch(globals=[theirs])
    with pytest.raises(UsageError, match="global states"):
        engine.watch(globals=[engine.session_state("cart", [])])  # type: ignore[list-item]


def test_writers_are_never_blocked_by_a_watch_in_another_thread() -> None:
    """Events from several threads while a consumer reads slowly: every event
    completes and the consumer ends with the last value. Fails if a push waits for
    the consumer (the writers would stall) or if the wake-up across threads is lost
    (the consumer would wait forever)."""

    async def scenario() -> None:
        engine = StateEngine()
        n = engine.session_state("n", 0)
        sid = engine.open_session()
        async with engine.watch(sid, maxsize=5) as watch:

            def write() -> None:
                for _ in range(200):
                    with engine.event(sid) as ev:
                        ev[n] += 1

            threads = [threading.Thread(target=write) for _ in range(4)]
            for thread in threads:
                thread.start()
            seen = 0
            while seen != 800:
                change = await asyncio.wait_for(anext(watch), 5)
                seen = change.value
                await asyncio.sleep(0.001)
            for thread in threads:
                thread.join(10)

    asyncio.run(scenario())
