"""Events: reads, writes, all-or-nothing commits, outputs and change listeners."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import Any

import pytest

from statekit import (
    ChangeLoopError,
    Event,
    SessionNotFound,
    SessionState,
    StateEngine,
    StateNotCopyable,
    UsageError,
    WrongEngine,
)


@dataclasses.dataclass
class Profile:
    name: str
    tags: list[str]


class TestReadWrite:
    def test_each_session_starts_from_its_own_copy_of_the_default(
        self, engine: StateEngine
    ) -> None:
        default: dict[str, list[str]] = {"items": []}
        cart = engine.session_state("cart", default)
        a, b = engine.open_session(), engine.open_session()
        with engine.event(a) as ev:
            ev[cart]["items"].append("milk")
        assert cart.get(a) == {"items": ["milk"]}
        assert cart.get(b) == {"items": []}
        assert default == {"items": []}

    def test_factory_is_called_once_per_session_and_kept(self, engine: StateEngine) -> None:
        calls: list[int] = []

        def make() -> list[int]:
            calls.append(1)
            return [len(calls)]

        state = engine.session_state("s", factory=make)
        sid = engine.open_session()
        for _ in range(3):
            with engine.event(sid) as ev:
                assert ev[state] == [1]
        assert calls == [1]

    def test_in_place_mutation_of_a_read_value_is_committed(self, engine: StateEngine) -> None:
        profile = engine.session_state("profile", Profile("ann", []))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[profile].tags.append("admin")
        assert ev.result.changed == {"profile"}
        assert profile.get(sid) == Profile("ann", ["admin"])

    def test_exception_in_block_writes_nothing(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", ["a"])
        other = engine.session_state("other", 0)
        sid = engine.open_session()
        with pytest.raises(ZeroDivisionError), engine.event(sid) as ev:
            ev[cart].append("b")  # in-place mutation of the value read
            ev[other] = 5
            1 / 0
        assert cart.get(sid) == ["a"]
        assert other.get(sid) == 0
        with engine.event(sid) as ev:  # and the session is not left locked
            assert ev[cart] == ["a"]

    def test_values_kept_after_the_event_cannot_change_the_store(
        self, engine: StateEngine
    ) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        sid = engine.open_session()
        with engine.event(sid) as ev:
            kept = ev[cart]
            kept.append("x")
        kept.append("sneaky")
        assert cart.get(sid) == ["x"]
        peeked = cart.get(sid)
        peeked.append("also sneaky")
        assert cart.get(sid) == ["x"]

    def test_non_copyable_write_fails_naming_the_state_and_writes_nothing(
        self, engine: StateEngine
    ) -> None:
        import threading

        a = engine.session_state("a", 0)
        holder: SessionState[object] = engine.session_state("holder", None)
        sid = engine.open_session()
        with pytest.raises(StateNotCopyable, match=r"'holder'.*registry"), engine.event(sid) as ev:
            ev[a] = 1
            ev[holder] = threading.Lock()
        assert a.get(sid) == 0

    def test_update_assigns_several(self, engine: StateEngine) -> None:
        a: SessionState[int] = engine.session_state("a", 0)
        b: SessionState[str] = engine.session_state("b", "")
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev.update({a: 1, b: "x"})
            ev.update([(a, 2)])
        assert (a.get(sid), b.get(sid)) == (2, "x")

    def test_unchanged_values_report_no_change(self, engine: StateEngine) -> None:
        cart = engine.session_state("cart", [1, 2])
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart] = [1, 2]
        assert ev.result.changed == frozenset()

    def test_outputs_are_returned_in_the_result(self, engine: StateEngine) -> None:
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev.emit("status", "ok")
            ev.emit("count", 3)
            assert ev.outputs == {"status": "ok", "count": 3}
        assert ev.result.outputs == {"status": "ok", "count": 3}
        assert ev.result.sid == sid
        assert sid not in repr(ev.result)

    def test_the_result_is_there_after_a_good_block_and_says_why_not_otherwise(
        self, engine: StateEngine
    ) -> None:
        """``ev.result`` is an EventResult once the block ended well (typed so, no
        ``None`` to check); before that, or after a failed block, reading it raises
        UsageError saying why (it used to answer None, which a host could mistake for
        "nothing changed")."""
        cart = engine.session_state("cart", [1])
        sid = engine.open_session()
        ev = engine.event(sid)
        with pytest.raises(UsageError, match="was not entered"):
            ev.result
        with ev:
            ev[cart].append(2)
            with pytest.raises(UsageError, match="still running"):
                ev.result
        assert ev.result.changed == {"cart"}
        with pytest.raises(RuntimeError, match="boom"), engine.event(sid) as failed:
            failed[cart].append(3)
            raise RuntimeError("boom")
        with pytest.raises(UsageError, match="nothing of it was committed"):
            failed.result
        unknown = engine.event("x" * 32)
        with pytest.raises(SessionNotFound), unknown:
            pass
        with pytest.raises(UsageError, match="failed"):
            unknown.result


class TestGlobalsInEvents:
    def test_global_reads_are_consistent_within_an_event(self, engine: StateEngine) -> None:
        visitors = engine.global_state("visitors", 0)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            first = ev[visitors]
            visitors.increment()
            assert ev[visitors] == first
        assert visitors.get() == 1

    def test_assigning_a_global_in_an_event_explains_what_to_do(self, engine: StateEngine) -> None:
        visitors = engine.global_state("visitors", 0)
        sid = engine.open_session()
        with pytest.raises(UsageError, match="increment"), engine.event(sid) as ev:
            ev[visitors] = 3  # type: ignore[index]


class TestMisuse:
    def test_state_of_another_engine_is_refused(self, engine: StateEngine) -> None:
        other = StateEngine(app="other")
        foreign: SessionState[list[str]] = other.session_state("cart", [])
        sid = engine.open_session()
        with (
            pytest.raises(WrongEngine, match=r"'cart'.*another StateEngine"),
            engine.event(sid) as ev,
        ):
            ev[foreign]
        with pytest.raises(SessionNotFound):  # its engine never issued this id
            foreign.get(sid)

    def test_nested_event_of_the_same_session_is_refused(self, engine: StateEngine) -> None:
        sid = engine.open_session()
        with pytest.raises(UsageError, match="cannot nest"), engine.event(sid):  # noqa: SIM117
            with engine.event(sid):
                pass
        with engine.event(sid):  # the outer one released its lock
            pass

    def test_events_of_other_sessions_may_nest(self, engine: StateEngine) -> None:
        s = engine.session_state("s", 0)
        a, b = engine.open_session(), engine.open_session()
        with engine.event(a) as ev_a, engine.event(b) as ev_b:
            ev_a[s] = 1
            ev_b[s] = 2
        assert (s.get(a), s.get(b)) == (1, 2)

    def test_event_cannot_be_used_after_it_ends(self, engine: StateEngine) -> None:
        s = engine.session_state("s", 0)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            pass
        with pytest.raises(UsageError, match="not open"):
            ev[s]
        with pytest.raises(UsageError):
            ev.emit("x", 1)

    def test_event_cannot_be_entered_twice(self, engine: StateEngine) -> None:
        sid = engine.open_session()
        ev = engine.event(sid)
        with ev:
            pass
        with pytest.raises(Exception, match="only once"), ev:
            pass

    def test_non_state_key_is_refused(self, engine: StateEngine) -> None:
        sid = engine.open_session()
        with pytest.raises(UsageError, match="takes a state"), engine.event(sid) as ev:
            ev["cart"]  # type: ignore[index]


class TestListeners:
    def test_listener_fires_after_commit_with_the_new_value(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        seen: list[Any] = []

        @cart.on_change
        def record(ev: Event, value: list[str]) -> None:
            seen.append((value, cart.get(ev.sid)))

        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart] = ["a"]
        assert seen == [(["a"], ["a"])]

    def test_listener_does_not_fire_without_a_change(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        seen: list[Any] = []
        cart.on_change(lambda ev, v: seen.append(v))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart]  # first read materializes the default: not a change
            ev[cart] = []
        assert seen == []

    def test_listeners_cascade_and_collect_outputs(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        size = engine.session_state("size", 0)
        label = engine.session_state("label", "")

        @cart.on_change
        def count(ev: Event, value: list[str]) -> None:
            ev[size] = len(value)

        @size.on_change
        def describe(ev: Event, value: int) -> None:
            ev[label] = f"{value} items"
            ev.emit("label", ev[label])

        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart] = ["a", "b"]
        assert ev.result.changed == {"cart", "size", "label"}
        assert ev.result.outputs == {"label": "2 items"}
        assert label.get(sid) == "2 items"

    def test_listener_loop_raises_change_loop_error_after_committing(
        self, engine: StateEngine
    ) -> None:
        ping = engine.session_state("ping", 0)
        pong = engine.session_state("pong", 0)
        ping.on_change(lambda ev, v: ev.__setitem__(pong, v + 1))
        pong.on_change(lambda ev, v: ev.__setitem__(ping, v + 1))
        sid = engine.open_session()
        with pytest.raises(ChangeLoopError) as info, engine.event(sid) as ev:
            ev[ping] = 1
        assert info.value.depth == 16
        assert set(info.value.states) <= {"ping", "pong"}
        assert ping.get(sid) >= 1  # the event and the rounds before the bound stand
        with engine.event(sid):  # and the session is usable
            pass

    def test_raising_listener_is_reported_and_commit_stands(
        self, engine: StateEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        size = engine.session_state("size", 0)
        seen: list[int] = []

        @cart.on_change
        def broken(ev: Event, value: list[str]) -> None:
            ev[size] = 99
            raise ValueError("listener bug")

        cart.on_change(lambda ev, v: seen.append(len(v)))
        sid = engine.open_session()
        with caplog.at_level(logging.ERROR, logger="statekit"), engine.event(sid) as ev:
            ev[cart] = ["a"]
        assert cart.get(sid) == ["a"]
        assert size.get(sid) == 0  # the broken listener's own write is discarded
        assert seen == [1]  # other listeners still ran
        (failure,) = ev.result.errors
        assert failure.state == "cart"
        assert "broken" in failure.listener
        assert isinstance(failure.error, ValueError)
        assert any("broken" in r.message for r in caplog.records)

    def test_listener_cannot_open_a_nested_event_of_its_session(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])

        @cart.on_change
        def nested(ev: Event, value: list[str]) -> None:
            with engine.event(ev.sid):
                pass

        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[cart] = ["a"]
        assert isinstance(ev.result.errors[0].error, UsageError)

    def test_global_listener_gets_the_new_value(self, engine: StateEngine) -> None:
        visitors = engine.global_state("visitors", 0)
        seen: list[int] = []
        visitors.on_change(seen.append)
        visitors.increment()
        visitors.increment(0)
        visitors.set(1)
        visitors.set(5)
        assert seen == [1, 5]

    def test_raising_global_listener_does_not_undo_the_write(
        self, engine: StateEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        visitors = engine.global_state("visitors", 0)

        @visitors.on_change
        def bad(value: int) -> None:
            raise RuntimeError("nope")

        with caplog.at_level(logging.ERROR, logger="statekit"):
            assert visitors.increment() == 1
        assert visitors.get() == 1
        assert any("bad" in r.message for r in caplog.records)


class TestAsync:
    def test_aevent_reads_and_writes(self, engine: StateEngine) -> None:
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        sid = engine.open_session()

        async def main() -> None:
            async with engine.aevent(sid) as ev:
                ev[cart].append("x")

        asyncio.run(main())
        assert cart.get(sid) == ["x"]

    def test_aevents_of_one_session_serialize_without_blocking_the_loop(
        self, engine: StateEngine
    ) -> None:
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()
        waiting: list[int] = []  # writers that have asked for the session
        inside: list[int] = []  # writers that have it
        ticks: list[int] = []
        seen: dict[str, Any] = {}

        async def writer(i: int) -> None:
            waiting.append(i)
            async with engine.aevent(sid) as ev:
                inside.append(i)
                value = ev[log]
                await asyncio.sleep(0.001)  # yield while holding the session
                value.append(i)

        async def main() -> None:
            entered, loop_ran = asyncio.Event(), asyncio.Event()

            async def holder() -> None:
                async with engine.aevent(sid) as ev:
                    entered.set()
                    # Only the ticker sets this, and only after the writers have all
                    # asked for the session: if waiting for it blocked the loop, the
                    # ticker never runs and this never returns.
                    await loop_ran.wait()
                    seen["waiting"] = list(waiting)
                    seen["inside"] = list(inside)
                    seen["ticks"] = len(ticks)
                    ev[log].append(0)

            async def ticker() -> None:
                while len(waiting) < 19:  # the writers start before the ticker
                    await asyncio.sleep(0)
                for i in range(5):
                    ticks.append(i)
                    await asyncio.sleep(0)
                loop_ran.set()

            held = asyncio.create_task(holder())
            await entered.wait()
            writers = [asyncio.create_task(writer(i)) for i in range(1, 20)]
            # A lost wake-up fails here rather than hanging.
            await asyncio.wait_for(asyncio.gather(held, *writers, ticker()), timeout=10)

        # A loop blocked by a waiting writer could not even time out: run it in a
        # thread and fail if it is still stuck after a while.
        failed: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(30)
        assert not thread.is_alive(), "the event loop is blocked"
        if failed:
            raise failed[0]
        # While the holder held the session, all 19 writers were waiting for it (none
        # had it) and the ticker, a task of the same loop, ran 5 times.
        assert seen == {"waiting": list(range(1, 20)), "inside": [], "ticks": 5}
        # Fails if two events of the session overlapped: a write would be lost.
        assert sorted(log.get(sid)) == list(range(20))

    def test_exception_in_aevent_writes_nothing(self, engine: StateEngine) -> None:
        n = engine.session_state("n", 0)
        sid = engine.open_session()

        async def main() -> None:
            async with engine.aevent(sid) as ev:
                ev[n] = 1
                raise KeyError("x")

        with pytest.raises(KeyError):
            asyncio.run(main())
        assert n.get(sid) == 0

    def test_cancelled_waiter_does_not_leak_the_lock(self, engine: StateEngine) -> None:
        n = engine.session_state("n", 0)
        sid = engine.open_session()

        async def main() -> None:
            gate = asyncio.Event()

            async def holder() -> None:
                async with engine.aevent(sid) as ev:
                    ev[n] = 1
                    await gate.wait()

            async def waiter() -> None:
                async with engine.aevent(sid) as ev:
                    ev[n] = 2

            held = asyncio.create_task(holder())
            await asyncio.sleep(0)
            waiting = asyncio.create_task(waiter())
            await asyncio.sleep(0)
            waiting.cancel()
            gate.set()
            await held
            with pytest.raises(asyncio.CancelledError):
                await waiting
            async with engine.aevent(sid) as ev:
                ev[n] = 3

        asyncio.run(main())
        assert n.get(sid) == 3
        assert engine.stats().held == 0

    def test_blocking_event_inside_async_code_does_not_hang(self, engine: StateEngine) -> None:
        sid = engine.open_session()

        async def main() -> None:
            gate = asyncio.Event()

            async def holder() -> None:
                async with engine.aevent(sid):
                    await gate.wait()

            task = asyncio.create_task(holder())
            await asyncio.sleep(0)
            with pytest.raises(UsageError, match="aevent"), engine.event(sid):
                pass
            gate.set()
            await task

        asyncio.run(main())


class TestRemoteListeners:
    def test_change_made_by_another_engine_fires_remote_listener(self) -> None:
        from statekit import MemoryStore

        store = MemoryStore()
        worker_a = StateEngine(store, app="shop")
        worker_b = StateEngine(store, app="shop")
        cart_a: SessionState[list[str]] = worker_a.session_state("cart", [])
        cart_b: SessionState[list[str]] = worker_b.session_state("cart", [])
        seen_b: list[tuple[str, list[str]]] = []
        seen_a: list[tuple[str, list[str]]] = []
        cart_b.on_remote_change(lambda sid, value: seen_b.append((sid, value)))
        cart_a.on_remote_change(lambda sid, value: seen_a.append((sid, value)))
        sid = worker_a.open_session()
        with worker_a.event(sid) as ev:
            ev[cart_a].append("milk")
        assert seen_b == [(sid, ["milk"])]
        assert seen_a == []  # a worker is not told of its own changes
        with worker_b.event(sid) as ev:
            ev[cart_b].append("tea")
        assert seen_a == [(sid, ["milk", "tea"])]

    def test_session_ended_elsewhere_runs_end_hooks_here(self) -> None:
        from statekit import MemoryStore

        store = MemoryStore()
        worker_a = StateEngine(store, app="shop")
        worker_b = StateEngine(store, app="shop")
        ended: list[tuple[str, str]] = []
        worker_b.on_close(lambda sid, reason: ended.append((sid, reason.value)))
        sid = worker_a.open_session()
        worker_a.close_session(sid)
        assert ended == [(sid, "closed")]
