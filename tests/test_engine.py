"""Sessions and lifetimes of StateEngine, on a FakeClock (no test sleeps)."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Any

import pytest

from statekit import (
    DeleteReason,
    EngineClosed,
    Event,
    InvalidDeclaration,
    MemoryStore,
    SessionExpired,
    SessionNotFound,
    SessionState,
    SQLiteStore,
    StateEngine,
    UsageError,
)
from statekit.testing import FakeClock

from .conftest import declared
from .threads import run_threads


def deletions(engine: StateEngine, name: str = "v", **kw: Any) -> list[tuple[Any, str]]:
    """Declare a session state whose deletions are recorded in the returned list."""
    log: list[tuple[Any, str]] = []
    engine.session_state(name, 0, on_delete=lambda v, r: log.append((v, r.value)), **kw)
    return log


def write(engine: StateEngine, sid: str, name: str, value: Any) -> None:
    state = declared(engine, name)
    with engine.event(sid) as ev:
        ev[state] = value


class TestSessionIds:
    def test_ids_are_random_and_long(self, engine: StateEngine) -> None:
        ids = {engine.open_session() for _ in range(200)}
        assert len(ids) == 200
        assert all(len(sid) >= 32 for sid in ids)  # 24 random bytes, base64

    @pytest.mark.parametrize("forged", ["made-up", "x" * 32, "", "a" * 10_000])
    def test_forged_id_is_refused_and_not_adopted(self, engine: StateEngine, forged: str) -> None:
        state = engine.session_state("s", 0)
        with pytest.raises(SessionNotFound) as info, engine.event(forged) as ev:
            ev[state] = 1
        assert "open_session()" in str(info.value)
        assert engine.session_count() == 0
        assert not engine.exists(forged)

    def test_non_string_id_is_refused(self, engine: StateEngine) -> None:
        with pytest.raises(SessionNotFound, match="a session id is a str, got int"):
            engine.event(123)  # type: ignore[arg-type]

    def test_error_message_does_not_reveal_the_id(self, engine: StateEngine) -> None:
        forged = "secret-token-value-1234567890"
        with pytest.raises(SessionNotFound) as info, engine.event(forged):
            pass
        assert forged not in str(info.value)

    def test_flood_of_forged_ids_evicts_nothing(self, engine: StateEngine) -> None:
        log = deletions(engine)
        real = engine.open_session()
        write(engine, real, "v", 7)
        for i in range(5000):
            with pytest.raises(SessionNotFound), engine.event(f"forged-{i}"):
                pass
        assert engine.exists(real)
        assert declared(engine, "v").get(real) == 7
        assert log == []


class TestIdleExpiry:
    def test_idle_session_expires_and_callbacks_run_once(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log = deletions(engine)
        sid = engine.open_session()
        write(engine, sid, "v", 5)
        clock.advance(61)
        assert engine.reap() == 1
        assert engine.reap() == 0
        assert log == [(5, "idle")]
        with pytest.raises(SessionExpired) as info, engine.event(sid):
            pass
        assert info.value.reason == "idle"
        assert isinstance(info.value, SessionNotFound)

    def test_every_event_slides_the_idle_deadline(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        sid = engine.open_session()
        for _ in range(5):
            clock.advance(50)
            with engine.event(sid):
                pass
        assert engine.reap() == 0
        assert engine.exists(sid)

    def test_peek_also_counts_as_use(self, engine: StateEngine, clock: FakeClock) -> None:
        state = engine.session_state("s", "x")
        sid = engine.open_session()
        clock.advance(50)
        assert state.get(sid) == "x"
        clock.advance(50)
        assert engine.exists(sid)

    def test_peek_past_the_idle_deadline_says_the_session_ended(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        # Fails if a read outside an event answered from a session whose deadline
        # passed but that no reaping removed yet.
        ended: list[str] = []
        engine.on_close(lambda sid, reason: ended.append(reason.value))
        state = engine.session_state("s", "x")
        sid = engine.open_session()
        clock.advance(61)
        with pytest.raises(SessionExpired) as info:
            state.get(sid)
        assert info.value.reason == "idle"
        assert ended == ["idle"]

    def test_a_listener_round_slides_the_deadline_from_now_and_reaping_agrees(
        self, clock: FakeClock
    ) -> None:
        # A listener round of a slow event loads the session again. Fails if that slid
        # its deadline from the event's start: the session then sat behind one used
        # later, and reaping missed it while a look ended it.
        engine = StateEngine(clock=clock, idle_ttl=100)
        count = engine.session_state("count", 0)
        size = engine.session_state("size", 0)
        ended: list[str] = []
        engine.on_close(lambda sid, reason: ended.append(sid))

        @count.on_change
        def follow(ev: Event, value: int) -> None:
            ev[size] = value

        s, x = engine.open_session(), engine.open_session()
        with engine.event(s) as ev:  # enters at 0
            ev[count] += 1
            clock.advance(5)
            count.get(x)  # x used at 5
        clock.advance(96)  # 101
        assert engine.reap() == 0
        assert engine.exists(s)
        assert ended == []
        clock.advance(5)  # 106: both past their deadline (105)
        assert engine.reap() == 2
        assert sorted(ended) == sorted([s, x])

    def test_exists_does_not_count_as_use(self, engine: StateEngine, clock: FakeClock) -> None:
        sid = engine.open_session()
        clock.advance(50)
        assert engine.exists(sid)
        clock.advance(11)
        assert not engine.exists(sid)

    def test_expired_value_is_never_returned_even_before_reaping(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log = deletions(engine)
        sid = engine.open_session()
        write(engine, sid, "v", 9)
        clock.advance(60)  # exactly at the deadline: expired
        with pytest.raises(SessionExpired):
            declared(engine, "v").get(sid)
        assert log == [(9, "idle")]  # claimed on access, callback ran once
        assert engine.reap() == 0
        assert log == [(9, "idle")]

    def test_ordinary_operations_reap_a_bounded_number(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        from statekit._core import REAP_BATCH

        log = deletions(engine)
        for _ in range(3 * REAP_BATCH):
            write(engine, engine.open_session(), "v", 1)
        clock.advance(61)
        engine.open_session()
        assert len(log) == REAP_BATCH
        engine.open_session()
        assert len(log) == 2 * REAP_BATCH
        assert engine.reap() == REAP_BATCH
        assert engine.session_count() == 2

    def test_reap_limit(self, engine: StateEngine, clock: FakeClock) -> None:
        for _ in range(10):
            engine.open_session()
        clock.advance(61)
        assert engine.reap(limit=3) == 3
        assert engine.session_count() == 7
        assert engine.reap() == 7

    def test_a_bad_reap_limit_is_refused_saying_why(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        """A negative limit used to reap nothing without a word, and a limit of another
        type failed on a comparison the caller never wrote."""
        engine.open_session()
        clock.advance(61)
        with pytest.raises(ValueError, match="cannot be negative"):
            engine.reap(limit=-1)
        with pytest.raises(TypeError, match=r"reap\(limit=...\) takes an int or None"):
            engine.reap(limit="5")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="takes an int"):
            asyncio.run(engine.areap(limit=2.5))  # type: ignore[arg-type]
        assert engine.reap(limit=0) == 0  # at most none: none
        assert engine.reap() == 1


class TestClose:
    def test_closed_session_keeps_values_for_the_grace(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log = deletions(engine)
        sid = engine.open_session()
        write(engine, sid, "v", 3)
        assert engine.close_session(sid) is True
        assert engine.close_session(sid) is False
        clock.advance(29)
        assert declared(engine, "v").get(sid) == 3
        with engine.event(sid) as ev:  # a late request of the closing tab is served
            assert ev.closed
        clock.advance(1)
        assert engine.reap() == 1
        assert log == [(3, "closed")]
        with pytest.raises(SessionExpired) as info, engine.event(sid):
            pass
        assert info.value.reason == "closed"

    def test_events_do_not_extend_a_closed_session(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        sid = engine.open_session()
        engine.close_session(sid)
        clock.advance(20)
        with engine.event(sid):
            pass
        clock.advance(10)
        assert not engine.exists(sid)

    def test_close_runs_session_end_hooks_once(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        ended: list[tuple[str, str]] = []
        engine.on_close(lambda sid, reason: ended.append((sid, reason.value)))
        sid = engine.open_session()
        engine.close_session(sid)
        engine.close_session(sid)
        clock.advance(31)
        engine.reap()
        assert ended == [(sid, "closed")]

    def test_close_of_forged_id_raises(self, engine: StateEngine) -> None:
        with pytest.raises(SessionNotFound):
            engine.close_session("forged")

    def test_close_of_expired_session_is_quiet(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log = deletions(engine)
        sid = engine.open_session()
        write(engine, sid, "v", 1)
        clock.advance(61)
        assert engine.close_session(sid) is False
        assert log == [(1, "idle")]
        assert engine.close_session(sid) is False


class TestCapacity:
    def test_opening_past_capacity_evicts_lru_with_reason(self, clock: FakeClock) -> None:
        engine = StateEngine(clock=clock, capacity=3)
        ended: list[tuple[str, str]] = []
        engine.on_close(lambda sid, reason: ended.append((sid, reason.value)))
        log = deletions(engine)
        a, b, c = (engine.open_session() for _ in range(3))
        for sid, value in ((a, "a"), (b, "b"), (c, "c")):
            write(engine, sid, "v", value)
        write(engine, a, "v", "a2")  # b is now the least recently used
        d = engine.open_session()
        assert log == [("b", "evicted")]
        assert ended == [(b, "evicted")]
        assert engine.session_count() == 3
        assert all(engine.exists(s) for s in (a, c, d))
        with pytest.raises(SessionExpired) as info, engine.event(b):
            pass
        assert info.value.reason == "evicted"

    def test_a_read_outside_an_event_makes_its_session_the_most_recently_used(
        self, clock: FakeClock
    ) -> None:
        # Fails if the read slid the session's deadline without moving it to the end of
        # the capacity order: the session read last would then be the one evicted.
        engine = StateEngine(clock=clock, capacity=2)
        state = engine.session_state("v", 0)
        a, b = engine.open_session(), engine.open_session()
        assert state.get(a) == 0  # b is now the least recently used
        engine.open_session()
        assert engine.exists(a)
        assert not engine.exists(b)


class TestValueTtl:
    def test_value_ttl_deletes_value_and_read_starts_from_default(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log: list[tuple[Any, str]] = []
        token = engine.session_state(
            "token", "none", ttl=10, on_delete=lambda v, r: log.append((v, r.value))
        )
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[token] = "abc"
        clock.advance(9)
        assert token.get(sid) == "abc"
        with engine.event(sid) as ev:
            ev[token] = "def"  # a write restarts the ttl
        clock.advance(9)
        assert token.get(sid) == "def"
        clock.advance(1)
        assert token.get(sid) == "none"
        assert log == [("def", "ttl")]
        assert engine.reap() == 0
        assert engine.exists(sid)

    def test_value_ttl_is_reaped_without_access(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log: list[tuple[Any, str]] = []
        token = engine.session_state("token", 0, ttl=5, on_delete=lambda v, r: log.append((v, r)))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[token] = 1
        clock.advance(5)
        assert engine.reap() == 1
        assert log == [(1, DeleteReason.TTL)]

    def test_reads_do_not_restart_the_ttl(self, engine: StateEngine, clock: FakeClock) -> None:
        token = engine.session_state("token", 0, ttl=10)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[token] = 1
        clock.advance(6)
        with engine.event(sid) as ev:
            assert ev[token] == 1
        clock.advance(4)
        assert token.get(sid) == 0

    def test_a_values_ttl_runs_from_its_commit_and_reaping_agrees_with_reads(
        self, clock: FakeClock
    ) -> None:
        # A slow event commits after a quick one that entered later. Fails if the slow
        # one's value expires from its event's start: queued behind the quick one's
        # later deadline, reaping then missed it while a read removed it.
        engine = StateEngine(clock=clock, idle_ttl=3600)
        deleted: list[str] = []
        token = engine.session_state(
            "token", "", ttl=10, on_delete=lambda value, reason: deleted.append(value)
        )
        a, b = engine.open_session(), engine.open_session()
        with engine.event(a) as slow:  # enters at 0
            slow[token] = "a"
            clock.advance(5)
            with engine.event(b) as quick:  # enters and commits at 5
                quick[token] = "b"
        # Both written at 5: both expire at 15.
        clock.advance(5.5)
        assert engine.reap() == 0
        assert (token.get(a), token.get(b), deleted) == ("a", "b", [])
        clock.advance(5)
        assert engine.reap() == 2
        assert sorted(deleted) == ["a", "b"]


class TestCallbacks:
    def test_raising_callback_is_logged_and_reaping_goes_on(
        self, engine: StateEngine, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        seen: list[Any] = []

        def bad(value: Any, reason: DeleteReason) -> None:
            seen.append(value)
            raise RuntimeError("boom")

        state = engine.session_state("v", 0, on_delete=bad)
        state.on_delete(lambda v, r: seen.append(("second", v)))
        for i in range(20):
            write(engine, engine.open_session(), "v", i)
        clock.advance(61)
        with caplog.at_level(logging.ERROR, logger="statekit"):
            assert engine.reap() == 20
        assert sorted(v for v in seen if isinstance(v, int)) == list(range(20))
        assert len([v for v in seen if isinstance(v, tuple)]) == 20
        assert sum("on_delete callback" in r.message for r in caplog.records) == 20
        # the engine still works
        sid = engine.open_session()
        write(engine, sid, "v", 1)
        assert state.get(sid) == 1

    def test_values_never_materialized_have_no_callback(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        log = deletions(engine)
        engine.open_session()
        clock.advance(61)
        engine.reap()
        assert log == []


class TestShutdown:
    def test_shutdown_runs_every_callback_once_and_closes(self, clock: FakeClock) -> None:
        engine = StateEngine(clock=clock)
        log = deletions(engine)
        ended: list[str] = []
        engine.on_close(lambda sid, reason: ended.append(reason.value))
        a, b = engine.open_session(), engine.open_session()
        write(engine, a, "v", "a")
        write(engine, b, "v", "b")
        engine.close_session(b)
        engine.shutdown()
        engine.shutdown()
        assert sorted(log) == [("a", "shutdown"), ("b", "shutdown")]
        assert ended == ["closed", "shutdown"]
        with pytest.raises(EngineClosed):
            engine.open_session()
        with pytest.raises(EngineClosed), engine.event(a):
            pass

    @pytest.mark.parametrize("store", ["memory", "sqlite"])
    def test_after_shutdown_even_the_questions_raise(
        self, store: str, tmp_path: pathlib.Path
    ) -> None:
        # Fails if exists() or session_count() answer after a shutdown: on the memory
        # store "no" and 0, which a host reads as "the session ended"; on SQLite the
        # live answers of a store the engine no longer serves. (stats() answers, with
        # the figures the engine ended with: test_operations.)
        engine = StateEngine(SQLiteStore(tmp_path / "s.db") if store == "sqlite" else None)
        sid = engine.open_session()
        engine.shutdown()
        for ask in (lambda: engine.exists(sid), engine.session_count):
            with pytest.raises(EngineClosed):
                ask()
        for aask in (lambda: engine.aexists(sid), engine.asession_count):
            with pytest.raises(EngineClosed):
                asyncio.run(aask())

    def test_context_manager_shuts_down(self) -> None:
        with StateEngine() as engine:
            engine.open_session()
        with pytest.raises(EngineClosed):
            engine.open_session()


class TestConfiguration:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"idle_ttl": 0},
            {"closed_ttl": -1},
            {"idle_ttl": float("inf")},
            {"idle_ttl": "60"},
            {"capacity": 0},
            {"capacity": 1.5},
            {"capacity": True},
            {"app": "has space"},
            {"app": ""},
        ],
    )
    def test_bad_settings_are_refused(self, kwargs: dict[str, Any]) -> None:
        with pytest.raises(InvalidDeclaration):
            StateEngine(**kwargs)

    def test_engines_on_one_store_with_different_apps_are_separate(self) -> None:
        store = MemoryStore()
        one = StateEngine(store, app="one")
        two = StateEngine(store, app="two")
        sid = one.open_session()
        assert not two.exists(sid)
        assert two.session_count() == 0

    def test_engines_with_the_same_app_share_state(self) -> None:
        store = MemoryStore()
        one = StateEngine(store, app="shop")
        two = StateEngine(store, app="shop")
        counter_one = one.global_state("n", 0)
        counter_two = two.global_state("n", 0)
        counter_one.increment(2)
        assert counter_two.get() == 2
        assert two.exists(one.open_session())

    def test_default_clock_follows_the_store(self) -> None:
        import time

        class Shared(MemoryStore):
            shared = True

        assert StateEngine().clock is time.monotonic
        assert StateEngine(Shared()).clock is time.time


def test_calls_racing_a_shutdown_say_the_engine_closed(clock: FakeClock) -> None:
    """An event passed its own check that the engine is open when another thread shuts
    the engine down, emptying the store: the event must say the engine closed, not
    that the session is unknown."""
    engines: list[StateEngine] = []

    class Racing(MemoryStore):
        def namespace(self, app: str) -> Any:
            ns = super().namespace(app)

            class ShutDownWhileEntering:
                def __getattr__(self, name: str) -> Any:
                    return getattr(ns, name)

                def enter(self, *args: Any) -> Any:
                    engines[0].shutdown()  # ... another thread, right now
                    return ns.enter(*args)

            return ShutDownWhileEntering()

    engine = StateEngine(Racing(), clock=clock)
    engines.append(engine)
    sid = engine.open_session()
    with pytest.raises(EngineClosed), engine.event(sid):
        pass


def test_an_id_already_stored_is_drawn_again(
    engine: StateEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ids are random, so a clash means a broken random source: the engine draws again
    rather than failing the page load or reusing a session."""
    import secrets

    taken = engine.open_session()
    ids = iter([taken, "fresh" + "x" * 27])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(ids))
    assert engine.open_session() == "fresh" + "x" * 27
    assert engine.session_count() == 2


#: What a store offers beyond the StoreNamespace protocol to be entered directly.
ENTERING_ONLY = frozenset(
    {
        "enter",
        "wait_turn",
        "await_turn",
        "enter_after_wait",
        "give_back",
        "leave",
        "release_entered",
        "occupancy",
        "entered_type",
    }
)


@pytest.mark.parametrize("way", ["entered directly", "locks and leases"])
def test_a_store_of_ones_own_may_offer_either_way_into_a_session(
    clock: FakeClock, way: str
) -> None:
    """The engine picks its way into sessions by the store's protocol, not its class: a
    namespace offering EnteringNamespace is entered directly, any other through this
    engine's locks and a lease. Both keep the same promises."""
    from statekit.stores.base import EnteringNamespace

    class Own(MemoryStore):
        def namespace(self, app: str) -> Any:
            ns = super().namespace(app)
            if way == "entered directly":
                return ns

            class OnlyTheStoreProtocol:
                def __getattr__(self, name: str) -> Any:
                    if name in ENTERING_ONLY:
                        raise AttributeError(name)
                    return getattr(ns, name)

            return OnlyTheStoreProtocol()

    store = Own()
    assert isinstance(store.namespace("probe"), EnteringNamespace) is (way == "entered directly")
    engine = StateEngine(store, clock=clock)
    log: SessionState[list[int]] = engine.session_state("log", [])
    size = engine.session_state("size", 0)

    @log.on_change
    def count(ev: Event, value: list[int]) -> None:
        ev[size] = len(value)

    sid = engine.open_session()

    def work(k: int) -> None:
        for i in range(50):
            with engine.event(sid) as ev:
                ev[log].append(k * 100 + i)

    run_threads(work, 4)
    assert sorted(log.get(sid)) == sorted(k * 100 + i for k in range(4) for i in range(50))
    assert size.get(sid) == 200  # listener rounds ran after every commit
    with engine.event(sid), pytest.raises(UsageError, match="cannot nest"), engine.event(sid):
        pass
    assert engine.stats().held == 0
    engine.shutdown()
