"""The engine's semantics, the same on every store: memory, SQLite and Redis.

Two engines on one store and app stand for two worker processes (the multi-process
tests in test_multiprocess.py use real processes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any

import pytest

from statekit import (
    DeleteReason,
    Event,
    GlobalState,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionState,
    StateEngine,
    ValueNotStorable,
)
from statekit.testing import FakeClock

from .conftest import StoreFactory
from .threads import wait_until


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


def engine_on(make_store: StoreFactory, clock: FakeClock, **kw: Any) -> StateEngine:
    settings: dict[str, Any] = {"idle_ttl": 60, "closed_ttl": 30, "capacity": 100, **kw}
    return StateEngine(make_store(), app="shop", clock=clock, **settings)


class TestSemantics:
    def test_cart_with_size_listener(self, make_store: StoreFactory, clock: FakeClock) -> None:
        engine = engine_on(make_store, clock)
        cart: SessionState[list[Line]] = engine.session_state("cart", [])
        size = engine.session_state("size", 0)

        @cart.on_change
        def count(ev: Event, value: list[Line]) -> None:
            ev[size] = sum(line.qty for line in value)
            ev.emit("size", ev[size])

        alice, bob = engine.open_session(), engine.open_session()
        with engine.event(alice) as ev:
            ev[cart].append(Line("milk", 2))
        assert ev.result.outputs == {"size": 2}
        with engine.event(alice) as ev:
            ev[cart][0].qty = 3  # in-place mutation of a stored dataclass
        assert ev.result.outputs == {"size": 3}
        assert cart.get(alice) == [Line("milk", 3)]
        assert cart.get(bob) == []

    def test_values_set_to_none_are_saved(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        note: SessionState[str | None] = engine.session_state("note", "draft")
        banner: GlobalState[str | None] = engine.global_state("banner", "hello")
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[note] = "kept"
        with engine.event(sid) as ev:
            ev[note] = None
        assert ev.result.changed == {"note"}
        assert note.get(sid) is None
        with engine.event(sid) as ev:
            assert ev[note] is None
        banner.set(None)
        assert banner.get() is None
        assert banner.update(lambda old: "back" if old is None else "lost") == "back"

    def test_exception_writes_nothing(self, make_store: StoreFactory, clock: FakeClock) -> None:
        engine = engine_on(make_store, clock)
        cart: SessionState[list[str]] = engine.session_state("cart", ["a"])
        sid = engine.open_session()
        with pytest.raises(RuntimeError), engine.event(sid) as ev:
            ev[cart].append("b")
            raise RuntimeError("handler failed")
        assert cart.get(sid) == ["a"]
        with engine.event(sid) as ev:  # the session (and its lease) was released
            ev[cart].append("c")
        assert cart.get(sid) == ["a", "c"]

    def test_lifetimes_and_callbacks(self, make_store: StoreFactory, clock: FakeClock) -> None:
        engine = engine_on(make_store, clock, capacity=3)
        deleted: list[tuple[Any, str]] = []
        note = engine.session_state(
            "note", "", on_delete=lambda v, r: deleted.append((v, r.value))
        )
        token = engine.session_state(
            "token", "", ttl=10, on_delete=lambda v, r: deleted.append((v, r.value))
        )
        sids = [engine.open_session() for _ in range(3)]
        for i, sid in enumerate(sids):
            with engine.event(sid) as ev:
                ev[note] = f"n{i}"
        with engine.event(sids[1]) as ev:
            ev[token] = "t1"
        clock.advance(10)
        assert token.get(sids[1]) == ""  # expired value is never returned
        engine.close_session(sids[2])
        engine.open_session()  # capacity: the closed session goes first
        clock.advance(61)
        engine.reap()
        assert sorted(deleted) == [
            ("n0", "idle"),
            ("n1", "idle"),
            ("n2", "evicted"),
            ("t1", "ttl"),
        ]
        with pytest.raises(SessionExpired):
            note.get(sids[0])

    def test_reads_keep_a_session_alive_and_never_return_an_expired_value(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)  # idle_ttl 60
        deleted: list[tuple[Any, str]] = []
        note = engine.session_state(
            "note", "", on_delete=lambda v, r: deleted.append((v, r.value))
        )
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[note] = "kept"
        for _ in range(5):
            clock.advance(40)  # past the first deadline: only the reads kept it
            assert note.get(sid) == "kept"
            clock.advance(0.25)  # a read right after another
            assert note.get(sid) == "kept"
        clock.advance(62)
        for _ in range(2):
            with pytest.raises(SessionExpired):
                note.get(sid)
        assert deleted == [("kept", "idle")]  # claimed once, by the first late read
        assert engine.exists(sid) is False

    def test_an_event_sees_the_session_as_it_entered_it(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            engine.close_session(sid)  # the tab closed while the request ran
            assert ev.closed is False
        assert ev.closed is False
        with engine.event(sid) as ev:
            assert ev.closed is True

    def test_malformed_ids_are_refused_on_entering_saying_why(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        cases = {
            "": "1 to 256 characters",
            "x" * 257: "1 to 256 characters",
            "caf\u00e9": "printable ASCII",
            "tab\there": "printable ASCII",
        }
        for sid, why in cases.items():
            event = engine.event(sid)
            with pytest.raises(SessionNotFound, match=why), event:
                pass
        with pytest.raises(SessionNotFound, match="is a str"):
            engine.event(123)  # type: ignore[arg-type]

    def test_a_short_idle_ttl_is_kept_alive_by_frequent_reads(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock, idle_ttl=1)
        note = engine.session_state("note", "")
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[note] = "kept"
        for _ in range(10):
            clock.advance(0.5)
            assert note.get(sid) == "kept"
        clock.advance(1.01)
        with pytest.raises(SessionExpired):
            note.get(sid)

    def test_outputs_are_read_only_and_the_result_keeps_them(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev.emit("a", 1)
        with pytest.raises(TypeError):
            ev.outputs["a"] = 999  # type: ignore[index]
        assert ev.result.outputs == {"a": 1}

    def test_a_session_held_too_long_gives_session_busy(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock, lease_wait=0.2)
        sid = engine.open_session()
        entered, go = threading.Event(), threading.Event()

        def hold() -> None:
            with engine.event(sid):
                entered.set()
                go.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert entered.wait(30)
            with pytest.raises(SessionBusy), engine.event(sid):
                pass
        finally:
            go.set()
            holder.join(30)
        with engine.event(sid):  # the timed-out waiter left nothing behind
            pass
        assert engine.stats().held == 0

    def test_at_capacity_an_open_passes_over_a_session_an_event_holds(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        """A long event (a streamed answer, say) holds its session, which becomes the
        least recently used while other tabs are busy; an open at capacity evicts one
        of those rather than the held one, and the long event commits. Fails on a
        store that evicts the held session (Redis did: the event's commit then failed
        with SessionExpired and its work was lost)."""
        engine = engine_on(make_store, clock, capacity=3)
        note = engine.session_state("note", "")
        evicted: list[str] = []
        note.on_delete(lambda value, reason: evicted.append(value))
        long, *others = [engine.open_session() for _ in range(3)]
        with engine.event(long) as ev:
            for n, sid in enumerate(others):
                clock.advance(2)
                with engine.event(sid) as other:
                    other[note] = f"tab {n}"
            clock.advance(2)
            opened = engine.open_session()  # at capacity: one must go
            ev[note] = "long answer"
        assert note.get(long) == "long answer"
        assert engine.exists(opened)
        assert evicted == ["tab 0"]  # the least recently used of those not held
        assert engine.session_count() == 3

    def test_opens_at_capacity_pass_over_every_held_session_while_others_can_go(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        """Three long events hold the three oldest sessions; three opens in a row at
        capacity evict the three others, oldest first, and never a held one. Fails if
        an open takes a held session while an unheld one is left (Redis did: a handle
        kept the candidates of its last eviction, held ones among them, and on a
        cluster the last round took the third held session)."""
        engine = engine_on(make_store, clock, capacity=6)
        note = engine.session_state("note", "")
        evicted: list[str] = []
        note.on_delete(lambda value, reason: evicted.append(value))
        sids = [engine.open_session() for _ in range(6)]
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(engine.event(sid)) for sid in sids[:3]]
            for n, sid in enumerate(sids[3:]):
                clock.advance(2)
                with engine.event(sid) as other:
                    other[note] = f"free {n}"
            for _ in range(3):
                clock.advance(2)
                engine.open_session()
            for n, ev in enumerate(held):
                ev[note] = f"long {n}"
        assert evicted == ["free 0", "free 1", "free 2"]
        assert [note.get(sid) for sid in sids[:3]] == ["long 0", "long 1", "long 2"]
        assert engine.session_count() == 6

    def test_a_long_event_outlives_opens_that_cycle_every_other_session(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        """While a long event runs, opens at capacity (each session used once) evict
        every other session in turn, and never the held one. Fails if an open takes
        the held session while one opened since can go (Redis did: its handle kept the
        candidates of its last eviction, and when only the held one was left among
        them it took that rather than looking again)."""
        engine = engine_on(make_store, clock, capacity=3)
        note = engine.session_state("note", "")
        long, *others = [engine.open_session() for _ in range(3)]
        for sid in (long, *others):
            clock.advance(1)
            with engine.event(sid) as ev:
                ev[note] = "first"
        with engine.event(long) as ev:
            for n in range(4):
                clock.advance(1)
                with engine.event(engine.open_session()) as new:
                    new[note] = f"new {n}"
            ev[note] = "long answer"
        assert note.get(long) == "long answer"
        assert engine.session_count() == 3

    def test_at_capacity_with_every_session_held_an_open_still_makes_room(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        """When events hold every session, an open at capacity evicts the least
        recently used all the same (a page load is not refused), and that event's
        commit fails with SessionExpired. Fails if the open gives up, evicts the
        session used last, or leaves the app over capacity."""
        engine = engine_on(make_store, clock, capacity=2)
        note = engine.session_state("note", "")
        first, second = engine.open_session(), engine.open_session()
        with pytest.raises(SessionExpired), engine.event(first) as held:
            clock.advance(2)
            with engine.event(second) as later:
                clock.advance(2)
                opened = engine.open_session()
                later[note] = "kept"
            held[note] = "lost"
        assert not engine.exists(first)
        assert note.get(second) == "kept"
        assert engine.exists(opened)
        assert engine.session_count() == 2

    def test_lease_wait_bounds_the_whole_wait_of_an_event(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        other = engine_on(make_store, clock)  # another process, holding the session
        engine = StateEngine(other.store, app="shop", clock=clock, lease_wait=1)
        sid = other.open_session()
        entered, go = threading.Event(), threading.Event()
        waited: dict[str, float] = {}
        started: dict[str, float] = {}

        def hold() -> None:
            with other.event(sid):
                entered.set()
                go.wait(30)

        def wait(name: str) -> None:
            started[name] = time.monotonic()
            with contextlib.suppress(SessionBusy), engine.event(sid):
                pass
            waited[name] = time.monotonic() - started[name]

        def first_waits() -> bool:
            """Whether the first waiter is in the way of the second, and has been for
            0.2 s: queued for the session on the memory store (whose locks the engines
            share), or holding this engine's lock of the session while it polls the
            lease on a shared store. The second then waits about 0.8 s for that lock
            and gets it before its own lease_wait ends; if lease_wait counted only from
            there, it would go on waiting for the lease for 1 s."""
            stats = engine.stats()
            in_the_way = stats.held >= 1 if engine.store.shared else stats.waiting >= 1
            return in_the_way and time.monotonic() - started["first"] >= 0.2

        holder = threading.Thread(target=hold)
        holder.start()
        assert entered.wait(30)
        first = threading.Thread(target=wait, args=("first",))
        first.start()
        assert wait_until(first_waits, timeout=10)
        wait("second")  # waits behind the first in this process, then for the lease
        first.join(30)
        go.set()
        holder.join(30)
        assert waited["second"] < 1.6  # one lease_wait in all, not one per stage

    def test_globals_are_exact_under_threads(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        visitors = engine.global_state("visitors", 0)
        names: GlobalState[list[str]] = engine.global_state("names", [])

        def work(k: int) -> None:
            for i in range(100):
                visitors.increment()
                names.update(lambda v, i=i: [*v, f"{k}-{i}"])  # type: ignore[misc]

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert visitors.get() == 400
        assert len(names.get()) == 400
        assert visitors.increment(0.5) == 400.5

    def test_async_events(self, make_store: StoreFactory, clock: FakeClock) -> None:
        engine = engine_on(make_store, clock)
        log: SessionState[list[int]] = engine.session_state("log", [])
        sid = engine.open_session()

        async def writer(i: int) -> None:
            async with engine.aevent(sid) as ev:
                ev[log].append(i)

        async def main() -> None:
            await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(20))), 30)

        asyncio.run(main())
        assert sorted(log.get(sid)) == list(range(20))


class TestSharedStores:
    def test_values_must_be_storable(self, make_store: StoreFactory, clock: FakeClock) -> None:
        engine = engine_on(make_store, clock)
        holder: SessionState[Any] = engine.session_state("holder", None)
        sid = engine.open_session()
        if not engine.store.shared:
            with engine.event(sid) as ev:
                ev[holder] = object()  # the memory store keeps any copyable object
            return
        with pytest.raises(ValueNotStorable, match=r"'holder'.*object"), engine.event(sid) as ev:
            ev[holder] = object()
        assert holder.get(sid) is None
        with pytest.raises(ValueNotStorable):
            engine.session_state("bad_default", {"when": object()})

    def test_session_opened_in_one_worker_is_used_in_another(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        worker_a = engine_on(make_store, clock)
        worker_b = engine_on(make_store, clock)
        cart_a: SessionState[list[str]] = worker_a.session_state("cart", [])
        cart_b: SessionState[list[str]] = worker_b.session_state("cart", [])
        seen: list[tuple[str, list[str]]] = []
        cart_b.on_remote_change(lambda sid, value: seen.append((sid, value)))
        sid = worker_a.open_session()
        with worker_b.event(sid) as ev:
            ev[cart_b].append("from b")
        with worker_a.event(sid) as ev:
            ev[cart_a].append("from a")
        assert cart_b.get(sid) == ["from b", "from a"]
        assert wait_until(lambda: seen == [(sid, ["from b", "from a"])], timeout=1.0)

    def test_events_of_one_session_in_two_workers_lose_nothing(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        workers = [engine_on(make_store, clock) for _ in range(2)]
        logs: list[SessionState[list[int]]] = [w.session_state("log", []) for w in workers]
        sid = workers[0].open_session()

        def work(k: int) -> None:
            engine, log = workers[k % 2], logs[k % 2]
            for i in range(50):
                with engine.event(sid) as ev:
                    ev[log].append(k * 100 + i)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(logs[0].get(sid)) == sorted(k * 100 + i for k in range(4) for i in range(50))

    def test_expired_session_is_reaped_once_across_workers(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        workers = [engine_on(make_store, clock) for _ in range(4)]
        deleted: list[tuple[str, DeleteReason]] = []
        lock = threading.Lock()

        def record(value: str, reason: DeleteReason) -> None:
            with lock:
                deleted.append((value, reason))

        notes = [w.session_state("note", "", on_delete=record) for w in workers]
        sid = workers[0].open_session()
        with workers[0].event(sid) as ev:
            ev[notes[0]] = "x"
        clock.advance(61)
        start = threading.Barrier(4)

        def reap(w: StateEngine) -> None:
            start.wait()
            w.reap()

        threads = [threading.Thread(target=reap, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert deleted == [("x", DeleteReason.IDLE)]


class TestHardening:
    """Regressions found in review: each failed before its fix."""

    def test_increments_are_exact_for_big_ints_and_floats(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock)
        big = engine.global_state("big", 2**60)
        assert big.increment(1) == 2**60 + 1
        assert big.get() == 2**60 + 1
        sum_ = engine.global_state("sum", 0.1)
        assert sum_.increment(0.2) == 0.1 + 0.2
        half = engine.global_state("half", 0.5)
        assert half.increment(0.5) == 1.0
        assert type(half.get()) is float
        huge = engine.global_state("huge", 2**70)
        assert huge.increment(1) == 2**70 + 1

    def test_a_stored_value_that_no_longer_opens_can_be_overwritten(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        import sys
        import types

        module = types.ModuleType("statekit_test_moved")
        sys.modules["statekit_test_moved"] = module
        exec(
            "import dataclasses\n@dataclasses.dataclass\nclass Old:\n    a: int\n",
            module.__dict__,
        )
        engine = engine_on(make_store, clock)
        holder: SessionState[Any] = engine.session_state("holder", None)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[holder] = [module.Old(1)]
        del sys.modules["statekit_test_moved"]  # a deploy moved the class away
        with engine.event(sid) as ev:
            ev[holder] = ["migrated"]
        assert holder.get(sid) == ["migrated"]

    @pytest.mark.parametrize("sid", ["\ud800abc", "tab\there", "é" * 10])
    def test_odd_session_ids_are_simply_not_found(
        self, make_store: StoreFactory, clock: FakeClock, sid: str
    ) -> None:
        from statekit import SessionNotFound

        engine = engine_on(make_store, clock)
        state = engine.session_state("s", 0)
        assert not engine.exists(sid)
        with pytest.raises(SessionNotFound):
            state.get(sid)
        with pytest.raises(SessionNotFound), engine.event(sid):
            pass

    def test_cancelled_async_events_leave_no_lease_or_late_commit(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        engine = engine_on(make_store, clock, lease_ttl=5, lease_wait=1)
        x = engine.session_state("x", 0)
        sid = engine.open_session()
        failures: list[str] = []

        async def handler() -> None:
            async with engine.aevent(sid) as ev:
                ev[x] += 1

        async def main() -> None:
            for n in range(30):
                task = asyncio.create_task(handler())
                for _ in range(n % 10):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                try:
                    await handler()  # the next request of the session
                except Exception as exc:
                    failures.append(type(exc).__name__)

        asyncio.run(main())
        assert failures == []

    def test_values_claimed_by_a_remote_look_still_get_their_callbacks(
        self, make_store: StoreFactory, clock: FakeClock
    ) -> None:
        deleted: list[tuple[int, str]] = []
        a = engine_on(make_store, clock)
        b = engine_on(make_store, clock)
        a_x = a.session_state("x", 0)
        a.session_state("y", 0, ttl=10, on_delete=lambda v, r: deleted.append((v, r.value)))
        b_x = b.session_state("x", 0)
        b_y = b.session_state("y", 0, ttl=10, on_delete=lambda v, r: deleted.append((v, r.value)))
        seen: list[int] = []
        b_x.on_remote_change(lambda sid, value: seen.append(value))
        sid = a.open_session()
        with a.event(sid) as ev:
            ev[a_x] = 1
        with b.event(sid) as ev:
            ev[b_y] = 42
        clock.advance(11)  # y is due; the next remote look claims it
        with a.event(sid) as ev:
            ev[a_x] = 2
        assert wait_until(lambda: bool(seen) and seen[-1] == 2, timeout=2)
        a.reap()
        b.reap()
        assert deleted == [(42, "ttl")]


def test_stats_count_an_event_waiting_for_another_engines_session(
    make_store: StoreFactory, clock: FakeClock
) -> None:
    """On a shared store, an event waiting for another process's lease holds only
    this engine's lock of the session: it used to count as held, never as waiting."""
    holder_engine = engine_on(make_store, clock)
    engine = engine_on(make_store, clock, lease_wait=30)
    sid = holder_engine.open_session()
    entered, go = threading.Event(), threading.Event()

    def hold() -> None:
        with holder_engine.event(sid):
            entered.set()
            go.wait(30)

    def wait() -> None:
        with engine.event(sid):
            pass

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        assert wait_until(lambda: engine.stats().waiting == 1, timeout=10)
    finally:
        go.set()
        holder.join(30)
        waiter.join(30)
    assert engine.stats().held == engine.stats().waiting == 0
