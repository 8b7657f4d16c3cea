"""SessionRegistry: per-session objects that cannot be copied, and the open/close
lifecycle (engine.on_open / engine.on_close).

Two engines on one store and app stand for two worker processes. Every wait is
bounded; lifetimes move with a FakeClock, never with sleeps."""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import logging
import random
import threading
import time
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from statekit import (
    DeleteReason,
    EngineClosed,
    InvalidDeclaration,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    SessionRegistry,
    StateEngine,
    StateNotCopyable,
    UsageError,
    WrongEngine,
)
from statekit.stores.base import Notice
from statekit.testing import FakeClock

from .conftest import StoreFactory, Switchboard
from .threads import THREADS, run_threads, wait_until


class NonDeepCopyable:
    """The guide's object: a counter guarded by a lock, which cannot be deep-copied."""

    def __init__(self) -> None:
        from threading import Lock

        self.counter = 0
        self.lock = Lock()  # Lock objects cannot be deepcopied

    def increment(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


class Tracked:
    """An object whose making and cleanup a test counts; weak-referenceable."""

    serials = itertools.count(1)

    def __init__(self, sid: str) -> None:
        self.sid = sid
        self.serial = next(self.serials)
        self.lock = threading.Lock()
        self.count = 0

    def increment(self) -> int:
        with self.lock:
            self.count += 1
            return self.count


class Ledger:
    """Counts factory calls and cleanups, per object, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.made: list[int] = []
        self.cleaned: collections.Counter[int] = collections.Counter()
        self.refs: list[weakref.ref[Tracked]] = []

    def factory(self, sid: str) -> Tracked:
        obj = Tracked(sid)
        with self.lock:
            self.made.append(obj.serial)
            self.refs.append(weakref.ref(obj))
        return obj

    def cleanup(self, obj: Tracked) -> None:
        with self.lock:
            self.cleaned[obj.serial] += 1

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.refs)

    def assert_each_cleaned_once(self) -> None:
        assert len(self.made) == len(set(self.made))
        assert set(self.cleaned) == set(self.made)
        assert set(self.cleaned.values()) <= {1}


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def registry(engine: StateEngine, ledger: Ledger) -> SessionRegistry[Tracked]:
    return engine.registry("things", ledger.factory, ledger.cleanup)


# -- the guide's example --------------------------------------------------------


class TestGuideCounter:
    """The guide's non-copyable counter, with statekit: the registry replaces the global
    dictionary, on_open the load event and on_close/close_session the close event."""

    def build(self, engine: StateEngine) -> SessionRegistry[NonDeepCopyable]:
        counters = engine.registry("counter", lambda sid: NonDeepCopyable())
        engine.on_open(counters.open)  # demo.load(initialize_instance)
        return counters

    def increment_counter(
        self, engine: StateEngine, counters: SessionRegistry[NonDeepCopyable], sid: str
    ) -> int:
        with engine.event(sid) as ev:
            return ev[counters].increment()

    def test_a_session_state_cannot_hold_it(self, engine: StateEngine) -> None:
        with pytest.raises(StateNotCopyable, match=r"registry"):
            engine.session_state("counter", NonDeepCopyable())

    def test_each_session_counts_on_its_own_object(self, engine: StateEngine) -> None:
        counters = self.build(engine)
        alice, bob = engine.open_session(), engine.open_session()
        assert [self.increment_counter(engine, counters, alice) for _ in range(3)] == [1, 2, 3]
        assert self.increment_counter(engine, counters, bob) == 1
        assert counters.get(alice).counter == 3
        assert counters.get(alice) is not counters.get(bob)

    def test_increments_from_8_threads_are_exact(self, engine: StateEngine) -> None:
        counters = self.build(engine)
        sid = engine.open_session()

        def click(k: int) -> None:
            for _ in range(200):
                counters.get(sid).increment()  # the object guards itself

        run_threads(click)
        assert counters.get(sid).counter == THREADS * 200

    def test_session_not_initialized(self, engine: StateEngine) -> None:
        counters = engine.registry("counter", lambda sid: NonDeepCopyable())  # no load hook
        sid = engine.open_session()
        with pytest.raises(SessionNotInitialized) as info, engine.event(sid) as ev:
            ev[counters].increment()
        message = str(info.value)
        assert "registry.open(sid) on page load" in message
        assert sid not in message  # ids are secrets
        assert isinstance(info.value, KeyError)
        assert info.value.registry == "counter"
        assert info.value.sid == sid
        with pytest.raises(SessionNotInitialized):
            counters.get(sid)
        counters.open(sid)  # the page-load step that was missing
        assert self.increment_counter(engine, counters, sid) == 1

    def test_closing_the_tab_cleans_up(self, engine: StateEngine) -> None:
        closed: list[tuple[str, str]] = []
        counters = engine.registry(
            "counter",
            lambda sid: NonDeepCopyable(),
            cleanup=lambda obj: closed.append(("cleanup", str(obj.counter))),
        )
        engine.on_open(counters.open)
        engine.on_close(lambda sid, reason: closed.append(("on_close", reason.value)))
        sid = engine.open_session()
        self.increment_counter(engine, counters, sid)
        engine.close_session(sid)  # demo.close(cleanup_instance)
        assert sorted(closed) == [("cleanup", "1"), ("on_close", "closed")]
        assert sid not in counters
        # A late request from the closing tab is served, but the object is gone.
        with pytest.raises(SessionNotInitialized, match="was closed"), engine.event(sid) as ev:
            ev[counters]


def test_registry_page_runs() -> None:
    """The example of docs/registry.md runs and says what the page says."""
    page = Path(__file__).resolve().parent.parent / "docs" / "registry.md"
    code = page.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "registry_page"}
    exec(compile(code, str(page), "exec"), namespace)  # its asserts check the outcomes
    engine: StateEngine = namespace["engine"]
    instances: SessionRegistry[Any] = namespace["instances"]
    engine.on_open(instances.open)  # the page's alternative to initialize_instance
    sid = engine.open_session()
    assert namespace["increment_counter"](sid) == 1
    engine.shutdown()
    assert len(instances) == 0


# -- open, get, close -----------------------------------------------------------


class TestOpenGetClose:
    def test_second_open_returns_the_same_object(
        self, engine: StateEngine, registry: SessionRegistry[Tracked], ledger: Ledger
    ) -> None:
        sid = engine.open_session()
        first = registry.open(sid)
        assert registry.open(sid) is first
        assert registry.get(sid) is first
        assert first.sid == sid
        assert ledger.made == [first.serial]
        assert len(registry) == 1
        assert sid in registry

    def test_forged_and_ended_ids_never_make_objects(
        self,
        engine: StateEngine,
        registry: SessionRegistry[Tracked],
        ledger: Ledger,
        clock: FakeClock,
    ) -> None:
        with pytest.raises(SessionNotFound):
            registry.open("forged-id")
        with pytest.raises(SessionNotFound):
            registry.open(12345)  # type: ignore[arg-type]
        expired = engine.open_session()
        clock.advance(61)
        with pytest.raises(SessionExpired) as info:
            registry.open(expired)
        assert info.value.reason == "idle"
        closed = engine.open_session()
        engine.close_session(closed)
        with pytest.raises(SessionExpired) as info:
            registry.open(closed)  # its close hooks ran already
        assert info.value.reason == "closed"
        assert ledger.made == []
        assert len(registry) == 0

    def test_open_counts_as_use(
        self, engine: StateEngine, registry: SessionRegistry[Tracked], clock: FakeClock
    ) -> None:
        sid = engine.open_session()
        clock.advance(50)
        registry.open(sid)
        clock.advance(50)
        assert engine.exists(sid)

    def test_close_cleans_up_once_and_keeps_the_session(
        self, engine: StateEngine, registry: SessionRegistry[Tracked], ledger: Ledger
    ) -> None:
        sid = engine.open_session()
        first = registry.open(sid)
        assert registry.close(sid) is True
        assert registry.close(sid) is False
        assert registry.close("never-opened") is False
        assert ledger.cleaned == {first.serial: 1}
        with pytest.raises(SessionNotInitialized):
            registry.get(sid)
        assert engine.exists(sid)
        second = registry.open(sid)  # a new object for the same session
        assert second is not first
        engine.close_session(sid)
        ledger.assert_each_cleaned_once()

    def test_failing_factory_keeps_nothing(self, engine: StateEngine) -> None:
        calls = itertools.count()

        def factory(sid: str) -> int:
            if next(calls) == 0:
                raise ConnectionError("model server down")
            return 42

        things = engine.registry("things", factory)
        sid = engine.open_session()
        with pytest.raises(ConnectionError):
            things.open(sid)
        assert sid not in things
        assert things.open(sid) == 42
        assert things._flights == {}

    def test_none_is_a_valid_object(self, engine: StateEngine) -> None:
        cleaned: list[object] = []
        nothing = engine.registry("nothing", lambda sid: None, cleaned.append)
        sid = engine.open_session()
        assert nothing.open(sid) is None
        with engine.event(sid) as ev:
            assert ev[nothing] is None
        engine.close_session(sid)
        assert cleaned == [None]

    def test_declarations_are_checked(self, engine: StateEngine) -> None:
        engine.registry("models", lambda sid: object())
        with pytest.raises(InvalidDeclaration, match="already declared"):
            engine.registry("models", lambda sid: object())
        with pytest.raises(InvalidDeclaration, match="not valid"):
            engine.registry("bad name!", lambda sid: object())
        with pytest.raises(InvalidDeclaration, match="factory"):
            engine.registry("x", "not callable")  # type: ignore[call-overload]
        with pytest.raises(InvalidDeclaration, match="cleanup"):
            engine.registry("y", lambda sid: 1, cleanup=3)  # type: ignore[call-overload]

    def test_event_rules(self, engine: StateEngine, registry: SessionRegistry[Tracked]) -> None:
        other = StateEngine()
        foreign = other.registry("things", lambda sid: object())
        sid = engine.open_session()
        registry.open(sid)
        with engine.event(sid) as ev:
            assert ev[registry] is registry.get(sid)
            assert ev.get(registry) is registry.get(sid)
            with pytest.raises(UsageError, match="cannot be assigned"):
                ev[registry] = Tracked(sid)  # type: ignore[index]
            with pytest.raises(WrongEngine):
                ev[foreign]
        with pytest.raises(UsageError, match="not open"):
            ev[registry]
        other.shutdown()

    def test_repr_hides_objects_and_ids(
        self, engine: StateEngine, registry: SessionRegistry[Tracked]
    ) -> None:
        sid = engine.open_session()
        registry.open(sid)
        assert repr(registry) == "SessionRegistry('things', app='app', objects=1)"
        assert registry.engine is engine


class TestHooks:
    def test_on_open_runs_after_open_session_and_errors_are_logged(
        self, engine: StateEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        opened: list[str] = []

        @engine.on_open
        def broken(sid: str) -> None:
            raise RuntimeError("hook bug")

        engine.on_open(opened.append)
        with caplog.at_level(logging.ERROR, logger="statekit"):
            sid = engine.open_session()
        assert opened == [sid]
        assert "session-open hook" in caplog.text
        assert engine.exists(sid)

    def test_on_close_runs_once_with_the_reason(
        self, engine: StateEngine, clock: FakeClock
    ) -> None:
        closed: list[tuple[str, DeleteReason]] = []
        engine.on_close(lambda sid, reason: closed.append((sid, reason)))
        a, b = engine.open_session(), engine.open_session()
        engine.close_session(a)
        engine.close_session(a)
        clock.advance(61)
        engine.reap()
        assert closed == [(a, DeleteReason.CLOSED), (b, DeleteReason.IDLE)]

    def test_hooks_must_be_plain_callables(self, engine: StateEngine) -> None:
        async def async_hook(sid: str) -> None: ...

        with pytest.raises(InvalidDeclaration, match="async"):
            engine.on_open(async_hook)
        with pytest.raises(InvalidDeclaration):
            engine.on_close(42)  # type: ignore[arg-type]


# -- cleanup exactly once ---------------------------------------------------------


class TestCleanupOnEveryEnd:
    def test_close_session(
        self,
        engine: StateEngine,
        registry: SessionRegistry[Tracked],
        ledger: Ledger,
        clock: FakeClock,
    ) -> None:
        sid = engine.open_session()
        obj = registry.open(sid)
        engine.close_session(sid)
        assert ledger.cleaned == {obj.serial: 1}
        clock.advance(31)  # the closed grace ends: nothing runs twice
        engine.reap()
        engine.shutdown()
        assert ledger.cleaned == {obj.serial: 1}

    def test_idle_expiry_by_the_reaper(
        self,
        engine: StateEngine,
        registry: SessionRegistry[Tracked],
        ledger: Ledger,
        clock: FakeClock,
    ) -> None:
        sid = engine.open_session()
        obj = registry.open(sid)
        clock.advance(61)
        assert engine.reap() == 1
        assert ledger.cleaned == {obj.serial: 1}
        assert sid not in registry

    def test_idle_expiry_found_on_access(
        self,
        engine: StateEngine,
        registry: SessionRegistry[Tracked],
        ledger: Ledger,
        clock: FakeClock,
    ) -> None:
        sid = engine.open_session()
        obj = registry.open(sid)
        clock.advance(61)
        with pytest.raises(SessionExpired), engine.event(sid):
            pass
        assert ledger.cleaned == {obj.serial: 1}

    def test_capacity_eviction(self, clock: FakeClock, ledger: Ledger) -> None:
        engine = StateEngine(clock=clock, capacity=2)
        registry = engine.registry("things", ledger.factory, ledger.cleanup)
        engine.on_open(registry.open)
        a, b = engine.open_session(), engine.open_session()
        with engine.event(a) as ev:  # b is now the least recently used
            ev[registry].increment()
        engine.open_session()
        assert list(ledger.cleaned) == [ledger.made[1]]
        assert b not in registry
        assert a in registry
        engine.shutdown()
        ledger.assert_each_cleaned_once()
        assert len(ledger.cleaned) == 3

    def test_shutdown(
        self, engine: StateEngine, registry: SessionRegistry[Tracked], ledger: Ledger
    ) -> None:
        for _ in range(3):
            registry.open(engine.open_session())
        engine.shutdown()
        engine.shutdown()
        assert len(ledger.cleaned) == 3
        ledger.assert_each_cleaned_once()
        assert ledger.alive() == 0
        with pytest.raises(EngineClosed):
            registry.open("any")
        with pytest.raises(EngineClosed):
            registry.get("any")
        with pytest.raises(EngineClosed):
            engine.registry("late", lambda sid: 1)

    def test_failing_cleanup_is_logged_and_never_stops_the_others(
        self, engine: StateEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        cleaned: list[int] = []

        def cleanup(n: int) -> None:
            if n == 1:
                raise OSError("socket already closed")
            cleaned.append(n)

        numbers = iter(range(3))
        things = engine.registry("things", lambda sid: next(numbers), cleanup)
        sids = [engine.open_session() for _ in range(3)]
        for sid in sids:
            things.open(sid)
        with caplog.at_level(logging.ERROR, logger="statekit"):
            assert things.close(sids[1]) is True  # logged, not raised
            engine.shutdown()
        assert sorted(cleaned) == [0, 2]
        assert "cleanup" in caplog.text
        assert "'things'" in caplog.text
        assert sids[1] not in caplog.text


# -- threads ---------------------------------------------------------------------


class TestThreads:
    def test_1000_sessions_from_8_threads_each_object_cleaned_once(
        self, clock: FakeClock, ledger: Ledger
    ) -> None:
        engine = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=2000)
        registry = engine.registry("things", ledger.factory, ledger.cleanup)
        sids: list[str] = []
        sids_lock = threading.Lock()
        opened = threading.Barrier(THREADS)

        def work(k: int) -> None:
            rng = random.Random(k)
            for _ in range(125):  # page loads
                sid = engine.open_session()
                registry.open(sid)
                with sids_lock:
                    sids.append(sid)
            opened.wait()
            order = list(sids)
            rng.shuffle(order)
            for sid in order:  # every thread works on every session, in its own order
                action = rng.randrange(5)
                try:
                    if action == 0:
                        registry.open(sid)
                    elif action == 1:
                        with engine.event(sid) as ev:
                            ev[registry].increment()
                    elif action == 2:
                        registry.close(sid)
                    elif action == 3:
                        engine.close_session(sid)
                    else:
                        registry.get(sid).increment()
                except (SessionExpired, SessionNotInitialized):
                    pass  # another thread closed it first

        run_threads(work)
        assert len(sids) == 1000
        engine.shutdown()
        assert len(registry) == 0
        assert registry._flights == {}
        assert len(ledger.made) >= 1000
        ledger.assert_each_cleaned_once()
        assert ledger.alive() == 0

    @pytest.mark.parametrize("attempt", range(5))
    def test_racing_ends_clean_up_each_object_once(self, clock: FakeClock, attempt: int) -> None:
        ledger = Ledger()
        engine = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=250)
        registry = engine.registry("things", ledger.factory, ledger.cleanup)
        sids = [engine.open_session() for _ in range(200)]
        for sid in sids:
            registry.open(sid)

        def end(k: int) -> None:
            try:
                if k == 0:
                    for sid in sids:
                        engine.close_session(sid)
                elif k == 1:
                    for sid in reversed(sids):
                        registry.close(sid)
                elif k == 2:
                    clock.advance(61)  # every session is now past its idle deadline
                    engine.reap()
                elif k == 3:
                    for _ in range(100):  # capacity evicts the oldest sessions
                        engine.open_session()
                elif k == 4:
                    engine.shutdown()
                else:
                    for sid in sids:
                        with engine.event(sid):
                            pass
            except (SessionExpired, EngineClosed):
                pass

        run_threads(end, n=6)
        engine.shutdown()
        assert len(ledger.made) == 200
        ledger.assert_each_cleaned_once()
        assert len(ledger.cleaned) == 200
        assert ledger.alive() == 0

    def test_concurrent_opens_keep_one_object_and_clean_up_the_extra(
        self, engine: StateEngine, ledger: Ledger
    ) -> None:
        both_inside = threading.Barrier(2, timeout=10)

        def factory(sid: str) -> Tracked:
            obj = ledger.factory(sid)
            # Both factories run at once: no lock of the engine or registry is held.
            both_inside.wait()
            with engine.event(sid):
                pass
            return obj

        registry = engine.registry("things", factory, ledger.cleanup)
        sid = engine.open_session()
        got: list[Tracked] = []

        def open_it(k: int) -> None:
            got.append(registry.open(sid))

        run_threads(open_it, n=2)
        assert got[0] is got[1]
        assert len(ledger.made) == 2
        kept = got[0].serial
        assert list(ledger.cleaned) == [s for s in ledger.made if s != kept]
        engine.close_session(sid)
        ledger.assert_each_cleaned_once()

    @pytest.mark.parametrize("ending", ["close_session", "shutdown"])
    def test_session_ending_while_the_factory_runs_keeps_nothing(
        self, engine: StateEngine, ledger: Ledger, ending: str
    ) -> None:
        entered, release = threading.Event(), threading.Event()

        def slow_factory(sid: str) -> Tracked:
            entered.set()
            assert release.wait(10)
            return ledger.factory(sid)

        registry = engine.registry("things", slow_factory, ledger.cleanup)
        sid = engine.open_session()
        errors: list[BaseException] = []

        def open_it() -> None:
            try:
                registry.open(sid)
            except BaseException as exc:
                errors.append(exc)

        opener = threading.Thread(target=open_it)
        opener.start()
        assert entered.wait(10)
        if ending == "close_session":
            engine.close_session(sid)
        else:
            engine.shutdown()
        release.set()
        opener.join(10)
        assert not opener.is_alive()
        expected = SessionExpired if ending == "close_session" else EngineClosed
        assert len(errors) == 1
        assert isinstance(errors[0], expected)
        assert len(registry) == 0
        ledger.assert_each_cleaned_once()
        assert len(ledger.cleaned) == 1


# -- async -----------------------------------------------------------------------


class AsyncLedger(Ledger):
    async def afactory(self, sid: str) -> Tracked:
        await asyncio.sleep(0)
        return self.factory(sid)

    async def acleanup(self, obj: Tracked) -> None:
        await asyncio.sleep(0)
        self.cleanup(obj)


async def until(predicate: Callable[[], bool]) -> None:
    """Let the running loop work until ``predicate`` holds (bounded)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not reached")


class TestAsync:
    def test_aopen_and_aclose_await_async_factory_and_cleanup(self, engine: StateEngine) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.afactory, ledger.acleanup)
        sid = engine.open_session()

        async def main() -> None:
            first = await conns.aopen(sid)
            assert await conns.aopen(sid) is first
            async with engine.aevent(sid) as ev:
                assert ev[conns] is first
            assert await conns.aclose(sid) is True
            assert await conns.aclose(sid) is False
            assert ledger.cleaned == {first.serial: 1}
            with pytest.raises(SessionNotFound):
                await conns.aopen("forged-id")

        asyncio.run(main())

    def test_a_task_can_be_the_object(self, engine: StateEngine) -> None:
        """Only coroutines are awaited: a per-session background task is kept as is."""
        ticks: list[str] = []

        async def ticker(sid: str) -> None:
            while True:
                ticks.append(sid)
                await asyncio.sleep(0.001)

        tickers: SessionRegistry[asyncio.Task[None]] = engine.registry(
            "ticker",
            lambda sid: asyncio.get_running_loop().create_task(ticker(sid)),
            cleanup=lambda task: task.cancel(),
        )

        async def main() -> None:
            sid = engine.open_session()
            task = await tickers.aopen(sid)
            assert isinstance(task, asyncio.Task)
            await until(lambda: len(ticks) >= 2)
            assert not task.done()
            engine.close_session(sid)
            await until(task.done)
            assert task.cancelled()

        asyncio.run(main())

    def test_sync_open_of_an_async_factory_says_to_use_aopen(self, engine: StateEngine) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.afactory, ledger.acleanup)
        hidden = engine.registry("hidden", lambda sid: ledger.afactory(sid))
        sid = engine.open_session()
        with pytest.raises(UsageError, match="aopen"):
            conns.open(sid)
        with pytest.raises(UsageError, match="aopen"):
            hidden.open(sid)  # the coroutine is closed, never left unawaited
        assert ledger.made == []
        assert hidden._flights == {}

    def test_concurrent_aopens_keep_one_object(self, engine: StateEngine) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.afactory, ledger.acleanup)
        sid = engine.open_session()

        async def main() -> list[Tracked]:
            return list(await asyncio.gather(*(conns.aopen(sid) for _ in range(5))))

        got = asyncio.run(main())
        assert all(obj is got[0] for obj in got)
        assert len(ledger.cleaned) == len(ledger.made) - 1
        assert got[0].serial not in ledger.cleaned

    def test_async_cleanup_from_sync_code_in_the_loop_runs_as_a_task(
        self, engine: StateEngine
    ) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.afactory, ledger.acleanup)

        async def main() -> None:
            sid = engine.open_session()
            obj = await conns.aopen(sid)
            engine.close_session(sid)  # sync, in the loop's thread: must not block it
            await until(lambda: ledger.cleaned == {obj.serial: 1})

        asyncio.run(main())

    def test_async_cleanup_from_another_thread_runs_on_the_hosts_loop(
        self, engine: StateEngine
    ) -> None:
        ledger = AsyncLedger()
        loops: list[asyncio.AbstractEventLoop] = []

        async def acleanup(obj: Tracked) -> None:
            loops.append(asyncio.get_running_loop())
            await ledger.acleanup(obj)

        conns = engine.registry("conns", ledger.afactory, acleanup)

        async def main() -> None:
            sid = engine.open_session()
            obj = await conns.aopen(sid)
            await asyncio.to_thread(engine.close_session, sid)  # e.g. a notice thread
            await until(lambda: ledger.cleaned == {obj.serial: 1})
            assert loops == [asyncio.get_running_loop()]

        asyncio.run(main())

    def test_async_cleanup_of_a_sync_opened_object_runs_on_the_callers_loop(
        self, engine: StateEngine
    ) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.factory, ledger.acleanup)
        sid = engine.open_session()
        obj = conns.open(sid)  # no loop remembered

        async def main() -> None:
            assert conns.close(sid) is True  # sync code inside a running loop
            await until(lambda: ledger.cleaned == {obj.serial: 1})

        asyncio.run(main())

    def test_session_closed_while_an_async_factory_runs_keeps_nothing(
        self, engine: StateEngine
    ) -> None:
        ledger = AsyncLedger()
        sid = engine.open_session()

        async def afactory(s: str) -> Tracked:
            engine.close_session(sid)  # the tab closes while the connection is made
            return await ledger.afactory(s)

        conns = engine.registry("conns", afactory, ledger.acleanup)

        async def main() -> None:
            with pytest.raises(SessionExpired):
                await conns.aopen(sid)

        asyncio.run(main())
        assert len(conns) == 0
        ledger.assert_each_cleaned_once()
        assert len(ledger.cleaned) == 1

    def test_async_cleanup_after_the_loop_stopped_runs_to_completion(
        self, engine: StateEngine
    ) -> None:
        ledger = AsyncLedger()
        conns = engine.registry("conns", ledger.afactory, ledger.acleanup)
        sid = engine.open_session()
        obj = asyncio.run(conns.aopen(sid))
        engine.shutdown()  # no loop runs any more: the cleanup runs here
        assert ledger.cleaned == {obj.serial: 1}

    def test_failing_async_cleanup_is_logged(
        self, engine: StateEngine, caplog: pytest.LogCaptureFixture
    ) -> None:
        async def acleanup(obj: object) -> None:
            raise OSError("already closed")

        conns = engine.registry("conns", lambda sid: object(), acleanup)
        sids = [engine.open_session() for _ in range(2)]
        for sid in sids:
            conns.open(sid)

        async def main() -> None:
            assert await conns.aclose(sids[0]) is True

        with caplog.at_level(logging.ERROR, logger="statekit"):
            asyncio.run(main())
            engine.close_session(sids[1])
        failures = [r for r in caplog.records if r.getMessage().startswith("cleanup")]
        assert len(failures) == 2


# -- process-local objects, shared stores ------------------------------------------


@pytest.fixture
def engines(make_store: StoreFactory, clock: FakeClock) -> Iterator[Callable[..., StateEngine]]:
    """Makes engines on one store and app: each stands for a worker process."""
    made: list[StateEngine] = []

    def make(**kw: Any) -> StateEngine:
        settings: dict[str, Any] = {"idle_ttl": 60, "closed_ttl": 30, "capacity": 100, **kw}
        engine = StateEngine(make_store(), app="shop", clock=clock, **settings)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.shutdown()


class TestProcessLocal:
    def test_each_process_builds_its_own_object(
        self, engines: Callable[..., StateEngine], ledger: Ledger
    ) -> None:
        worker_a, worker_b = engines(), engines()
        reg_a = worker_a.registry("things", ledger.factory, ledger.cleanup)
        reg_b = worker_b.registry("things", ledger.factory, ledger.cleanup)
        sid = worker_a.open_session()
        with pytest.raises(SessionNotInitialized):
            reg_b.get(sid)  # opened in worker a only
        obj_a, obj_b = reg_a.open(sid), reg_b.open(sid)
        assert obj_a is not obj_b
        worker_a.close_session(sid)
        assert ledger.cleaned[obj_a.serial] == 1
        assert wait_until(lambda: ledger.cleaned[obj_b.serial] == 1)
        ledger.assert_each_cleaned_once()

    @pytest.mark.parametrize("ending", ["closed", "idle", "evicted"])
    def test_session_ended_in_another_process_is_cleaned_up_here(
        self,
        engines: Callable[..., StateEngine],
        ledger: Ledger,
        clock: FakeClock,
        ending: str,
    ) -> None:
        here = engines()
        elsewhere = engines(capacity=1)
        registry = here.registry("things", ledger.factory, ledger.cleanup)
        closed: list[tuple[str, DeleteReason]] = []
        here.on_close(lambda sid, reason: closed.append((sid, reason)))
        sid = here.open_session()
        obj = registry.open(sid)
        if ending == "closed":
            elsewhere.close_session(sid)
        elif ending == "idle":
            clock.advance(61)
            assert elsewhere.reap() == 1
        else:
            elsewhere.open_session()  # at capacity 1: evicts sid
        assert wait_until(lambda: ledger.cleaned == {obj.serial: 1})
        assert sid not in registry
        assert wait_until(lambda: closed == [(sid, DeleteReason(ending))])
        with pytest.raises(SessionExpired):
            registry.open(sid)

    @pytest.mark.parametrize("ending", ["idle", "evicted"])
    def test_session_ended_here_is_cleaned_up_here(
        self,
        engines: Callable[..., StateEngine],
        ledger: Ledger,
        clock: FakeClock,
        ending: str,
    ) -> None:
        engine = engines(capacity=1)
        registry = engine.registry("things", ledger.factory, ledger.cleanup)
        sid = engine.open_session()
        obj = registry.open(sid)
        if ending == "idle":
            clock.advance(61)
            assert engine.reap() == 1
        else:
            engine.open_session()
        assert ledger.cleaned == {obj.serial: 1}

    def test_shutdown_cleans_up_this_process_only(
        self, engines: Callable[..., StateEngine], ledger: Ledger
    ) -> None:
        worker_a, worker_b = engines(), engines()
        registry = worker_b.registry("things", ledger.factory, ledger.cleanup)
        sid = worker_a.open_session()
        serial = registry.open(sid).serial
        worker_b.shutdown()
        assert ledger.cleaned == {serial: 1}
        assert ledger.alive() == 0
        if worker_a.store.shared:  # the session lives on in the store, for other workers
            assert worker_a.exists(sid)

    def test_lost_notices_are_made_up_for_at_resync(self, clock: FakeClock) -> None:
        store = Switchboard()
        worker_a = StateEngine(store, app="shop", clock=clock)
        worker_b = StateEngine(store, app="shop", clock=clock)
        ledger = Ledger()
        registry = worker_b.registry("things", ledger.factory, ledger.cleanup)
        gone, kept = worker_a.open_session(), worker_a.open_session()
        obj_gone, obj_kept = registry.open(gone), registry.open(kept)
        store.paused = True  # worker b misses what happens next
        worker_a.close_session(gone)
        assert ledger.cleaned == {}
        store.paused = False
        store.send(Notice(kind="resync", sid="", origin="test"))
        assert ledger.cleaned == {obj_gone.serial: 1}
        assert registry.get(kept) is obj_kept
        worker_a.shutdown()
        worker_b.shutdown()

    def test_resync_that_cannot_reach_the_store_is_logged(
        self, clock: FakeClock, ledger: Ledger, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = Switchboard()
        engine = StateEngine(store, clock=clock)
        registry = engine.registry("things", ledger.factory, ledger.cleanup)
        sid = engine.open_session()
        registry.open(sid)
        store.failing = True
        with caplog.at_level(logging.ERROR, logger="statekit"):
            store.send(Notice(kind="resync", sid="", origin="test"))
        assert "could not check its sessions" in caplog.text
        assert sid in registry  # kept until the store answers
        assert ledger.cleaned == {}

    def test_a_resync_the_store_failed_runs_again_when_a_session_ends(
        self, clock: FakeClock
    ) -> None:
        """A session that ended while notices were lost, and the resync that should
        have found it failing (the store unreachable): when the store answers again
        and another session ends, the check runs again and cleans up the object of the
        one missed. Fails if the failed resync was given up for good (the object would
        live as long as the process), or ran on the thread that ended the session."""
        store = Switchboard()
        worker_a = StateEngine(store, app="shop", clock=clock)
        worker_b = StateEngine(store, app="shop", clock=clock)
        ledger = Ledger()
        threads: list[threading.Thread] = []

        def cleanup(obj: Any) -> None:
            threads.append(threading.current_thread())
            ledger.cleanup(obj)

        registry = worker_b.registry("things", ledger.factory, cleanup)
        gone, kept, later = (worker_a.open_session() for _ in range(3))
        obj_gone, obj_kept = registry.open(gone), registry.open(kept)
        store.paused = True  # worker b misses the close
        worker_a.close_session(gone)
        store.paused = False
        store.failing = True
        store.send(Notice(kind="resync", sid="", origin="test"))
        assert ledger.cleaned == {}
        store.failing = False
        worker_a.close_session(later)  # its notice reaches worker b
        deadline = time.monotonic() + 10
        while obj_gone.serial not in ledger.cleaned:
            assert time.monotonic() < deadline, "the resync never ran again"
            time.sleep(0.01)
        assert ledger.cleaned == {obj_gone.serial: 1}
        assert registry.get(kept) is obj_kept
        # Not on the thread that ended the session (here the caller's own: the notice
        # is delivered at once; an event loop's, in an async app), which would wait
        # for a look at every session.
        assert threads[-1] is not threading.current_thread()
        worker_a.shutdown()
        worker_b.shutdown()


# -- memory ----------------------------------------------------------------------


CYCLES = 100_000
STATEKIT = str(Path(__file__).resolve().parent.parent / "statekit")


def test_100000_open_close_cycles_leave_memory_flat(clock: FakeClock) -> None:
    """Page load, a click, tab close, 100,000 times: no object outlives its session,
    the registry's tables empty out, and the engine's own allocations stay flat."""
    engine = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=1000)
    alive: weakref.WeakSet[NonDeepCopyable] = weakref.WeakSet()
    cleaned = 0

    def factory(sid: str) -> NonDeepCopyable:
        obj = NonDeepCopyable()
        alive.add(obj)
        return obj

    def cleanup(obj: NonDeepCopyable) -> None:
        nonlocal cleaned
        cleaned += 1

    counters = engine.registry("counter", factory, cleanup)
    engine.on_open(counters.open)

    def cycles(n: int) -> None:
        for _ in range(n):
            sid = engine.open_session()
            with engine.event(sid) as ev:
                ev[counters].increment()
            engine.close_session(sid)

    measured = 10_000  # the last cycles, traced (tracing slows every allocation)
    cycles(CYCLES - measured)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        cycles(measured)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert cleaned == CYCLES
    assert len(alive) == 0
    assert len(counters) == 0
    assert counters._flights == {}
    assert engine.stats().held == 0
    # The memory store remembers ended ids (bounded: TOMBSTONES); the engine, events,
    # locks and registry must not grow at all.
    ours = [
        stat
        for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename.startswith(STATEKIT)
        and not stat.traceback[0].filename.endswith("memory.py")
    ]
    growth = sum(stat.size_diff for stat in ours)
    assert growth < 16 * 1024, ours
    engine.shutdown()
